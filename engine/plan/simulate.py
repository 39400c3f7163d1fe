"""``meshtron-plan --simulate CONFIG``: one training step of real ranks of the configured world, at
real shapes, on any machine.

Each simulated rank runs in a process of its own (fake CUDA, engine/plan/fake_cuda.py, is
process-wide) under a fake process group of the configured world size (``torch.distributed``'s
``fake`` backend: every collective returns at once) and ``FakeTensorMode`` on a fake ``cuda``
device, so nothing is computed and nothing is allocated, but every tensor of the rank exists with
its shape, dtype and device. The rank then runs the engine's own code path: it builds its model
chunk(s) (and the frozen reference for DPO) and its optimizer with the configured sharding and
offload, runs one complete step of the configured recipe and schedule on synthetic sequences (or
preference pairs) of the configured length and batch, takes the optimizer step, and saves a
checkpoint through the real save path into a writer that discards the bytes
(:class:`DiscardWriter`). No data file, tokenizer or checkpoint is read.

What is measured (engine/plan/sim_checks.py for the rules):

* memory: ``torch.distributed._tools.mem_tracker.MemTracker``'s peak of tensor bytes on the
  device, by category (parameters, gradients, optimizer states, activations, temporaries), and
  the peak of host tensors (offloaded optimizer states, checkpoint staging);
* NCCL breaches with the engine's file:line, and the host syncs of the step (forward, backward and
  optimizer step; not the save);
* ``planner``: meshtron-plan's analytic prediction of the same rank's peak (I-11: within 5 %).

``fits`` compares the peak plus the CUDA context, the NCCL buffers and the allocator's
fragmentation reserve (engine/plan/devices.py) with the GPU's memory.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import os
import tempfile
import time

from engine.plan.devices import ALLOCATOR_FRAGMENTATION, GIB, usable_bytes

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
MAX_HOST_SYNCS = 4
OFFLOAD_HOST_SYNCS = 4
"""More a step may take when the optimizer runs on the host (``optim.offload``): the host waits
for the clipped gradients it updates from (the clip coefficient's copy, the gradient copies'
events)."""


def max_host_syncs(cfg, params: int = 0, micro_batches: int = 1) -> int:
    """The host syncs a step of ``cfg`` may take (I-9): :data:`MAX_HOST_SYNCS`, plus
    :data:`OFFLOAD_HOST_SYNCS` with ``optim.offload``, plus, with fsdp2 offload, one per sharded
    parameter for each micro-batch after the first: torch's ``CPUOffloadPolicy`` adds each
    micro-batch's gradient into the host's with a blocking copy (the CPU add needs its result).
    ``params``: the rank's parameters; ``micro_batches``: its micro-batches per step. meshtron-plan
    --max-seq-len emits one micro-batch per step, where none of those waits happen."""
    extra = OFFLOAD_HOST_SYNCS if cfg.optim.offload else 0
    if cfg.optim.offload and cfg.optim.sharding == "fsdp2":
        extra += params * max(micro_batches - 1, 0)
    return MAX_HOST_SYNCS + extra


# -- the configured world ----------------------------------------------------------------------
def world_size(cfg) -> int:
    """The world the config describes: ``hardware.gpus``, else dp·pp·tp·cp with dp given."""
    from engine.config import ConfigError

    p = cfg.parallel
    if cfg.hardware.gpus:
        return cfg.hardware.gpus
    if p.dp > 0:
        return p.dp * p.pp * p.tp * p.cp
    raise ConfigError("the config does not say how many GPUs it runs on: set hardware.gpus (the world size) "
                      "or parallel.dp")


def default_ranks(cfg) -> list[int]:
    """One rank of the first and one of the last pipeline stage (the first of each)."""
    from engine.mesh import rank_layout

    p = cfg.parallel
    layout = rank_layout(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, order=p.order, placement=p.placement)
    return sorted({int(layout.grid[0].flatten()[0]), int(layout.grid[p.pp - 1].flatten()[0])})


def simulation_config(cfg):
    """The config the simulated rank trains with: the same model, mesh, recipe and settings, on
    synthetic data of the configured lengths, from random weights, no resume, no export."""
    d = dataclasses.replace(cfg.data, source="synthetic", path=None, tokenizer=None, pack=True,
                            min_doc_len=cfg.data.seq_len, max_doc_len=cfg.data.seq_len)
    return dataclasses.replace(
        cfg, data=d, model=dataclasses.replace(cfg.model, load=None),
        train=dataclasses.replace(cfg.train, resume="none"),
        checkpoint=dataclasses.replace(cfg.checkpoint, export_hf=None, every=0))


def steady_micro_batches(cfg) -> int:
    """The fewest micro-batches per rank and step whose simulated peak is the whole step's:
    without a pipeline the second micro-batch runs as every later one (gradients accumulate into
    buffers that exist); with one, 2·pp micro-batches (a multiple of pp, as the interleaved schedule
    wants) fill each stage's warm-up — at most (pp-1)·2 + (vpp-1)·pp forwards in flight on the
    first stage — and run steady 1F1B beyond it, so the activations in flight reach their maximum.
    Every micro-batch of the step is still built and moved to the device (the step holds them all,
    as a real one does); only the schedule runs fewer. tests/test_simulate_configs.py checks the
    peak against whole steps of every schedule, byte for byte."""
    return min(micro_batches(cfg), 2 if cfg.parallel.pp == 1 else 2 * cfg.parallel.pp)


def micro_batches(cfg) -> int:
    """Micro-batches per rank and step."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * cfg.parallel.dp)


