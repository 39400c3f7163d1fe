"""I-5 for tensor and data parallelism: loss, every gathered gradient, the global gradient norm and
the weights after 3 AdamW steps equal the single-process run, for tp ∈ {1, 2, 4} × dp ∈ {1, 2},
on a GQA Llama model and a Qwen2 model with QKV bias and tied embeddings (the latter with the fused
loss in chunks of 24 tokens, so chunks split unevenly over tp and the tied output weight
accumulates its gradient over chunks).

Tolerance (fp32): loss relative error ≤ 1e-6; the grad norm and every gradient tensor
max|mesh − ref| / max|ref| ≤ 1e-5 (the only differences are summation orders); weights after
3 AdamW steps ≤ 3e-5 of each tensor's max (Adam divides by √v per element, which turns the
gradients' 1e-7-level round-off into up to ~1e-5 of a step for elements with tiny gradients;
measured worst 1.0e-5 with 8 layers).
Adam's update lr·m/(√v + eps) is ill-conditioned where |g| ≈ eps (its derivative is ~lr/(4·eps)), so
with eps = 1e-8 round-off in gradients of ~1e-8 (unused embedding rows, say) moves weights by up to
~lr; the test uses eps = 1e-4, far below the gradients that matter (~1e-2), so the weight check
measures the engine's arithmetic, not Adam's conditioning.
One gloo world per world size (2, 4, 8); each runs every mesh of that size and both models.
"""
from __future__ import annotations

import pytest
import torch

from tests.harness import max_rel_diff, run_world

MODELS = {
    "llama-gqa": ["model.arch=llama", "model.num_attention_heads=8", "model.num_query_groups=4"],
    "qwen2-bias-tied": ["model.arch=qwen2", "model.num_attention_heads=8", "model.num_query_groups=4",
                        "model.add_qkv_bias=true", "model.tie_word_embeddings=true",
                        "train.loss_chunk_tokens=24"],  # several fused-loss chunks, uneven per tp rank
}
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=300",
        "data.seq_len=64", "data.min_doc_len=5", "data.max_doc_len=40", "train.global_batch_size=4",
        "optim.lr=1e-2", "optim.warmup_steps=1", "optim.clip_grad=1.0", "optim.weight_decay=0.1",
        "optim.eps=1e-4"]
STEPS = 3
LOSS_TOL, TENSOR_TOL, WEIGHT_TOL = 1e-6, 1e-5, 3e-5


def check(worst: dict, key) -> None:
    """The tolerances of I-5 checks (see the module docstring)."""
    assert worst["loss"] <= LOSS_TOL, (key, worst)
    assert worst["norm"] <= TENSOR_TOL, (key, worst)
    assert worst["grads"] <= TENSOR_TOL, (key, worst)
    assert worst["weights"] <= WEIGHT_TOL, (key, worst)


def make_cfg(overrides, world):
    from engine.config import load_config, validate

    return validate(load_config(None, BASE + overrides), world)


