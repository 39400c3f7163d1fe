"""train.offload_activations: what the layers keep for backward waits in host memory, exactly.

1. One process, every recompute mode (fp32, bf16, Seq1F1B units): loss and every gradient equal
   those without offload bitwise, and every byte copied out comes back once.
2. The saved tensors of the offloaded layers are host copies: the bytes the offloader holds per
   layer after the forward equal test_recompute.py's closed forms of what each mode keeps (T
   tokens, fp32): none 4T(4h + 2 + 2HD + 2GD + H + 3F), selective 4T(3h + 1 + HD + 3F),
   attention-cached 4T(h + HD + H), full 4Th; the first ``offload_keep_layers`` layers hold
   nothing (with full, their inputs are still alive, the others' are not); nothing is held after
   backward. Two micro-batches in flight (1F1B's order: two forwards, then their backwards) each
   find their own copies.
3. Mesh-exactness in one spawned gloo world of 4: tp2×dp2, pp2×dp2 1F1B, pp2×tp2 Seq1F1B,
   interleaved pp2×dp2, FSDP2 over dp4 — bitwise equal to the same mesh without offload, and
   within I-5's tolerances of the single process.
4. ``meshtron-plan --simulate`` runs it under the fake CUDA device: host memory grows by the
   offloaded inputs, the device peak drops, no host sync is added.
5. (CUDA) on a GPU: pinned copies on side streams give the same gradients bitwise, and a lower peak.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.harness import run_world
from tests.test_tp_exact import MODELS

MODES = ("none", "full", "selective", "attention-cached")
SMALL = ["model.num_layers=3", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=300",
         "data.seq_len=64", "data.min_doc_len=5", "data.max_doc_len=40", "train.global_batch_size=2",
         "parallel.dp=1"]
OFFLOAD = ["train.offload_activations=true", "train.offload_keep_layers=1"]


def one_step(overrides, device="cpu"):
    """Loss, gradients and the chunks' offloaders after one forward/backward on one process."""
    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    cfg = validate(load_config(None, SMALL + overrides), 1)
    mesh = ParallelMesh.single(device)
    model = build_model(cfg, mesh)
    batches = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    loss, _ = forward_backward(model, batches, mesh, cfg.parallel)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss, grads, [c.offloader for c in model]


@pytest.mark.parametrize("case", ["llama-gqa", "bf16", "seq1f1b"])
def test_offload_is_bitwise_in_every_mode(case, monkeypatch):
    from engine.model import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # tiny shapes: offload every saved tensor
    over = MODELS["llama-gqa"] + {"llama-gqa": [], "bf16": ["train.bf16=true"],
                                  "seq1f1b": ["parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=3"]}[case]
    for mode in MODES:
        ref_loss, ref_grads, (none,) = one_step(over + [f"train.recompute={mode}"])
        assert none is None
        loss, grads, (off,) = one_step(over + [f"train.recompute={mode}"] + OFFLOAD)
        assert loss == ref_loss, (mode, loss, ref_loss)
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (mode, name)
        assert off.bytes_out > 0 and off.bytes_in == off.bytes_out, (mode, off.bytes_out, off.bytes_in)
        gc.collect()
        assert off.held_bytes() == {}, mode


def _layer_model(mode: str, keep: int, dims: dict, min_bytes: int):
    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.train import build_dataset, build_model, rank_micro_batches

    cfg = validate(load_config(None, [
        "model.num_layers=4", f"model.hidden_size={dims['h']}", f"model.num_attention_heads={dims['H']}",
        f"model.num_query_groups={dims['G']}", f"model.ffn_hidden_size={dims['F']}", "model.vocab_size=300",
        f"data.seq_len={dims['T']}", "data.min_doc_len=20", "data.max_doc_len=100", "train.global_batch_size=2",
        "parallel.dp=1", f"train.recompute={mode}", "train.offload_activations=true",
        f"train.offload_keep_layers={keep}"]), 1)
    mesh = ParallelMesh.single()
    model = build_model(cfg, mesh)[0]
    model.offloader.min_bytes = min_bytes
    return model, rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)


def test_saved_tensors_become_host_copies_and_are_freed():
    from engine.loss import token_loss_sum

    d = {"h": 64, "H": 8, "G": 2, "F": 96, "T": 256}
    h, hd, gd, heads, f, t = d["h"], d["H"] * 8, d["G"] * 8, d["H"], d["F"], d["T"]
    expected = {"none": 4 * t * (4 * h + 2 + 2 * hd + 2 * gd + heads + 3 * f),
                "selective": 4 * t * (3 * h + 1 + hd + 3 * f),
                "attention-cached": 4 * t * (h + hd + heads),
                "full": 4 * t * h}
    keep = 2
    for mode, per_layer in expected.items():
        # 512 bytes: the norms' rstd [T, 1] (1 KiB) moves, the batch's cu_seqlens stays
        model, (batch, _) = _layer_model(mode, keep, d, min_bytes=512)
        inputs = []
        hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
                 for layer in model.decoder.layers]
        loss = token_loss_sum(model, batch)
        for hk in hooks:
            hk.remove()
        gc.collect()
        assert model.offloader.held_bytes() == {2: per_layer, 3: per_layer}, mode
        if mode == "full":  # a kept layer's input is saved on the device, an offloaded one's is gone
            assert [r() is not None for r in inputs] == [True, True, False, False]
        loss.backward()
        del loss
        gc.collect()
        off = model.offloader
        assert off.held_bytes() == {} and off.bytes_in == off.bytes_out == 2 * per_layer, mode


