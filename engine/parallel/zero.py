"""ZeRO-1: the distributed optimizer over dp×cp (Megatron's ``--use-distributed-optimizer``).

Layout. This rank's trainable parameters (its tp shard of its pipeline stage; identical on the
D = dp·cp ranks of its dp×cp group) are grouped into *buckets* per model chunk, in backward order,
by (dtype, weight decay, tied embedding copy), of at most ``optim.grad_bucket_size`` elements
(engine/parallel/grads.py ``plan_buckets``). Each bucket is one flat parameter buffer, padded to a
multiple of D, whose views the parameters' ``.data`` become (as in Megatron's param buffer), and
an fp32 gradient buffer of the same layout whose views are the parameters' ``main_grad`` (I-10:
micro-batches accumulate in fp32 whatever the parameter dtype). Slot r of the dp×cp process group
owns elements ``[r·S, (r+1)·S)`` of every bucket (S = padded/D) and holds the AdamW moments and
the fp32 master weights of that shard only: 1/D of the unsharded optimizer state. fp32 masters of
fp32 parameters are views of the parameter buffer (no copy), as in the unsharded optimizer.

Step. (1) During the last backward of the step each gradient bucket, once complete, is
reduce-scattered over dp×cp in place into its own slot (summed, I-5; asynchronous, so it overlaps
the rest of backward); (2) tp-replicated gradients are summed over tp and tied-embedding copies
over the pipeline ends, on the shards; (3) the global norm is the square root of the squares of
all shards summed over dp×cp, tp and pp (each element counted once), and every shard is clipped
by it; (4) AdamW updates the owned shards; (5) every bucket's shards are all-gathered, in the
parameter dtype, into the parameter buffer.

Offload (``optim.offload``): masters and moments are CPU tensors, the reduced (and clipped)
gradient shard is copied to the CPU, AdamW runs there, and the updated shard is copied back to the device before the
all-gather. Device memory then holds no optimizer state at all.

Why the tied-embedding copy gets a bucket of its own: the first and last pipeline stages each hold
a copy that must stay bit-identical. In its own bucket the copy has the same offsets and the same
shard boundaries on both stages, so both stages update every element with the same arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.parallel.data import all_gather_flat, reduce_replicas, reduce_scatter_async, shard_index
from engine.parallel.grads import GradBuffers, plan_buckets


@dataclass
class Bucket:
    """One flat buffer of parameters and this rank's shard ``[lo, hi)`` of it."""

    params: list[torch.nn.Parameter]
    offsets: list[int]  # start of each parameter in the flat buffer
    data: torch.Tensor  # [padded] parameter dtype, on the device; params are views of it
    grad: torch.Tensor  # [padded] fp32, on the device; p.main_grad are views of it
    lo: int
    hi: int
    decay: bool
    master: torch.Tensor = field(default=None)  # [hi - lo] fp32: this rank's master weights
    master_is_param: bool = False  # the master is the parameter buffer's own slice (fp32, on the device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (laid out like ``data``) cut into tensors shaped like the parameters."""
        return [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]


