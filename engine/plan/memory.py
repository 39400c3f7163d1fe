"""Memory per rank of a meshtron run: model states, activations by recompute and CP mode, the loss
working set, CP buffers, and the fixed and fragmentation terms of engine/plan/devices.py.

Model states (engine/optim.py, engine/parallel/zero.py, engine/parallel/fsdp.py), P parameters of
this rank's tp shard of its pipeline stage, D = dp·cp, s_p bytes of a parameter (2 bf16, 4 fp32):

========  ====================  ===================================  ===============================
sharding  params                grads                                optimizer (device; 0 if offload)
========  ====================  ===================================  ===============================
none      s_p·P                 4P: fp32 ``main_grad`` buckets,      (4 masters if bf16 + 8 Adam)·P
                                all-reduced in place
zero1     s_p·P                 4P: fp32 buckets, reduce-scattered   (4 if bf16 + 8)·P/D
                                in place
fsdp2     4P/D + 2 layers·s_p   4P/D + 1 layer·4                     8P/D
========  ====================  ===================================  ===============================

``offload`` moves the optimizer column to host memory; with fsdp2 (torch's ``CPUOffloadPolicy``)
the parameter and gradient shards go too, and the device keeps only what is gathered.

DPO adds the frozen reference model (s_p·P, forward only) and runs it over every micro-batch
before the policy (engine/recipes/dpo.py), a phase with no saved activations — unless
``precompute_reference``: then the sums were computed before training and neither exists.

Activation offload (engine/model/offload.py) keeps the first ``offload_keep_layers`` layers of
each model chunk's checkpoints on the device and the rest in host memory (the host column, at
the schedule's peak of micro-batches in flight), plus two layers' worth staged on the device in
backward (the layer being rebuilt, the one prefetched).

The peak is the largest of these phases: ``loss`` (last stage: states, the saved activations of
the micro-batches in flight and the cross-entropy's forward working set), ``backward`` (states,
saved activations, one layer's backward with its recomputed layer and the CP buffers), ``step``
(states with the fp32 gradient copy, no activations) and, for DPO, ``reference`` (the frozen
model's forward: one layer live at a time, then its loss without grad).
"""
from __future__ import annotations

import dataclasses
import math

from engine.model.sharding import stage_layers
from engine.plan import activations as act
from engine.plan.devices import ALLOCATOR_FRAGMENTATION, CUDA_CONTEXT_GIB, GIB, NCCL_COMM_GIB
from engine.plan.models import ModelSpec, layer_params, param_counts

COMPONENTS = ("params", "grads", "optimizer", "activations", "loss", "cp_buffers")


@dataclasses.dataclass(frozen=True)
class Mesh:
    tp: int = 1
    cp: int = 1
    hp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1

    @property
    def rp(self) -> int:
        return self.cp // self.hp

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def communicators(self) -> int:
        """Process groups that move bulk data (each costs NCCL buffers): tp, hp, rp, dp×cp, pp."""
        return sum(n > 1 for n in (self.tp, self.hp, self.rp, self.dp * self.cp, self.pp))


@dataclasses.dataclass(frozen=True)
class Run:
    seq_len: int
    """Tokens per sequence (meshtron's data.seq_len; for DPO a chosen+rejected pair packed together)."""
    recipe: str = "sft"
    recompute: str = "none"
    sharding: str = "none"
    offload: bool = False
    bf16: bool = True
    micro_batch_size: int = 1
    global_batch_size: int = 0
    """Sequences per step; 0 = one micro-batch per dp rank."""
    pp_schedule: str = "1f1b"
    seq_chunks: int = 1
    seq_partition: str = "compute"
    """Seq1F1B unit lengths: ``compute`` (equal FLOPs, first unit longest) or ``uniform``."""
    loss_chunk: int = 1024
    """train.loss_chunk_tokens: tokens per chunk of the fused output layer + loss (0: whole logits)."""
    tile_mlp: int = 1
    """train.tile_mlp: token tiles of each MLP."""
    offload_activations: bool = False
    """train.offload_activations: what the layers keep for backward goes to host memory."""
    offload_keep_layers: int = 0
    """train.offload_keep_layers: layers per model chunk whose checkpoints stay on the GPU."""
    precompute_reference: bool = False
    """dpo.precompute_reference: no reference model in training (its sums were computed before)."""


