"""``meshtron-plan``: memory per rank and estimated step time of every mesh that fits, fastest first.

    meshtron-plan --model qwen2.5-7b --gpus 8 --gpu-memory-gb 80 --seq-len 131072 --recipe sft
    meshtron-plan --model configs/qwen2.5-7b-sft-128k.yaml --gpus 16 --max-seq-len --tp 2 --cp 8
    meshtron-plan --validate-360lf
    meshtron-plan --simulate configs/qwen2.5-72b-sft-128k.yaml [section.key=value ...] [--rank R ...] [--json]

``--model`` is a known name (qwen2.5-7b/14b/72b, llama3-8b/70b, mistral-7b), a meshtron YAML or a
Hugging Face config.json (or its folder). Memory is in GiB per rank: params, grads, optimizer
(device part), saved activations, the loss working set, CP buffers, and fixed = CUDA context +
NCCL + the allocator's fragmentation reserve (engine/plan/devices.py). ``--validate-360lf`` prints
the model of 360-LLaMA-Factory's memory beside its published maxima (a report: exit 0). ``--simulate CONFIG`` runs the engine's own training step for
ranks of the configured world under fake tensors and a fake process group (engine/plan/simulate.py)
and prints its peak memory beside this planner's prediction; exit 0 when it fits the config's GPU,
1 when it does not, 2 on bad input. Also ``python -m engine.plan.cli``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from engine.plan import lf360
from engine.plan.activations import RECOMPUTE
from engine.plan.devices import ALLOCATOR_FRAGMENTATION, DEVICES, GIB
from engine.plan.memory import COMPONENTS, Mesh, Run, rank_memory
from engine.plan.models import resolve_model
from engine.plan.search import max_seq_len, mesh_problem, plan

SHARDING = ("none", "zero1", "fsdp2")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="meshtron-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="known name, meshtron YAML or HF config.json / folder")
    ap.add_argument("--gpus", type=int, help="number of GPUs")
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="memory of one GPU in GiB (default 80; --simulate: the config's hardware.gpu)")
    ap.add_argument("--gpu", choices=sorted(DEVICES), default="a100", help="throughput/bandwidth constants")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (DPO: the chosen+rejected pair)")
    ap.add_argument("--recipe", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=list(RECOMPUTE))
    ap.add_argument("--sharding", nargs="+", choices=SHARDING,
                    help="optimizer sharding over dp x cp to try (default: all; zero1 with --offload)")
    ap.add_argument("--offload", action="store_true", help="optimizer states in host memory (needs zero1)")
    ap.add_argument("--fp32", action="store_true", help="fp32 parameters and activations (default bf16)")
    ap.add_argument("--global-batch", type=int, default=0, help="sequences per step (0: one per GPU)")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--pp-schedule", choices=("1f1b", "interleaved", "seq1f1b"), default="1f1b")
    ap.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (interleaved)")
    ap.add_argument("--seq-chunks", type=int, default=1, help="Seq1F1B units per micro-batch")
    for axis in ("tp", "cp", "hp", "pp"):
        ap.add_argument(f"--{axis}", type=int, help=f"pin the {axis} degree (default: try all)")
    ap.add_argument("--max-seq-len", action="store_true", help="print the longest seq_len the mesh holds")
    ap.add_argument("--fragmentation", type=float, default=ALLOCATOR_FRAGMENTATION,
                    help="share of GPU memory lost to allocator fragmentation")
    ap.add_argument("--top", type=int, default=20, help="rows to print")
    ap.add_argument("--validate-360lf", action="store_true", help="compare with 360-LLaMA-Factory's maxima")
    ap.add_argument("--simulate", metavar="CONFIG",
                    help="run one training step of ranks of this config's world under fake tensors and report "
                         "their peak memory, host syncs and NCCL breaches")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (--simulate)")
    ap.add_argument("--rank", type=int, action="append",
                    help="global rank to simulate (repeatable; default: the first rank of the first and of the "
                         "last pipeline stage)")
    ap.add_argument("--json", action="store_true", help="--simulate: print only the JSON line")
    return ap.parse_args(argv)


def check_args(a) -> None:
    """One clear error per bad flag (ValueError naming it)."""
    if a.validate_360lf or a.simulate:
        return
    if a.overrides:
        raise ValueError(f"unexpected arguments {a.overrides}: section.key=value overrides go with --simulate CONFIG")
    if a.gpu_memory_gb is None:
        a.gpu_memory_gb = 80.0
    if a.model is None:
        raise ValueError("--model is required (a known name, a meshtron YAML or a HF config.json)")
    for flag, value, low in (("--gpus", a.gpus, 1), ("--gpu-memory-gb", a.gpu_memory_gb, 1e-9),
                             ("--gpus-per-node", a.gpus_per_node, 1), ("--micro-batch-size", a.micro_batch_size, 1),
                             ("--vpp", a.vpp, 1), ("--seq-chunks", a.seq_chunks, 1), ("--top", a.top, 1),
                             ("--global-batch", a.global_batch, 0)):
        if value is None or value < low:
            raise ValueError(f"{flag} must be given and >= {low:g} (got {value})")
    if not a.max_seq_len and (a.seq_len is None or a.seq_len < 2):
        raise ValueError(f"--seq-len must be given and >= 2 (got {a.seq_len}), or use --max-seq-len")
    if not 0 <= a.fragmentation < 1:
        raise ValueError(f"--fragmentation must be in [0, 1) (got {a.fragmentation})")
    for axis in ("tp", "cp", "hp", "pp"):
        v = getattr(a, axis)
        if v is not None and (v < 1 or a.gpus % v):
            raise ValueError(f"--{axis} {v} must be a positive divisor of --gpus {a.gpus}")
    if a.offload and a.sharding not in (None, ["zero1"]):
        raise ValueError(f"--offload needs --sharding zero1 (got {' '.join(a.sharding)}): the ZeRO-1 optimizer "
                         f"is what keeps the optimizer states in host memory")
    if a.sharding is None:
        a.sharding = ["zero1"] if a.offload else list(SHARDING)
    if a.vpp > 1 and a.pp_schedule != "interleaved":
        raise ValueError("--vpp > 1 needs --pp-schedule interleaved")
    if a.seq_chunks > 1 and a.pp_schedule != "seq1f1b":
        raise ValueError("--seq-chunks > 1 needs --pp-schedule seq1f1b")


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def _mesh(mesh: Mesh) -> str:
    return f"{mesh.tp:>3} {mesh.cp:>3} {f'{mesh.hp}x{mesh.rp}':>6} {mesh.pp:>3} {mesh.dp:>3}"


HEADER = (f"{'tp':>3} {'cp':>3} {'hp x rp':>6} {'pp':>3} {'dp':>3}  {'recompute':<16} {'sharding':<8} "
          + " ".join(f"{c[:7]:>7}" for c in COMPONENTS) + f" {'fixed':>7} {'total':>7}  {'phase':<9} {'step s':>8}")


def run_plan(a, m, base: Run) -> int:
    rows, tried = [], 0
    pins = {k: getattr(a, k) for k in ("tp", "cp", "hp", "pp")}
    for recompute in a.recompute:
        for sharding in a.sharding:
            run = dataclasses.replace(base, recompute=recompute, sharding=sharding)
            fits, n = plan(m, a.gpus, run, a.gpu_memory_gb, DEVICES[a.gpu], a.gpus_per_node, a.vpp,
                           a.fragmentation, **pins)
            tried += n
            rows += [(c, recompute, sharding) for c in fits]
    rows.sort(key=lambda r: (r[0].time["total"], r[0].memory.total))
    print(f"{m.name}: {a.recipe}, seq_len {base.seq_len}, {a.gpus} x {a.gpu_memory_gb:g} GiB ({a.gpu}), "
          f"{'fp32' if a.fp32 else 'bf16'}; {len(rows)} of {tried} (mesh, recompute, sharding) fit; "
          f"memory in GiB per rank, fastest first")
    if not rows:
        print("nothing fits: try more GPUs, recompute full, sharding zero1/fsdp2, --offload or a shorter --seq-len")
        return 1
    print(HEADER)
    for c, recompute, sharding in rows[:a.top]:
        mem = c.memory
        print(f"{_mesh(c.mesh)}  {recompute:<16} {sharding:<8} "
              + " ".join(_gib(mem.parts[k]) for k in COMPONENTS)
              + f" {_gib(mem.fixed + mem.reserve)} {_gib(mem.total)}  {mem.phase:<9} {c.time['total']:8.3f}")
    return 0


def run_max_seq_len(a, m, base: Run) -> int:
    tp, cp, hp, pp = (getattr(a, k) or 1 for k in ("tp", "cp", "hp", "pp"))
    if a.gpus % (tp * cp * pp):
        raise ValueError(f"--tp {tp} x --cp {cp} x --pp {pp} does not divide --gpus {a.gpus}")
    mesh = Mesh(tp, cp, hp, pp, a.gpus // (tp * cp * pp), a.vpp if pp > 1 else 1)
    problem = mesh_problem(m, mesh, base, a.gpus_per_node)
    if problem:
        raise ValueError(problem)
    print(f"{m.name}: {a.recipe}, {a.gpus} x {a.gpu_memory_gb:g} GiB, mesh tp={tp} cp={cp} (hp={hp} x rp={mesh.rp}) "
          f"pp={pp} dp={mesh.dp}; longest seq_len that fits, and its memory per rank in GiB")
    print(f"{'recompute':<16} {'sharding':<8} {'max seq_len':>11} " + " ".join(f"{c[:7]:>7}" for c in COMPONENTS)
          + f" {'fixed':>7} {'total':>7}")
    for recompute in a.recompute:
        for sharding in a.sharding:
            run = dataclasses.replace(base, recompute=recompute, sharding=sharding)
            best = max_seq_len(m, mesh, run, a.gpu_memory_gb, a.fragmentation)
            mem = rank_memory(m, mesh, dataclasses.replace(run, seq_len=max(best, 1)), a.gpu_memory_gb,
                              a.fragmentation)
            print(f"{recompute:<16} {sharding:<8} {best:>11} " + " ".join(_gib(mem.parts[k]) for k in COMPONENTS)
                  + f" {_gib(mem.fixed + mem.reserve)} {_gib(mem.total)}")
    return 0


def run_validate(a) -> int:
    rows = lf360.validate(a.fragmentation)
    print("360-LLaMA-Factory published maxima (README; A800 80 GB, ZeRO-3 offload + gradient checkpointing) "
          "vs the derived memory model (engine/plan/lf360.py); cutoff_len in tokens")
    print(f"{'model':<12} {'recipe':<6} {'gpus':>4} {'sp':>3} {'published':>10} {'predicted':>10} {'error':>8}  "
          f"{'binding phase':<15} {'within 10 %':<11} {'need GiB':>8} note")
    for r in rows:
        print(f"{r['model']:<12} {r['recipe']:<6} {r['gpus']:>4} {r['sp']:>3} {r['published']:>10} "
              f"{r['predicted']:>10} {100 * r['error']:>+7.1f}%  {r['binding']:<15} {'yes' if r['ok'] else 'NO':<11} "
              f"{r['need_gib']:>8.1f} {'(a)' if r['example_setting'] else ''}")
    print("(a) 32k equals cutoff_len 32768 of 360-LF's own 360-example.sh: probably the example setting, not a "
          "searched maximum (a per-rank model cannot meet both 7B DPO rows); still counted in the exit status")
    lo, hi = min(rows, key=lambda r: r["need_gib"]), max(rows, key=lambda r: r["need_gib"])
    usable = lf360.usable_bytes(fragmentation=a.fragmentation) / lf360.GIB
    print(f"need GiB: what the model needs at the published cutoff_len; usable {usable:.1f} GiB. "
          "On the same A800s and software the rows need "
          f"{lo['need_gib']:.1f} ({lo['model']} {lo['recipe']} sp={lo['sp']}) to {hi['need_gib']:.1f} GiB "
          f"({hi['model']} {hi['recipe']} sp={hi['sp']}): in this model no single budget makes all nine tight maxima "
          "(360-LF's README calls them coarse-grained)")
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - bad} of {len(rows)} within {100 * lf360.TOLERANCE:.0f} % (a report: the published rows "
          f"contradict each other, see above; the planner is checked against meshtron's own simulated step, "
          f"meshtron-plan --simulate)")
    return 0


def run_simulate(a) -> int:
    from engine.config import ConfigError, load_config, validate
    from engine.plan import simulate

    try:
        cfg = load_config(a.simulate, a.overrides)
        cfg = validate(cfg, simulate.world_size(cfg), files=False)
    except ConfigError as e:
        raise ValueError(f"{a.simulate}: {e}") from None
    world = simulate.world_size(cfg)
    bad = [r for r in (a.rank or []) if not 0 <= r < world]
    if bad:
        raise ValueError(f"--rank {bad[0]} is not a rank of the configured world of {world} GPUs (0..{world - 1})")
    if a.gpu_memory_gb is not None and a.gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be > 0 (got {a.gpu_memory_gb})")
    report = simulate.simulate(cfg, a.rank, a.gpu_memory_gb)
    if not a.json:
        print(simulate.format_report(report, a.simulate))
    print(simulate.json_line(report, a.simulate), flush=True)
    if report["errors"]:
        return 2
    return 0 if report["fits"] else 1


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        check_args(a)
        if a.simulate:
            return run_simulate(a)
        if a.validate_360lf:
            return run_validate(a)
        m = resolve_model(a.model)
        base = Run(seq_len=a.seq_len or 2, recipe=a.recipe, offload=a.offload, bf16=not a.fp32,
                   micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch or a.gpus,
                   pp_schedule=a.pp_schedule, seq_chunks=a.seq_chunks)
        return run_max_seq_len(a, m, base) if a.max_seq_len else run_plan(a, m, base)
    except ValueError as e:
        print(f"meshtron-plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
