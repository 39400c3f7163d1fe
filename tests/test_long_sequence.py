"""I-5 at a real long sequence: one packed sequence of 32,768 tokens at cp = 4 — ring (rp = 4) and
hybrid (hp = 2 × rp = 2) — gives the single-process loss and every gradient, with the long-sequence
settings all on: the fused chunked loss (``loss_chunk_tokens=1024``: 32 chunks on one process, 8
per cp rank), the tiled MLP (``tile_mlp=4``) and ``recompute: full``.

The sequence is ONE document of 32,768 tokens: no document boundary masks a ring step's block
out, so every step carries real work on every rank, the gradients of K/V travel the whole ring,
and rotary positions run to 32,767 — the hardest case for the ring; packed documents at cp are covered by test_cp_exact.py. The model is
tiny (two layers, so a recomputed layer's input gradient feeds another; hidden 32, 4 heads / 2 KV
heads of dim 8, ffn 64, vocab 256, fp32) so the step fits CI: the attention over 32k tokens is most
of the cost (about 1.5 min on 2 shared cores: reference ~25 s, ring ~30 s, hybrid ~18 s).

One gloo world of 4 ranks: rank 0 computes the single-process reference (the others wait in the
broadcast of it, leaving it the cores), then every rank runs both meshes and compares.
Tolerances are test_cp_exact.py's (test_tp_exact.check): loss ≤ 1e-6 relative, the gradient norm
and every gradient tensor max|mesh − ref| / max|ref| ≤ 1e-5. Gradients are compared unclipped.
"""
from __future__ import annotations

import time

import pytest

from tests.harness import max_rel_diff, run_world
from tests.test_tp_exact import LOSS_TOL, TENSOR_TOL

SEQ = 32768
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "model.vocab_size=256", f"model.max_position_embeddings={SEQ}",
        f"data.seq_len={SEQ}", f"data.min_doc_len={SEQ}", f"data.max_doc_len={SEQ}",
        "train.global_batch_size=1", "train.micro_batch_size=1", "train.recompute=full", "train.tile_mlp=4",
        "train.loss_chunk_tokens=1024", "optim.clip_grad=0"]
MESHES = {"ring cp=4": ["parallel.cp=4", "parallel.sp_mode=ring"],
          "hybrid cp=4 (hp=2 x rp=2)": ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]}


def one_step(overrides: list[str], world: int) -> dict:
    """Loss, gradient norm and canonical gradients of one forward + backward of step 0's batch, on
    one process (``world`` 1) or on the mesh the overrides describe."""
    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    cfg = validate(load_config(None, BASE + overrides), world)
    p = cfg.parallel
    mesh = (ParallelMesh.single() if world == 1 else
            ParallelMesh.build(cp=p.cp, hp=p.hp, placement=p.placement, ring_window=p.ring_window))
    model = build_model(cfg, mesh)
    names = [n for n, w in model.named_parameters() if w.requires_grad]
    opt = MeshOptimizer(model, cfg.optim, mesh, 1)
    batches = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    assert len(batches) == 1 and batches[0].num_tokens == SEQ // p.cp, [b.num_tokens for b in batches]
    if world == 1:
        assert batches[0].doc_lens == [SEQ], batches[0].doc_lens  # one document, no padding
    t0 = time.perf_counter()
    loss, _ = forward_backward(model, batches, mesh, cfg.parallel)
    grads, norm = opt.reduce_and_clip()
    return {"loss": float(loss), "norm": float(norm), "seconds": time.perf_counter() - t0,
            "grads": canonical_tensors(model, dict(zip(names, grads)))}


def long_sequence_world(rank, world):
    import torch.distributed as dist

    ref = [one_step(["parallel.dp=1"], 1) if rank == 0 else None]
    dist.broadcast_object_list(ref, src=0)
    ref = ref[0]
    report = {"reference": {"seconds": ref["seconds"]}}
    for name, over in MESHES.items():
        got = one_step(over, world)
        assert got["grads"].keys() == ref["grads"].keys()
        report[name] = {"seconds": got["seconds"],
                        "loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
                        "norm": abs(got["norm"] - ref["norm"]) / ref["norm"],
                        "grads": max(max_rel_diff(got["grads"][n], ref["grads"][n]) for n in ref["grads"])}
    return report


@pytest.mark.slow
def test_32k_tokens_cp4_ring_and_hybrid_exact():
    reports = run_world(4, long_sequence_world, timeout=900)
    for rank, report in enumerate(reports):
        for name, worst in report.items():
            if rank == 0:
                print(name, {k: f"{v:.2e}" for k, v in worst.items()})
            if name == "reference":
                continue
            assert worst["loss"] <= LOSS_TOL, (rank, name, worst)
            assert worst["norm"] <= TENSOR_TOL, (rank, name, worst)
            assert worst["grads"] <= TENSOR_TOL, (rank, name, worst)