def test_micro_batches_in_flight_keep_their_own_copies():
    """1F1B's order on one stage: forward of micro-batch 0 and 1, then backward of 0 and of 1;
    each backward brings back its own micro-batch's copies, and the gradients are bitwise those
    without offload."""
    from engine.loss import token_loss_sum

    d = {"h": 64, "H": 8, "G": 2, "F": 96, "T": 256}
    grads = {}
    for offloaded in (False, True):
        model, batches = _layer_model("attention-cached", 1, d, min_bytes=0)
        if not offloaded:
            model.offloader = None
            for layer in model.decoder.layers:
                layer.offload = None
        losses = [token_loss_sum(model, b) for b in batches]
        if offloaded:
            one = model.offloader.held_bytes()
            assert sorted(one) == [1, 2, 3]
        losses[0].backward()
        if offloaded:
            gc.collect()
            left = model.offloader.held_bytes()
            assert left and all(2 * left[i] == one[i] for i in one), (one, left)  # equal batch lengths
        losses[1].backward()
        grads[offloaded] = {n: p.grad.clone() for n, p in model.named_parameters()}
    del losses
    gc.collect()
    assert model.offloader.held_bytes() == {}
    assert model.offloader.bytes_in == model.offloader.bytes_out > 0
    for name, g in grads[True].items():
        assert torch.equal(g, grads[False][name]), name


# -- meshes ------------------------------------------------------------------------------------
MESHES = [  # (mode, keep layers, mesh overrides)
    ("full", 1, ["parallel.tp=2", "parallel.dp=2"]),
    ("full", 1, ["parallel.pp=2", "parallel.dp=2"]),
    ("attention-cached", 1, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=seq1f1b",
                             "parallel.seq_chunks=2"]),
    ("none", 0, ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"]),
    ("selective", 1, ["parallel.dp=4", "optim.sharding=fsdp2"]),
]


def offload_world(rank, world, meshes):
    from engine.mesh import ParallelMesh
    from engine.model import offload
    from tests.test_tp_exact import compare, make_cfg, run_steps

    offload.MIN_BYTES = 0  # this process only: offload every saved tensor at these tiny shapes
    copied = []
    real_pack = offload.ActivationOffload._pack
    offload.ActivationOffload._pack = lambda self, *a: copied.append(1) or real_pack(self, *a)
    model = MODELS["llama-gqa"] + ["model.num_layers=4"]
    ref = run_steps(make_cfg(model + ["parallel.dp=1"], 1), ParallelMesh.single())
    report, bitwise = {}, {}
    for mode, keep, mesh_over in meshes:
        runs = []
        for extra in ([], ["train.offload_activations=true", f"train.offload_keep_layers={keep}"]):
            cfg = make_cfg(model + mesh_over + [f"train.recompute={mode}"] + extra, world)
            p = cfg.parallel
            mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement)
            copied.clear()
            runs.append(run_steps(cfg, mesh))
        key = f"{mode} {' '.join(mesh_over)}"
        plain, off = runs
        bitwise[key] = (len(copied) > 0 and plain["loss"] == off["loss"] and plain["norm"] == off["norm"]
                        and all(torch.equal(plain[k][n], off[k][n]) for k in ("grads", "weights") for n in plain[k]))
        report[key] = compare(off, ref)
    return report, bitwise


def test_offload_mesh_exact():
    from tests.test_tp_exact import check_reports

    results = run_world(4, offload_world, MESHES, timeout=1200)
    check_reports([report for report, _ in results])
    for rank, (_, bitwise) in enumerate(results):
        assert all(bitwise.values()), (rank, bitwise)


# -- the simulation --------------------------------------------------------------------------------
def test_simulation_moves_activations_to_the_host():
    from tests.test_simulate import simulate

    seq, layers, keep, h = 4096, 4, 1, 64  # configs/tiny.yaml: fp32, hidden 64, 4 layers
    reports = {}
    for on in ("false", "true"):
        out, rep = simulate("configs/tiny.yaml", "--json", "train.recompute=full", f"train.offload_activations={on}",
                            f"train.offload_keep_layers={keep}", f"data.seq_len={seq}", "data.max_doc_len=1000")
        assert rep is not None and not rep["errors"], out.stdout[-3000:] + out.stderr[-3000:]
        (reports[on],) = rep["ranks"]
    off, on = reports["false"], reports["true"]
    assert on["host_bytes"] >= off["host_bytes"] + (layers - keep) * seq * h * 4 - 2**20, (off, on)
    assert on["host_bytes"] >= (layers - keep) * seq * h * 4
    assert on["categories"]["activations"] < off["categories"]["activations"]
    assert on["peak_bytes"] < off["peak_bytes"], (off["peak_bytes"], on["peak_bytes"])
    assert on["host_syncs"] == off["host_syncs"], (off["host_sync_sites"], on["host_sync_sites"])


# -- CUDA --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_bitwise_and_lower_peak():
    over = MODELS["llama-gqa"] + ["model.num_layers=6", "model.hidden_size=256", "model.ffn_hidden_size=512",
                                  "data.seq_len=8192", "data.max_doc_len=4000"]
    for mode in ("full", "none"):
        peaks, results = [], []
        for extra in ([], OFFLOAD):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            results.append(one_step(over + [f"train.recompute={mode}"] + extra, device="cuda"))
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        (ref_loss, ref_grads, _), (loss, grads, (off,)) = results
        assert torch.equal(loss, ref_loss), mode
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (mode, name)
        assert off.bytes_in == off.bytes_out > 0
        assert peaks[1] < peaks[0], (mode, peaks)
