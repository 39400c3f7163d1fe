#!/usr/bin/env python3
"""Measured pipeline bubble of 1F1B, interleaved and Seq1F1B against the analytic fractions.

    python tools/bench_pipeline.py [--pp 4] [-m 8] [--vpp 2] [-k 2 4] [--layers 8] [--hidden 256]
                                   [--seq 1024] [--schedules ...] [--timeline FILE]

One gloo world of pp CPU processes (1 thread each). For every schedule — 1f1b, interleaved
(--vpp), seq1f1b for each k of --seq-chunks (--seq-partition, compute-balanced by default) — it
builds the model and runs --warmup training steps and one measured step: engine.train's
forward_backward (no optimizer), with the pipeline runtime's timeline on. All ranks pass a
barrier and take t = 0 right after it, so their timelines share a time base. The step spans the
first action's start to the last action's end over all ranks; rank r's bubble is
1 − (Σ compute of rank r) / step, where compute excludes the time blocked on a receive.

Analytic bubble (equal-cost units, free messages): (p−1)/(m+p−1) for 1F1B, (p−1)/(v·m+p−1)
interleaved, (p−1)/(k·m+p−1) Seq1F1B. The measured figures are indicative: on CPU the Seq1F1B
units do not cost exactly a micro-batch / k (the reference attention kernel computes the full
masked score rectangle, so k units do less attention work than one micro-batch, and every unit
pays fixed per-action costs), point-to-point messages are not free, and with more ranks than
cores (or a busy machine) ranks that compute at the same time slow each other down, which
stretches compute into the bubble. So each action also records the CPU time of its thread
(``cpu``), and the *replay* columns run the recorded action orders with those costs on an ideal
pipeline (one core per rank, free messages): what is left is the schedule and the unequal costs.
With equal costs the replay gives the analytic bubble exactly (tests/test_bench_pipeline.py).

The ranks run with glibc's mmap threshold raised (MALLOC_MMAP_THRESHOLD_; --no-malloc-tuning
keeps the default): otherwise every score block of 32 MiB or more (8 heads × 1024² fp32) is
mmapped and page-faulted afresh, which more than doubles a 1024-token micro-batch's cost.
The last line is the JSON of the figures; --timeline FILE writes every rank's raw timeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


SCHEDULES = ("1f1b", "interleaved", "seq1f1b")


def schedules(args) -> list[dict]:
    """The schedules to compare: name, vpp, k and the row label."""
    rows = [{"schedule": "1f1b", "vpp": 1, "k": 1, "label": "1f1b"},
            {"schedule": "interleaved", "vpp": args.vpp, "k": 1, "label": f"interleaved v={args.vpp}"}]
    rows += [{"schedule": "seq1f1b", "vpp": 1, "k": k, "label": f"seq1f1b k={k}"} for k in args.seq_chunks]
    return rows


def analytic_bubble(p: int, m: int, schedule: str, vpp: int = 1, k: int = 1) -> float:
    """Bubble fraction of the schedule when every unit costs the same and messages are free."""
    units = {"1f1b": m, "interleaved": vpp * m, "seq1f1b": k * m}[schedule]
    return (p - 1) / (units + p - 1)


def make_cfg(args, sched: dict):
    from engine.config import load_config, validate

    over = [f"parallel.pp={args.pp}", "parallel.dp=1", f"parallel.pp_schedule={sched['schedule']}",
            f"parallel.vpp={sched['vpp']}", f"parallel.seq_chunks={sched['k']}",
            f"parallel.seq_partition={args.seq_partition}",
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.kv_heads}",
            f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}",
            f"model.max_position_embeddings={args.seq}",
            # one document per sequence: the causal cost the compute partition balances
            f"data.seq_len={args.seq}", f"data.min_doc_len={args.seq}", f"data.max_doc_len={args.seq}",
            f"train.global_batch_size={args.micro_batches}", "train.micro_batch_size=1"]
    return validate(load_config(None, over), args.pp)


class CpuTimeline(list):
    """The runtime's timeline list, adding to each action the CPU time this thread spent since
    the previous one (``cpu``): the action's cost without the time other processes held the core
    (torch runs on the calling thread with 1 thread, and a blocked receive sleeps)."""

    def mark(self) -> None:
        self._last = time.thread_time()

    def append(self, action: dict) -> None:
        now = time.thread_time()
        action["cpu"], self._last = now - self._last, now
        super().append(action)


def timed_runtime(made: list):
    """A PipelineRuntime class whose ``run`` records the timeline from a common t = 0 (every
    rank passes a barrier and reads its clock right after); each run's runtime goes to ``made``."""
    import torch.distributed as dist

    from engine.parallel.pipeline.runtime import PipelineRuntime

    class TimedRuntime(PipelineRuntime):
        def run(self, units, num_valid):
            made.append(self)
            self.timeline = CpuTimeline()
            dist.barrier(group=self.group)
            self.t0 = time.perf_counter()
            self.timeline.mark()
            return super().run(units, num_valid)

    return TimedRuntime


