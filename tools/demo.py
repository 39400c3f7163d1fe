#!/usr/bin/env python3
"""The end-to-end demo (the README's main command runs it through tools/demo.sh).

1. generate a long-context key-value retrieval task and train a sentencepiece tokenizer on it;
2. build a tiny Llama model from a transformers config (no download) and save it as a Hugging
   Face directory; convert it to meshtron's native (Megatron torch_dist) layout;
3. SFT it at cp=2 (zigzag ring) × tp=2 on 4 CPU processes — and, for the plot, at SP = 1, 2, 4
   on the same data: the three loss curves must overlap (sequence parallelism never changes the
   math);
4. DPO from the SFT weights at cp=2 × tp=2, export to Hugging Face;
5. load the result with transformers and answer a few retrieval prompts.

    python tools/demo.py [--out runs/demo] [--sft-steps 30] [--dpo-steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
WORDS = "facts what is the value of answer with one word".split()


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def task(rng: random.Random, num_facts: int, num_keys: int = 400):
    keys = rng.sample(range(num_keys), num_facts)
    values = {k: rng.randrange(100) for k in keys}
    asked = rng.choice(keys)
    other = rng.choice([k for k in keys if values[k] != values[asked]] or [asked])
    facts = " ; ".join(f"k{k} = v{values[k]}" for k in keys)
    return f"facts : {facts} . what is the value of k{asked} ?", f"v{values[asked]}", f"v{values[other]}"


def make_data(out: str, args) -> str:
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    rng = random.Random(args.seed)
    corpus = os.path.join(out, "corpus.txt")
    with open(corpus, "w") as f:
        for _ in range(2000):
            f.write(" ".join(task(rng, rng.randint(2, 20))[:2]) + "\n")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(out, "spm"), vocab_size=110,
                                   model_type="bpe", user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>"],
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    tok = SentencePieceBackend(vocab_file=os.path.join(out, "spm.model"), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = TEMPLATE
    tok_dir = os.path.join(out, "tokenizer")
    tok.save_pretrained(tok_dir)
    with open(os.path.join(out, "sft.jsonl"), "w") as f:
        for _ in range(args.records):
            prompt, answer, _ = task(rng, rng.randint(args.max_facts // 2, args.max_facts))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    with open(os.path.join(out, "dpo.jsonl"), "w") as f:
        for _ in range(args.records // 2):  # a pair shares one sequence: half the context each
            prompt, chosen, rejected = task(rng, rng.randint(args.max_facts // 4, args.max_facts // 3))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    text = tok.apply_chat_template([{"role": "user", "content": task(rng, args.max_facts)[0]}], tokenize=False)
    n = len(tok(text)["input_ids"])
    print(f"sentencepiece tokenizer of {len(tok)} pieces; {args.records} SFT conversations up to ~{n} tokens")
    return tok_dir


def make_model(out: str, tok_dir: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=3)
    hf_dir = os.path.join(out, "hf_init")
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    for f in os.listdir(tok_dir):
        shutil.copy2(os.path.join(tok_dir, f), hf_dir)
    return hf_dir


def run(cmd: list[str], env_extra: dict | None = None) -> None:
    env = dict(os.environ, PYTHON=sys.executable, **(env_extra or {}))
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(f"demo: step failed with exit code {r.returncode}: {' '.join(cmd)}")


def train(config: str, nproc: int, *overrides: str) -> None:
    if nproc == 1:
        run([sys.executable, "-m", "engine.cli", config, *overrides])
    else:
        run(["bash", "tools/launch.sh", config, *overrides], {"NPROC_PER_NODE": str(nproc)})


def write_config(path: str, mg_dir: str, data: str, recipe: str, args) -> str:
    from convert.megatron_io import load_megatron
    from engine.config import dump_yaml, load_config

    _, model, _ = load_megatron(mg_dir)
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in model.items() if k != "load"]
    cfg = load_config(None, overrides + [
        f"recipe={recipe}", f"model.load={mg_dir}", "data.source=files", f"data.path={data}",
        f"data.format={'messages' if recipe == 'sft' else 'preference'}", f"data.seq_len={args.seq_len}",
        "train.global_batch_size=8", "train.micro_batch_size=2", "optim.lr=2e-3", "optim.min_lr=2e-4",
        "optim.warmup_steps=3", "optim.weight_decay=0.0", "dpo.beta=0.1"])
    dump_yaml(cfg, path)
    return path


def answer_prompts(hf_dir: str, n: int, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    rng, right = random.Random(seed + 1), 0
    for _ in range(n):
        prompt, answer, _ = task(rng, rng.randint(4, 12))
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        right += reply.split()[:1] == [answer]
        print(f"  ...{prompt[-48:]!r:52} expected {answer:>4}  model says {reply!r}")
    print(f"  {right}/{n} answered correctly (a tiny model after a few CPU steps: the point is the pipeline)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--dpo-steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence")
    ap.add_argument("--max-facts", type=int, default=120, help="facts per conversation (context length)")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    start = time.perf_counter()
    out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    say("1. data and sentencepiece tokenizer")
    tok_dir = make_data(out, args)
    say("2. tiny Llama from a transformers config -> Hugging Face dir -> native (Megatron torch_dist)")
    hf_dir = make_model(out, tok_dir)
    mg = os.path.join(out, "megatron_init")
    run([sys.executable, "-m", "convert.cli", "hf-to-megatron", "--hf", hf_dir, "--out", mg])
    sft_cfg = write_config(os.path.join(out, "sft.yaml"), mg, os.path.join(out, "sft.jsonl"), "sft", args)

    say("3. SFT at cp=2 (zigzag ring) x tp=2 on 4 processes, then SP = 1, 2, 4 on the same data")
    steps = f"train.steps={args.sft_steps}"
    train(sft_cfg, 4, steps, "parallel.cp=2", "parallel.tp=2", f"train.output_dir={out}/sft_cp2_tp2")
    curves = {}
    for sp in (1, 2, 4):
        run_dir = f"{out}/sft_sp{sp}"
        train(sft_cfg, sp, steps, f"sequence_parallel_size={sp}", "sequence_parallel_mode=zigzag-ring",
              f"train.output_dir={run_dir}", "checkpoint.save_final=false")
        curves[f"SP={sp}"] = os.path.join(run_dir, "metrics.jsonl")
    from engine.metrics import plot_loss_curves, read_metrics

    png = os.path.join(out, "sft_loss_sp1_sp2_sp4.png")
    if plot_loss_curves(curves, png, "SFT loss at SP = 1, 2, 4 (same data): the curves overlap"):
        print(f"wrote {png}")
    base = [r["loss"] for r in read_metrics(curves["SP=1"])]
    for label, path in curves.items():
        worst = max(abs(a - b) / b for a, b in zip([r["loss"] for r in read_metrics(path)], base))
        print(f"  {label}: max relative difference to SP=1 over {len(base)} steps = {worst:.2e}")

    say("4. DPO from the SFT weights at cp=2 x tp=2, exported to Hugging Face")
    dpo_cfg = write_config(os.path.join(out, "dpo.yaml"), os.path.join(out, "sft_cp2_tp2", "checkpoints"),
                           os.path.join(out, "dpo.jsonl"), "dpo", args)
    final = os.path.join(out, "hf_final")
    train(dpo_cfg, 4, f"train.steps={args.dpo_steps}", "parallel.cp=2", "parallel.tp=2",
          f"train.output_dir={out}/dpo_cp2_tp2", f"checkpoint.export_hf={final}", f"data.tokenizer={tok_dir}")

    say("5. the exported model, loaded with transformers, answers retrieval prompts")
    answer_prompts(final, 5, args.seed)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
