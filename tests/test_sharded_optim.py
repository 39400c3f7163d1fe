"""Sharded optimizer states (optim.sharding = zero1 | fsdp2, optim.offload) are mesh-exact and
save the memory they target.

I-5 checks against the single-process unsharded run, with test_tp_exact's tolerances (fp32):
loss relative error ≤ 1e-6, grad norm and every step-0 gradient max|Δ|/max|ref| ≤ 1e-5, weights
after 3 AdamW steps ≤ 3e-5 (see test_tp_exact's docstring for why weights get 3e-5).

Memory per rank (MeshOptimizer.memory_report, measured after the backward of step 1, when
parameters, gradients and optimizer state are all live): zero1's optimizer state is that of the
unsharded run divided by D = dp·cp, up to the padding of its buckets to a multiple of D; fsdp2's
parameters + gradients + state are 1/D of unsharded up to FSDP's dim-0 padding; offload leaves
zero optimizer-state bytes on the device (on this CPU-only machine "device" is the placement the
optimizer chose, see engine/optim.py).

Checkpoints: a state saved sharded resumes unsharded at another mesh (and the reverse) with the
same next-step loss, and a sharded save resumes at the same mesh and sharding bit for bit.

bf16 (fp32 masters): at dp=2 with one micro-batch per rank, zero1, fsdp2 and offload give the
unsharded bf16 run's losses and weights (measured: identical bits; asserted with the fp32
tolerances). Every sharding sums micro-batch gradients in fp32 (none and zero1 in their main_grad
buckets, fsdp2 through its fp32 reduce_dtype: I-10, tests/test_grad_accum.py).
"""
from __future__ import annotations

import pytest
import torch

from tests.harness import max_rel_diff, run_world
from tests.test_tp_exact import MODELS, check, compare, make_cfg, merge_stages

STEPS = 3


def run_steps(cfg, mesh, steps: int = STEPS) -> dict:
    """test_tp_exact's run: losses, norms, step-0 gradients and final weights (canonical), plus the
    memory report taken after the backward of step 1."""
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, steps)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    data = build_dataset(cfg)
    out = {"loss": [], "norm": []}
    for step in range(steps):
        loss, _ = forward_backward(model, rank_micro_batches(data, step, cfg, mesh), mesh, cfg.parallel)
        if step == 1:
            out["memory"] = opt.memory_report()
        grads, norm = opt.reduce_and_clip()
        if step == 0:
            out["grads"] = canonical_tensors(model, dict(zip(names, [g.clone() for g in grads])))
        opt.update()
        out["loss"].append(loss)
        out["norm"].append(float(norm))
    with opt.full_weights():
        out["weights"] = canonical_tensors(model, {n: p.detach() for n, p in model.named_parameters()})
    if mesh.pp > 1:
        for key in ("grads", "weights"):
            out[key] = merge_stages(out[key], mesh)
    return out


SHARDINGS = {"none": [], "zero1": ["optim.sharding=zero1"], "fsdp2": ["optim.sharding=fsdp2"],
             "offload": ["optim.sharding=zero1", "optim.offload=true"]}


def exact_world(rank, world, meshes, models):
    """Every (model, mesh, sharding): I-5 differences against the single-process unsharded run and
    this rank's memory report."""
    from engine.mesh import ParallelMesh

    report = {}
    for model_name in models:
        over = MODELS[model_name]
        ref = run_steps(make_cfg(over + ["parallel.dp=1"], 1), ParallelMesh.single())
        for mesh_over, shardings in meshes:
            for sharding in shardings:
                cfg = make_cfg(over + mesh_over + SHARDINGS[sharding], world)
                p = cfg.parallel
                mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp)
                got = run_steps(cfg, mesh)
                report[(model_name, " ".join(mesh_over), sharding)] = (compare(got, ref), got["memory"],
                                                                       mesh.dp * mesh.cp)
    return report


def check_exact_and_memory(reports) -> None:
    """I-5 tolerances for every run; memory ratios against the unsharded run at the same mesh."""
    for rank, report in enumerate(reports):
        for key, (worst, memory, d) in report.items():
            if rank == 0:
                print(key, {k: f"{v:.2e}" for k, v in worst.items()}, memory)
            check(worst, key)
            model_name, mesh_name, sharding = key
            base = report.get((model_name, mesh_name, "none"), (None, None))[1]
            if base is None or sharding == "none":
                continue
            state = memory["state_device"] + memory["state_host"]
            if sharding == "zero1":  # 1/D of the moments (the fp32 masters are the parameters)
                assert memory["state_host"] == 0, (key, memory)
                assert abs(state * d / base["state_device"] - 1) < 1e-2, (key, memory, base)
                for k in ("params", "grads"):  # not sharded (only bucket padding added)
                    assert abs(memory[k] / base[k] - 1) < 1e-2, (key, k, memory, base)
            elif sharding == "fsdp2":  # parameters, gradients and moments: 1/D each
                for k in ("params", "grads", "state_device"):
                    assert abs(memory[k] * d / base[k] - 1) < 2e-2, (key, k, memory, base)
            elif sharding == "offload":  # nothing on the device; on the host 1/D of moments + fp32 masters
                zero1 = report[(model_name, mesh_name, "zero1")][1]["state_device"]
                assert memory["state_device"] == 0, (key, memory)
                assert abs(memory["state_host"] - zero1 - base["params"] / d) <= 64 * d, (key, memory, zero1)


