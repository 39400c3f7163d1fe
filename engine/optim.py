"""AdamW with warmup + cosine schedule, fp32 master weights for bf16 training, and optimizer
states kept whole, ZeRO-1-sharded or FSDP2-sharded over dp×cp (``optim.sharding``), optionally in
CPU memory (``optim.offload``).

With ``train.bf16`` the model holds bf16 parameters; the optimizer holds fp32 master copies,
gradients are summed over dp×cp in fp32 and updated masters are cast back after each step.

The three ways of holding the state are interchangeable state objects behind
:class:`MeshOptimizer` (the same arithmetic, I-5; checkpoints in one canonical format, so a run
saved with one resumes with another):

- :class:`ReplicatedState` (``none``): every dp×cp rank holds all moments; gradients all-reduced.
- :class:`engine.parallel.zero.ZeroState` (``zero1``): 1/(dp·cp) of the moments and masters per
  rank; gradients reduce-scattered, parameters all-gathered. With ``offload`` the shard lives in CPU
  memory and AdamW runs there.
- :class:`engine.parallel.fsdp.FSDPState` (``fsdp2``): torch's ``fully_shard`` over dp×cp shards the
  parameters and gradients too. With ``offload`` all three shards live in CPU memory and AdamW runs
  there — also with one dp×cp rank, where ``fully_shard`` runs on a mesh of that rank alone.

Memory accounting (:meth:`MeshOptimizer.memory_report`): bytes per rank of the distinct storages
holding parameters, gradients and optimizer state, the last split by placement. "device" is the
device of the mesh (where the model computes), "host" the CPU memory an offloaded state lives in.
On a CPU-only machine both are the same RAM, so the split reports where the optimizer *placed* each
tensor: offloaded state is allocated by the offload path as CPU tensors of its own (never the
parameters' storage), and everything else counts as device memory.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from engine.parallel.data import all_reduce_async, global_grad_norm, reduce_replicas
from engine.parallel.grads import GradBuffers, plan_buckets


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``cfg.min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class ReplicatedState:
    """Whole AdamW state on every dp×cp rank (``optim.sharding=none``); gradients summed in the
    fp32 ``main_grad`` buckets of engine/parallel/grads.py, each all-reduced over dp×cp as soon as
    backward completes it."""

    sharded = False
    offload = False

    def __init__(self, params: list[torch.nn.Parameter], cfg, mesh, chunks: list[list[torch.nn.Parameter]]):
        self.params, self.mesh = params, mesh
        self.mixed = any(p.dtype != torch.float32 for p in params)
        self.masters = ([p.detach().float().clone().requires_grad_(True) for p in params]
                        if self.mixed else params)
        decay = [m for p, m in zip(params, self.masters) if p.ndim >= 2]
        no_decay = [m for p, m in zip(params, self.masters) if p.ndim < 2]
        fused = all(m.is_cuda for m in self.masters)
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
        group = mesh.group("dp_cp")
        self.buffers = GradBuffers(plan_buckets(chunks, cfg.grad_bucket_size, 1), mesh.device,
                                   lambda b: all_reduce_async(b.data, group))
        self._reduced = None

    def reduce(self):
        """Wait for the buckets' dp×cp all-reduces (started during backward), then sum the tp
        replicas and tied copies; returns ``(params, fp32 gradients)`` (views of the buckets)."""
        self.buffers.finish()
        grads = [p.main_grad for p in self.params]
        reduce_replicas(self.params, grads, self.mesh)
        self._reduced = grads
        return self.params, grads

    def full_grads(self) -> list[torch.Tensor]:
        return self._reduced

    def adam_step(self, lr: float) -> None:
        for group in self.adam.param_groups:
            group["lr"] = lr
        for m, g in zip(self.masters, self._reduced):
            m.grad = g
        self.adam.step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        self.discard()

    def discard(self) -> None:
        """Drop this step's gradients (after the update, or a skipped step)."""
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None
        self.buffers.zero()
        self._reduced = None

    def checkpoint_pieces(self) -> list[tuple[int, int, int, dict[str, torch.Tensor]]]:
        """Views of what this rank holds, for checkpoints: ``(index into params, lo, hi, roles)``
        per piece [lo, hi) of a parameter's flat (tp-local) tensor, ``roles`` mapping ``param``
        (the weights), ``fp32_param`` (masters, where they are not the weights themselves),
        ``exp_avg`` and ``exp_avg_sq`` (once stepped) to flat views of [lo, hi) — a save reads
        them, a resume writes into them. Here every dp×cp replica holds every parameter whole."""
        out = []
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            roles = {"param": p.detach().view(-1)}
            if self.mixed:
                roles["fp32_param"] = m.detach().view(-1)
            state = self.adam.state.get(m)
            if state:
                roles.update(exp_avg=state["exp_avg"].view(-1), exp_avg_sq=state["exp_avg_sq"].view(-1))
            out.append((i, 0, p.numel(), roles))
        return out

    def init_moments(self, step: int) -> None:
        """Zero AdamW moments at step count ``step``, for a resume to fill through
        :meth:`checkpoint_pieces`."""
        fused = bool(self.adam.defaults.get("fused"))
        for m in self.masters:
            self.adam.state[m] = {"step": torch.tensor(float(step), device=m.device if fused else "cpu"),
                                  "exp_avg": torch.zeros_like(m, memory_format=torch.contiguous_format),
                                  "exp_avg_sq": torch.zeros_like(m, memory_format=torch.contiguous_format)}

    def state_tensors(self) -> list[torch.Tensor]:
        out = [t for s in self.adam.state.values() for t in s.values() if torch.is_tensor(t)]
        return out + (self.masters if self.mixed else [])