# -- the planner's view of the same rank --------------------------------------------------------
def planner_inputs(cfg):
    """(ModelSpec, Mesh, Run) of meshtron-plan for a validated config."""
    from engine.plan.memory import Mesh, Run
    from engine.plan.models import ModelSpec

    m, p, t = cfg.model, cfg.parallel, cfg.train
    spec = ModelSpec("config", m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                     m.num_query_groups, m.vocab_size, m.head_dim, m.add_qkv_bias, m.tie_word_embeddings,
                     m.make_vocab_size_divisible_by, m.qk_layernorm)
    mesh = Mesh(p.tp, p.cp, p.hp, p.pp, p.dp, p.vpp)
    run = Run(seq_len=cfg.data.seq_len, recipe=cfg.recipe, recompute=t.recompute, sharding=cfg.optim.sharding,
              offload=cfg.optim.offload, bf16=t.bf16, micro_batch_size=t.micro_batch_size,
              global_batch_size=t.global_batch_size, pp_schedule=p.pp_schedule, seq_chunks=p.seq_chunks,
              seq_partition=p.seq_partition, loss_chunk=t.loss_chunk_tokens, tile_mlp=t.tile_mlp,
              offload_activations=t.offload_activations, offload_keep_layers=t.offload_keep_layers,
              precompute_reference=cfg.recipe == "dpo" and cfg.dpo.precompute_reference)
    return spec, mesh, run


def planner_bytes(cfg, stage: int) -> float:
    """meshtron-plan's peak tensor bytes of pipeline stage ``stage`` (no fixed terms)."""
    from engine.plan.memory import stage_memory

    parts, _, _ = stage_memory(*planner_inputs(cfg), stage)
    return float(sum(parts.values()))


def gpu_memory_gib(cfg, override: float | None = None) -> float:
    from engine.plan.devices import DEVICES

    if override:
        return override
    return cfg.hardware.gpu_memory_gb or DEVICES[cfg.hardware.gpu].memory_gib


# -- one rank (in its own process) ---------------------------------------------------------------
def simulate_rank(cfg, world: int, rank: int, run: int | None = None) -> dict:
    """Run the simulated step of global rank ``rank``; returns its measurements (see module doc).
    ``run``: how many of the step's micro-batches the schedule runs (None: all)."""
    from engine.plan import fake_cuda

    fake_cuda.install()
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        return _run_rank(simulation_config(cfg), rank, torch.device(fake_cuda.DEVICE), start, run)
    finally:
        dist.destroy_process_group()


