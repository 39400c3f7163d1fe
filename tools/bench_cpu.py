#!/usr/bin/env python3
"""One CPU training step: meshtron against transformers' LlamaForCausalLM (sdpa), tokens/s.

    python tools/bench_cpu.py [--layers 4] [--hidden 256] [--heads 8] [--kv-heads 2] [--ffn 688]
                              [--vocab 4096] [--seq 4096] [--threads 1] [--steps 5] [--warmup 1]
                              [--recompute none] [--no-hf] [--profile N]

Same work on both sides, in one process:
- the same Llama model (fp32, untied embeddings, RMSNorm eps 1e-5, rope base 10000) with the same
  weights: meshtron's initial canonical weights, converted to transformers' layout;
- the same batch: one sequence of --seq tokens that is ONE document, so both compute full causal
  attention over all of it (a packed sequence would give meshtron, which never attends across
  documents, less work);
- the same step: forward, backward, gradient norm clipped at optim.clip_grad, AdamW with meshtron's
  lr, betas, eps and weight decay (meshtron: ``MeshOptimizer.step()``; transformers:
  ``clip_grad_norm_`` + ``torch.optim.AdamW``); the batch is built before the clock starts;
- the same threads (``torch.set_num_threads(--threads)``).

After --warmup untimed steps each, the timed steps alternate (meshtron, transformers, meshtron,
…) so a busy machine slows both alike. Per step the wall time and this process's CPU time are
recorded; tokens/s = --seq / the median wall time (the CPU-time figures are less sensitive to
other processes on a shared machine). The step-0 losses of both must agree (same math).
meshtron's CPU attention kernel (fused or blocked, per direction) is chosen by measurement the
first time a shape is met (engine/kernels/reference.py; in the warm-up step by default) and cached
on disk; the benchmark prints the choice, where it came from (measured, cache or pinned by
``MESHTRON_CPU_ATTN``) and the measured seconds per kernel.
The last line is JSON: ``tokens_per_s`` (meshtron's, wall), ``hf_tokens_per_s``, ``ratio`` and
the CPU-time equivalents, the losses, ``attention_kernels`` and the configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=4096, help="tokens of the one sequence (one document)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both systems")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per system")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per system first")
    ap.add_argument("--recompute", default="none", choices=("none", "full", "selective", "attention-cached"),
                    help="meshtron's train.recompute")
    ap.add_argument("--no-hf", action="store_true", help="time meshtron alone")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more meshtron step and list its N costliest ops")
    args = ap.parse_args(argv)
    for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "threads", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq < 2:
        ap.error(f"--seq must be >= 2, got {args.seq}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_cfg(args):
    from engine.config import load_config, validate

    seq = args.seq
    over = ["model.arch=llama", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.kv_heads}",
            f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}",
            f"model.max_position_embeddings={max(seq, 4096)}", "model.tie_word_embeddings=false",
            f"data.seq_len={seq}", f"data.min_doc_len={seq}", f"data.max_doc_len={seq}",
            "train.global_batch_size=1", "train.micro_batch_size=1",
            f"train.bf16={'true' if getattr(args, 'dtype', 'fp32') == 'bf16' else 'false'}",
            f"train.recompute={args.recompute}", "parallel.dp=1"]
    return validate(load_config(None, over), 1)


def one_document(cfg, mesh) -> list:
    """Step 0's batch: one micro-batch holding one ``data.seq_len``-token document, on the mesh's device."""
    from engine.train import build_dataset, rank_micro_batches

    batches = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    assert len(batches) == 1 and batches[0].doc_lens == [cfg.data.seq_len], "one document"
    return batches


class Meshtron:
    """meshtron's single-process training step (engine.train's forward_backward + MeshOptimizer)."""

    def __init__(self, cfg, total_steps: int, device: torch.device | str = "cpu"):
        from engine.mesh import ParallelMesh
        from engine.model.gpt import init_canonical
        from engine.optim import MeshOptimizer
        from engine.train import build_model

        self.cfg, self.mesh = cfg, ParallelMesh.single(device)
        self.model = build_model(cfg, self.mesh)
        self.canonical = init_canonical(self.model[0], cfg.train.seed)
        self.opt = MeshOptimizer(self.model, cfg.optim, self.mesh, total_steps)
        self.batches = one_document(cfg, self.mesh)

    def step(self) -> float:
        from engine.train import forward_backward

        loss, _ = forward_backward(self.model, self.batches, self.mesh, self.cfg.parallel)
        self.opt.step()
        return float(loss)  # a device tensor; reading it also ends the timed step on a GPU


class Transformers:
    """transformers' LlamaForCausalLM (sdpa) with meshtron's weights, batch and optimizer settings."""

    def __init__(self, cfg, canonical: dict, tokens: torch.Tensor):
        import transformers

        from convert.hf_map import canonical_to_hf, hf_config_from_model_config

        model_dict = dataclasses.asdict(cfg.model)
        hf_cfg = hf_config_from_model_config(model_dict)
        self.model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        self.model.load_state_dict(canonical_to_hf(canonical, model_dict), strict=True)
        self.model.train()
        o = cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.clip = o.clip_grad
        self.adam = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.ids = tokens[None]  # labels = ids: transformers shifts them inside, as meshtron's I-2 does

    def step(self) -> float:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        return float(loss.detach())


def timed(step) -> tuple[float, float, float]:
    """``(loss, wall seconds, CPU seconds of this process)`` of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    return loss, time.perf_counter() - w0, time.process_time() - c0