@dataclasses.dataclass
class Breakdown:
    """Bytes per rank of the worst pipeline stage at its peak phase."""
    parts: dict[str, float]
    phase: str
    stage: int
    fixed: float
    """CUDA context and NCCL buffers."""
    reserve: float
    """What the allocator's fragmentation makes unusable."""
    device: float
    host: float
    """Host bytes of this rank: offloaded optimizer states (fsdp2: parameters and gradients too)
    and offloaded activations (not counted against the GPU)."""
    host_limit: float = float("inf")
    """Host memory available to one rank: the node's host memory over the ranks it holds."""

    @property
    def allocated(self) -> float:
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        return self.allocated + self.fixed + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.device and self.host <= self.host_limit


def tokens_per_rank(seq_len: int, mesh: Mesh, micro_batch_size: int = 1) -> int:
    """Tokens one rank holds of a micro-batch: each sequence padded to a multiple of 2·cp·tp (tp
    without cp: I-3, engine/config/checks.py) and cut over cp."""
    unit = 2 * mesh.cp * mesh.tp if mesh.cp > 1 else mesh.tp
    return math.ceil(seq_len / unit) * unit // mesh.cp * micro_batch_size


def micro_batches(run: Run, mesh: Mesh) -> int:
    """Micro-batches each dp rank runs per step."""
    per_dp = run.global_batch_size // mesh.dp if run.global_batch_size else run.micro_batch_size
    return max(1, per_dp // run.micro_batch_size)


def in_flight(run: Run, mesh: Mesh, stage: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at once (in micro-batch units):
    1F1B: min(pp − r, m); interleaved: Megatron's warm-up 2(pp − r − 1) + (vpp − 1)·pp chunk
    forwards plus one, each chunk 1/vpp of the stage; Seq1F1B: pp − r − 1 + k units of 1/k."""
    m, pp = micro_batches(run, mesh), mesh.pp
    if run.pp_schedule == "interleaved":
        return min(2 * (pp - stage - 1) + (mesh.vpp - 1) * pp + 1, m * mesh.vpp) / mesh.vpp
    if run.pp_schedule == "seq1f1b":
        k = run.seq_chunks
        return min(pp - stage - 1 + k, m * k) / k
    return min(pp - stage, m)


def unit_fractions(m: ModelSpec, mesh: Mesh, run: Run) -> list[float]:
    """Each Seq1F1B unit's share of a micro-batch's tokens, as engine.train.unit_lengths cuts
    them ([1.0] for the other schedules)."""
    if run.pp_schedule != "seq1f1b" or run.seq_chunks == 1:
        return [1.0]
    from engine.parallel.pipeline.partition import compute_partition, uniform_partition

    multiple = 2 * mesh.cp * mesh.tp if mesh.cp > 1 else mesh.tp
    total = tokens_per_rank(run.seq_len, mesh, run.micro_batch_size) * mesh.cp
    if run.seq_partition == "uniform":
        lengths = uniform_partition(total, run.seq_chunks, multiple)
    else:
        lengths = compute_partition(total, run.seq_chunks, multiple, hidden=m.hidden_size, num_layers=m.num_layers,
                                    num_heads=m.num_attention_heads, head_dim=m.head_dim, ffn=m.ffn_hidden_size,
                                    vocab=m.vocab_size)
    return [n / total for n in lengths]


def live_peak(run: Run, mesh: Mesh, stage: int, weight) -> float:
    """The most ``weight(chunk, unit)`` summed over the units whose forward has run and whose
    backward has not, walking this pipeline rank's own schedule (engine/parallel/pipeline/
    schedules.py): the saved activations at their peak, for any schedule and unit sizes."""
    from engine.parallel.pipeline.schedules import pipeline_plan

    k = run.seq_chunks if run.pp_schedule == "seq1f1b" else 1
    plan = pipeline_plan(run.pp_schedule, mesh.pp, stage, micro_batches(run, mesh), mesh.vpp, k)
    live = peak = 0.0
    for step in plan:
        for kind, _, c, j in step.actions:
            live += weight(c, j) if kind == "F" else -weight(c, j)
            peak = max(peak, live)
    return peak


def _states(m: ModelSpec, mesh: Mesh, run: Run, num_layers: int, first: bool, last: bool) -> dict:
    n = param_counts(m, mesh.tp, num_layers, first, last)
    p = n["sharded"] + n["replicated"]
    s_p, pool = (2 if run.bf16 else 4), mesh.dp * mesh.cp
    layer = layer_params(m) / mesh.tp
    window_bwd = window_fwd = 0.0
    sharding = run.sharding  # (fsdp2 without offload on one dp×cp rank: replicated, as "none")
    if sharding == "fsdp2" and pool == 1 and not run.offload:
        sharding = "none"
    if sharding == "fsdp2":
        # fp32 shards (the masters) and their gradient shards; the chunk's own parameters
        # (embedding, final norm, output layer) stay gathered from its forward to its backward;
        # a layer is gathered for its forward and again for its backward (the next one
        # prefetched: two at a time), its unsharded fp32 gradient alive until reduce-scattered
        root = p - num_layers * layer
        params, grads, optim = 4 * p / pool + s_p * root, 4 * p / pool, 8 * p / pool
        window_fwd, window_bwd = 2 * layer * s_p, 2 * layer * s_p + 4 * layer
        if last:  # the output layer's unsharded gradient, made by the loss's backward, waits for
            # the chunk's reduce-scatter at the end of its backward (the embedding's comes last)
            window_bwd += s_p * m.padded_vocab(mesh.tp) / mesh.tp * m.hidden_size
    elif sharding == "zero1":  # fp32 main_grad buckets; fp32 masters (bf16 only) and moments of 1/pool
        params, grads, optim = s_p * p, 4 * p, (12 if run.bf16 else 8) * p / pool
    else:  # fp32 main_grad buckets (reduced in place), fp32 masters (bf16 only) and moments
        params, grads, optim = s_p * p, 4 * p, (12 if run.bf16 else 8) * p
    step_extra = 0.0
    host = 0.0
    if run.offload and sharding == "fsdp2":
        # CPUOffloadPolicy: the fp32 parameter shards, their gradients and the moments are host
        # tensors; the device holds what is gathered (root and layer windows) and one layer's
        # unsharded gradient until it is reduce-scattered and copied out
        host, params, grads, optim = params - s_p * root + grads + optim, s_p * root, 0.0, 0.0
    elif run.offload:
        host, optim = optim, 0.0
    if run.recipe == "dpo" and not run.precompute_reference:
        params += s_p * p  # the frozen reference model
    return {"params": params, "grads": grads, "optimizer": optim, "step_extra": step_extra, "host": host,
            "window_fwd": window_fwd, "window_bwd": window_bwd}


def stage_phases(m: ModelSpec, mesh: Mesh, run: Run, stage: int) -> tuple[dict[str, dict[str, float]], float]:
    """``({phase: parts}, host bytes)`` of pipeline rank ``stage``."""
    chunks = stage_layers(m.num_layers, mesh.pp, mesh.vpp)[stage]
    num_layers = sum(len(c) for c in chunks)
    first, last = stage == 0, stage == mesh.pp - 1
    st = _states(m, mesh, run, num_layers, first, last)
    s, tp, hp = (2 if run.bf16 else 4), mesh.tp, mesh.hp
    tokens = tokens_per_rank(run.seq_len, mesh, run.micro_batch_size)
    fracs = unit_fractions(m, mesh, run)
    unit = tokens * max(fracs)  # the largest unit of work: a micro-batch, or a Seq1F1B unit
    tiles, chunk = run.tile_mlp, run.loss_chunk
    per_layer = act.kept_per_layer(m, tp, hp, s, run.recompute, tiles)
    kv = 2 * m.num_query_groups / tp * m.head_dim * s  # a layer's K and V per token
    loss_tok = act.loss_saved_per_token(m, tp, s, chunk) if last else 0.0

    def on_device(c: int) -> int:
        """Layers of chunk ``c`` whose checkpoints stay on the GPU (engine/model/offload.py)."""
        return min(run.offload_keep_layers, len(chunks[c])) if run.offload_activations else len(chunks[c])

    def host_bytes(c: int, j: int) -> float:
        return per_layer * (len(chunks[c]) - on_device(c)) * fracs[j] * tokens

    def saved_bytes(c: int, j: int) -> float:
        """What unit ``j`` of a micro-batch keeps on model chunk ``c`` of this stage."""
        per_token = per_layer * on_device(c)
        per_token += act.model_extras_per_token(m, tp, s, first and c == 0, False, 1, run.recompute)
        if c == len(chunks) - 1:
            per_token += loss_tok  # the loss's softmax
        out = per_token * fracs[j] * tokens
        if j:  # Seq1F1B: the earlier units' K/V gathered for this unit's attention (saved for its backward)
            out += kv * len(chunks[c]) * sum(fracs[:j]) * tokens * mesh.cp
        return out

    saved = live_peak(run, mesh, stage, saved_bytes)
    host_acts = live_peak(run, mesh, stage, host_bytes) if run.offload_activations else 0.0
    # offload in flight: a layer's checkpoint copied out while the next runs; in backward the
    # layer being rebuilt and the one prefetched (engine/model/offload.py)
    staged = per_layer * unit * (2 if run.offload_activations and any(
        len(c_) > run.offload_keep_layers for c_ in chunks) else 0)
    loss_saved = loss_tok * unit  # the softmax (fused: the lse) of the unit whose backward starts
    # a layer's backward runs its MLP half, then its attention half: the larger of the two working
    # sets is alive on top of the layer's rematerialised activations
    mlp_bwd = act.mlp_backward_per_token(m, tp, s, tiles) * unit + act.tile_grad_bytes(m, tp, s, tiles)
    attn_bwd = act.qkv_backward_per_token(m, tp, s) * unit
    cp_buf = act.cp_buffers_per_token(m, tp, hp, mesh.rp, s) * unit
    if mlp_bwd > attn_bwd + cp_buf:
        attn_bwd = cp_buf = 0.0
    else:
        mlp_bwd = 0.0
    layer_bwd = act.rematerialised_per_token(m, tp, hp, s, run.recompute, tiles) * unit + staged + mlp_bwd + attn_bwd
    loss = act.loss_transient_bytes(m, tp, s, unit, chunk) if last else 0.0
    states = {k_: st[k_] for k_ in ("params", "grads", "optimizer")}
    zero = {"activations": 0.0, "loss": 0.0, "cp_buffers": 0.0}
    # a layer's backward: the unit's softmax is spent (its gradient went into the output layer)
    phases = {"backward": {**states, **zero, "params": st["params"] + st["window_bwd"],
                           "activations": saved - loss_saved + layer_bwd, "cp_buffers": cp_buf},
              "step": {**states, **zero, "grads": st["grads"] + st["step_extra"]}}
    if last:
        phases["loss"] = {**states, **zero, "activations": saved, "loss": loss}
        # the loss's backward: unfused, the softmax becomes the logits' gradient in place, cast
        # to bf16; fused, one chunk at a time (engine/fused_loss.py)
        phases["loss_backward"] = {**states, **zero, "activations": saved,
                                   "loss": act.loss_backward_bytes(m, tp, s, unit, chunk)}
    if run.recipe == "dpo" and not run.precompute_reference:
        # reference forward: one layer live at a time, then its loss forward
        ref_loss = 0.0
        if last:
            ref_loss = loss + (4 * m.padded_vocab(tp) / tp * tokens if chunk <= 0 else 0.0)
        grads = st["grads"] if run.sharding == "zero1" else 0.0  # zero1's gradient buckets persist
        layer = (act.layer_bytes_per_token(m, tp, hp, s, tiles) + act.mlp_tile_per_token(m, tp, s, tiles)) * tokens
        phases["reference"] = {**states, "params": st["params"] + st["window_fwd"], "grads": grads,
                               "activations": layer, "loss": ref_loss, "cp_buffers": cp_buf}
    return phases, st["host"] + host_acts


def stage_memory(m: ModelSpec, mesh: Mesh, run: Run, stage: int) -> tuple[dict[str, float], str, float]:
    """``(parts, phase, host bytes)`` at the peak of pipeline rank ``stage``."""
    phases, host = stage_phases(m, mesh, run, stage)
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    return phases[phase], phase, host


def rank_memory(m: ModelSpec, mesh: Mesh, run: Run, gpu_memory_gib: float,
                fragmentation: float = ALLOCATOR_FRAGMENTATION, host_memory_gib_per_node: float = float("inf"),
                gpus_per_node: int = 8) -> Breakdown:
    """The per-rank breakdown of the pipeline stage that needs the most memory; ``host`` is the
    most any stage needs in host memory, which the node's ``host_memory_gib_per_node`` must hold
    for each of its ranks."""
    best, host = None, 0.0
    for stage in range(mesh.pp):
        parts, phase, stage_host = stage_memory(m, mesh, run, stage)
        host = max(host, stage_host)
        if best is None or sum(parts.values()) > sum(best[0].values()):
            best = (parts, phase, stage)
    parts, phase, stage = best
    device = gpu_memory_gib * GIB
    fixed = (CUDA_CONTEXT_GIB + NCCL_COMM_GIB * mesh.communicators()) * GIB
    limit = host_memory_gib_per_node * GIB / min(gpus_per_node, mesh.world)
    return Breakdown(parts, phase, stage, fixed, (device - fixed) * fragmentation, device, host, limit)