def _run_rank(cfg, rank: int, device, start: float, run: int | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.plan.sim_checks import StepWatch, group_warnings, step_memory_tracker
    from engine.train import build_model

    p = cfg.parallel
    if p.sp_mode == "flexsp":
        raise ValueError("parallel.sp_mode=flexsp is not simulated: its groups change every step; simulate the "
                         "static cp mode FlexSP's largest group uses (parallel.sp_mode=ring|ulysses|hybrid)")
    mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, order=p.order, placement=p.placement,
                              device=device, **_ring_window(p))
    watch = StepWatch(mesh.device)
    with group_warnings(watch), FakeTensorMode(allow_non_fake_inputs=True), watch:
        model = build_model(cfg, mesh)
        # dpo.precompute_reference: training holds no reference and its step reads cached sums
        precomputed = cfg.recipe == "dpo" and cfg.dpo.precompute_reference
        reference = (build_model(cfg, mesh).requires_grad_(False).eval()
                     if cfg.recipe == "dpo" and not precomputed else None)
        opt = MeshOptimizer(model, cfg.optim, mesh, cfg.train.steps)
        # a step of the steady state (every step after the first): AdamW's moments exist before
        # the forward, as they do from the second step of a run or after a resume
        opt.restore_step(1, moments=True)
        host = _host_batches(cfg, mesh)
        if precomputed:  # synthetic sums in place of the cache's (fp32 [2·pairs], as computed)
            import torch
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                for mb in host[0]:
                    mb.reference = torch.zeros(2 * mb.num_pairs)
        tracker = step_memory_tracker()
        _track(tracker, model, reference, opt)
        with tracker:
            watch.counting = True
            stats = _step(cfg, model, reference, opt, mesh, host, run)
            watch.counting = False
            save_peak = _save(cfg, model, opt, mesh, tracker)
        peak = tracker.get_tracker_snapshot("peak")
    device_peak = _categories(peak.get(mesh.device, {}))
    host_peak = sum(v for dev, snap in peak.items() if dev.type == "cpu" for k, v in snap.items() if k == "Total")
    return {"rank": rank, "coords": {a: mesh.index(a) for a in ("pp", "dp", "tp", "cp", "hp", "rp")},
            "stage": mesh.index("pp"), "peak_bytes": device_peak["total"], "categories": device_peak,
            "peak_site": getattr(tracker, "peak_site", ""),
            "host_bytes": host_peak, "save_peak_bytes": save_peak, "host_syncs": watch.num_syncs,
            "host_sync_allowance": max_host_syncs(cfg, sum(1 for w in model.parameters() if w.requires_grad),
                                                  len(host[0][:run])),
            "micro_batches": len(host[0][:run]),
            "host_sync_sites": [f"{where} {kind} x{n}" for (where, kind), n in sorted(watch.syncs.items())],
            "unknown_host_values": [f"{where} x{n}" for where, n in watch.unknown_host_values.items()],
            "nccl_violations": [f"{where}: {what}" for where, what in watch.violations.items()],
            "loss_finite": stats.get("skipped", 0) == 0, "seconds": time.perf_counter() - start}


def _ring_window(p) -> dict:
    """The double ring's window, where the mesh builds its groups (parallel.ring_window)."""
    import inspect

    from engine.mesh import ParallelMesh

    return {"ring_window": p.ring_window} if "ring_window" in inspect.signature(ParallelMesh.build).parameters else {}


