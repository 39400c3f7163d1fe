"""fp32 gradient accumulation (I-10) and the overlap of the bucketed dp×cp reduction.

* 64 bf16 micro-batches: the engine's gradient (fp32 ``main_grad`` buckets) equals the
  reference that computes each micro-batch's bf16 gradient on its own and sums them in fp32, to
  1e-6 relative (max |Δ| / max |ref| per tensor); summing the same bf16 gradients in bf16 (what
  ``p.grad`` accumulation did before) misses it by orders of magnitude more.
* Overlap: with several buckets, the first bucket's reduction over dp×cp (all-reduce for
  ``optim.sharding=none``, reduce-scatter for ``zero1``) is issued before backward has finished
  (before the embedding, the first layer in forward and so the last in backward, gets its
  gradient), and the reduced gradients equal the single-process run's (dp=2).
"""
from __future__ import annotations

import torch

from tests.harness import max_rel_diff, run_world

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=300",
        "model.num_attention_heads=4", "model.num_query_groups=2", "data.seq_len=64",
        "data.min_doc_len=8", "data.max_doc_len=64", "optim.clip_grad=0"]


def _cfg(over: list[str], world: int):
    from engine.config import load_config, validate

    return validate(load_config(None, TINY + over), world)


def _reference_grads(cfg, micro_batches, num_valid: float) -> dict[str, dict[str, torch.Tensor]]:
    """Each micro-batch's bf16 gradient on its own (a model without the optimizer's hooks),
    summed in fp32 and, for contrast, in bf16."""
    from engine.loss import token_loss_sum
    from engine.mesh import ParallelMesh
    from engine.train import build_model

    model = build_model(cfg, ParallelMesh.single())
    fp32 = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    bf16 = {n: torch.zeros(p.shape, dtype=torch.bfloat16) for n, p in model.named_parameters()}
    for mb in micro_batches:
        loss = token_loss_sum(model[0], mb) / torch.tensor(num_valid, dtype=torch.float32)
        loss.backward()
        for n, p in model.named_parameters():
            fp32[n] += p.grad
            bf16[n] += p.grad
            p.grad = None
    return {"fp32": fp32, "bf16": bf16}


def test_bf16_micro_batches_accumulate_in_fp32():
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    cfg = _cfg(["train.bf16=true", "train.global_batch_size=64", "train.micro_batch_size=1"], 1)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, 1)
    batches = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    assert len(batches) == 64
    _, num_valid = forward_backward(model, batches, mesh, cfg.parallel)
    grads, _ = opt.reduce_and_clip()
    assert all(g.dtype == torch.float32 for g in grads)
    ref = _reference_grads(cfg, batches, float(num_valid))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    worst_fp32 = max(max_rel_diff(g, ref["fp32"][n]) for n, g in zip(names, grads))
    worst_bf16 = max(max_rel_diff(ref["bf16"][n].float(), ref["fp32"][n]) for n in names)
    print(f"64 bf16 micro-batches: engine vs fp32 sum {worst_fp32:.2e}, bf16 sum vs fp32 sum {worst_bf16:.2e}")
    assert worst_fp32 <= 1e-6, worst_fp32
    assert worst_bf16 > 100 * max(worst_fp32, 1e-7), worst_bf16  # the check can tell the two apart


def _overlap_world(rank, world, shardings):
    """dp=2, many small buckets: the order of (reduction issued, embedding gradient done) events,
    and the reduced gradients, per sharding."""
    import engine.optim
    import engine.parallel.zero
    from engine.mesh import ParallelMesh
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.parallel.pipeline.runtime import PipelineRuntime
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    out = {}
    for sharding in shardings:
        cfg = _cfg([f"optim.sharding={sharding}", "optim.grad_bucket_size=3000", "parallel.dp=2",
                    "train.global_batch_size=4"], world)
        mesh = ParallelMesh.build(dp=2)
        model = build_model(cfg, mesh)
        opt = MeshOptimizer(model, cfg.optim, mesh, 1)
        events: list[str] = []
        module = engine.parallel.zero if sharding == "zero1" else engine.optim
        name = "reduce_scatter_async" if sharding == "zero1" else "all_reduce_async"
        original = getattr(module, name)

        def traced(*args, _original=original):
            events.append("reduce")
            return _original(*args)

        setattr(module, name, traced)
        embedding = model[0].embedding.word_embeddings.weight
        embedding.register_post_accumulate_grad_hook(lambda p: events.append("embedding"))
        run = PipelineRuntime.run

        def run_with_sync(self, *args, **kwargs):
            self.grad_sync = opt.grad_sync
            return run(self, *args, **kwargs)

        PipelineRuntime.run = run_with_sync
        try:
            forward_backward(model, rank_micro_batches(build_dataset(cfg), 0, cfg, mesh), mesh, cfg.parallel)
        finally:
            PipelineRuntime.run = run
            setattr(module, name, original)
        grads, _ = opt.reduce_and_clip()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        out[sharding] = {"events": events, "buckets": len(opt.state.buffers.buckets),
                         "grads": canonical_tensors(model, dict(zip(names, [g.clone() for g in grads])))}
    return out


def test_bucket_reduction_starts_during_backward():
    from engine.mesh import ParallelMesh
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    shardings = ["none", "zero1"]
    results = run_world(2, _overlap_world, shardings, timeout=600)
    cfg = _cfg(["optim.grad_bucket_size=3000", "parallel.dp=1", "train.global_batch_size=4"], 1)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, 1)
    forward_backward(model, rank_micro_batches(build_dataset(cfg), 0, cfg, mesh), mesh, cfg.parallel)
    grads, _ = opt.reduce_and_clip()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = canonical_tensors(model, dict(zip(names, grads)))
    for rank, result in enumerate(results):
        for sharding in shardings:
            got = result[sharding]
            events = got["events"]
            assert got["buckets"] >= 4, got["buckets"]
            assert events.count("reduce") == got["buckets"], (sharding, events)
            # the first reduction goes out while backward still has the embedding to do
            assert events.index("reduce") < len(events) - 1 - events[::-1].index("embedding"), (sharding, events)
            worst = max(max_rel_diff(got["grads"][k], ref[k]) for k in ref)
            assert worst <= 1e-5, (rank, sharding, worst)
