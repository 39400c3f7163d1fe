#!/usr/bin/env python3
"""Measure the FlexSP cost model's constants on this machine and write the device JSON it reads.

    python tools/calibrate_flexsp.py [--out flexsp_calibration.json] [--lengths 256 512 1024 2048 4096]
                                     [--world 2] [--bf16] [--like h100]

1. Compute: meshtron's own model (engine.model.gpt.GPTModel, the sizes given) on a one-rank mesh
   runs forward + backward of one document of each length; the fastest of ``--repeats`` runs is
   fitted by non-negative least squares, relative error weighted: t(s) = α1·s² + α2·s + β.
   α1, α2 and the model they belong to are written (used as measured for that model), and so are
   the effective FLOP/s they imply (attention: α1 against the causal attention FLOPs; linear
   layers: α2 against the linear FLOPs per token), which serve any other model; β becomes the
   fixed cost per group.
2. Communication: a world of ``--world`` processes (engine.spawn.run_world: gloo on CPU tensors;
   ``--backend nccl`` re-initialises it on one GPU per rank) times an all-to-all in groups of
   every power-of-two size (the mesh's hp axis) and a ring exchange (its rp axis, the ring
   attention's RingComm) at two message sizes; t = latency + bytes / bandwidth per group size.
   These are intra-node figures. Nothing here can see another node: ``--inter-node-gbs`` gives
   that bandwidth, else the measured figures are scaled by the intra-to-inter drop of ``--like``
   (a shipped device file), and the JSON says which. ``--world 1`` skips this part and copies
   every bandwidth from ``--like``.

Use the result with ``flexsp.cost_model=<the JSON path>``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def progress(items, desc: str):
    """A progress bar on stderr (tqdm when installed, else one line per item)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return (print(f"{desc} {i + 1}/{len(items)}", file=sys.stderr, flush=True) or x for i, x in enumerate(items))
    return tqdm(items, desc=desc, file=sys.stderr)


def model_config(args):
    from engine.config import load_config, validate

    over = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={args.ffn}",
            f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.kv_heads}",
            f"model.vocab_size={args.vocab}", f"model.max_position_embeddings={max(args.lengths)}",
            f"train.bf16={args.bf16}"]
    return validate(load_config(None, over), 1)


def time_steps(cfg, lengths, repeats: int, device: str) -> list[float]:
    """Fastest forward + backward seconds of one document of each length (one rank)."""
    import torch

    from engine.data.packing import document_arrays, pack
    from engine.loss import token_loss_sum
    from engine.mesh import ParallelMesh
    from engine.train import build_model

    model = build_model(cfg, ParallelMesh.single(device))[0]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in progress(list(lengths), "compute"):
        toks, labels, _ = document_arrays(torch.randint(0, cfg.model.vocab_size, (s,), generator=gen).tolist())
        batch = pack([(toks, labels)]).to(device)
        best = float("inf")
        for i in range(repeats + 1):  # the first run warms up (allocator, kernels)
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            token_loss_sum(model, batch).backward()
            sync()
            if i:
                best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out


