"""train.recompute: every mode keeps exactly what it claims, gives recompute=none's gradients, and is
mesh-exact.

1. One process (fp32 and bf16; GQA Llama, Qwen2 with QKV bias and tied embeddings, and Seq1F1B
   units with their K/V cache): the loss and every gradient of full, selective and attention-cached
   equal recompute=none's bitwise (a rerun repeats the same operations on the same values), and
   the regions really run again (the attention kernel's call count).
2. Saved-activation bytes per layer (two layers minus one, counted with tools/bench_memory.py's
   hook, T tokens, fp32) equal closed forms: none 4T(4h + 2 + 2HD + 2GD + H + 3F) (x and rstd of
   both norms, both norm outputs, q, k, v, out, lse, fc1 output, SwiGLU output); selective
   4T(3h + 1 + HD + 3F) (the attention block's x_norm, q, k, v, lse and rstd are gone);
   attention-cached 4T(h + HD + H) (x, out, lse); full 4Th (x).
3. Mesh-exactness (I-5) of each mode against the single-process recompute=none run over tp, cp
   (ring, double ring, Ulysses, hybrid, FlexSP's per-step groups), pp (1F1B, interleaved, Seq1F1B
   with and without cp) and dp: loss, every gradient, grad norm and weights after 3 AdamW steps, tolerances of
   test_tp_exact.py (loss 1e-6, gradients 1e-5, weights 3e-5, relative). In the same world, one
   step's ring traffic at cp = 4: attention-cached sends exactly what none sends, full and
   selective send one more forward's K/V.
Invalid modes are a ValueError naming train.recompute.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.harness import run_world
from tests.test_tp_exact import MODELS, check_reports

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "full", "selective", "attention-cached")
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=300",
         "data.seq_len=64", "data.min_doc_len=5", "data.max_doc_len=40", "train.global_batch_size=2",
         "parallel.dp=1"]


def one_step(overrides, mode, monkeypatch):
    """Loss, gradients and attention-kernel calls of one forward/backward on one process."""
    from engine.config import load_config, validate
    from engine.kernels import dispatch
    from engine.mesh import ParallelMesh
    from engine.train import (
        build_dataset,
        build_model,
        forward_backward,
        rank_micro_batches,
    )

    cfg = validate(load_config(None, SMALL + overrides + [f"train.recompute={mode}"]), 1)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)
    batches = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    calls, real = [], dispatch.attention_forward
    monkeypatch.setattr(dispatch, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss, _ = forward_backward(model, batches, mesh, cfg.parallel)
    monkeypatch.setattr(dispatch, "attention_forward", real)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss, grads, len(calls)


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2-bias-tied", "bf16", "seq1f1b"])
def test_modes_equal_none_bitwise(case, monkeypatch):
    over = {"llama-gqa": MODELS["llama-gqa"], "qwen2-bias-tied": MODELS["qwen2-bias-tied"],
            "bf16": MODELS["llama-gqa"] + ["train.bf16=true"],
            "seq1f1b": MODELS["llama-gqa"] + ["parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=3"]}[case]
    ref_loss, ref_grads, ref_calls = one_step(over, "none", monkeypatch)
    assert ref_calls > 0
    for mode in MODES[1:]:
        loss, grads, calls = one_step(over, mode, monkeypatch)
        assert loss == ref_loss, (mode, loss, ref_loss)
        for name, g in grads.items():
            assert g.dtype == ref_grads[name].dtype and torch.equal(g, ref_grads[name]), (mode, name)
        # full and selective run every layer's attention again in backward; attention-cached never
        assert calls == (ref_calls if mode == "attention-cached" else 2 * ref_calls), (mode, calls, ref_calls)


def _saved_bytes(mode: str, layers: int, dims: dict) -> int:
    from engine.config import load_config, validate
    from engine.loss import token_loss_sum
    from engine.mesh import ParallelMesh
    from engine.train import build_dataset, build_model, rank_micro_batches

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "tools" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = validate(load_config(None, [
        f"model.num_layers={layers}", f"model.hidden_size={dims['h']}", f"model.num_attention_heads={dims['H']}",
        f"model.num_query_groups={dims['G']}", f"model.ffn_hidden_size={dims['F']}", "model.vocab_size=300",
        f"data.seq_len={dims['T']}", "data.min_doc_len=20", "data.max_doc_len=100", "train.global_batch_size=1",
        "parallel.dp=1", f"train.recompute={mode}"]), 1)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)[0]
    (batch,) = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    counter = bench.SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = token_loss_sum(model, batch)
    loss.backward()
    return counter.total


def test_saved_bytes_per_layer_closed_forms():
    d = {"h": 64, "H": 8, "G": 2, "F": 96, "T": 256}
    h, hd, gd, heads, f, t = d["h"], d["H"] * 8, d["G"] * 8, d["H"], d["F"], d["T"]
    expected = {"none": 4 * t * (4 * h + 2 + 2 * hd + 2 * gd + heads + 3 * f),
                "selective": 4 * t * (3 * h + 1 + hd + 3 * f),
                "attention-cached": 4 * t * (h + hd + heads),
                "full": 4 * t * h}
    per_layer = {m: _saved_bytes(m, 2, d) - _saved_bytes(m, 1, d) for m in MODES}
    assert per_layer == expected
    assert per_layer["full"] < per_layer["attention-cached"] < per_layer["selective"] < per_layer["none"]


def test_invalid_mode_is_a_clear_error():
    from engine.config import ConfigError, load_config, validate
    from engine.mesh import ParallelMesh
    from engine.model.gpt import GPTModel

    cfg = validate(load_config(None, SMALL), 1)
    with pytest.raises(ValueError, match="recompute='sometimes'.*full, selective, attention-cached"):
        GPTModel(cfg.model, ParallelMesh.single(), recompute="sometimes")
    with pytest.raises(ConfigError, match="train.recompute"):
        validate(load_config(None, SMALL + ["train.recompute=partial"]), 1)


# -- meshes ------------------------------------------------------------------------------------
LAYERS = ["model.num_layers=4"]
FLEX_DATA = ["data.pack=false", "data.min_doc_len=4", "data.max_doc_len=400", "data.seq_len=400",
             "train.global_batch_size=8"]
SEQ1F1B = ["parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]
MESHES = [  # (mode, mesh overrides)
    ("full", ["parallel.tp=2", "parallel.cp=2"]),
    ("full", ["parallel.pp=2", "parallel.cp=2"] + SEQ1F1B),
    ("selective", ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]),
    ("selective", ["parallel.pp=2", "parallel.tp=2"] + SEQ1F1B),
    ("selective", ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"]),
    ("attention-cached", ["parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.tp=2"]),
    ("attention-cached", ["parallel.cp=4", "parallel.ring_window=2"]),
    ("attention-cached", ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]),
    ("attention-cached", ["parallel.pp=2", "parallel.cp=2"] + SEQ1F1B),
    ("attention-cached", ["parallel.pp=2", "parallel.cp=2", "parallel.sp_mode=ulysses",
                          "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=3"]),
    ("attention-cached", ["parallel.pp=2", "parallel.dp=2"]),
]


def ring_bytes(cfg, mesh, grad: bool) -> int:
    """Bytes of ring K/V sent by this rank in one forward (and backward when ``grad``)."""
    from engine.loss import token_loss_sum
    from engine.parallel.comm import count_comm
    from engine.train import build_dataset, build_model, rank_micro_batches

    model = build_model(cfg, mesh)[0]
    (batch,) = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)[:1]
    with count_comm() as counter, torch.set_grad_enabled(grad):
        loss = token_loss_sum(model, batch)
        if grad:
            loss.backward()
    return counter.total("ring_kv")


def recompute_world(rank, world, meshes):
    from engine.mesh import ParallelMesh
    from tests.test_tp_exact import compare, make_cfg, run_steps

    report = {}
    model = MODELS["llama-gqa"] + LAYERS
    ref = run_steps(make_cfg(model + ["parallel.dp=1"], 1), ParallelMesh.single())
    for mode, mesh_over in meshes:
        cfg = make_cfg(model + mesh_over + [f"train.recompute={mode}"], world)
        p = cfg.parallel
        mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement,
                                  ring_window=p.ring_window)
        report[(mode, " ".join(mesh_over))] = compare(run_steps(cfg, mesh), ref)
    # FlexSP: per-micro-batch groups of 4, 2 and 1 ranks (hybrid 2x2 at 4), unpacked sequences
    from engine.flexsp.runtime import Block, StepPlan

    plan = [[Block(0, 4, (0, 1))], [Block(0, 2, (2, 3)), Block(2, 1, (4,)), Block(3, 1, (5, 6))],
            [Block(0, 1, ()), Block(1, 1, (7,)), Block(2, 2, ())]]
    plan = StepPlan(tuple(map(tuple, plan)), makespan=0.0, solver="hand", solve_time_s=0.0)
    flex = MODELS["llama-gqa"] + FLEX_DATA
    ref = run_steps(make_cfg(flex + ["parallel.dp=1"], 1), ParallelMesh.single())
    for mode in ("full", "attention-cached"):
        cfg = make_cfg(flex + ["parallel.sp_mode=flexsp", "parallel.cp=4", "parallel.hp=2", f"train.recompute={mode}"],
                       world)
        p = cfg.parallel
        mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement)
        report[(mode, "flexsp cp=4 hp=2")] = compare(run_steps(cfg, mesh, lambda step: plan), ref)
    traffic = {}
    for mode in MODES:
        cfg = make_cfg(model + ["parallel.cp=4", f"train.recompute={mode}"], world)
        mesh = ParallelMesh.build(cp=4)
        traffic[mode] = ring_bytes(cfg, mesh, grad=True)
    traffic["forward"] = ring_bytes(cfg, mesh, grad=False)
    return report, traffic


def test_recompute_modes_mesh_exact():
    results = run_world(4, recompute_world, MESHES, timeout=1200)
    check_reports([report for report, _ in results])
    for rank, (_, traffic) in enumerate(results):
        assert traffic["forward"] > 0, traffic
        assert traffic["attention-cached"] == traffic["none"], (rank, traffic)
        for mode in ("full", "selective"):
            assert traffic[mode] == traffic["none"] + traffic["forward"], (rank, mode, traffic)
