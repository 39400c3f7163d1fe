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

    python tools/bench_memory.py --vs-transformers [--seq 8192] [--tile-mlp 4] [--loss-chunk 1024]
                                 [--repeats 2] [--threads 1] [--profile N]

``--vs-transformers``: one training step (forward + backward, no optimizer) of one Llama — by default
2 layers, hidden 512, 8 heads / 2 KV heads (head dim 64), ffn 1376 (Llama 2 7B's ratio 2.6875), vocab
128,256, fp32 — on ONE document of ``--seq`` tokens, in meshtron (single process: the fused chunked
loss, ``recompute: full``, the tiled MLP) and in transformers' ``LlamaForCausalLM`` (sdpa attention,
gradient checkpointing, train mode), with the same weights (mapped by convert/hf_map.py) and tokens.
transformers shifts the labels itself and averages over the seq − 1 predicted tokens; meshtron's
loss is its token-loss sum over the same count. The first step of each runs under
``torch.distributed._tools.mem_tracker.MemTracker`` (real tensors; parameters, gradients,
activations and temporaries alike; the peak checked after every op); tokens/s comes from the
fastest of ``--repeats`` steps' wall time, the two models interleaved so background load hits both
(``speed_ratio_cpu_time`` is the same ratio from the process's CPU time, which a shared machine
distorts less). Prints each one's peak (by category), tokens/s and loss, the loss and
worst-gradient agreement, with ``--profile`` the costliest ops of one more step of each, and last
the JSON
``{"meshtron_peak_gib", "transformers_peak_gib", "memory_ratio" (meshtron / transformers peak),
"speed_ratio" (meshtron / transformers tokens/s), "loss_rel_diff", "grad_rel_diff", …}``.
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
import warnings
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


# -- --vs-transformers: one training step against transformers' LlamaForCausalLM ----------------
# model shape flags: (default, default with --vs-transformers). The latter is the Llama:
# head_dim 64, GQA 8/2, Llama 3's vocabulary, ffn/hidden = 2.6875 (Llama 2 7B's 11008/4096).
SHAPES = {"layers": (2, 2), "hidden": (256, 512), "heads": (8, 8), "kv_heads": (4, 2), "ffn": (512, 1376),
          "vocab": (1024, 128256)}
GIB = 2**30


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" after the shape flags
        return action.help if action.default is None else super()._get_help_string(action)


def build_pair(args):
    """transformers' LlamaForCausalLM (sdpa attention, gradient checkpointing) with random weights, and
    meshtron's single-process GPTModel with the same weights (convert/hf_map.py) and the long-sequence
    settings: the fused chunked loss, ``recompute: full``, the tiled MLP."""
    import transformers

    from convert.hf_map import hf_to_canonical, model_config_from_hf
    from engine.config import ModelConfig
    from engine.mesh import ParallelMesh
    from engine.model.gpt import GPTModel

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable()
    hf.train()
    model_dict = model_config_from_hf(hf_cfg)
    ours = GPTModel(ModelConfig(**model_dict), ParallelMesh.single(), dtype=dtype, recompute="full",
                    tile_mlp=args.tile_mlp, loss_chunk_tokens=args.loss_chunk)
    ours.load_canonical(hf_to_canonical(hf.state_dict(), model_dict, ours.padded_vocab))
    return hf, ours, model_dict


def _step(model, run) -> tuple[float, tuple[float, float]]:
    """(loss, (wall seconds, CPU seconds of this process)) of one forward + backward from no gradients.
    The CPU time is what a machine shared with other jobs distorts least (time-sharing stretches
    the wall time, not the CPU time); with one thread and an idle machine the two agree."""
    for p in model.parameters():
        p.grad = None
    t0, c0 = time.perf_counter(), time.process_time()
    loss = run()
    loss.backward()
    return loss.item(), (time.perf_counter() - t0, time.process_time() - c0)


