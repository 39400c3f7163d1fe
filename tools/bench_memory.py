#!/usr/bin/env python3
"""Saved-activation memory per rank for tp × cp and per recompute mode, against the ideal 1/(tp·cp).

    python tools/bench_memory.py [--seq 8192] [--tp 1 2] [--cp 1 2 4] [--sp-mode ring]
                                 [--recompute none full selective attention-cached | all] [--check]

For every recompute mode (``train.recompute``) and every (tp, cp) with dp = 1, one micro-batch of
ONE packed sequence of --seq tokens (a few long synthetic documents) goes forward under an autograd
saved-tensors hook that adds up the bytes of every tensor saved for backward: each distinct storage
once (a view of a saved storage costs nothing more), parameters and anything sharing their storage
excluded. What a recomputed region keeps — its inputs, and attention-cached's attention output and
lse — is packed through the same hooks, so it is counted; what the region would have saved is not
(it is rebuilt in backward, one layer at a time). Backward then runs, so the graph is a real
training step. Prints, per mode and mesh, the largest figure over its ranks, its ratio to
(tp=1, cp=1) of the same mode, the ideal 1/(tp·cp) and the deviation, and the ratio to
recompute=none on the same mesh; the last line is the JSON of the figures.
Not ideal by construction: per-document padding to 2·cp (and the padding document), the rope
tables, and whatever a layer saves at the full sequence length (``--top`` lists the sites).

``--check`` exits 1 when, for any mode, the tp=1, cp=4 figure is more than ``--tol`` (10 %) above
1/4 of cp=1's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MIB = 2**20


class SavedBytes:
    """A pack hook that counts the bytes of distinct non-parameter storages saved for backward.

    A saved tensor stays alive until backward, so a storage's data pointer cannot be reused by
    another saved tensor during the forward: the pointer identifies the storage.
    """

    def __init__(self, model, record_sites: bool = False):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.total = 0
        self.record_sites = record_sites
        self.sites: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # site -> [bytes, count]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if isinstance(t, torch.nn.Parameter) or ptr in self.param_ptrs or ptr in self.seen or nbytes == 0:
            return t
        self.seen.add(ptr)
        self.total += nbytes
        if self.record_sites:
            base = t if t._base is None else t._base  # a view is charged its whole storage
            shape = list(t.shape) if base is t else f"{list(t.shape)} of {list(base.shape)}"
            site = (_engine_frame(), str(shape), str(t.dtype).replace("torch.", ""))
            self.sites[site][0] += nbytes
            self.sites[site][1] += 1
        return t


def _engine_frame() -> str:
    """``file:line function`` of the innermost engine frame that saved the tensor."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if ROOT / "engine" in path.parents:
            return f"{path.relative_to(ROOT)}:{frame.lineno} {frame.name}"
    return "?"


MODES = ("none", "full", "selective", "attention-cached")


def make_cfg(args, tp: int, cp: int, mode: str = "none"):
    from engine.config import load_config, validate

    over = [f"parallel.tp={tp}", f"parallel.cp={cp}", "parallel.dp=1", f"train.recompute={mode}",
            f"parallel.sp_mode={args.sp_mode if cp > 1 else 'ring'}",
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.kv_heads}",
            f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}",
            f"model.max_position_embeddings={max(args.seq, 4096)}", f"train.bf16={args.bf16}",
            f"data.seq_len={args.seq}", f"data.min_doc_len={args.seq // 4}",
            f"data.max_doc_len={args.seq // 2}",
            "train.global_batch_size=1", "train.micro_batch_size=1"]
    if args.sp_mode == "hybrid" and cp > 1:
        over.append(f"parallel.hp={args.hp}")
    return validate(load_config(None, over), tp * cp)