def test_sharded_states_exact_and_smaller_dp2():
    """dp=2: zero1, fsdp2 and zero1+offload against the single-process run, both models."""
    meshes = [(["parallel.dp=2"], ["none", "zero1", "fsdp2", "offload"])]
    check_exact_and_memory(run_world(2, exact_world, meshes, list(MODELS), timeout=600))


def test_sharded_states_exact_over_cp_tp_pp():
    """World of 4: shards over dp×cp (D=4), and D=2 beside tp=2 (tp-replicated norms summed on the
    shards) and beside pp=2 (the tied embedding's copies on both stages stay bit-identical)."""
    meshes = [(["parallel.dp=2", "parallel.cp=2"], ["none", "zero1", "fsdp2"]),
              (["parallel.dp=2", "parallel.tp=2"], ["none", "zero1", "fsdp2"]),
              (["parallel.dp=2", "parallel.pp=2"], ["none", "zero1", "fsdp2"])]
    check_exact_and_memory(run_world(4, exact_world, meshes, ["qwen2-bias-tied"], timeout=600))


def _train(cfg, mesh, first: int, last: int, resume: str | None = None, save_at: int | None = None):
    """Steps ``first``…``last - 1`` (after resuming from ``resume``); saves a training checkpoint
    after step ``save_at - 1``. Returns (losses by step, canonical weights, optimizer)."""
    from engine.model.gpt import canonical_tensors
    from engine.optim import MeshOptimizer
    from engine.resume import load_training_checkpoint, save_training_checkpoint
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, STEPS)
    data = build_dataset(cfg)
    if resume:
        assert load_training_checkpoint(model, opt, mesh, resume) == first
    losses = {}
    for step in range(first, last):
        losses[step], _ = forward_backward(model, rank_micro_batches(data, step, cfg, mesh), mesh, cfg.parallel)
        opt.step()
        if save_at == step + 1:
            save_training_checkpoint(model, opt, mesh, cfg, step + 1)
    with opt.full_weights():
        weights = canonical_tensors(model, {n: p.detach().clone() for n, p in model.named_parameters()})
    return losses, weights, opt


def resume_world(rank, world, root):
    """Checkpoints across shardings and meshes, in a world of 2 (dp=1 runs on rank 0 alone)."""
    import os

    import torch.distributed as dist

    from engine.mesh import ParallelMesh

    over = MODELS["llama-gqa"] + ["train.bf16=false"]
    dp2 = ParallelMesh.build(dp=2)
    out = {}

    def cfg_for(sharding, dp, name):
        where = f"checkpoint.dir={os.path.join(root, name)}"
        return make_cfg(over + [f"parallel.dp={dp}", where] + SHARDINGS[sharding], dp)

    def single(sharding, name, **kw):
        """A dp=1 run on rank 0 while rank 1 waits at the barrier."""
        result = _train(cfg_for(sharding, 1, name), ParallelMesh.single(), **kw)[:2] if rank == 0 else None
        dist.barrier()
        return result

    # straight runs: 3 steps, checkpoint after 2
    for sharding in ("zero1", "fsdp2", "offload"):
        out[f"{sharding} dp2"] = _train(cfg_for(sharding, 2, sharding), dp2, 0, STEPS, save_at=2)[:2]
    out["none dp1"] = single("none", "none", first=0, last=STEPS, save_at=2)  # its barrier: all saved
    ck = {name: os.path.join(root, name, "iter_0000002") for name in ("zero1", "fsdp2", "offload", "none")}
    # the same sharding and mesh: bit for bit
    for sharding in ("zero1", "fsdp2", "offload"):
        out[f"{sharding} dp2 <- {sharding} dp2"] = _train(cfg_for(sharding, 2, "r"), dp2, 2, STEPS, ck[sharding])[:2]
    # sharded at dp=2 -> unsharded at dp=1, and the reverse
    for sharding in ("zero1", "fsdp2"):
        out[f"none dp1 <- {sharding} dp2"] = single("none", "r", first=2, last=STEPS, resume=ck[sharding])
        out[f"{sharding} dp2 <- none dp1"] = _train(cfg_for(sharding, 2, "r"), dp2, 2, STEPS, ck["none"])[:2]
    out["fsdp2 dp2 <- zero1 dp2"] = _train(cfg_for("fsdp2", 2, "r"), dp2, 2, STEPS, ck["zero1"])[:2]
    # bf16 with fp32 masters: sharded masters against the unsharded ones at the same mesh
    over[-1] = "train.bf16=true"
    over.append("train.micro_batch_size=2")  # one micro-batch per rank: no bf16 accumulation in autograd
    for sharding in ("none", "zero1", "fsdp2", "offload"):
        losses, weights, opt = _train(cfg_for(sharding, 2, "bf16-" + sharding), dp2, 0, STEPS, save_at=2)
        out[f"bf16 {sharding} dp2"] = (losses, weights)
        if sharding in ("zero1", "offload"):  # the bf16 parameters are the rounded fp32 masters
            for b in opt.state.buckets:
                assert torch.equal(b.data[b.lo:b.hi], b.master.to(b.data.device, torch.bfloat16)), sharding
    dist.barrier()
    bf16 = {name: os.path.join(root, "bf16-" + name, "iter_0000002") for name in ("zero1", "none")}
    out["bf16 zero1 dp2 <- bf16 zero1 dp2"] = _train(cfg_for("zero1", 2, "r"), dp2, 2, STEPS, bf16["zero1"])[:2]
    out["bf16 none dp2 <- bf16 zero1 dp2"] = _train(cfg_for("none", 2, "r"), dp2, 2, STEPS, bf16["zero1"])[:2]
    out["bf16 zero1 dp2 <- bf16 none dp2"] = _train(cfg_for("zero1", 2, "r"), dp2, 2, STEPS, bf16["none"])[:2]
    return out