def _tracked_step(model, run) -> tuple[float, float, dict]:
    """``_step`` under MemTracker: every tensor of the step (the model's parameters and buffers given
    as external, gradients, activations, temporaries) counted at its creation; the peak is checked
    after every op. Returns the peak snapshot by category too."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, warnings.catch_warnings():
        # ModTracker's per-module bookkeeping loses its way when checkpointed layers rerun in
        # backward; the peak is the total over every live tensor, which that does not affect
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")
        loss, secs = _step(model, run)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return loss, secs, {getattr(k, "value", k): v for k, v in peak.items() if v}  # "Parameter", …, "Total"


def _profile(run_step, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)


def vs_transformers(args) -> int:
    """One step of each with the same weights and tokens: peak memory, tokens/s, loss agreement."""
    from tqdm import tqdm

    from convert.hf_map import hf_to_canonical
    from engine.data.packing import document_arrays, pack
    from engine.loss import token_loss_sum
    from engine.model.gpt import canonical_tensors
    from engine.spawn import max_rel_diff

    torch.set_num_threads(args.threads)
    phases = ["build"] + [f"{name} step {r + 1}/{args.repeats}" for r in range(args.repeats)
                          for name in ("meshtron", "transformers")]
    bar = tqdm(phases, desc="vs transformers", unit="phase", file=sys.stderr)
    bar.set_postfix_str("building both models")
    hf, ours, model_dict = build_pair(args)
    tokens = torch.randint(0, args.vocab, (args.seq,), generator=torch.Generator().manual_seed(1))
    batch = pack([document_arrays(tokens.tolist())[:2]])  # one document; labels shifted before (I-2)
    assert batch.num_valid == args.seq - 1

    def run_ours():
        return token_loss_sum(ours, batch) / batch.num_valid

    def run_hf():  # transformers shifts the labels itself and averages over the seq - 1 predictions
        return hf(input_ids=tokens[None], labels=tokens[None]).loss

    runs = {"meshtron": (ours, run_ours), "transformers": (hf, run_hf)}
    res = {name: {"seconds": [], "cpu_seconds": []} for name in runs}
    bar.update()
    for phase in phases[1:]:
        bar.set_postfix_str(phase)
        name = phase.split()[0]
        model, run = runs[name]
        if "peak" not in res[name]:
            res[name]["loss"], secs, res[name]["peak"] = _tracked_step(model, run)
            if name == "meshtron":  # canonical gradients, to compare once transformers' are there
                grads = {n: p.grad for n, p in ours.named_parameters()}
                res[name]["grads"] = canonical_tensors(ours, grads)
            else:
                hf_grads = {n: p.grad for n, p in hf.named_parameters()}
                res[name]["grads"] = hf_to_canonical(hf_grads, model_dict, ours.padded_vocab)
        else:
            secs = _step(model, run)[1]
        res[name]["seconds"].append(secs[0])
        res[name]["cpu_seconds"].append(secs[1])
        bar.update()
    bar.close()

    ref_grads = res["transformers"].pop("grads")
    grad_diff = max(max_rel_diff(g, ref_grads[n]) for n, g in res["meshtron"].pop("grads").items())
    loss_diff = abs(res["meshtron"]["loss"] - res["transformers"]["loss"]) / abs(res["transformers"]["loss"])
    for r in res.values():
        r["peak_gib"] = r["peak"]["Total"] / GIB
        r["tokens_per_s"] = args.seq / min(r["seconds"])
        r["cpu_tokens_per_s"] = args.seq / min(r["cpu_seconds"])
    m, t = res["meshtron"], res["transformers"]
    print(f"one training step (forward + backward, no optimizer), one document of {args.seq} tokens, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.threads} thread(s): Llama {args.layers} layers, hidden "
          f"{args.hidden}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, vocab {args.vocab}")
    print(f"meshtron: recompute=full, tile_mlp={args.tile_mlp}, loss_chunk_tokens={args.loss_chunk}; "
          f"transformers {__import__('transformers').__version__}: LlamaForCausalLM, sdpa, gradient checkpointing")
    print(f"{'':<13} {'peak GiB':>9} {'tokens/s':>9} {'best s':>8} {'CPU s':>8}  {'loss':>12}  "
          f"peak by category (GiB)")
    for name, r in res.items():
        parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in r["peak"].items() if k != "Total")
        print(f"{name:<13} {r['peak_gib']:>9.3f} {r['tokens_per_s']:>9.1f} {min(r['seconds']):>8.2f} "
              f"{min(r['cpu_seconds']):>8.2f}  "
              f"{r['loss']:>12.8f}  {parts}")
    print(f"loss relative difference {loss_diff:.2e}; gradients: max |meshtron - transformers| / max |transformers| "
          f"of the worst tensor {grad_diff:.2e}")
    if args.profile:
        for name, (model, run) in runs.items():
            print(f"\n{name}: the {args.profile} costliest ops of one more step (self CPU time)")
            print(_profile(lambda: _step(model, run), args.profile))
    print(json.dumps({"meshtron_peak_gib": round(m["peak_gib"], 4), "transformers_peak_gib": round(t["peak_gib"], 4),
                      "memory_ratio": m["peak_gib"] / t["peak_gib"],
                      "speed_ratio": m["tokens_per_s"] / t["tokens_per_s"], "loss_rel_diff": loss_diff,
                      "grad_rel_diff": grad_diff, "meshtron_tokens_per_s": m["tokens_per_s"],
                      "transformers_tokens_per_s": t["tokens_per_s"],
                      "speed_ratio_cpu_time": m["cpu_tokens_per_s"] / t["cpu_tokens_per_s"],
                      "seconds": {n: r["seconds"] for n, r in res.items()}}))
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=_Help)
    ap.add_argument("--seq", type=int, default=8192, help="tokens of the one packed sequence (global)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel degrees")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel degrees")
    ap.add_argument("--sp-mode", choices=("ring", "ulysses", "hybrid"), default="ring",
                    help="context-parallel attention for cp > 1")
    ap.add_argument("--hp", type=int, default=2, help="Ulysses degree inside cp with --sp-mode hybrid")
    ap.add_argument("--recompute", nargs="+", default=["none"], choices=MODES + ("all",),
                    help="train.recompute modes to measure ('all': every mode)")
    ap.add_argument("--max-world", type=int, default=8, help="skip meshes with tp·cp above this")
    for name, (default, vs_hf) in SHAPES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                        help=f"model shape (default: {default}; {vs_hf} with --vs-transformers)")
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters and activations")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also list the N largest saved-tensor sites of each mesh's largest rank")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if, for any mode, tp=1 cp=4 saves more than (1 + tol)/4 of tp=1 cp=1")
    ap.add_argument("--tol", type=float, default=0.10, help="tolerance of --check")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per mesh")
    vs = ap.add_argument_group("--vs-transformers", "one training step of meshtron against transformers' "
                               "LlamaForCausalLM (--seq, the model shape and --bf16 apply; the mesh flags do not)")
    vs.add_argument("--vs-transformers", action="store_true",
                    help="compare peak memory and tokens/s of one step with transformers (see the module doc)")
    vs.add_argument("--tile-mlp", type=int, default=4, help="meshtron's train.tile_mlp")
    vs.add_argument("--loss-chunk", type=int, default=1024, help="meshtron's train.loss_chunk_tokens")
    vs.add_argument("--repeats", type=int, default=2,
                    help="steps per model, interleaved; the first under MemTracker, tokens/s from the fastest")
    vs.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    vs.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one more step of each (torch.profiler) and list its N costliest ops")
    args = ap.parse_args(argv)
    for name, defaults in SHAPES.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[args.vs_transformers])
    args.recompute = list(MODES) if "all" in args.recompute else list(dict.fromkeys(args.recompute))
    return args


def main(argv=None) -> int:
    from tqdm import tqdm

    from engine.config import ConfigError

    args = parse_args(argv)
    if args.vs_transformers:
        return vs_transformers(args)
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