def _host_batches(cfg, mesh):
    """This rank's micro-batches of step 0 and the step's global valid-token count, built on the
    host with real tensors by the engine's own functions (as a real run does before moving them to
    the device: engine.train.host_micro_batches, engine.recipes.dpo.dpo_micro_batches)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from engine import train

    with unset_fake_temporarily():
        if cfg.recipe == "dpo":
            from engine.recipes.dpo import dpo_micro_batches

            return dpo_micro_batches(SyntheticPairs(cfg), 0, cfg, mesh, device="cpu"), None
        dataset = train.build_dataset(cfg)
        return train.host_micro_batches(dataset, 0, cfg, mesh), train.step_valid_tokens(dataset, 0, cfg)


class SyntheticPairs:
    """Preference pairs of the configured length: chosen and rejected each ``seq_len / 2`` tokens,
    the first quarter of each a prompt (no loss), so every pair fills its sequence."""

    def __init__(self, cfg):
        from engine.recipes.dpo import PairSequences

        self.cfg = cfg
        self.sequences = PairSequences(self, cfg.data.seq_len)

    def pair(self, index: int):
        import torch

        from engine.data.packing import document_arrays

        half = self.cfg.data.seq_len // 2
        docs = []
        for offset in (0, 1):
            toks = ((torch.arange(half) * 7 + index + offset) % (self.cfg.model.vocab_size - 1) + 1).tolist()
            mask = [i >= half // 4 for i in range(half)]
            docs.append(document_arrays(toks, mask)[:2])
        return docs[0], docs[1]

    def sequence(self, index: int):
        return self.sequences.sequence(index)


def _step(cfg, model, reference, opt, mesh, host, run: int | None = None) -> dict:
    """One optimizer step as engine.train.train runs it: batches to the device, forward and
    backward through the schedule, the optimizer step, the read of what the loop logs. ``run``:
    the schedule runs the first ``run`` micro-batches (the steady state); all are on the device."""
    from engine import train

    batches, num_valid = host
    if cfg.recipe == "dpo":
        on_device = [mb.to(mesh.device) for mb in batches]
        loss, _, extra = train.dpo_forward_backward(model, reference, on_device[:run], mesh, cfg,
                                                    grad_sync=opt.grad_sync)
    else:
        on_device = train.batches_to(batches, mesh.device)
        loss, _ = train.forward_backward(model, on_device[:run], mesh, cfg.parallel,
                                         num_valid=num_valid, grad_sync=opt.grad_sync)
        extra = {}
    stats = opt.step(loss)
    train.read_logged({"loss": stats.pop("loss", loss), **extra})
    return stats


def _save(cfg, model, opt, mesh, tracker) -> float:
    """A checkpoint save through the real save path into :class:`DiscardWriter`; returns the
    device peak of the save alone (bytes above what the step left on the device). The tracker's
    overall peak stays the larger of the step's and the save's."""
    from engine.resume import save_training_checkpoint

    dev = mesh.device
    step_peak, step_snap = dict(tracker._peak_mem), copy.deepcopy(tracker._peak_mem_snap)
    current = tracker.get_tracker_snapshot("current")
    before = _categories(current.get(dev, {}))["total"]
    tracker._peak_mem_snap = current  # measure the save's own peak from here
    tracker._peak_mem = {d: snap.get("Total", 0) for d, snap in current.items()}
    with tempfile.TemporaryDirectory() as root:
        sim_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir=root, keep=0))
        save_training_checkpoint(model, opt, mesh, sim_cfg, 1, storage_writer=DiscardWriter)
    save_total = tracker._peak_mem.get(dev, 0)
    for d, total in step_peak.items():  # the report's peak: the larger of step and save, per device
        if total >= tracker._peak_mem.get(d, 0):
            tracker._peak_mem[d], tracker._peak_mem_snap[d] = total, step_snap[d]
    return max(0.0, save_total - before)


def _track(tracker, model, reference, opt) -> None:
    """Register what exists before the step: parameters (and the reference's), the optimizer, and
    the tensors MemTracker cannot attribute itself — fp32 gradient buckets (gradients) and fp32
    master weights kept apart from the parameters (optimizer states)."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    for t in opt.state.state_tensors():  # first: where a state tensor is a parameter, Parameter wins below
        tracker._update_and_maybe_create_winfos(t.to_local() if hasattr(t, "to_local") else t, _MemRefType.OPT)
    buffers = getattr(opt.state, "buffers", None)
    for t in (buffers.tensors() if buffers is not None else []):
        tracker._update_and_maybe_create_winfos(t, _MemRefType.GRAD)
    modules = list(model) + (list(reference) if reference is not None else [])
    tracker.track_external(*modules, opt.adam)


def _categories(snapshot: dict) -> dict:
    """MemTracker's categories as the report's."""
    by = {str(getattr(k, "value", k)): v for k, v in snapshot.items()}
    out = {"parameters": by.get("Parameter", 0) + by.get("Buffer", 0), "gradients": by.get("Gradient", 0),
           "optimizer": by.get("Optstate", 0), "activations": by.get("Activation", 0),
           "temporaries": by.get("Temp", 0) + by.get("Other", 0) + by.get("Inputs", 0)}
    out["total"] = by.get("Total", sum(out.values()))
    return out


# -- the DCP sink --------------------------------------------------------------------------------
def _writer_base():
    from torch.distributed.checkpoint import StorageWriter

    return StorageWriter


class DiscardWriter(_writer_base()):
    """A ``torch.distributed.checkpoint`` storage writer that takes every item the save path
    produces (tensors staged to host memory as the file writer stages them, byte objects) and
    throws the bytes away, reporting the sizes a file writer would have written."""

    def __init__(self, path: str | os.PathLike = "", *args, **kwargs):
        super().__init__()
        self.path = str(path)
        self.bytes_written = 0

    def reset(self, checkpoint_id=None) -> None:
        self.bytes_written = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def write_data(self, plan, planner):
        import torch
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult
        from torch.futures import Future

        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if isinstance(data, torch.Tensor):
                staged = data.detach().to("cpu")  # what the file writer stages before writing
                size = staged.numel() * staged.element_size()
                del staged
            else:
                size = len(data.getbuffer()) if hasattr(data, "getbuffer") else len(data)
            self.bytes_written += size
            results.append(WriteResult(index=item.index, size_in_bytes=size,
                                       storage_data=_StorageInfo("discarded", 0, size)))
        fut = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata, results) -> None:
        pass

    def storage_meta(self):
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