def test_checkpoints_across_shardings(tmp_path):
    reports = run_world(2, resume_world, str(tmp_path), timeout=600)
    runs = reports[0]
    for name, (losses, weights) in runs.items():
        if name.startswith("bf16") and "<-" not in name:
            ref = runs["bf16 none dp2"]
            worst = max(max_rel_diff(weights[k].float(), ref[1][k].float()) for k in weights)
            loss = max(abs(a - b) / b for a, b in zip(losses.values(), ref[0].values()))
            print(name, f"loss {loss:.2e} weights {worst:.2e}")
            assert loss <= 1e-6 and worst <= 3e-5, (name, loss, worst)
        if "<-" not in name:
            continue
        target, source = name.split(" <- ")
        straight = runs[source]
        loss, ref = losses[2], straight[0][2]
        if target == source:  # same mesh and sharding: the same bits
            assert loss == ref, (name, loss, ref)
            assert all(torch.equal(weights[k], straight[1][k]) for k in weights), name
        else:  # another mesh or sharding: fp32 round-off of the summation order (I-5 tolerances)
            worst = max(max_rel_diff(weights[k], straight[1][k]) for k in weights)
            print(name, f"loss {abs(loss - ref) / ref:.2e} weights {worst:.2e}")
            assert abs(loss - ref) / ref <= 1e-6, (name, loss, ref)
            assert worst <= 3e-5, (name, worst)


@pytest.mark.parametrize("overrides,message", [
    (["optim.offload=true"], "optim.offload=true needs optim.sharding=zero1"),
    (["optim.sharding=fsdp2", "train.bf16=true", "parallel.pp=2"], "use parallel.pp=1 or optim.sharding=zero1"),
])
def test_unsupported_combinations_are_config_errors(overrides, message):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_cfg(overrides, 2)


def test_fsdp2_run_exports_the_same_hf_model(tmp_path):
    """checkpoint.export_hf under fsdp2 (2 ranks) writes whole tensors equal to the unsharded
    single-process export after the same 2 steps (fp32: 3e-5 of each tensor's max, as for weights
    in test_tp_exact.py)."""
    import glob
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC_PER_NODE="2")
    # optim.eps=1e-4: Adam's conditioning, as in test_tp_exact.py
    common = ["configs/tiny.yaml", "train.steps=2", "checkpoint.save_final=false", "optim.eps=1e-4"]
    runs = {"fsdp2": ["bash", "tools/launch.sh", *common, "optim.sharding=fsdp2"],
            "single": [sys.executable, "-m", "engine.cli", *common]}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + [f"train.output_dir={tmp_path / name}", f"checkpoint.export_hf={tmp_path / name / 'hf'}"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    got, ref = (load_file(glob.glob(str(tmp_path / n / "hf" / "*.safetensors"))[0]) for n in runs)
    assert got.keys() == ref.keys() and len(ref) > 10
    for k in ref:
        assert max_rel_diff(got[k].float(), ref[k].float()) <= 3e-5, k
