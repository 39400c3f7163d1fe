"""Optimizer pieces against closed forms: the warmup + cosine schedule, and bf16 training with
fp32 master weights tracking the fp32 run."""
from __future__ import annotations

import math

import torch

from engine.config import load_config, validate
from engine.mesh import ParallelMesh
from engine.optim import MeshOptimizer, lr_at
from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=300",
        "data.seq_len=64", "train.global_batch_size=2", "optim.lr=1e-2", "optim.min_lr=1e-3",
        "optim.warmup_steps=2"]


def test_warmup_then_cosine():
    cfg = load_config(None, TINY).optim
    total = 10
    assert lr_at(0, cfg, total) == cfg.lr / 2 and lr_at(1, cfg, total) == cfg.lr
    for step in range(2, total + 1):
        progress = (step - 2) / (total - 2)
        expect = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
        assert abs(lr_at(step, cfg, total) - expect) < 1e-15
    assert lr_at(total, cfg, total) == cfg.min_lr


def run(bf16: bool, steps=4):
    cfg = validate(load_config(None, TINY + [f"train.bf16={str(bf16).lower()}"]), 1)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, steps)
    data = build_dataset(cfg)
    losses = []
    for step in range(steps):
        losses.append(forward_backward(model, rank_micro_batches(data, step, cfg, mesh), mesh)[0])
        opt.step()
    return model, opt, losses


def test_bf16_with_fp32_masters_tracks_fp32():
    model, opt, losses = run(bf16=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt.mixed and all(m.dtype == torch.float32 for m in opt.masters)
    # the bf16 parameters are the rounded fp32 masters, not an independent bf16 copy
    for p, m in zip(opt.params, opt.masters):
        assert torch.equal(p, m.to(torch.bfloat16))
    _, _, ref = run(bf16=False)
    assert losses[-1] < losses[0]
    for a, b in zip(losses, ref):
        assert abs(a - b) / b < 1e-2, (losses, ref)