def attention_kernels() -> dict:
    """meshtron's CPU attention kernel per shape bucket this process used (see the docstring)."""
    from engine.kernels.reference import TUNER

    return TUNER.decisions()


def describe_kernels(kernels: dict) -> list[str]:
    lines = []
    for bucket, d in kernels.items():
        timed = ", ".join(f"{name} {s:.4f} s" for name, s in (d["seconds"] or {}).items())
        lines.append(f"  {bucket}: {d['choice']} ({d['source']}{'; ' + timed if timed else ''})")
    return lines or ["  none (no CPU attention ran)"]


def profile_step(step, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = make_cfg(args)
    systems = {"meshtron": Meshtron(cfg, args.warmup + args.steps + 1)}
    if not args.no_hf:
        m = systems["meshtron"]
        systems["transformers"] = Transformers(cfg, m.canonical, m.batches[0].tokens)
    losses = {name: [] for name in systems}
    wall = {name: [] for name in systems}
    cpu = {name: [] for name in systems}
    total = (args.warmup + args.steps) * len(systems)
    with tqdm(total=total, desc="steps", unit="step", file=sys.stderr) as bar:
        for i in range(args.warmup + args.steps):
            for name, system in systems.items():
                bar.set_postfix_str(name)
                loss, w, c = timed(system.step)
                losses[name].append(loss)
                if i >= args.warmup:
                    wall[name].append(w)
                    cpu[name].append(c)
                bar.update()

    rows = {}
    for name in systems:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rows[name] = {"tokens_per_s": args.seq / w, "cpu_tokens_per_s": args.seq / c, "median_step_s": w,
                      "median_cpu_s": c, "step_s": wall[name], "cpu_s": cpu[name], "loss0": losses[name][0]}
    print(f"training step on CPU: one {args.seq}-token sequence (one document), {args.layers} layers, "
          f"hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"fp32, {args.threads} thread(s), recompute={args.recompute}; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'system':<13} {'tokens/s':>10} {'step s':>8} {'CPU tok/s':>10} {'CPU s':>8} {'loss step 0':>12}")
    for name, r in rows.items():
        print(f"{name:<13} {r['tokens_per_s']:>10.1f} {r['median_step_s']:>8.3f} {r['cpu_tokens_per_s']:>10.1f} "
              f"{r['median_cpu_s']:>8.3f} {r['loss0']:>12.6f}")
    kernels = attention_kernels()
    print("meshtron's attention kernels (bucket: choice (source; measured seconds per kernel, one KV group)):")
    print("\n".join(describe_kernels(kernels)))
    report = {"tokens_per_s": rows["meshtron"]["tokens_per_s"], "attention_kernels": kernels,
              "cpu_tokens_per_s": rows["meshtron"]["cpu_tokens_per_s"], "meshtron": rows["meshtron"],
              "config": {k: v for k, v in vars(args).items() if k not in ("profile", "no_hf")}}
    status = 0
    if "transformers" in rows:
        hf = rows["transformers"]
        report.update(hf_tokens_per_s=hf["tokens_per_s"], hf_cpu_tokens_per_s=hf["cpu_tokens_per_s"],
                      ratio=rows["meshtron"]["tokens_per_s"] / hf["tokens_per_s"],
                      cpu_ratio=rows["meshtron"]["cpu_tokens_per_s"] / hf["cpu_tokens_per_s"], transformers=hf)
        rel = abs(rows["meshtron"]["loss0"] - hf["loss0"]) / abs(hf["loss0"])
        report["loss0_rel_diff"] = rel
        print(f"meshtron / transformers: {report['ratio']:.3f}x tokens/s (wall), {report['cpu_ratio']:.3f}x "
              f"(CPU time); step-0 losses differ by {rel:.1e} (relative)")
        if rel > 1e-5:
            print("the two systems did not compute the same loss: the comparison is void", file=sys.stderr)
            status = 1
    if args.profile:
        print(f"\nmeshtron's costliest ops, one more step:\n{profile_step(systems['meshtron'].step, args.profile)}")
    print(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
