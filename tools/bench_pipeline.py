#!/usr/bin/env python3
"""Measured pipeline bubble of 1F1B, interleaved and Seq1F1B against the analytic fractions.

    python tools/bench_pipeline.py [--pp 4] [--micro-batches 8] [--vpp 2] [--seq-chunks 2 4]
                                   [--layers 8] [--hidden 256] [--seq 1024] [--timeline FILE]

One gloo world of pp CPU processes (1 thread each). For every schedule — 1f1b, interleaved
(--vpp), seq1f1b for each k of --seq-chunks (--seq-partition, compute-balanced by default) — it
builds the model, runs --warmup training steps (forward + backward through the pipeline runtime,
no optimizer) and one measured step with the runtime's timeline on. All ranks pass a barrier and
take t = 0 right after it, so their timelines share a time base. The step spans the first
action's start to the last action's end over all ranks; rank r's bubble is
1 − (Σ compute of rank r) / step, where compute excludes the time spent blocked on a receive.

Analytic bubble (equal-cost forward/backward units, free messages): (p−1)/(m+p−1) for 1F1B,
(p−1)/(v·m+p−1) interleaved, (p−1)/(k·m+p−1) Seq1F1B. The figures are indicative: on CPU the
Seq1F1B units do not cost exactly 1/k of a micro-batch (and k small units cost more than one
large one), point-to-point messages are not free, and with more ranks than cores, ranks that
compute at the same time slow each other down. The last line is the JSON of the figures;
--timeline FILE writes every rank's raw timeline (seconds from t = 0).
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


def _step(model, micro_batches, mesh, parallel, record: bool):
    """forward_backward of engine.train without the loss reductions, with the timeline on.
    Returns (timeline, t0, cpu seconds of this process during the step)."""
    import torch.distributed as dist

    from engine.parallel.pipeline.runtime import PipelineRuntime
    from engine.parallel.pipeline.seqchunks import split_units
    from engine.train import global_valid_tokens, unit_lengths

    k = parallel.seq_chunks if parallel.pp_schedule == "seq1f1b" else 1
    num_valid = global_valid_tokens(micro_batches, mesh)
    # units are rebuilt every step: each micro-batch's K/V cache lives for one step
    units = [[mb] if k == 1 else split_units(mb, unit_lengths(mb.num_tokens, k, model[0].cfg, mesh, parallel))
             for mb in micro_batches]
    runtime = PipelineRuntime(list(model), mesh, parallel.pp_schedule, k)
    runtime.timeline = [] if record else None
    for q in model.parameters():
        q.grad = None  # every step allocates its gradients afresh: warm-up and measured steps alike
    dist.barrier(group=mesh.group("pp"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    runtime.run(units, num_valid)
    return runtime.timeline, t0, time.process_time() - cpu0


def bench_world(rank, world, cfgs, warmup: int):
    """Runs on every rank: each schedule's timeline of the measured step, times from t0."""
    import torch
    from tqdm import tqdm

    from engine.mesh import ParallelMesh
    from engine.train import build_dataset, build_model, rank_micro_batches

    mesh = ParallelMesh.build(pp=world)
    out = []
    bar = tqdm(total=len(cfgs) * (warmup + 1), desc="steps", unit="step", file=sys.stderr,
               disable=rank != 0)
    for cfg in cfgs:
        p = cfg.parallel
        bar.set_postfix_str(f"{p.pp_schedule} vpp={p.vpp} k={p.seq_chunks}")
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, mesh)
        mbs = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
        for _ in range(warmup):
            _step(model, mbs, mesh, p, record=False)
            bar.update()
        timeline, t0, cpu = _step(model, mbs, mesh, p, record=True)
        bar.update()
        for a in timeline:
            a["start"] -= t0
        out.append({"timeline": timeline, "cpu_s": cpu})
    bar.close()
    return out