def _host_buffer(b: Bucket, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A host buffer of the bucket's shard size, kept on the bucket; pinned on a CUDA machine,
    so device copies into and out of it do not block the host."""
    buf = getattr(b, name, None)
    if buf is None:
        buf = torch.empty(b.hi - b.lo, dtype=dtype, pin_memory=torch.cuda.is_available())
        setattr(b, name, buf)
    return buf


def _wait_for_host_copies(device: torch.device) -> None:
    """The host waits for the device-to-host copies issued so far (one sync per step)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class ZeroState:
    """Sharded AdamW state of one rank; the engine-facing interface is that of
    :class:`engine.optim.MeshOptimizer`'s state objects (reduce, adam_step, checkpoint_pieces, …)."""

    sharded = True

    def __init__(self, params: list[torch.nn.Parameter], cfg, mesh, chunks: list[list[torch.nn.Parameter]]):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.group = mesh.group("dp_cp")
        num_shards = 1 if self.group is None else torch.distributed.get_world_size(self.group)
        slot = shard_index(self.group)
        self.offload = cfg.offload
        self.state_device = torch.device("cpu") if cfg.offload else mesh.device
        self.mixed = any(p.dtype != torch.float32 for p in params)

        def kind(p):
            return (p.dtype, p.ndim >= 2, bool(getattr(p, "shared_embedding", False)))

        plan = plan_buckets(chunks, cfg.grad_bucket_size, num_shards, kind)
        group = self.group
        self.buffers = GradBuffers(plan, mesh.device, lambda gb: reduce_scatter_async(gb.data, group))
        self.buckets = [self._bucket(params_, key[1], offsets, gb.data, slot)
                        for (_, key, params_, offsets, _), gb in zip(plan, self.buffers.buckets)]
        decay = [b.master for b in self.buckets if b.decay]
        no_decay = [b.master for b in self.buckets if not b.decay]
        fused = all(b.master.is_cuda for b in self.buckets) and bool(self.buckets)
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
        # this rank's piece of each parameter's gradient: (bucket, param, [a, b) in shard coordinates)
        self.pieces = [(b, p, max(o, b.lo) - b.lo, min(o + p.numel(), b.hi) - b.lo)
                       for b in self.buckets for p, o in zip(b.params, b.offsets)
                       if o < b.hi and o + p.numel() > b.lo]

    def _bucket(self, params, decay: bool, offsets: list[int], grad: torch.Tensor, slot: int) -> Bucket:
        size = grad.numel() // (1 if self.group is None else torch.distributed.get_world_size(self.group))
        data = torch.zeros(grad.numel(), dtype=params[0].dtype, device=params[0].device)
        b = Bucket(params, offsets, data, grad, slot * size, (slot + 1) * size, decay)
        with torch.no_grad():
            for p, view in zip(params, b.views(data)):
                view.copy_(p)
                p.data = view  # the parameter now lives in the bucket (the same Parameter object)
        shard = data[b.lo:b.hi]
        if shard.dtype == torch.float32 and not self.offload:
            b.master = shard  # fp32 parameters are their own masters
            b.master_is_param = True
        else:
            b.master = shard.detach().to(device=self.state_device, dtype=torch.float32, copy=True)
        return b

    # -- the step ------------------------------------------------------------------------------
    def reduce(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """Wait for every bucket's reduce-scatter over dp×cp (started during backward), then sum
        tp replicas and tied copies on the shards. Returns this rank's disjoint fp32 gradient
        pieces ``(params, pieces)`` (views of the reduced shards, on the device: clipping them in
        place clips the shards)."""
        self.buffers.finish()
        params = [p for _, p, _, _ in self.pieces]
        pieces = [b.grad[b.lo:b.hi][lo:hi] for b, _, lo, hi in self.pieces]
        reduce_replicas(params, pieces, self.mesh)
        return params, pieces

    def adam_step(self, lr: float) -> None:
        """AdamW on the owned shards, then every bucket all-gathered into the parameters.

        Offloaded (CPU AdamW): the host runs ahead of the device (I-9) — every bucket's reduced,
        clipped gradient shard is copied into a pinned host buffer without blocking, one wait
        for all of them precedes the CPU AdamW, and each updated master goes back from a pinned
        buffer without blocking, ahead of its all-gather on the same stream."""
        for group in self.adam.param_groups:
            group["lr"] = lr
        if self.offload:
            for b in self.buckets:
                b.master.grad = _host_buffer(b, "host_grad", torch.float32)
                b.master.grad.copy_(b.grad[b.lo:b.hi], non_blocking=True)
            _wait_for_host_copies(self.mesh.device)
        else:
            for b in self.buckets:  # the reduced, clipped shard
                b.master.grad = b.grad[b.lo:b.hi]
        self.adam.step()
        with torch.no_grad():
            for b in self.buckets:
                if self.offload:
                    host = _host_buffer(b, "host_param", b.data.dtype)
                    host.copy_(b.master)
                    shard = host.to(b.data.device, non_blocking=True)
                else:
                    shard = b.master.to(dtype=b.data.dtype, copy=True)
                all_gather_flat(shard, b.data, self.group)
        self.discard()

    def discard(self) -> None:
        """Drop this step's gradients (after the update, or a skipped step)."""
        for b in self.buckets:
            b.master.grad = None
        for p in self.params:
            p.grad = None
        self.buffers.zero()

    def full_grads(self) -> list[torch.Tensor]:
        """The reduced (and clipped) fp32 gradients as whole local tensors aligned with
        ``params``, all-gathered from the shards: for tests and inspection, not for training."""
        out = {}
        for b in self.buckets:
            flat = torch.empty(b.data.numel(), dtype=torch.float32, device=b.grad.device)
            all_gather_flat(b.grad[b.lo:b.hi].clone(), flat, self.group)
            out.update(zip(map(id, b.params), b.views(flat)))
        return [out[id(p)] for p in self.params]

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_pieces(self) -> list[tuple[int, int, int, dict[str, torch.Tensor]]]:
        """Views for checkpoints (see engine/optim.py ``ReplicatedState.checkpoint_pieces``): this
        rank's range [lo, hi) of every bucket, cut per parameter (a piece may start and end
        mid-row): its weights, its fp32 masters where they are a copy (bf16 or offloaded
        parameters), its moments once stepped. No communication."""
        index = {id(p): i for i, p in enumerate(self.params)}
        out = []
        for b in self.buckets:
            state = self.adam.state.get(b.master)
            copy = b.data.dtype != torch.float32 or self.offload  # else the master is the shard itself
            for p, o in zip(b.params, b.offsets):
                lo, hi = max(o, b.lo), min(o + p.numel(), b.hi)
                if lo >= hi:
                    continue
                roles = {"param": b.data[lo:hi]}
                if copy:
                    roles["fp32_param"] = b.master[lo - b.lo:hi - b.lo]
                if state:
                    roles.update(exp_avg=state["exp_avg"][lo - b.lo:hi - b.lo],
                                 exp_avg_sq=state["exp_avg_sq"][lo - b.lo:hi - b.lo])
                out.append((index[id(p)], lo - o, hi - o, roles))
        return out

    def init_moments(self, step: int) -> None:
        """Zero AdamW moments of this rank's shards at step count ``step`` (a resume fills them)."""
        fused = bool(self.adam.defaults.get("fused"))
        for b in self.buckets:
            self.adam.state[b.master] = {
                "step": torch.tensor(float(step), device=b.master.device if fused else "cpu"),
                "exp_avg": torch.zeros_like(b.master), "exp_avg_sq": torch.zeros_like(b.master)}

    # -- accounting ----------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of optimizer state this rank holds: AdamW moments, and the fp32 masters
        where they are not the parameters themselves."""
        out = [t for s in self.adam.state.values() for t in s.values() if torch.is_tensor(t)]
        return out + [b.master for b in self.buckets if not b.master_is_param]
