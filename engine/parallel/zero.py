"""ZeRO-1: the distributed optimizer over dp×cp (Megatron's ``--use-distributed-optimizer``).

Layout. This rank's trainable parameters (its tp shard of its pipeline stage; identical on the
D = dp·cp ranks of its dp×cp group) are grouped into *buckets* by (dtype, weight decay, tied
embedding copy). Each bucket is one flat buffer, padded to a multiple of D, and its parameters'
``.data`` become views of it (as in Megatron's param buffer); their ``.grad`` are views of a
second flat buffer, into which autograd accumulates in place. Slot r of the dp×cp process group
owns elements ``[r·S, (r+1)·S)`` of every bucket (S = padded/D) and holds the AdamW moments and
the fp32 master weights of that shard only: 1/D of the unsharded optimizer state. fp32 masters of
fp32 parameters are views of the parameter buffer (no copy), as in the unsharded optimizer.

Step. (1) tp-replicated gradients are summed over tp and tied-embedding copies over the pipeline
ends, on the whole local gradients (as unsharded); (2) each bucket's gradient is reduce-scattered
over dp×cp in fp32 (summed, I-5), so each rank receives only the sum of its shard; (3) the global
norm is the square root of the squares of all shards summed over dp×cp, tp and pp (each element
counted once), and every shard is clipped by it; (4) AdamW updates the owned shards; (5) every
bucket's shards are all-gathered, in the parameter dtype, into the parameter buffer.

Offload (``optim.offload``): masters and moments are CPU tensors, the reduced gradient shard is
copied to the CPU, AdamW runs there, and the updated shard is copied back to the device before the
all-gather. Device memory then holds no optimizer state at all.

Why the tied-embedding copy gets a bucket of its own: the first and last pipeline stages each hold
a copy that must stay bit-identical. In its own bucket the copy has the same offsets and the same
shard boundaries on both stages, so both stages update every element with the same arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.parallel.data import all_gather_flat, reduce_replicas, reduce_scatter_flat, shard_index


@dataclass
class Bucket:
    """One flat buffer of parameters and this rank's shard ``[lo, hi)`` of it."""

    params: list[torch.nn.Parameter]
    offsets: list[int]  # start of each parameter in the flat buffer
    data: torch.Tensor  # [padded] parameter dtype, on the device; params are views of it
    grad: torch.Tensor  # [padded] parameter dtype, on the device; p.grad are views of it
    lo: int
    hi: int
    decay: bool
    master: torch.Tensor = field(default=None)  # [hi - lo] fp32: this rank's master weights

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (laid out like ``data``) cut into tensors shaped like the parameters."""
        return [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]


class ZeroState:
    """Sharded AdamW state of one rank; the engine-facing interface is that of
    :class:`engine.optim.MeshOptimizer`'s state objects (reduce, adam_step, local_state, …)."""

    sharded = True

    def __init__(self, params: list[torch.nn.Parameter], cfg, mesh):
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.group = mesh.group("dp_cp")
        num_shards = 1 if self.group is None else torch.distributed.get_world_size(self.group)
        slot = shard_index(self.group)
        self.offload = cfg.offload
        self.state_device = torch.device("cpu") if cfg.offload else mesh.device
        self.mixed = any(p.dtype != torch.float32 for p in params)
        kinds: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in params:
            kinds.setdefault((p.dtype, p.ndim >= 2, bool(getattr(p, "shared_embedding", False))), []).append(p)
        self.buckets = [self._bucket(ps, decay, num_shards, slot) for (_, decay, _), ps in kinds.items()]
        decay = [b.master for b in self.buckets if b.decay]
        no_decay = [b.master for b in self.buckets if not b.decay]
        fused = all(b.master.is_cuda for b in self.buckets) and bool(self.buckets)
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
        self._attach_grads()
        # this rank's piece of each parameter's gradient: (bucket, param, [a, b) in shard coordinates)
        self.pieces = [(b, p, max(o, b.lo) - b.lo, min(o + p.numel(), b.hi) - b.lo)
                       for b in self.buckets for p, o in zip(b.params, b.offsets)
                       if o < b.hi and o + p.numel() > b.lo]

    def _bucket(self, params, decay: bool, num_shards: int, slot: int) -> Bucket:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        padded = -(-total // num_shards) * num_shards
        size = padded // num_shards
        data = torch.zeros(padded, dtype=params[0].dtype, device=params[0].device)
        b = Bucket(params, offsets, data, torch.zeros_like(data), slot * size, (slot + 1) * size, decay)
        with torch.no_grad():
            for p, view in zip(params, b.views(data)):
                view.copy_(p)
                p.data = view  # the parameter now lives in the bucket (the same Parameter object)
        shard = data[b.lo:b.hi]
        if shard.dtype == torch.float32 and not self.offload:
            b.master = shard  # fp32 parameters are their own masters
        else:
            b.master = shard.detach().to(device=self.state_device, dtype=torch.float32, copy=True)
        return b

    def _attach_grads(self) -> None:
        """Zero the gradient buffers and point every ``p.grad`` at its view: autograd then
        accumulates micro-batches in place, with no second copy of the gradients."""
        for b in self.buckets:
            b.grad.zero_()
            for p, view in zip(b.params, b.views(b.grad)):
                p.grad = view

    # -- the step ------------------------------------------------------------------------------
    def reduce(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """Sum gradients over tp replicas and tied copies, reduce-scatter every bucket over dp×cp;
        the fp32 shard becomes ``master.grad``. Returns this rank's disjoint gradient pieces
        ``(params, pieces)`` (views of the shards: clipping them in place clips the shards)."""
        for b in self.buckets:  # a gradient set elsewhere (e.g. after model.zero_grad()) joins the buffer
            for p, view in zip(b.params, b.views(b.grad)):
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
        grads = [view for b in self.buckets for view in b.views(b.grad)]
        reduce_replicas([p for b in self.buckets for p in b.params], grads, self.mesh)
        for b in self.buckets:
            shard = reduce_scatter_flat(b.grad.float(), self.group)
            b.master.grad = shard.to(self.state_device)
        return ([p for _, p, _, _ in self.pieces],
                [b.master.grad[lo:hi] for b, _, lo, hi in self.pieces])

    def adam_step(self, lr: float) -> None:
        """AdamW on the owned shards, then every bucket all-gathered into the parameters."""
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        with torch.no_grad():
            for b in self.buckets:
                shard = b.master.to(device=b.data.device, dtype=b.data.dtype, copy=True)
                all_gather_flat(shard, b.data, self.group)
                b.master.grad = None
        self._attach_grads()

    def discard(self) -> None:
        """Drop this step's gradients (a skipped step)."""
        for b in self.buckets:
            b.master.grad = None
        self._attach_grads()

    def full_grads(self) -> list[torch.Tensor]:
        """The reduced (and clipped) fp32 gradients as whole local tensors aligned with
        ``params``, all-gathered from the shards: for tests and inspection, not for training."""
        out = {}
        for b in self.buckets:
            flat = torch.empty(b.data.numel(), dtype=torch.float32, device=b.master.grad.device)
            all_gather_flat(b.master.grad, flat, self.group)
            out.update(zip(map(id, b.params), b.views(flat)))
        return [out[id(p)] for p in self.params]

    # -- checkpoints ---------------------------------------------------------------------------
    def _gather_state(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every bucket's fp32 shard (``shards[i]`` of bucket i) all-gathered and cut per parameter."""
        out = {}
        for b, shard in zip(self.buckets, shards):
            flat = torch.empty(b.data.numel(), dtype=shard.dtype, device=shard.device)
            all_gather_flat(shard, flat, self.group)
            out.update(zip(map(id, b.params), b.views(flat)))
        return [out[id(p)] for p in self.params]

    def _shard_of(self, b: Bucket, tensors: list[torch.Tensor]) -> torch.Tensor:
        """This rank's fp32 shard of bucket ``b`` from whole tensors aligned with ``params``."""
        index = {id(p): i for i, p in enumerate(self.params)}
        flat = torch.zeros(b.data.numel(), dtype=torch.float32)
        for p, view in zip(b.params, b.views(flat)):
            view.copy_(tensors[index[id(p)]])
        return flat[b.lo:b.hi].to(self.state_device)

    def local_state(self) -> dict:
        """Whole (dp×cp-unsharded) local AdamW moments and fp32 masters, aligned with ``params``
        (all-gathered over dp×cp; every rank of the group must call it). Moments are ``None``
        before the first step; masters are ``None`` unless the parameters are not fp32."""
        stepped = all(b.master in self.adam.state for b in self.buckets)
        out = {}
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = (self._gather_state([self.adam.state[b.master][key] for b in self.buckets]) if stepped
                        else [None] * len(self.params))
        out["masters"] = self._gather_state([b.master.detach() for b in self.buckets]) if self.mixed else None
        return out

    def load_local_state(self, exp_avg, exp_avg_sq, masters, step: int) -> None:
        """Inverse of :meth:`local_state` (after the weights were loaded into the parameters):
        every rank keeps its shard. ``masters=None`` takes the masters from the parameters."""
        fused = bool(self.adam.defaults.get("fused"))
        for b in self.buckets:
            with torch.no_grad():
                if masters is not None:
                    b.master.copy_(self._shard_of(b, masters))
                elif b.master.data_ptr() != b.data[b.lo:b.hi].data_ptr():
                    b.master.copy_(b.data[b.lo:b.hi])
            if exp_avg is not None:
                self.adam.state[b.master] = {
                    "step": torch.tensor(float(step), device=b.master.device if fused else "cpu"),
                    "exp_avg": self._shard_of(b, exp_avg), "exp_avg_sq": self._shard_of(b, exp_avg_sq)}

    # -- accounting ----------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of optimizer state this rank holds: AdamW moments, and the fp32 masters
        where they are not the parameters themselves."""
        out = [t for s in self.adam.state.values() for t in s.values() if torch.is_tensor(t)]
        out += [b.master for b in self.buckets if b.master.data_ptr() != b.data[b.lo:b.hi].data_ptr()
                or b.master.device != b.data.device]
        return out
