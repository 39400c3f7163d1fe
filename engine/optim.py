"""AdamW with warmup + cosine schedule, and fp32 master weights for bf16 training.

With ``train.bf16`` the model holds bf16 parameters; the optimizer holds fp32 master copies,
gradients are accumulated into fp32 ``main_grad`` buffers (so summation over micro-batches and
dp×cp happens in fp32) and updated masters are cast back after each step.
"""
from __future__ import annotations

import math

import torch

from engine.parallel.data import global_grad_norm, reduce_gradients


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``cfg.min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class MeshOptimizer:
    """Optimizer step of one rank: reduce gradients over the mesh, clip by the global norm, AdamW."""

    def __init__(self, model: torch.nn.Module, cfg, mesh, total_steps: int):
        self.model, self.cfg, self.mesh, self.total_steps = model, cfg, mesh, total_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        self.masters = ([p.detach().float().clone().requires_grad_(True) for p in self.params]
                        if self.mixed else self.params)
        decay = [m for p, m in zip(self.params, self.masters) if p.ndim >= 2]
        no_decay = [m for p, m in zip(self.params, self.masters) if p.ndim < 2]
        fused = all(m.is_cuda for m in self.masters)
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
        self.step_count = 0

    def grads(self) -> list[torch.Tensor]:
        """fp32 gradients aligned with ``self.params`` (zeros for parameters that got none)."""
        out = []
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.mixed:
                m.grad = p.grad.float()
            out.append(m.grad if self.mixed else p.grad)
        return out

    def reduce_and_clip(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum gradients over the mesh (I-5) and clip them by the global norm; returns
        ``(grads, norm before clipping)``."""
        grads = self.grads()
        reduce_gradients(self.params, grads, self.mesh)
        norm = global_grad_norm(self.params, grads, self.mesh)
        if self.cfg.clip_grad > 0:
            coef = torch.clamp(self.cfg.clip_grad / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return grads, norm

    def update(self) -> float:
        """AdamW on the (reduced, clipped) gradients at this step's learning rate; returns it."""
        lr = lr_at(self.step_count, self.cfg, self.total_steps)
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
                    m.grad = None
        for p in self.params:
            p.grad = None
        self.step_count += 1
        return lr

    def step(self) -> dict:
        """Reduce, clip, update; returns ``{"grad_norm", "lr"}`` of this step."""
        _, norm = self.reduce_and_clip()
        return {"grad_norm": float(norm), "lr": self.update()}
