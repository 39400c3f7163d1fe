#!/usr/bin/env python3
"""One GPU training step per sequence length: meshtron against transformers' LlamaForCausalLM (sdpa).

    python tools/bench_gpu.py [--seq 8192,16384,32768,65536] [--layers 16] [--hidden 2048] [--heads 32]
                              [--kv-heads 8] [--ffn 8192] [--vocab 32000] [--recompute none]
                              [--steps 3] [--warmup 1] [--peak-tflops T] [--no-hf]
    python tools/bench_gpu.py --device cpu --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 \\
                              --vocab 256 --seq 64,128 --peak-tflops 0.1        # smoke run, no GPU

The GPU counterpart of tools/bench_cpu.py, whose model, weights, batch and step it reuses: for every
--seq, tokens/s, model TFLOP/s, MFU and peak memory of one forward + backward + clip + AdamW step
on one sequence of --seq tokens that is ONE document (full causal attention on both sides).

The default model (1.10 B parameters, 1.04 B without the input embedding) has Llama-3.2-1B's
shapes — 16 layers, hidden 2048, 32 query / 8 KV heads of 64, SwiGLU 8192 — with Llama-2's 32000
vocabulary and untied embeddings (bench_cpu's model); the smaller vocabulary keeps transformers'
fp32 logits at 64k tokens to 8 GiB. The count is printed.

Precision (default: bf16 on CUDA, fp32 on CPU, ``--dtype``): meshtron trains as it does with
``train.bf16`` (bf16 parameters and activations, fp32 master weights and moments, fused AdamW);
transformers holds bf16 parameters, gradients and moments with ``torch.optim.AdamW(fused=True)``
(its rotary buffers stay fp32, as ``from_pretrained(dtype=bfloat16)`` leaves them). meshtron
therefore does more optimizer work and holds more memory. ``--recompute`` is meshtron's
``train.recompute``; when it is not ``none`` transformers runs with
``gradient_checkpointing_enable()`` (whole layers, the only mode it has), which the table states.

The systems run one after the other (meshtron at every length, then transformers), so that each
one's peak memory is its own (weights, gradients, optimizer state and activations); before every
length each is reset to the same initial weights with a fresh optimizer, so the step-0 losses of
the two agree at every length (to 1e-5 relative in fp32, to bf16 round-off in bf16; beyond that the
comparison is void and the exit status 1). Timed steps are bracketed by ``torch.cuda.synchronize``;
tokens/s = --seq / the median step time. An out-of-memory error at a length is reported as OOM in
that cell; the memory is freed and the run goes on.

Model FLOPs of one step (:func:`step_flops`), causal attention:
    6 · N · T  +  12 · L · a · T² / 2
N parameters without the input embedding (a lookup; the output layer is a matmul and counts),
T tokens, L layers, a = heads · head dim (the attention width). TFLOP/s = that / step time; MFU =
TFLOP/s / the GPU's dense bf16 peak (:data:`PEAK_FLOPS`, chosen from the device name; ``--peak-tflops``
overrides it and gives one to the CPU or an unknown GPU; without one, MFU is n/a). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps; n/a on CPU. The attention kernel meshtron
used is what ``engine.kernels.dispatch.select_backend`` picks for the model's q.

Progress goes to stderr; stdout gets the table, then one line of JSON: ``rows`` (one per length and
system), the parameter counts, the peak used, the device and the configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("bench_cpu", Path(__file__).with_name("bench_cpu.py"))
bench_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cpu)  # also puts the repository root on sys.path

#: Dense bf16 peak FLOP/s per GPU, by a substring of ``torch.cuda.get_device_name``; first match wins.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
#: Step-0 losses of the two systems may differ by this much (relative) before the comparison is void.
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
MODEL_DEFAULTS = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "ffn": 8192, "vocab": 32000}
OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
GIB = 2**30


def step_flops(num_params: int, num_layers: int, attn_width: int, seq: int) -> float:
    """Model FLOPs of one training step on one causal ``seq``-token document: 6·N·T for the
    matmuls (forward 2, backward 4 per parameter and token) plus 12·L·a·T²/2 for the scores and
    the weighted sum (forward 4·a·T² per layer, backward twice that, halved by the causal mask).
    ``num_params`` excludes the input embedding; ``attn_width`` is heads × head dim."""
    return 6.0 * num_params * seq + 12.0 * num_layers * attn_width * seq * seq / 2


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> float | None:
    """The peak FLOP/s MFU is measured against: ``--peak-tflops``, else the table's (bf16 on a
    CUDA device only), else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default in MODEL_DEFAULTS.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--seq", default="8192,16384,32768,65536",
                    help="comma-separated tokens of the one sequence (one document), one row pair each")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per system and length")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per system and length first")
    ap.add_argument("--recompute", default="none", choices=("none", "full", "selective", "attention-cached"),
                    help="meshtron's train.recompute (transformers: gradient checkpointing unless none)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for MFU (default: from the GPU's name; none on CPU)")
    ap.add_argument("--no-hf", action="store_true", help="time meshtron alone")
    args = ap.parse_args(argv)
    for name in (*MODEL_DEFAULTS, "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.seq = [int(s) for s in args.seq.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seq must be comma-separated integers, got {args.seq!r}")
    if not args.seq or min(args.seq) < 2:
        ap.error(f"--seq needs lengths >= 2, got {args.seq}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    return args


def make_cfg(args, seq: int):
    """bench_cpu's config at ``seq`` tokens, in ``--dtype``."""
    return bench_cpu.make_cfg(argparse.Namespace(**{**vars(args), "seq": seq}))


def reset_meshtron(system, cfg, canonical, batches, total_steps) -> None:
    from engine.optim import MeshOptimizer

    system.opt = None  # free the old masters and moments before the new ones
    for chunk in system.model:
        chunk.load_canonical(canonical)
    system.cfg, system.batches = cfg, batches
    system.opt = MeshOptimizer(system.model, cfg.optim, system.mesh, total_steps)


def build_transformers(cfg, canonical, tokens, dtype, recompute):
    with torch.device(tokens.device):
        system = bench_cpu.Transformers(cfg, canonical, tokens)
    system.model.to(tokens.device)
    for p in system.model.parameters():  # parameters only: the rotary buffers stay fp32
        p.data = p.data.to(dtype)
    system.model.config.use_cache = False  # a training step keeps no KV cache
    if recompute != "none":
        system.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return system


def reset_transformers(system, cfg, canonical, batches, total_steps) -> None:
    from convert.hf_map import canonical_to_hf

    system.model.load_state_dict(canonical_to_hf(canonical, dataclasses.asdict(cfg.model)), strict=True)
    old = system.adam
    old.state.clear()  # free the old moments before the new ones
    fused = all(p.is_cuda for p in system.params) or None
    system.adam = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                     for g in old.param_groups],
                                    **{k: old.defaults[k] for k in ("lr", "betas", "eps")}, fused=fused)
    system.ids = batches[0].tokens[None]