def bench_world(rank, world, cfgs, warmup: int):
    """Runs on every rank: each schedule's timeline of the measured step, times from t0.

    The step is engine.train.forward_backward itself (no optimizer), its runtime swapped for
    one that records: exactly what training runs, whatever the schedule needs (Seq1F1B units,
    their K/V caches)."""
    import torch
    from tqdm import tqdm

    from engine import train
    from engine.mesh import ParallelMesh

    made = []
    train.PipelineRuntime = timed_runtime(made)  # in this rank's process only
    mesh = ParallelMesh.build(pp=world)
    out = []
    bar = tqdm(total=len(cfgs) * (warmup + 1), desc="steps", unit="step", file=sys.stderr,
               disable=rank != 0)
    for cfg in cfgs:
        p = cfg.parallel
        bar.set_postfix_str(f"{p.pp_schedule} vpp={p.vpp} k={p.seq_chunks}")
        torch.manual_seed(cfg.train.seed)
        model, dataset = train.build_model(cfg, mesh), train.build_dataset(cfg)
        for _ in range(warmup + 1):
            for q in model.parameters():
                q.grad = None  # every step allocates its gradients afresh
            # fresh micro-batches every step: a Seq1F1B unit's K/V cache lives for one step
            train.forward_backward(model, train.rank_micro_batches(dataset, 0, cfg, mesh), mesh, p)
            bar.update()
        if len(made) != warmup + 1:
            raise RuntimeError("engine.train.forward_backward no longer runs engine.train.PipelineRuntime "
                               "once per step; update tools/bench_pipeline.py to record its timeline")
        runtime = made[-1]
        made.clear()
        for a in runtime.timeline:
            a["start"] -= runtime.t0
        out.append(list(runtime.timeline))
    bar.close()
    return out


def figures(timelines: list[list[dict]]) -> dict:
    """Step time over all ranks and each rank's bubble, compute and wait, from the timelines."""
    starts = [a["start"] for t in timelines for a in t]
    ends = [a["start"] + a["wait"] + a["compute"] for t in timelines for a in t]
    step = max(ends) - min(starts)
    compute = [sum(a["compute"] for a in t) for t in timelines]
    return {"step_s": step, "bubble": [1.0 - c / step for c in compute], "compute_s": compute,
            "wait_s": [sum(a["wait"] for a in t) for t in timelines],
            "cpu_s": [sum(a["cpu"] for a in t) for t in timelines]}


def replay(timelines: list[list[dict]], vpp: int, cost: str = "cpu") -> dict:
    """Each rank's actions in its order, each taking its measured ``cost``, on one dedicated core
    per rank with free messages: a forward waits for the previous stage's forward of the same
    unit, a backward for the next stage's backward. Returns the step and each rank's bubble."""
    pp = len(timelines)
    last = pp * vpp - 1
    end, free, busy, nxt = {}, [0.0] * pp, [0.0] * pp, [0] * pp
    remaining = sum(len(t) for t in timelines)
    while remaining:
        moved = False
        for r, actions in enumerate(timelines):
            while nxt[r] < len(actions):
                a = actions[nxt[r]]
                stage = a["chunk"] * pp + r
                up = stage - 1 if a["kind"] == "F" else stage + 1
                dep = (a["kind"], a["mb"], up, a["unit"]) if 0 <= up <= last else None
                if dep is not None and dep not in end:
                    break
                free[r] = max(free[r], end.get(dep, 0.0)) + a[cost]
                busy[r] += a[cost]
                end[(a["kind"], a["mb"], stage, a["unit"])] = free[r]
                nxt[r], remaining, moved = nxt[r] + 1, remaining - 1, True
        assert moved, "the recorded action orders deadlock"
    step = max(free)
    return {"step_s": step, "bubble": [1.0 - b / step for b in busy]}