def fit_compute(lengths, seconds) -> dict:
    """α1, α2, β ≥ 0 minimising the relative error of α1·s² + α2·s + β."""
    from scipy.optimize import nnls

    s, t = np.asarray(lengths, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    A = np.stack([s * s, s, np.ones_like(s)], axis=1)
    coef, _ = nnls(A / t[:, None], np.ones_like(t))
    pred = A @ coef
    return {"alpha1": float(coef[0]), "alpha2": float(coef[1]), "beta": float(coef[2]),
            "lengths": [int(x) for x in s], "seconds": [float(x) for x in t], "predicted": [float(x) for x in pred],
            "max_rel_error": float(np.max(np.abs(pred - t) / t))}


def _comm_rank(rank, world, sizes, msg_bytes, repeats, backend, rendezvous):
    """On every rank: seconds of an all-to-all (hp groups) and a ring exchange (rp groups) per
    group size and message size, the fastest of ``repeats``."""
    import torch
    import torch.distributed as dist

    from engine.mesh import ParallelMesh
    from engine.parallel.context.ring import RingComm

    device = "cpu"
    if backend == "nccl":  # run_world starts gloo; measure on NCCL, one GPU per rank
        torch.cuda.set_device(rank)
        dist.destroy_process_group()
        dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
        device = f"cuda:{rank}"
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)

    def fastest(fn):
        fn()  # warm-up (connections)
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    out = {"a2a": {}, "p2p": {}}
    for g in sizes:
        hp_mesh = ParallelMesh.build(cp=g, hp=g, dp=world // g, device=device)
        rp_mesh = ParallelMesh.build(cp=g, hp=1, dp=world // g, device=device)
        ring = RingComm(rp_mesh.group("rp"), rp_mesh.ranks("rp"), rp_mesh.index("rp"))
        for m in msg_bytes:
            x = torch.ones(max(g, m // 4 // g * g), device=device)
            y = torch.empty_like(x)
            group = hp_mesh.group("hp")
            out["a2a"][(g, m)] = fastest(lambda x=x, y=y, group=group: dist.all_to_all_single(y, x, group=group))
            out["p2p"][(g, m)] = fastest(lambda x=x, ring=ring: ring.exchange([x], "calibrate")[0]())
    return out


def fit_bandwidth(times: dict, share) -> tuple[dict, float]:
    """Per group size: bytes/s from t = latency + bytes·share(g) / bw over the message sizes;
    returns ({size: bw}, median latency)."""
    bw, lat = {}, []
    for g in sorted({g for g, _ in times}):
        pts = sorted((m * share(g), t) for (gg, m), t in times.items() if gg == g)
        x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        slope, icpt = np.polyfit(x, y, 1) if len(x) > 1 else (y[0] / x[0], 0.0)
        if slope <= 0:  # noise swamped the size dependence: the largest message's average rate
            slope, icpt = y[-1] / x[-1], 0.0
        bw[str(g)] = float(1.0 / slope)
        lat.append(max(0.0, float(icpt)))
    return bw, float(np.median(lat)) if lat else 0.0


def measure_comm(args) -> dict:
    import torch

    from engine.spawn import run_world

    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--backend nccl needs one GPU per rank: --world={args.world} but "
                         f"{torch.cuda.device_count()} GPUs; lower --world or use --backend gloo")

    sizes = [2**k for k in range(1, args.world.bit_length()) if 2**k <= args.world]
    msg = [int(m * 2**20) for m in args.msg_mib]
    print(f"communication: world of {args.world}, group sizes {sizes}, messages {args.msg_mib} MiB", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_world(args.world, _comm_rank, sizes, msg, args.repeats, args.backend,
                          os.path.join(tmp, "nccl-rendezvous"), timeout=args.timeout)
    slowest = {kind: {key: max(r[kind][key] for r in ranks) for key in ranks[0][kind]} for kind in ("a2a", "p2p")}
    a2a, lat_a2a = fit_bandwidth(slowest["a2a"], lambda g: (g - 1) / g)  # bytes that leave a rank
    p2p, lat_p2p = fit_bandwidth(slowest["p2p"], lambda g: 1.0)
    return {"alltoall_bw": a2a, "p2p_bw": p2p, "latency_s": max(lat_a2a, lat_p2p),
            "raw_seconds": {kind: {f"{g}x{m}": t for (g, m), t in v.items()} for kind, v in slowest.items()}}


def machine(device: str, world: int) -> tuple[str, float]:
    """(description, memory GiB per rank) of the device that trains."""
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / 2**30
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / world  # CPU ranks share the RAM
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})", mem


def calibrate(args) -> dict:
    import torch

    from engine.flexsp.cost import (attention_flops_coef, linear_flops_per_token, load_device, model_fingerprint,
                                    recipe_passes)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # as a CPU rank trains (engine.spawn): one thread, no oversubscription
        torch.set_num_threads(args.threads)
    cfg = model_config(args)
    fit = fit_compute(args.lengths, time_steps(cfg, args.lengths, args.repeats, device))
    if fit["alpha1"] <= 0 or fit["alpha2"] <= 0:
        raise SystemExit(f"the fit found no {'s² (attention)' if fit['alpha1'] <= 0 else 's (linear)'} term in "
                         f"{fit['seconds']}: use longer --lengths (or a wider model) so it shows above the noise")
    m, passes = cfg.model, recipe_passes("none")
    mult = cfg.model.make_vocab_size_divisible_by
    vocab = -(-m.vocab_size // mult) * mult
    like = load_device(args.like)
    name, mem_gb = machine(device, args.world)
    out = {"name": f"calibrated on {platform.node()}: {name}",
           "notes": (f"Written by tools/calibrate_flexsp.py on {datetime.date.today().isoformat()}: compute fitted "
                     "on a "
                     f"{m.num_layers}-layer, hidden-{m.hidden_size} model at lengths {list(args.lengths)}; "
                     "bandwidths measured per group size inside this machine."),
           "memory_gb": args.memory_gb or round(mem_gb, 2), "reserved_gb": args.reserved_gb,
           "linear_flops": passes["linear"] * linear_flops_per_token(m, vocab) / fit["alpha2"],
           "attention_flops": passes["attention"] * attention_flops_coef(m) / fit["alpha1"],
           "flops_dtype": "bf16" if args.bf16 else "fp32", "fp32_flops_ratio": like.get("fp32_flops_ratio", 0.5),
           "group_overhead_s": fit["beta"], "alpha1": fit["alpha1"], "alpha2": fit["alpha2"],
           "alpha_model": model_fingerprint(m, 1, args.bf16, "none"), "fit": fit}
    if args.world >= 2:
        comm = measure_comm(args)
        largest = str(max(int(g) for g in comm["alltoall_bw"]))
        out.update(alltoall_bw=comm["alltoall_bw"], p2p_bw=comm["p2p_bw"], latency_s=comm["latency_s"],
                   intra_node_bw=comm["alltoall_bw"][largest], p2p_intra_bw=comm["p2p_bw"][largest],
                   comm_seconds=comm["raw_seconds"],
                   bandwidth_source=f"measured, world of {args.world} ({args.backend})")
    else:
        out.update({k: like[k] for k in ("intra_node_bw", "latency_s") if k in like},
                   p2p_intra_bw=like.get("p2p_intra_bw", like["intra_node_bw"]),
                   bandwidth_source=f"copied from {like['path']} (--world 1)")
    if args.inter_node_gbs:
        out.update(inter_node_bw=args.inter_node_gbs * 1e9, p2p_inter_bw=args.inter_node_gbs * 1e9,
                   inter_node_source="--inter-node-gbs")
    else:  # the --like device's drop from intra- to inter-node, applied to what was measured here
        drop = like["inter_node_bw"] / like["intra_node_bw"]
        p2p_drop = like.get("p2p_inter_bw", like["inter_node_bw"]) / like.get("p2p_intra_bw", like["intra_node_bw"])
        out.update(inter_node_bw=out["intra_node_bw"] * min(1.0, drop),
                   p2p_inter_bw=out["p2p_intra_bw"] * min(1.0, p2p_drop),
                   inter_latency_s=max(out["latency_s"], like.get("inter_latency_s", like["latency_s"])),
                   inter_node_source=(f"not measurable inside one machine: the intra-node figures × the drop of "
                                      f"{like['path']} ({drop:.3f} all-to-all, {p2p_drop:.3f} p2p)"))
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="flexsp_calibration.json", help="where the device JSON goes")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                    help="document lengths timed (the longest sets how well the s² term is seen)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (the fastest counts)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--bf16", action="store_true", help="time in bf16 (flops_dtype bf16); default fp32")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the CPU timing (a CPU rank's share)")
    ap.add_argument("--world", type=int, default=2, help="processes of the communication test; 1 skips it")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="collectives of the test")
    ap.add_argument("--msg-mib", type=float, nargs="+", default=[1.0, 8.0], help="message sizes per rank")
    ap.add_argument("--inter-node-gbs", type=float, default=0.0, help="inter-node bandwidth, GB/s; 0: from --like")
    ap.add_argument("--like", default="h100", help="device file for what is not measured here")
    ap.add_argument("--memory-gb", type=float, default=0.0,
                    help="memory per rank, GiB; 0: the GPU's, or RAM / --world on CPU")
    ap.add_argument("--reserved-gb", type=float, default=2.0, help="memory kept back (context, buffers), GiB")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for the communication world")
    args = ap.parse_args(argv)
    if args.world < 1 or args.world & (args.world - 1):
        ap.error(f"--world={args.world} must be a power of two >= 1")
    if len(args.lengths) < 3:
        ap.error("--lengths needs at least 3 lengths to fit α1, α2 and β")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = calibrate(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    fit = result["fit"]
    print(f"alpha1 {fit['alpha1']:.4g} s/token², alpha2 {fit['alpha2']:.4g} s/token, beta {fit['beta']:.4g} s "
          f"(max relative error {fit['max_rel_error']:.1%}); attention {result['attention_flops']:.3g} FLOP/s, "
          f"linear {result['linear_flops']:.3g} FLOP/s")
    for key in ("alltoall_bw", "p2p_bw"):
        if key in result:
            print(f"{key}: " + ", ".join(f"{g} ranks {bw / 1e9:.2f} GB/s" for g, bw in result[key].items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