def drop_grads(system) -> None:
    """Free what a step that ran out of memory left behind (gradients, fp32 master gradients)."""
    for p in system.model.parameters():
        p.grad = None
    if getattr(system, "opt", None) is not None:
        system.opt.state.discard()
    gc.collect()
    torch.cuda.empty_cache()


def measure(system, device, warmup: int, steps: int, bar) -> dict:
    """``loss0`` (of the first step), ``step_s`` (each timed step) and ``peak_bytes`` (None on CPU)."""
    cuda = device.type == "cuda"

    def step():
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        loss = system.step()
        if cuda:
            torch.cuda.synchronize(device)
        return loss

    out = {"loss0": None, "step_s": [], "peak_bytes": 0 if cuda else None}
    for i in range(warmup + steps):
        loss, wall, _ = bench_cpu.timed(step)
        out["loss0"] = loss if i == 0 else out["loss0"]
        if i >= warmup:
            out["step_s"].append(wall)
            if cuda:
                out["peak_bytes"] = max(out["peak_bytes"], torch.cuda.max_memory_allocated(device))
        bar.update()
    return out


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows, args, counts, peak, device_name, hf_ckpt: bool) -> None:
    print(f"training step on {device_name}, one sequence (one document) per row: {args.layers} layers, hidden "
          f"{args.hidden}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"{counts['num_params']:,} parameters ({counts['num_params_nonembedding']:,} without the input embedding)")
    print(f"{args.dtype}, recompute={args.recompute} (transformers: gradient checkpointing {'on' if hf_ckpt else 'off'}), "
          f"median of {args.steps} steps after {args.warmup} warm-up; FLOPs 6·N·T + 12·L·a·T²/2, MFU against "
          f"{fmt(peak and peak / 1e12, '.4g')} TFLOP/s")
    print(f"{'tokens':>7} {'system':<13} {'tokens/s':>10} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9} {'loss step 0':>12} {'attention':<12}")
    for r in rows:
        oom = "OOM" if r["oom"] else "n/a"
        print(f"{r['seq']:>7} {r['system']:<13} {fmt(r['tokens_per_s'], '.1f', oom):>10} "
              f"{fmt(r['median_step_s'], '.3f', oom):>8} {fmt(r['tflops'], '.4g', oom):>8} "
              f"{fmt(r['mfu'], '.1%', oom):>6} {fmt(r['peak_mem_gib'], '.2f', oom):>9} "
              f"{fmt(r['loss0'], '.6f', oom):>12} {r['kernel']:<12}")


def compare(rows, tol: float) -> bool:
    """Print meshtron / transformers per length; False when a pair's step-0 losses disagree."""
    ok = True
    for mesh_row in (r for r in rows if r["system"] == "meshtron"):
        hf = next((r for r in rows if r["system"] == "transformers" and r["seq"] == mesh_row["seq"]), None)
        if hf is None or mesh_row["oom"] or hf["oom"]:
            continue
        rel = abs(mesh_row["loss0"] - hf["loss0"]) / abs(hf["loss0"])
        mesh_row.update(ratio=mesh_row["tokens_per_s"] / hf["tokens_per_s"], loss0_rel_diff=rel)
        print(f"{mesh_row['seq']} tokens: meshtron / transformers {mesh_row['ratio']:.3f}x tokens/s; "
              f"step-0 losses differ by {rel:.1e} (relative)")
        if rel > tol:
            print(f"at {mesh_row['seq']} tokens the two systems did not compute the same loss (tolerance "
                  f"{tol:.0e}): the comparison is void", file=sys.stderr)
            ok = False
    return ok


def make_row(name, seq, result, kernel, counts, model_cfg, peak) -> dict:
    row = {"seq": seq, "system": name, "kernel": kernel, "oom": result is None, "tokens_per_s": None,
           "median_step_s": None, "step_s": None, "tflops": None, "mfu": None, "peak_mem_gib": None, "loss0": None}
    if result is None:
        return row
    step_s = statistics.median(result["step_s"])
    flops = step_flops(counts["num_params_nonembedding"], model_cfg.num_layers,
                       model_cfg.num_attention_heads * model_cfg.head_dim, seq)
    row.update(tokens_per_s=seq / step_s, median_step_s=step_s, step_s=result["step_s"], tflops=flops / step_s / 1e12,
               mfu=peak and flops / step_s / peak, loss0=result["loss0"], flops=flops,
               peak_mem_gib=None if result["peak_bytes"] is None else result["peak_bytes"] / GIB)
    return row


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    total_steps = args.warmup + args.steps + 1
    names = ["meshtron"] + ([] if args.no_hf else ["transformers"])
    cfgs = {seq: make_cfg(args, seq) for seq in args.seq}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(device, dtype, args.peak_tflops)
    if peak is None:
        print(f"no peak FLOP/s known for {device_name}: MFU is n/a (pass --peak-tflops)", file=sys.stderr)

    print(f"building meshtron on {device} ({args.dtype})", file=sys.stderr)
    system = bench_cpu.Meshtron(cfgs[max(args.seq)], total_steps, device)  # the model does not depend on --seq
    canonical, mesh = system.canonical, system.mesh
    counts = {"num_params": sum(t.numel() for t in canonical.values())}
    counts["num_params_nonembedding"] = counts["num_params"] - canonical["embedding.word_embeddings.weight"].numel()
    from engine.kernels.dispatch import select_backend

    head_dim = cfgs[max(args.seq)].model.head_dim
    kernels = {"meshtron": select_backend(torch.empty(1, args.heads, head_dim, dtype=dtype, device=device)),
               "transformers": "sdpa"}
    print(f"{counts['num_params'] / 1e9:.3f} B parameters; meshtron's attention kernel: {kernels['meshtron']}",
          file=sys.stderr)

    rows = []
    bar = tqdm(total=len(names) * len(args.seq) * (args.warmup + args.steps), desc="steps", unit="step",
               file=sys.stderr)
    for name in names:
        if name == "transformers":
            print(f"building transformers on {device} ({args.dtype})", file=sys.stderr)
            tokens = bench_cpu.one_document(cfgs[args.seq[0]], mesh)[0].tokens
            system = build_transformers(cfgs[args.seq[0]], canonical, tokens, dtype, args.recompute)
        reset = reset_meshtron if name == "meshtron" else reset_transformers
        for seq in args.seq:
            bar.set_postfix_str(f"{name} {seq}")
            done, result = bar.n, None
            try:
                reset(system, cfgs[seq], canonical, bench_cpu.one_document(cfgs[seq], mesh), total_steps)
                result = measure(system, device, args.warmup, args.steps, bar)
            except RuntimeError as err:  # OutOfMemoryError is one; so are cuBLAS' failed allocations
                if not (isinstance(err, OOM) or "out of memory" in str(err) or "ALLOC_FAILED" in str(err)):
                    raise
            # out of the except block: its traceback no longer holds the step's tensors
            if result is None:
                drop_grads(system)
                bar.update(done + args.warmup + args.steps - bar.n)
                print(f"{name} ran out of memory at {seq} tokens", file=sys.stderr)
            rows.append(make_row(name, seq, result, kernels[name], counts, cfgs[seq].model, peak))
        system = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()

    rows.sort(key=lambda r: (r["seq"], names.index(r["system"])))
    print_table(rows, args, counts, peak, device_name, hf_ckpt=args.recompute != "none" and not args.no_hf)
    ok = compare(rows, LOSS_TOL[dtype])
    report = {"rows": rows, **counts, "peak_flops": peak, "device": device_name,
              "flops_formula": "6*N*T + 12*L*a*T^2/2", "config": vars(args)}
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
