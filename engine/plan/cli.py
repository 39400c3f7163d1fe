"""``meshtron-plan``: memory per rank and estimated step time of every mesh that fits, fastest first.

    meshtron-plan --model qwen2.5-7b --gpus 8 --gpu-memory-gb 80 --seq-len 131072 --recipe sft
    meshtron-plan --model configs/qwen2.5-7b-sft-128k.yaml --gpus 16 --max-seq-len --tp 2 --cp 8
    meshtron-plan --model llama3-8b --gpus 8 --recipe sft --max-seq-len --json --emit-config long.yaml
    meshtron-plan --validate-360lf
    meshtron-plan --simulate configs/qwen2.5-72b-sft-128k.yaml [section.key=value ...] [--rank R ...]
                  [--steady-state] [--json]

``--model`` is a known name (qwen2.5-7b/14b/72b, qwen3-0.6b/1.7b/4b/8b/14b/32b, llama3-8b/70b,
mistral-7b), a meshtron YAML or a Hugging Face config.json (or its folder). Memory is in GiB per rank: params, grads, optimizer
(device part), saved activations, the loss working set, CP buffers, and fixed = CUDA context +
NCCL + the allocator's fragmentation reserve (engine/plan/devices.py). ``--validate-360lf`` prints
the model of 360-LLaMA-Factory's memory beside its published maxima (a report: exit 0). ``--simulate CONFIG`` runs the engine's own training step for
ranks of the configured world under fake tensors and a fake process group (engine/plan/simulate.py)
and prints its peak memory beside this planner's prediction; exit 0 when it fits the config's GPU,
1 when it does not, 2 on bad input. ``--max-seq-len`` searches the meshes and the memory levers
(engine/plan/reach.py) for the longest sequence that fits the GPUs and the nodes' host memory, and
prints, last, one JSON line ``{"max_seq_len", "settings", "peak_gib", "host_gib_per_node",
"step_s"}``; ``--emit-config FILE`` writes that run as a meshtron YAML (which ``--simulate FILE``
checks). Also ``python -m engine.plan.cli``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from engine.plan import lf360
from engine.plan.activations import RECOMPUTE
from engine.plan.devices import ALLOCATOR_FRAGMENTATION, DEVICES, GIB
from engine.plan.memory import COMPONENTS, Mesh, Run
from engine.plan.models import hf_param_count, resolve_model
from engine.plan.search import mesh_problem, plan

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
    ap.add_argument("--recipe", choices=("sft", "dpo", "pretrain"), default="sft",
                    help="pretrain plans as sft does (the same token loss over packed sequences)")
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=list(RECOMPUTE))
    ap.add_argument("--sharding", nargs="+", choices=SHARDING,
                    help="optimizer sharding over dp x cp to try (default: all; zero1 with --offload)")
    ap.add_argument("--offload", action="store_true",
                    help="optimizer states in host memory (zero1; fsdp2: parameters and gradients too)")
    ap.add_argument("--fp32", action="store_true", help="fp32 parameters and activations (default bf16)")
    ap.add_argument("--global-batch", type=int, default=0, help="sequences per step (0: one per GPU)")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--pp-schedule", choices=("1f1b", "interleaved", "seq1f1b"), default="1f1b")
    ap.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank (interleaved)")
    ap.add_argument("--seq-chunks", type=int, default=1, help="Seq1F1B units per micro-batch")
    for axis in ("tp", "cp", "hp", "pp"):
        ap.add_argument(f"--{axis}", type=int, help=f"pin the {axis} degree (default: try all)")
    ap.add_argument("--max-seq-len", action="store_true",
                    help="search meshes and memory levers for the longest seq_len that fits")
    ap.add_argument("--host-memory-gb", type=float, default=2048.0, help="host (CPU) memory per node in GiB")
    ap.add_argument("--emit-config", metavar="FILE", help="--max-seq-len: write the found run as a meshtron YAML")
    ap.add_argument("--margin", type=float, default=0.05,
                    help="--max-seq-len: share of GPU memory kept spare beyond the fragmentation reserve, so "
                         "the simulated step still fits where it exceeds the planner (they agree within 5 %%)")
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
    ap.add_argument("--steady-state", action="store_true",
                    help="--simulate: run only the micro-batches that reach the step's peak (pp=1: 2; else 2*pp), "
                         "not the whole global batch: the same peak in a fraction of the time")
    ap.add_argument("--json", action="store_true", help="--simulate / --max-seq-len: print only the JSON line")
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
    if a.offload and a.sharding is not None and "none" in a.sharding:
        raise ValueError(f"--offload needs --sharding zero1 or fsdp2 (got {' '.join(a.sharding)}): the sharded "
                         f"optimizers are what keep states in host memory")
    if a.sharding is None:
        a.sharding = ["zero1", "fsdp2"] if a.offload else list(SHARDING)
    if a.host_memory_gb <= 0 or not 0 <= a.margin < 1 - a.fragmentation:
        raise ValueError(f"--host-memory-gb must be > 0 (got {a.host_memory_gb}) and --margin in [0, "
                         f"{1 - a.fragmentation:g}) (got {a.margin})")
    if a.emit_config and not a.max_seq_len:
        raise ValueError("--emit-config writes the run --max-seq-len finds; add --max-seq-len")
    if a.vpp > 1 and a.pp_schedule != "interleaved":
        raise ValueError("--vpp > 1 needs --pp-schedule interleaved")
    if a.seq_chunks > 1 and a.pp_schedule != "seq1f1b":
        raise ValueError("--seq-chunks > 1 needs --pp-schedule seq1f1b")


def _named(m) -> str:
    """The model's name and its parameter count as published (Hugging Face's, unpadded vocabulary)."""
    return f"{m.name} ({hf_param_count(m) / 1e9:.2f}B parameters)"


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
    print(f"{_named(m)}: {a.recipe}, seq_len {base.seq_len}, {a.gpus} x {a.gpu_memory_gb:g} GiB ({a.gpu}), "
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
    from engine.plan import reach

    pins = {k: getattr(a, k) for k in ("tp", "cp", "hp", "pp")}
    budget = reach.Budget(a.gpu_memory_gb, a.host_memory_gb, a.gpus_per_node, a.fragmentation + a.margin)
    best, per_mesh = reach.search(m, a.gpus, base, budget, DEVICES[a.gpu], a.sharding, a.recompute, a.offload,
                                  a.vpp, **pins)
    if not per_mesh:
        problem = mesh_problem(m, Mesh(*(pins[k] or 1 for k in ("tp", "cp", "hp", "pp"))), base, a.gpus_per_node)
        raise ValueError(problem or f"no mesh of {a.gpus} GPUs runs {m.name} with the pinned degrees")
    if not a.json:
        print(f"{_named(m)}: {a.recipe}, {a.gpus} x {a.gpu_memory_gb:g} GiB ({a.gpu}), host {a.host_memory_gb:g} GiB "
              f"per node of {a.gpus_per_node}; longest seq_len per mesh with every memory lever on, then the "
              f"fastest settings that hold the longest")
        print(f"{'tp':>3} {'cp':>3} {'hp x rp':>6} {'pp':>3} {'dp':>3}  {'max seq_len':>11}")
        for mesh, n in sorted(per_mesh, key=lambda x: -x[1])[:a.top]:
            print(f"{_mesh(mesh)}  {n:>11}")
    if best is None:
        print(json.dumps({"max_seq_len": 0, "settings": None, "peak_gib": None, "host_gib_per_node": None,
                          "step_s": None}))
        return 1
    # peak and step at the real budget (the search kept --margin spare)
    mem = reach._memory(m, best.mesh, best.run, dataclasses.replace(budget, fragmentation=a.fragmentation))
    out = {"max_seq_len": best.seq_len, "settings": best.settings(), "peak_gib": round(mem.allocated / GIB, 3),
           "host_gib_per_node": round(best.host_gib_per_node(a.gpus_per_node), 1),
           "step_s": round(best.time["total"], 1)}
    if not a.json:
        print(f"settings: {' '.join(f'{k}={v}' for k, v in out['settings'].items())}")
        print("memory per rank (GiB): " + " ".join(f"{k} {mem.parts[k] / GIB:.2f}" for k in COMPONENTS)
              + f"; fixed + reserve {(mem.fixed + mem.reserve) / GIB:.2f}; total {mem.total / GIB:.2f} of "
              f"{a.gpu_memory_gb:g} ({mem.phase}); host {mem.host / GIB:.1f} per rank")
        print("step time (s): " + " ".join(f"{k} {v:.1f}" for k, v in best.time.items()))
    if a.emit_config:
        from engine.plan.emit import write_config

        write_config(a.emit_config, m, best, a)
        if not a.json:
            print(f"wrote {a.emit_config}: check it with meshtron-plan --simulate {a.emit_config}")
    print(json.dumps(out), flush=True)
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
    report = simulate.simulate(cfg, a.rank, a.gpu_memory_gb, steady=a.steady_state)
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
        gbs = a.global_batch or (0 if a.max_seq_len else a.gpus)  # reach: one sequence per dp rank
        base = Run(seq_len=a.seq_len or 2, recipe=a.recipe, offload=a.offload, bf16=not a.fp32,
                   micro_batch_size=a.micro_batch_size, global_batch_size=gbs,
                   pp_schedule=a.pp_schedule, seq_chunks=a.seq_chunks)
        return run_max_seq_len(a, m, base) if a.max_seq_len else run_plan(a, m, base)
    except ValueError as e:
        print(f"meshtron-plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