def measure(cfg, top: int) -> dict:
    """Saved bytes of this rank's forward, then backward; runs on every rank of the mesh."""
    from engine.loss import token_loss_sum
    from engine.mesh import ParallelMesh
    from engine.parallel.comm import all_reduce_
    from engine.train import build_dataset, build_model, global_valid_tokens, rank_micro_batches

    p = cfg.parallel
    mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, placement=p.placement, order=p.order,
                              ring_window=p.ring_window)
    model = build_model(cfg, mesh)[0]  # one chunk: no pipeline here
    (batch,) = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    num_valid = global_valid_tokens([batch], mesh)
    counter = SavedBytes(model, record_sites=top > 0)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = token_loss_sum(model, batch) / num_valid.to(torch.float32)
    loss.backward()
    missing = [n for n, q in model.named_parameters() if q.grad is None]
    assert not missing, f"backward left no gradient on {missing}"
    sites = sorted(((b, n, *s) for s, (b, n) in counter.sites.items()), reverse=True)[:top]
    return {"bytes": counter.total, "tokens": batch.num_tokens, "sites": sites,
            "loss": float(all_reduce_(loss.detach().double(), mesh.group("dp_cp")))}


def _rank_main(rank, world, port, outdir, cfg, top):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(measure(cfg, top), os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears down its gloo pairs while a peer still finishes p2p
    dist.destroy_process_group()


def run_mesh(cfg, top: int, timeout: float) -> list[dict]:
    """``measure`` on every rank of a world of tp·cp gloo processes (in-process for one rank)."""
    world = cfg.parallel.tp * cfg.parallel.cp
    if world == 1:
        return [measure(cfg, top)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_rank_main, args=(world, port, outdir, cfg, top), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:  # join raises with the failed rank's traceback and terminates the others
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tp={cfg.parallel.tp} cp={cfg.parallel.cp} did not finish "
                                       f"within {timeout:.0f}s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192, help="tokens of the one packed sequence (global)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel degrees")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel degrees")
    ap.add_argument("--sp-mode", choices=("ring", "ulysses", "hybrid"), default="ring",
                    help="context-parallel attention for cp > 1")
    ap.add_argument("--hp", type=int, default=2, help="Ulysses degree inside cp with --sp-mode hybrid")
    ap.add_argument("--recompute", nargs="+", default=["none"], choices=MODES + ("all",),
                    help="train.recompute modes to measure ('all': every mode)")
    ap.add_argument("--max-world", type=int, default=8, help="skip meshes with tp·cp above this")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also list the N largest saved-tensor sites of each mesh's largest rank")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if, for any mode, tp=1 cp=4 saves more than (1 + tol)/4 of tp=1 cp=1")
    ap.add_argument("--tol", type=float, default=0.10, help="tolerance of --check")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per mesh")
    args = ap.parse_args(argv)
    args.recompute = list(MODES) if "all" in args.recompute else list(dict.fromkeys(args.recompute))
    return args


def main(argv=None) -> int:
    from tqdm import tqdm

    from engine.config import ConfigError

    args = parse_args(argv)
    if args.check and not (1 in args.tp and {1, 4} <= set(args.cp)):
        print("--check needs tp 1 and cp 1 and 4 among the meshes (--tp 1 ... --cp 1 4 ...)", file=sys.stderr)
        return 2
    meshes = [(tp, cp) for tp in sorted(set(args.tp)) for cp in sorted(set(args.cp))
              if tp * cp <= args.max_world]
    rows, skipped, sites = {}, {}, {}
    runs = [(mode, tp, cp) for mode in args.recompute for tp, cp in meshes]
    bar = tqdm(runs, desc="meshes", unit="mesh", file=sys.stderr)
    for mode, tp, cp in bar:
        bar.set_postfix_str(f"{mode} tp={tp} cp={cp}")
        try:
            cfg = make_cfg(args, tp, cp, mode)
        except ConfigError as e:
            skipped[(mode, tp, cp)] = str(e)
            continue
        t0 = time.perf_counter()
        ranks = run_mesh(cfg, args.top, args.timeout)
        worst = max(ranks, key=lambda r: r["bytes"])
        rows[(mode, tp, cp)] = {"recompute": mode, "tp": tp, "cp": cp, "world": tp * cp,
                                "max_bytes": worst["bytes"], "rank_bytes": [r["bytes"] for r in ranks],
                                "rank_tokens": worst["tokens"], "loss": ranks[0]["loss"],
                                "seconds": round(time.perf_counter() - t0, 2)}
        sites[(mode, tp, cp)] = worst["sites"]
    bar.close()
    missing = [m for m in args.recompute if (m, 1, 1) not in rows]
    if missing:
        why = {m: skipped.get((m, 1, 1), "not requested") for m in missing}
        print(f"the (tp=1, cp=1) reference did not run for {why}", file=sys.stderr)
        return 2
    base = {m: rows[(m, 1, 1)]["max_bytes"] for m in args.recompute}
    print(f"saved activations per rank: one sequence of {args.seq} tokens, sp_mode={args.sp_mode}, "
          f"{args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'recompute':<16} {'tp':>3} {'cp':>3} {'world':>5} {'tokens':>7} {'max MiB':>9} {'ratio':>7} "
          f"{'ideal':>7} {'vs ideal':>9} {'vs none':>8} {'loss':>10}")
    for (mode, tp, cp), row in rows.items():
        row["ratio"] = row["max_bytes"] / base[mode]
        row["ideal"] = 1.0 / (tp * cp)
        row["deviation_pct"] = 100.0 * (row["ratio"] / row["ideal"] - 1.0)
        none = rows.get(("none", tp, cp))
        row["vs_none"] = row["max_bytes"] / none["max_bytes"] if none else None
        vs_none = f"{row['vs_none']:>8.4f}" if none else f"{'-':>8}"
        print(f"{mode:<16} {tp:>3} {cp:>3} {tp * cp:>5} {row['rank_tokens']:>7} {row['max_bytes'] / MIB:>9.2f} "
              f"{row['ratio']:>7.4f} {row['ideal']:>7.4f} {row['deviation_pct']:>+8.2f}% {vs_none} "
              f"{row['loss']:>10.6f}")
    for (mode, tp, cp), why in skipped.items():
        print(f"{mode:<16} {tp:>3} {cp:>3} skipped: {why}")
    for (mode, tp, cp), top in sites.items():
        if top:
            print(f"\nlargest saved-tensor sites, recompute={mode} tp={tp} cp={cp}, rank with the most bytes "
                  f"(MiB, number of distinct storages, dtype, saved shape [of its base], saving line):")
            for nbytes, count, where, shape, dtype in top:
                print(f"  {nbytes / MIB:9.3f} MiB  {count:>3}×  {dtype:<8} {shape:<30} {where}")
    status = 0
    if args.check:
        for mode in args.recompute:
            if (mode, 1, 4) not in rows:
                print(f"check: recompute={mode} tp=1 cp=4 did not run: "
                      f"{skipped.get((mode, 1, 4), 'not requested')}")
                status = 1
                continue
            got, limit = rows[(mode, 1, 4)]["max_bytes"], (1 + args.tol) * base[mode] / 4
            ok = got <= limit
            print(f"check: recompute={mode} tp=1 cp=4 saves {got / MIB:.2f} MiB, limit (1 + {args.tol:g})·cp1/4 = "
                  f"{limit / MIB:.2f} MiB: {'ok' if ok else 'FAILED'}")
            status = status if ok else 1
    print(json.dumps({"seq": args.seq, "sp_mode": args.sp_mode, "recompute": args.recompute,
                      "base_bytes": base[args.recompute[0]], "base_bytes_by_mode": base,
                      "rows": list(rows.values()),
                      "skipped": {f"recompute={m} tp={t} cp={c}": w for (m, t, c), w in skipped.items()}}))
    return status


if __name__ == "__main__":
    sys.exit(main())