def parse_args(argv):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--pp", type=int, default=4, help="pipeline stages (= processes)")
    ap.add_argument("--micro-batches", "-m", type=int, default=8, help="micro-batches per step (m)")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                    help="schedules to run")
    ap.add_argument("--vpp", type=int, default=2, help="virtual stages per rank of the interleaved schedule")
    ap.add_argument("--seq-chunks", "-k", type=int, nargs="+", default=[2, 4],
                    help="Seq1F1B sequence units per micro-batch; one row per k")
    ap.add_argument("--seq-partition", choices=("compute", "uniform"), default="compute",
                    help="Seq1F1B unit lengths: equal compute or equal tokens")
    ap.add_argument("--layers", type=int, default=8, help="transformer layers (split over pp·vpp stages)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--heads", type=int, default=8, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="KV heads (query groups)")
    ap.add_argument("--ffn", type=int, default=704, help="MLP width")
    ap.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per micro-batch (one document)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured one")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="keep glibc's default mmap threshold in the ranks (see above)")
    ap.add_argument("--timeline", metavar="FILE", help="write every rank's raw timeline here as JSON")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed for the whole world")
    return ap.parse_args(argv)


def _run_ranks(args, cfgs) -> list:
    """bench_world on pp processes, with glibc's malloc told to keep large blocks on the heap."""
    from engine.spawn import run_world

    saved = dict(os.environ)
    if not args.no_malloc_tuning:
        for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            os.environ.setdefault(var, str(2**30))
    try:
        return run_world(args.pp, bench_world, cfgs, args.warmup, timeout=args.timeout)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main(argv=None) -> int:
    from engine.config import ConfigError

    args = parse_args(argv)
    p, m = args.pp, args.micro_batches
    if p < 2:
        print("--pp must be at least 2: with one stage there is no pipeline bubble", file=sys.stderr)
        return 2
    rows = [s for s in schedules(args) if s["schedule"] in args.schedules]
    try:
        cfgs = [make_cfg(args, s) for s in rows]
    except ConfigError as e:
        print(f"bench_pipeline: {e} (the interleaved schedule needs --micro-batches a multiple of "
              f"--pp and --layers splittable over pp·vpp = {p * args.vpp} stages; --schedules can leave it out)", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"pipeline bubble: pp={p}, m={m} micro-batches of {args.seq} tokens, {args.layers} layers, "
          f"hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"fp32; {p} processes × 1 thread on {cores} cores; Seq1F1B partition {args.seq_partition}"
          + ("" if args.no_malloc_tuning else "; glibc mmap threshold raised"),
          flush=True)
    t_start = time.perf_counter()
    results = _run_ranks(args, cfgs)
    for i, row in enumerate(rows):
        timelines = [results[r][i] for r in range(p)]
        row.update(figures(timelines))
        row["mean_bubble"] = sum(row["bubble"]) / p
        row["analytic"] = analytic_bubble(p, m, row["schedule"], row["vpp"], row["k"])
        row["replay"] = replay(timelines, row["vpp"])
        row["replay"]["mean_bubble"] = sum(row["replay"]["bubble"]) / p

    ranks = " ".join(f"{f'rank {r}':>7}" for r in range(p))
    print(f"{'schedule':<16} {ranks} {'mean':>7} {'analytic':>9} {'step s':>8} {'replay':>7} {'replay s':>9}")
    for row in rows:
        bubbles = " ".join(f"{b:>7.3f}" for b in row["bubble"])
        print(f"{row['label']:<16} {bubbles} {row['mean_bubble']:>7.3f} {row['analytic']:>9.3f} "
              f"{row['step_s']:>8.3f} {row['replay']['mean_bubble']:>7.3f} {row['replay']['step_s']:>9.3f}")
    print("bubble = 1 − Σ compute / step, per rank, the step measured from the first action's start to the last "
          "one's end over all ranks; replay: the mean bubble, and the step, of the same action orders with each "
          "action's measured CPU time, one core per rank and free messages.")
    print("Indicative only: on CPU the Seq1F1B units do not cost exactly a micro-batch / k, point-to-point "
          "messages are not negligible"
          + (f", and {p} processes share {cores} cores, so stages computing at the same time slow each other "
             f"down (compute stretches into the bubble: see the replay columns)" if cores and p > cores else "")
          + ".")
    if args.timeline:
        dump = {row["label"]: {"schedule": row["schedule"], "vpp": row["vpp"], "k": row["k"],
                               "ranks": [results[r][i] for r in range(p)]}
                for i, row in enumerate(rows)}
        with open(args.timeline, "w") as f:
            json.dump({"pp": p, "micro_batches": m, "time_unit": "seconds from a common t0 (start); "
                       "seconds (wait, compute, cpu)", "schedules": dump}, f)
        print(f"timelines written to {args.timeline}")
    print(f"total {time.perf_counter() - t_start:.1f}s")
    print(json.dumps({"pp": p, "micro_batches": m, "seq": args.seq, "layers": args.layers, "hidden": args.hidden,
                      "cores": cores, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