class MeshOptimizer:
    """Optimizer step of one rank: reduce gradients over the mesh, clip by the global norm, AdamW.

    Construction applies ``cfg.sharding``: ``zero1`` moves the parameters into flat buckets (the
    same Parameter objects), ``fsdp2`` wraps the model's layers with ``fully_shard`` (new DTensor
    Parameter objects: build the optimizer before taking references to parameters). With one
    dp×cp rank there is nothing to shard: ``fsdp2`` uses the replicated state, but with ``offload``
    still FSDP2, on a DeviceMesh of that one rank (the mesh's ``own_group``, or a world of one that a
    single process starts; engine/parallel/fsdp.py): parameters, gradients and moments whole in host
    memory, the device holding only the window FSDP2 gathers, a layer at a time — the point of
    offload on one GPU or a tp/pp-only mesh. ``zero1`` with ``offload`` and one dp×cp rank is the
    one-shard ZeRO-1 state (the optimizer state on the host, parameters and gradients on the device).
    """

    def __init__(self, model: torch.nn.Module, cfg, mesh, total_steps: int):
        self.model, self.cfg, self.mesh, self.total_steps = model, cfg, mesh, total_steps
        self.sharding = cfg.sharding
        if cfg.offload and cfg.sharding not in ("zero1", "fsdp2"):
            raise ValueError(f"optim.offload=true needs optim.sharding=zero1 or fsdp2 (got {cfg.sharding!r}): the "
                             f"CPU offload is of the optimizer's shard (zero1) or of every shard (fsdp2)")
        params = [p for p in model.parameters() if p.requires_grad]
        modules = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
        chunks = [[p for p in m.parameters() if p.requires_grad] for m in modules]  # per model chunk
        if cfg.sharding == "zero1":
            from engine.parallel.zero import ZeroState

            self.state = ZeroState(params, cfg, mesh, chunks)
        elif cfg.sharding == "fsdp2" and (cfg.offload or mesh.group("dp_cp") is not None):
            from engine.parallel.fsdp import FSDPState

            self.state = FSDPState(model, cfg, mesh)
        elif cfg.sharding in ("none", "fsdp2"):
            self.state = ReplicatedState(params, cfg, mesh, chunks)
        else:
            raise ValueError(f"optim.sharding={cfg.sharding!r}; expected 'none', 'zero1' or 'fsdp2'")
        self.params = self.state.params
        self.mixed = self.state.mixed
        self.adam = self.state.adam
        self.step_count = 0

    @property
    def grad_sync(self):
        """``grad_sync(chunk, last)`` for ``PipelineRuntime.grad_sync``: lets the fp32 gradient
        buckets start their reduction during the chunk's last backward (None under FSDP2, which
        reduces per layer itself)."""
        buffers = getattr(self.state, "buffers", None)
        return buffers.grad_sync if buffers is not None else None

    @property
    def masters(self) -> list[torch.Tensor]:
        """fp32 master weights aligned with ``params`` (replicated state only)."""
        return self.state.masters

    def reduce_and_clip(self, full_grads: bool = True) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        """Sum gradients over the mesh (I-5) and clip them by the global norm; returns ``(grads,
        norm before clipping)``. ``grads`` are whole local fp32 gradients aligned with ``params``
        (sharded states all-gather them for this: pass ``full_grads=False`` when training)."""
        params, pieces = self.state.reduce()
        norm = global_grad_norm(params, pieces, self.mesh, sharded=self.state.sharded)
        if self.cfg.clip_grad > 0:
            coef = torch.clamp(self.cfg.clip_grad / (norm + 1e-6), max=1.0)
            # one copy per place the pieces live (FSDP2 offload: the host), not one per piece (I-9)
            coefs = {d: coef.to(d) for d in {g.device for g in pieces}}
            for g in pieces:
                g.mul_(coefs[g.device].to(g.dtype))
        return (self.state.full_grads() if full_grads else None), norm

    def update(self) -> float:
        """AdamW on the (reduced, clipped) gradients at this step's learning rate; returns it."""
        lr = lr_at(self.step_count, self.cfg, self.total_steps)
        self.state.adam_step(lr)
        self.step_count += 1
        return lr

    def step(self, loss: float | torch.Tensor | None = None) -> dict:
        """Reduce, clip, update; returns ``{"grad_norm", "lr", "skipped"}`` of this step (and
        ``"loss"`` as a float when ``loss`` is a device tensor).

        A non-finite gradient norm (any NaN/Inf gradient anywhere: the norm is global) or a
        non-finite ``loss`` skips the update: gradients are dropped, weights, moments and the
        learning-rate schedule stay as they were. Both values are identical on every rank, so
        every rank skips together. The norm and a tensor ``loss`` reach the host in one transfer:
        the step's only host sync besides what the caller logs (I-9)."""
        _, norm = self.reduce_and_clip(full_grads=False)
        out = {}
        if torch.is_tensor(loss):
            norm, loss = torch.stack([norm.double(), loss.detach().double().to(norm.device)]).tolist()
            out["loss"] = loss
        else:
            norm = float(norm)
        if not math.isfinite(norm) or (loss is not None and not math.isfinite(loss)):
            self.state.discard()
            return {**out, "grad_norm": norm, "lr": lr_at(self.step_count, self.cfg, self.total_steps), "skipped": 1}
        return {**out, "grad_norm": norm, "lr": self.update(), "skipped": 0}

    # -- whole weights, checkpoints ------------------------------------------------------------
    def full_weights(self, writeback: bool = False):
        """Context in which ``model.named_parameters()`` are this rank's whole (tp-local) weights;
        a no-op except under FSDP2, whose parameters are dp×cp shards (see FSDPState)."""
        fn = getattr(self.state, "full_weights", None)
        return fn(writeback) if fn else nullcontext()

    def checkpoint_pieces(self) -> list[tuple[int, int, int, dict[str, torch.Tensor]]]:
        """Views of this rank's parameters and optimizer state for checkpoints (see
        :meth:`ReplicatedState.checkpoint_pieces`): whole parameters on every dp×cp replica
        (``none``), or each rank's disjoint pieces (``zero1``: its bucket ranges, which may start
        and end mid-row; ``fsdp2``: its dim-0 shards) — ``state.sharded`` tells which."""
        return self.state.checkpoint_pieces()

    def restore_step(self, step: int, moments: bool) -> None:
        """Set the optimizer step count after a resume; with ``moments``, first allocate zero AdamW
        moments for :meth:`checkpoint_pieces` to expose (the checkpoint fills them)."""
        if moments:
            self.state.init_moments(step)
        self.step_count = step

    # -- accounting ----------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes this rank holds now in parameters, gradients and optimizer state (distinct
        storages; the state split into "device" and "host", see the module docstring). Call it
        after backward to see parameters, gradients and state all live."""
        def local(t):
            return t.to_local() if hasattr(t, "to_local") else t

        def total(tensors) -> int:
            seen = {}
            for t in tensors:
                s = local(t).untyped_storage()
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
            return sum(seen.values())

        params = list(self.model.parameters())
        state = self.state.state_tensors()
        host = [t for t in state if self.state.offload and t.device.type == "cpu"]
        device = [t for t in state if not any(t is h for h in host)]
        buffers = getattr(self.state, "buffers", None)
        grads = [p.grad for p in params if p.grad is not None] + (buffers.tensors() if buffers else [])
        return {"params": total(params), "grads": total(grads), "state_device": total(device),
                "state_host": total(host)}