def figures(ranks: list[dict]) -> dict:
    """Step time over all ranks and each rank's bubble, compute and wait, from the timelines."""
    starts = [a["start"] for r in ranks for a in r["timeline"]]
    ends = [a["start"] + a["wait"] + a["compute"] for r in ranks for a in r["timeline"]]
    step = max(ends) - min(starts)
    compute = [sum(a["compute"] for a in r["timeline"]) for r in ranks]
    return {"step_s": step, "bubble": [1.0 - c / step for c in compute], "compute_s": compute,
            "wait_s": [sum(a["wait"] for a in r["timeline"]) for r in ranks],
            "cpu_s": [r["cpu_s"] for r in ranks]}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pp", type=int, default=4, help="pipeline stages (= processes)")
    ap.add_argument("--micro-batches", "-m", type=int, default=8, help="micro-batches per step (m)")
    ap.add_argument("--vpp", type=int, default=2, help="virtual stages per rank of the interleaved schedule")
    ap.add_argument("--seq-chunks", "-k", type=int, nargs="+", default=[2, 4],
                    help="Seq1F1B sequence units per micro-batch; one row per k")
    ap.add_argument("--seq-partition", choices=("compute", "uniform"), default="compute",
                    help="Seq1F1B unit lengths: equal compute or equal tokens")
    ap.add_argument("--layers", type=int, default=8, help="must split over pp·vpp stages")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=1024, help="tokens per micro-batch (one document)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured one")
    ap.add_argument("--timeline", metavar="FILE", help="write every rank's raw timeline here as JSON")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed for the whole world")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from engine.config import ConfigError
    from engine.spawn import run_world

    args = parse_args(argv)
    p, m = args.pp, args.micro_batches
    if p < 2:
        print("--pp must be at least 2: with one stage there is no pipeline bubble", file=sys.stderr)
        return 2
    rows = schedules(args)
    try:
        cfgs = [make_cfg(args, s) for s in rows]
    except ConfigError as e:
        print(f"bench_pipeline: {e} (options: --layers must be a multiple of pp·vpp = "
              f"{p * args.vpp}; --micro-batches a multiple of pp)", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"pipeline bubble: pp={p}, m={m} micro-batches of {args.seq} tokens, {args.layers} layers, "
          f"hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"fp32, {p} processes × 1 thread on {cores} cores, Seq1F1B partition {args.seq_partition}",
          flush=True)
    t_start = time.perf_counter()
    results = run_world(p, bench_world, cfgs, args.warmup, timeout=args.timeout)
    for i, row in enumerate(rows):
        row.update(figures([results[r][i] for r in range(p)]))
        row["mean_bubble"] = sum(row["bubble"]) / p
        row["analytic"] = analytic_bubble(p, m, row["schedule"], row["vpp"], row["k"])

    ranks = " ".join(f"{f'rank {r}':>7}" for r in range(p))
    print(f"{'schedule':<16} {ranks} {'mean':>7} {'analytic':>9} {'step s':>8} {'compute s':>10}")
    for row in rows:
        bubbles = " ".join(f"{b:>7.3f}" for b in row["bubble"])
        print(f"{row['label']:<16} {bubbles} {row['mean_bubble']:>7.3f} {row['analytic']:>9.3f} "
              f"{row['step_s']:>8.3f} {sum(row['compute_s']) / p:>10.3f}")
    print("bubble = 1 − Σ compute / step per rank; 'compute s' is the mean Σ compute over ranks.")
    print("Indicative only: on CPU Seq1F1B units do not cost exactly a micro-batch / k (small units run "
          "less efficiently), point-to-point messages are not negligible"
          + (f", and {p} processes share {cores} cores, so concurrent stages slow each other down"
             if cores and p > cores else "") + ".")
    if args.timeline:
        dump = {row["label"]: {"schedule": row["schedule"], "vpp": row["vpp"], "k": row["k"],
                               "ranks": [results[r][i]["timeline"] for r in range(p)]}
                for i, row in enumerate(rows)}
        with open(args.timeline, "w") as f:
            json.dump({"pp": p, "micro_batches": m, "time_unit": "s from a common t0", "schedules": dump}, f)
        print(f"timelines written to {args.timeline}")
    print(f"total {time.perf_counter() - t_start:.1f}s")
    print(json.dumps({"pp": p, "micro_batches": m, "seq": args.seq, "layers": args.layers, "hidden": args.hidden,
                      "cores": cores, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