def run_steps(cfg, mesh, plan_fn=None):
    """Losses, grad norms, step-0 gradients and final weights, all canonical (unsharded).
    Runs the configured recipe (SFT token loss, or DPO with its frozen reference); under
    sp_mode=flexsp the planner's plans, or ``plan_fn(step)``'s."""
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, dpo_forward_backward, forward_backward, rank_micro_batches

    flex = None
    if cfg.parallel.sp_mode == "flexsp":
        from engine.flexsp.runtime import FlexSPRuntime

        flex = FlexSPRuntime(cfg, mesh, plan_fn)
    model = build_model(cfg, mesh, flex.attention if flex else None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = MeshOptimizer(model, cfg.optim, mesh, STEPS)
    data = build_dataset(cfg)
    reference = build_model(cfg, mesh).requires_grad_(False) if cfg.recipe == "dpo" else None
    out = {"loss": [], "norm": []}
    for step in range(STEPS):
        if reference is not None:
            from engine.recipes.dpo import dpo_micro_batches

            loss, _, _ = dpo_forward_backward(model, reference, dpo_micro_batches(data, step, cfg, mesh), mesh, cfg)
        elif flex is not None:
            loss, _ = flex.forward_backward(model, data, step, flex.plan(data, step, STEPS))
        else:
            loss, _ = forward_backward(model, rank_micro_batches(data, step, cfg, mesh), mesh, cfg.parallel)
        grads, norm = opt.reduce_and_clip()
        if step == 0:
            out["grads"] = canonical_tensors(model, dict(zip(names, [g.clone() for g in grads])))
        opt.update()
        out["loss"].append(loss)
        out["norm"].append(float(norm))
    out["weights"] = canonical_tensors(model, {n: whole(p, mesh) for n, p in model.named_parameters()})
    if flex is not None:
        out["plans"] = flex.plans
    if mesh.pp > 1:  # every pipeline stage's tensors, on every rank
        for key in ("grads", "weights"):
            out[key] = merge_stages(out[key], mesh)
    return out


def whole(p, mesh):
    """A parameter's whole tensor on this rank (FSDP2 shards it as a DTensor)."""
    from torch.distributed.tensor import DTensor

    from engine.parallel.fsdp import full_tensor

    return full_tensor(p.detach(), mesh.device) if isinstance(p, DTensor) else p.detach()


def merge_stages(tensors: dict, mesh) -> dict:
    import torch.distributed as dist

    parts = [None] * mesh.pp
    dist.all_gather_object(parts, tensors, group=mesh.group("pp"))
    merged = {}
    for part in parts:
        for name, t in part.items():
            if name in merged:  # tied embedding: the last stage's copy must equal the first's
                assert torch.equal(merged[name], t), name
            merged.setdefault(name, t)
    return merged


VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def unpad(tensors: dict, vocab: int = 300) -> dict:
    """Drop vocabulary padding rows (their count depends on tp); they must stay exactly zero."""
    for name in VOCAB_PARAMS:
        if name in tensors:
            assert not tensors[name][vocab:].any(), f"{name}: padding rows are not zero"
            tensors[name] = tensors[name][:vocab]
    return tensors


def compare(got, ref) -> dict:
    for r in (got, ref):
        unpad(r["grads"]), unpad(r["weights"])
    worst = {"loss": max(abs(a - b) / abs(b) for a, b in zip(got["loss"], ref["loss"])),
             "norm": max(abs(a - b) / abs(b) for a, b in zip(got["norm"], ref["norm"])),
             "grads": max(max_rel_diff(got["grads"][n], ref["grads"][n]) for n in ref["grads"]),
             "weights": max(max_rel_diff(got["weights"][n], ref["weights"][n]) for n in ref["weights"])}
    assert got["grads"].keys() == ref["grads"].keys()
    return worst


def mesh_world_checks(rank, world, meshes, extra=()):
    """In a spawned world: for both models, the single-process reference, then every mesh given as
    config overrides; returns the worst differences per (model, mesh)."""
    from engine.mesh import ParallelMesh

    report = {}
    for model_name, model_over in MODELS.items():
        over = model_over + list(extra)
        ref = run_steps(make_cfg(over + ["parallel.dp=1"], 1), ParallelMesh.single())
        for mesh_over in meshes:
            cfg = make_cfg(over + mesh_over, world)
            p = cfg.parallel
            mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement,
                                      ring_window=p.ring_window)
            report[(model_name, " ".join(mesh_over))] = compare(run_steps(cfg, mesh), ref)
    return report


def check_reports(reports) -> None:
    for rank, report in enumerate(reports):
        for key, worst in report.items():
            if rank == 0:
                print(key, {k: f"{v:.2e}" for k, v in worst.items()})
            check(worst, key)


def world_checks(rank, world, meshes):
    from engine.mesh import ParallelMesh

    report = {}
    for model_name, model_over in MODELS.items():
        ref = run_steps(make_cfg(model_over + ["parallel.dp=1"], 1), ParallelMesh.single())
        for tp, dp, mbs in meshes:
            cfg = make_cfg(model_over + [f"parallel.tp={tp}", f"parallel.dp={dp}",
                                         f"train.micro_batch_size={mbs}"], world)
            mesh = ParallelMesh.build(tp=tp, dp=dp)
            report[(model_name, tp, dp, mbs)] = compare(run_steps(cfg, mesh), ref)
    return report


@pytest.mark.parametrize("world,meshes", [
    (2, [(2, 1, 1), (1, 2, 1), (1, 2, 2)]),
    (4, [(4, 1, 1), (2, 2, 1), (2, 2, 2)]),
    (8, [(4, 2, 1)]),
])
def test_tp_dp_mesh_exact(world, meshes):
    reports = run_world(world, world_checks, meshes, timeout=900)
    for rank, report in enumerate(reports):
        for key, worst in report.items():
            print(rank, key, {k: f"{v:.2e}" for k, v in worst.items()})
            check(worst, key)
