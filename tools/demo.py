#!/usr/bin/env python3
"""The end-to-end demo (the README's main command runs it through tools/demo.sh).

1. generate an SFT task a tiny model learns in minutes on a CPU — reverse a short sequence of
   letters — and train a sentencepiece tokenizer on it; draw held-out examples (another seed, none
   in the training data);
2. build a tiny Llama model from a transformers config (no download) and save it as a Hugging
   Face directory; convert it to meshtron's native (Megatron torch_dist) layout; score the
   untrained model on the held-out examples with transformers;
3. SFT it at cp=2 (zigzag ring) × tp=2 on 4 CPU processes — and, for the plot, at SP = 1, 2, 4
   on the same data: the three loss curves must overlap (sequence parallelism never changes the
   math);
4. DPO from the SFT weights at cp=2 × tp=2, export to Hugging Face;
5. load the export with transformers, show a few answers and print its held-out accuracy before
   and after training (exact match of the whole greedy answer).

    python tools/demo.py [--out runs/demo] [--sft-steps 250] [--dpo-steps 10]
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
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 3, 6  # letters per sequence: a tiny model reverses these reliably within the demo


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def task(rng: random.Random) -> tuple[str, str, str]:
    """``(prompt, answer, rejected)``: reverse 3–6 random letters; the rejected answer is the letters
    as given (the copy a model makes before it learns to reverse). The answer is a function of the
    prompt alone, so it cannot be memorised without reading it."""
    seq = [rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]
    return f"reverse : {' '.join(seq)}", " ".join(reversed(seq)), " ".join(seq)


def held_out(seed: int, n: int, train_prompts: set[str]) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, answer)`` examples drawn with ``seed``, none of whose prompts the
    training data holds."""
    rng, out, seen = random.Random(seed), [], set(train_prompts)
    while len(out) < n:
        prompt, answer, _ = task(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def chance(examples: list[tuple[str, str]]) -> float:
    """Exact-match accuracy of guessing each answer letter uniformly (the right length given)."""
    return sum(len(LETTERS) ** -len(answer.split()) for _, answer in examples) / len(examples)


def make_tokenizer(out: str, texts) -> str:
    """A sentencepiece BPE tokenizer trained on ``texts`` with the demo's chat template, saved as a
    transformers tokenizer directory ``out/tokenizer``; every letter is one piece."""
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    corpus = os.path.join(out, "corpus.txt")
    with open(corpus, "w") as f:
        f.writelines(t + "\n" for t in texts)
    # vocab_size is a ceiling (hard_vocab_limit off): the corpus has ~76 pieces, each letter one
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(out, "spm"), vocab_size=96,
                                   hard_vocab_limit=False, model_type="bpe",
                                   user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>"],
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    tok = SentencePieceBackend(vocab_file=os.path.join(out, "spm.model"), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = TEMPLATE
    split = [c for c in LETTERS if len(tok(" " + c, add_special_tokens=False)["input_ids"]) != 1]
    assert not split, f"letters {split} are not single pieces"
    tok_dir = os.path.join(out, "tokenizer")
    tok.save_pretrained(tok_dir)
    print(f"sentencepiece tokenizer of {len(tok)} pieces")
    return tok_dir


def make_data(out: str, args) -> tuple[str, list[tuple[str, str]]]:
    """SFT and DPO records in ``out``, the tokenizer, and the held-out examples."""
    rng = random.Random(args.seed)
    sft = [task(rng) for _ in range(args.records)]
    dpo = [t for t in (task(rng) for _ in range(args.records // 4)) if t[1] != t[2]]  # no palindromes
    tok_dir = make_tokenizer(out, [" ".join(t[:2]) for t in sft])
    with open(os.path.join(out, "sft.jsonl"), "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}) + "\n"
                     for prompt, answer, _ in sft)
    with open(os.path.join(out, "dpo.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in dpo)
    examples = held_out(args.seed + 1, args.eval_examples, {t[0] for t in sft + dpo})
    print(f"{len(sft)} SFT conversations, {len(dpo)} preference pairs, {len(examples)} held-out examples; "
          f"e.g. {sft[0][0]!r} -> {sft[0][1]!r}")
    return tok_dir, examples


def make_model(out: str, tok_dir: str) -> str:
    """A randomly initialised tiny Llama with the tokenizer, as the Hugging Face directory
    ``out/hf_init``: the step-0 weights every run starts from. Two layers are enough to reverse
    and twice as fast as four: on CPU the step time is mostly per-layer overhead."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
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


def write_config(path: str, mg_dir: str, data: str, recipe: str, tok_dir: str, args) -> str:
    """The run's YAML: the checkpoint's model, the demo's data and its optimizer settings. SFT
    packs many short conversations per sequence; a DPO pair fills one sequence of its own, so a
    short one suffices."""
    from convert.megatron_io import load_megatron
    from engine.config import dump_yaml, load_config

    _, model, _ = load_megatron(mg_dir)
    overrides = [f"model.{k}={json.dumps(v)}" for k, v in model.items() if k != "load"]
    if recipe == "sft":
        recipe_overrides = ["data.format=messages", f"data.seq_len={args.seq_len}",
                            f"train.global_batch_size={args.global_batch}",
                            f"train.micro_batch_size={args.global_batch}", f"optim.lr={args.lr}",
                            f"optim.min_lr={args.lr / 10}", "optim.warmup_steps=10"]
    else:
        # a small step: at the SFT's rates DPO pushes the rejected copy's already improbable tokens
        # further down, which moves probability onto other wrong letters (99% -> 93% measured)
        recipe_overrides = ["data.format=preference", "data.seq_len=64", "train.global_batch_size=16",
                            "train.micro_batch_size=8", "optim.lr=5e-5", "optim.min_lr=5e-6", "optim.warmup_steps=2",
                            "dpo.beta=0.5"]
    cfg = load_config(None, overrides + recipe_overrides + [
        f"recipe={recipe}", f"model.load={mg_dir}", "data.source=files", f"data.path={data}",
        f"data.tokenizer={tok_dir}", "optim.weight_decay=0.0"])
    dump_yaml(cfg, path)
    return path


def accuracy(model, tokenizer, examples: list[tuple[str, str]], show: int = 0, batch_size: int = 50) -> float:
    """Exact-match accuracy of ``model``'s greedy answers to ``examples`` (``(prompt, answer)``
    pairs): after the chat template's assistant prompt, ``model.generate`` (batches left-padded)
    must write the whole answer and then the end-of-sequence token. Prints the first ``show``
    replies."""
    import torch
    from tqdm import tqdm

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in examples) + 2
    right, shown = 0, []
    batches = range(0, len(examples), batch_size)
    for b in tqdm(batches, desc="greedy answers", unit="batch", leave=False, file=sys.stderr, disable=len(batches) < 3):
        batch = examples[b:b + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for p, _ in batch]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        for (prompt, answer), row in zip(batch, out[:, width:].tolist()):
            stopped = eos in row
            row = row[:row.index(eos)] if stopped else row
            # an untrained model may pick ids past the tokenizer's (the vocabulary is padded)
            reply = tokenizer.decode([t if t < len(tokenizer) else tokenizer.unk_token_id for t in row]).strip()
            right += stopped and reply == answer
            if len(shown) < show:
                shown.append(f"  {prompt!r:28} expected {answer!r:16} model says {reply!r}{'' if stopped else ' ...'}")
    print("\n".join(shown), end="\n" if shown else "")  # after the progress bar is gone
    return right / len(examples)


def hf_accuracy(hf_dir: str, examples: list[tuple[str, str]], show: int = 0) -> float:
    """:func:`accuracy` of the Hugging Face model directory ``hf_dir``, loaded with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    return accuracy(model, tok, examples, show)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--sp-steps", type=int, default=20, help="steps of the SP = 1, 2, 4 runs of the loss plot")
    ap.add_argument("--dpo-steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per packed SFT sequence")
    ap.add_argument("--global-batch", type=int, default=4, help="SFT sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="SFT peak learning rate")
    ap.add_argument("--records", type=int, default=8000, help="SFT conversations (a quarter as many DPO pairs)")
    ap.add_argument("--eval-examples", type=int, default=200, help="held-out examples scored before and after")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    start = time.perf_counter()
    out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    say("1. data (reverse 3-6 letters), held-out examples and a sentencepiece tokenizer")
    tok_dir, examples = make_data(out, args)
    say("2. tiny Llama from a transformers config -> Hugging Face dir -> native (Megatron torch_dist)")
    hf_dir = make_model(out, tok_dir)
    before = hf_accuracy(hf_dir, examples)
    print(f"step-0 weights ({hf_dir}): {before:.1%} of {len(examples)} held-out examples reversed exactly")
    mg = os.path.join(out, "megatron_init")
    run([sys.executable, "-m", "convert.cli", "hf-to-megatron", "--hf", hf_dir, "--out", mg])
    sft_cfg = write_config(os.path.join(out, "sft.yaml"), mg, os.path.join(out, "sft.jsonl"), "sft", tok_dir, args)

    say("3. SFT at cp=2 (zigzag ring) x tp=2 on 4 processes, then SP = 1, 2, 4 on the same data")
    sft_hf = os.path.join(out, "hf_sft")
    train(sft_cfg, 4, f"train.steps={args.sft_steps}", "parallel.cp=2", "parallel.tp=2",
          f"train.output_dir={out}/sft_cp2_tp2", f"checkpoint.export_hf={sft_hf}")
    curves = {}
    for sp in (1, 2, 4):
        run_dir = f"{out}/sft_sp{sp}"
        train(sft_cfg, sp, f"train.steps={args.sp_steps}", f"sequence_parallel_size={sp}",
              "sequence_parallel_mode=zigzag-ring", f"train.output_dir={run_dir}", "checkpoint.save_final=false")
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
                           os.path.join(out, "dpo.jsonl"), "dpo", tok_dir, args)
    final = os.path.join(out, "hf_final")
    train(dpo_cfg, 4, f"train.steps={args.dpo_steps}", "parallel.cp=2", "parallel.tp=2",
          f"train.output_dir={out}/dpo_cp2_tp2", f"checkpoint.export_hf={final}")

    say("5. the exported models, loaded with transformers, reverse held-out letters (greedy, exact match)")
    after_sft = hf_accuracy(sft_hf, examples)
    after = hf_accuracy(final, examples, show=5)
    print(f"accuracy before: {before:.1%} (chance {chance(examples):.3%})  after SFT: {after_sft:.1%}  "
          f"after SFT + DPO: {after:.1%} on {len(examples)} held-out examples")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