# -- several ranks, the report ----------------------------------------------------------------------
def _worker(args):
    cfg, world, rank, run = args
    try:
        return simulate_rank(cfg, world, rank, run)
    except Exception as e:  # noqa: BLE001 - reported per rank, with the traceback
        import traceback

        return {"rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def simulate(cfg, ranks: list[int] | None = None, gpu_memory: float | None = None,
             steady: bool = False) -> dict:
    """Simulate ``ranks`` (default: :func:`default_ranks`) of a validated config; the report.
    ``steady``: the schedule runs :func:`steady_micro_batches` of the step's micro-batches, not all
    (the same peak, a fraction of the time for a large global batch)."""
    start = time.perf_counter()
    world = world_size(cfg)
    ranks = ranks or default_ranks(cfg)
    run = steady_micro_batches(cfg) if steady else None
    ctx = multiprocessing.get_context("spawn")
    workers = max(1, min(len(ranks), os.cpu_count() or 1))
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        results = pool.map(_worker, [(cfg, world, r, run) for r in ranks], chunksize=1)
    _, mesh, _ = planner_inputs(cfg)
    gib = gpu_memory_gib(cfg, gpu_memory)
    usable = usable_bytes(gib, mesh.communicators(), ALLOCATOR_FRAGMENTATION)
    for r in results:
        if "error" not in r:
            r["planner_bytes"] = planner_bytes(cfg, r["stage"])
    ok = [r for r in results if "error" not in r]
    peak = max((r["peak_bytes"] for r in ok), default=math.nan)
    worst = max(ok, key=lambda r: r["peak_bytes"]) if ok else None
    return {"ranks": results, "world": world, "gpu_memory_gib": gib, "usable_bytes": usable,
            "peak_gib": peak / GIB,
            "planner_gib": worst["planner_bytes"] / GIB if worst else math.nan,
            "host_gib": max((r["host_bytes"] for r in ok), default=0.0) / GIB,
            "host_syncs_per_step": max((r["host_syncs"] for r in ok), default=0),
            "host_sync_allowance": min((r["host_sync_allowance"] for r in ok), default=MAX_HOST_SYNCS),
            "nccl_violations": sorted({v for r in ok for v in r["nccl_violations"]}),
            "micro_batches": min((r["micro_batches"] for r in ok), default=0),
            "configured_micro_batches": micro_batches(cfg),
            "fits": bool(ok) and len(ok) == len(results) and peak <= usable,
            "errors": [f"rank {r['rank']}: {r['error']}" for r in results if "error" in r],
            "seconds": time.perf_counter() - start}


def format_report(report: dict, config: str) -> str:
    """The tables (one per rank) printed before the JSON line."""
    lines = [f"{config}: {report['world']} GPUs x {report['gpu_memory_gib']:g} GiB; usable for tensors "
             f"{report['usable_bytes'] / GIB:.2f} GiB per GPU (after CUDA context, NCCL and fragmentation)"]
    if report["micro_batches"] != report["configured_micro_batches"]:
        lines.append(f"steady state: {report['micro_batches']} of the step's {report['configured_micro_batches']} "
                     f"micro-batches per rank simulated (the same peak)")
    for r in report["ranks"]:
        if "error" in r:
            lines += [f"rank {r['rank']}: simulation failed: {r['error']}", r.get("traceback", "")]
            continue
        c = r["coords"]
        diff = (r["planner_bytes"] / r["peak_bytes"] - 1) * 100 if r["peak_bytes"] else math.nan
        lines.append(f"rank {r['rank']} (pp {c['pp']}, dp {c['dp']}, tp {c['tp']}, cp {c['cp']}): peak "
                     f"{r['peak_bytes'] / GIB:.2f} GiB, planner {r['planner_bytes'] / GIB:.2f} GiB ({diff:+.1f} %), "
                     f"{r['seconds']:.0f} s")
        for name in CATEGORIES:
            lines.append(f"  {name:<12} {r['categories'][name] / GIB:9.2f} GiB")
        if r.get("peak_site"):
            lines.append(f"  peak reached at {r['peak_site']}")
        lines.append(f"  {'host':<12} {r['host_bytes'] / GIB:9.2f} GiB   checkpoint save adds "
                     f"{r['save_peak_bytes'] / GIB:.2f} GiB on the device")
        lines.append(f"  host syncs per step: {r['host_syncs']} (allowed {r['host_sync_allowance']})"
                     + "".join(f"\n    {s}" for s in r["host_sync_sites"]))
        lines.append("  NCCL violations: " + ("none" if not r["nccl_violations"] else
                                             "".join(f"\n    {v}" for v in r["nccl_violations"])))
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"peak {report['peak_gib']:.2f} GiB (planner {report['planner_gib']:.2f} GiB): {verdict}")
    return "\n".join(lines)


def json_line(report: dict, config: str) -> str:
    ranks = [{k: v for k, v in r.items() if k not in ("traceback",)} for r in report["ranks"]]
    out = {"config": config, "ranks": ranks, "peak_gib": report["peak_gib"], "planner_gib": report["planner_gib"],
           "host_gib": report["host_gib"], "host_syncs_per_step": report["host_syncs_per_step"],
           "host_sync_allowance": report["host_sync_allowance"],
           "nccl_violations": report["nccl_violations"], "fits": report["fits"], "errors": report["errors"],
           "micro_batches": report["micro_batches"], "configured_micro_batches": report["configured_micro_batches"],
           "seconds": report["seconds"]}
    return json.dumps(out)
