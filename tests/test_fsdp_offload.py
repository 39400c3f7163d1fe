"""FSDP2 with CPU offload (``optim.sharding=fsdp2``, ``optim.offload=true``): the policy is applied,
the numbers are mesh-exact, a resume is exact, and on a (fake) GPU the shards are host memory.

On this CPU-only machine the mesh's device is the CPU too, so "offloaded" cannot be told from
where tensors are; the gloo world checks what torch was told instead — every FSDP parameter group
has ``CPUOffloadPolicy`` (pinning off on a CPU mesh) and every FSDP parameter ``offload_to_cpu`` —
and that the optimizer made its states on the shards' device with torch's fused (CPU) AdamW. The
simulation (a fake cuda device, engine/plan/simulate.py) then shows the placement itself: no
parameter, gradient or optimizer-state bytes on the device, all of them on the host.

Numbers (one world of 4, qwen2 with biases and tied embeddings, test_tp_exact's tolerances): at
dp=2×tp=2 (tp-replicated norms and biases summed on host shards), dp=2×pp=2 (the tied
embedding's copies summed over the pipeline ends on host shards), dp=4, and tp=2×pp=2 with dp=1
(one dp×cp rank: FSDP2 on each rank's own 1-rank group, ParallelMesh.own_group) against the
single-process run; at dp=2×tp=2 the step-0 gradients are bit-identical to fsdp2 without offload
(the same reductions; only AdamW runs in another kernel, so the weights agree to round-off).
Checkpoints at dp=2×tp=2: an offloaded save resumes bit for bit, fp32 and bf16, and a save with
and without offload resume each other (the step-2 loss bit-identical: the same weights); at
tp=2×pp=2 with dp=1 an offloaded save resumes bit for bit.

One process (no process group: the engine's single-GPU run), in a fresh interpreter: FSDP2 starts
a world of one for its 1-rank DeviceMesh and destroys it with the optimizer; the same placement
and exactness checks, a resume bit for bit (and from the replicated state's save), and the
Hugging Face export of a ``meshtron-train`` run equal to the replicated run's.
"""
from __future__ import annotations

import os

import torch

from tests.harness import max_rel_diff, run_world
from tests.test_sharded_optim import STEPS, _train, run_steps
from tests.test_simulate import simulate
from tests.test_tp_exact import MODELS, check, compare, make_cfg

OFFLOAD = ["optim.sharding=fsdp2", "optim.offload=true"]
FSDP2 = ["optim.sharding=fsdp2"]
TP = ["parallel.dp=2", "parallel.tp=2"]
ONE_DP_CP = ["parallel.dp=1", "parallel.tp=2", "parallel.pp=2"]


def fsdp_meshes(opt) -> set:
    """Sizes of the DeviceMeshes the FSDP modules run on."""
    return {m._get_fsdp_state()._fsdp_param_group.mesh_info.mesh.size() for m in opt.state.modules}


def placement(opt) -> dict:
    """What this rank's optimizer told torch and where it put things, after one reduce (gradients
    present) and the update (moments present)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    groups = [g for g in (m._get_fsdp_state()._fsdp_param_group for m in opt.state.modules) if g is not None]
    moments = [t for s in opt.adam.state.values() for k, t in s.items() if k != "step"]
    return {"policies": {type(g.offload_policy).__name__ for g in groups},
            "pinned": {g.offload_policy.pin_memory for g in groups if isinstance(g.offload_policy, CPUOffloadPolicy)},
            "offload_to_cpu": {fp.offload_to_cpu for g in groups for fp in g.fsdp_params},
            "fused": opt.adam.defaults.get("fused"),
            "devices": {t.to_local().device.type for t in opt.params + moments},
            "steps": {s["step"].device.type for s in opt.adam.state.values()},
            "mesh sizes": fsdp_meshes(opt), "memory": opt.memory_report()}


def one_step(cfg, mesh) -> dict:
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, STEPS)
    forward_backward(model, rank_micro_batches(build_dataset(cfg), 0, cfg, mesh), mesh, cfg.parallel)
    opt.reduce_and_clip(full_grads=False)
    grads = {p.grad.to_local().device.type for p in opt.params}
    opt.update()
    return {**placement(opt), "grad_devices": grads}


def offload_world(rank, world, root):
    from engine.mesh import ParallelMesh

    def mesh_of(cfg):
        p = cfg.parallel
        return ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp)

    model = MODELS["qwen2-bias-tied"]
    out = {}
    ref = run_steps(make_cfg(model + ["parallel.dp=1"], 1), ParallelMesh.single())
    runs = {}
    for mesh_over, shardings in ((TP, ("fsdp2", "offload")), (["parallel.dp=2", "parallel.pp=2"], ("offload",)),
                                 (["parallel.dp=4"], ("offload",))):
        for sharding in shardings:
            cfg = make_cfg(model + mesh_over + (OFFLOAD if sharding == "offload" else FSDP2), world)
            runs[" ".join(mesh_over), sharding] = run_steps(cfg, mesh_of(cfg))
    # one dp×cp rank in a world of 4: fully_shard on this rank's own group, everything on the host
    cfg = make_cfg(model + ONE_DP_CP + OFFLOAD, world)
    runs[" ".join(ONE_DP_CP), "offload"] = run_steps(cfg, mesh_of(cfg))
    out["one dp×cp placement"] = one_step(cfg, mesh_of(cfg))
    out["exact"] = {key: compare(got, ref) for key, got in runs.items()}
    same = runs[" ".join(TP), "fsdp2"]["grads"], runs[" ".join(TP), "offload"]["grads"]
    out["grads bitwise"] = all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    out["memory"] = {k: runs[" ".join(TP), k]["memory"] for k in ("fsdp2", "offload")}
    cfg = make_cfg(model + TP + OFFLOAD, world)
    out["placement"] = one_step(cfg, mesh_of(cfg))

    # checkpoints at dp=2 x tp=2: offload <-> offload bit for bit, offload <-> fsdp2 (fp32), bf16
    llama = MODELS["llama-gqa"] + TP + ["train.bf16=false"]

    def cfg_for(name, sharding, bf16=False):
        extra = ["train.bf16=true", "train.micro_batch_size=2"] if bf16 else []  # one micro-batch per rank
        return make_cfg(llama + extra + sharding + [f"checkpoint.dir={os.path.join(root, name)}"], world)

    ck = {}
    for name, sharding, bf16 in (("offload", OFFLOAD, False), ("fsdp2", FSDP2, False),
                                 ("bf16 offload", OFFLOAD, True), ("bf16 fsdp2", FSDP2, True)):
        cfg = cfg_for(name, sharding, bf16)
        out[name] = _train(cfg, mesh_of(cfg), 0, STEPS, save_at=2)[:2]
        ck[name] = os.path.join(root, name, "iter_0000002")
    for target, source, sharding, bf16 in (("offload", "offload", OFFLOAD, False),
                                           ("offload", "fsdp2", OFFLOAD, False),
                                           ("fsdp2", "offload", FSDP2, False),
                                           ("bf16 offload", "bf16 offload", OFFLOAD, True)):
        cfg = cfg_for("r", sharding, bf16)
        out[f"{target} <- {source}"] = _train(cfg, mesh_of(cfg), 2, STEPS, ck[source])[:2]
    # one dp×cp rank (tp=2 x pp=2): the 1-rank FSDP2 states save and resume bit for bit
    where = f"checkpoint.dir={os.path.join(root, 'one')}"
    cfg = make_cfg(MODELS["llama-gqa"] + ONE_DP_CP + OFFLOAD + ["train.bf16=false", where], world)
    out["one dp×cp"] = _train(cfg, mesh_of(cfg), 0, STEPS, save_at=2)[:2]
    out["one dp×cp <- one dp×cp"] = _train(cfg, mesh_of(cfg), 2, STEPS, os.path.join(root, "one", "iter_0000002"))[:2]
    return out


def test_fsdp2_offload_exact_placed_and_resumed(tmp_path):
    reports = run_world(4, offload_world, str(tmp_path), timeout=900)
    for rank, out in enumerate(reports):
        for key, worst in out["exact"].items():
            if rank == 0:
                print(key, {k: f"{v:.2e}" for k, v in worst.items()})
            check(worst, key)
        assert out["grads bitwise"], "step-0 gradients differ between fsdp2 with and without offload"
        # the offloaded run holds what fsdp2 holds, its optimizer state counted as host memory
        plain, off = out["memory"]["fsdp2"], out["memory"]["offload"]
        assert off["state_device"] == 0 and off["state_host"] == plain["state_device"] > 0, (plain, off)
        assert off["params"] == plain["params"] and off["grads"] == plain["grads"], (plain, off)
        check_placement(out["placement"], mesh_size=2)
        check_placement(out["one dp×cp placement"], mesh_size=1)
        # resumes: the same sharding bit for bit; with and without offload the same step-2 loss
        for name in [n for n in out if " <- " in n]:
            (losses, weights), (target, source) = out[name], name.split(" <- ")
            straight = out[source]
            assert losses[2] == straight[0][2], (name, losses[2], straight[0][2])
            if target == source:
                assert all(torch.equal(weights[k], straight[1][k]) for k in weights), name
            else:  # AdamW's fused CPU kernel against the per-tensor loop: round-off
                worst = max(max_rel_diff(weights[k], straight[1][k]) for k in weights)
                assert worst <= 3e-5, (name, worst)
        # bf16 (fp32 master shards on the host) against bf16 fsdp2 on the device
        (l_off, w_off), (l_dev, w_dev) = out["bf16 offload"], out["bf16 fsdp2"]
        loss = max(abs(a - b) / b for a, b in zip(l_off.values(), l_dev.values()))
        worst = max(max_rel_diff(w_off[k].float(), w_dev[k].float()) for k in w_off)
        if rank == 0:
            print(f"bf16 offload vs fsdp2: loss {loss:.2e} weights {worst:.2e}")
        assert loss <= 1e-6 and worst <= 3e-5, (loss, worst)


def check_placement(p: dict, mesh_size: int) -> None:
    """FSDP2 with CPUOffloadPolicy on every module, over ``mesh_size`` ranks: parameter and gradient
    shards, moments and step counts on the host, AdamW fused (CPU kernel)."""
    assert p["policies"] == {"CPUOffloadPolicy"} and p["pinned"] == {False}, p
    assert p["offload_to_cpu"] == {True} and p["fused"] is True, p
    assert p["devices"] == p["grad_devices"] == p["steps"] == {"cpu"}, p
    assert p["memory"]["state_device"] == 0 and p["memory"]["state_host"] > 0, p
    assert p["mesh sizes"] == {mesh_size}, p


def one_process(root: str) -> None:
    """In a fresh interpreter with no process group (one GPU's run): exactness, placement, the
    world of one's lifetime, resumes; results saved to ``root``/out.pt."""
    import gc

    import torch.distributed as dist

    from engine.mesh import ParallelMesh

    torch.set_num_threads(1)
    single, out = ParallelMesh.single(), {}
    model = MODELS["qwen2-bias-tied"] + ["parallel.dp=1"]
    ref = run_steps(make_cfg(model, 1), single)
    out["initialised before"] = dist.is_initialized()
    out["exact"] = compare(run_steps(make_cfg(model + OFFLOAD, 1), single), ref)
    out["placement"] = one_step(make_cfg(model + OFFLOAD, 1), single)
    gc.collect()
    out["initialised after"] = dist.is_initialized()  # the optimizers are gone: so is their world

    llama = MODELS["llama-gqa"] + ["parallel.dp=1", "train.bf16=false"]

    def cfg_for(name, sharding):
        return make_cfg(llama + sharding + [f"checkpoint.dir={os.path.join(root, name)}"], 1)

    for name, sharding in (("offload", OFFLOAD), ("none", [])):
        losses, weights, opt = _train(cfg_for(name, sharding), single, 0, STEPS, save_at=2)
        if name == "offload":
            out["initialised while training"] = dist.is_initialized() and dist.get_world_size() == 1
        out[name] = losses, weights
        del opt
    for target, source in (("offload", "offload"), ("offload", "none")):
        ck = os.path.join(root, source, "iter_0000002")
        out[f"{target} <- {source}"] = _train(cfg_for("r", OFFLOAD), single, 2, STEPS, ck)[:2]
    torch.save(out, os.path.join(root, "out.pt"))


def test_one_process_fsdp2_offload(tmp_path):
    """One process, no process group (module docstring): FSDP2's world of one, exact, placed,
    resumed."""
    import torch.multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=one_process, args=(str(tmp_path),))
    proc.start()
    proc.join(600)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0, proc.exitcode
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    print({k: f"{v:.2e}" for k, v in out["exact"].items()})
    check(out["exact"], "one process")
    check_placement(out["placement"], mesh_size=1)
    assert not out["initialised before"] and out["initialised while training"] and not out["initialised after"], out
    losses, weights = out["offload <- offload"]
    assert losses[2] == out["offload"][0][2] and all(torch.equal(weights[k], out["offload"][1][k]) for k in weights)
    losses, weights = out["offload <- none"]  # AdamW's fused CPU kernel against the per-tensor loop
    assert losses[2] == out["none"][0][2], (losses, out["none"][0])
    assert max(max_rel_diff(weights[k], out["none"][1][k]) for k in weights) <= 3e-5


def test_one_process_export_matches_replicated(tmp_path):
    """``meshtron-train`` on one process with fsdp2 + offload exports the Hugging Face model of the
    replicated run after the same 2 steps (fp32: 3e-5 of each tensor's max, as in test_tp_exact)."""
    import glob
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "-m", "engine.cli", "configs/tiny.yaml", "train.steps=2", "train.global_batch_size=2",
              "checkpoint.save_final=false", "optim.eps=1e-4"]
    for name, over in (("offload", OFFLOAD), ("none", [])):
        r = subprocess.run(common + over + [f"train.output_dir={tmp_path / name}",
                                            f"checkpoint.export_hf={tmp_path / name / 'hf'}"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    got, ref = (load_file(glob.glob(str(tmp_path / n / "hf" / "*.safetensors"))[0]) for n in ("offload", "none"))
    assert got.keys() == ref.keys() and len(ref) > 10
    for k in ref:
        assert max_rel_diff(got[k].float(), ref[k].float()) <= 3e-5, k


def test_simulated_offload_is_host_memory():
    """``meshtron-plan --simulate`` on fake GPUs, tiny config at dp=tp=pp=2: with offload a rank has
    no parameter, gradient or optimizer-state bytes on the device (buffers aside: the parameters'
    category counts them), its parameter, gradient and state shards are host memory, and no NCCL
    breach (the replica sums over tp and the pipeline ends, the gradient norm and the save keep
    their collectives on the device)."""
    # tp and tied embeddings over pp: the replica sums of reduce_replicas run on host shards; one
    # micro-batch per rank (torch accumulates further micro-batches' gradient shards on the host,
    # each copy blocking: see engine/parallel/fsdp.py)
    common = ["configs/tiny.yaml", "hardware.gpus=8", "parallel.dp=2", "parallel.tp=2", "parallel.pp=2",
              "model.tie_word_embeddings=true", "train.global_batch_size=2"]
    reports = {}
    for name, over in (("fsdp2", FSDP2), ("offload", OFFLOAD)):
        proc, report = simulate(*common, *over)
        assert report is not None and not report["errors"], proc.stdout[-3000:] + proc.stderr[-3000:]
        reports[name] = report
    for plain, off in zip(reports["fsdp2"]["ranks"], reports["offload"]["ranks"]):  # first and last stage
        print({k: (plain["categories"][k], off["categories"][k]) for k in plain["categories"]},
              plain["host_bytes"], off["host_bytes"], off["host_sync_sites"])
        assert off["categories"]["gradients"] == off["categories"]["optimizer"] == 0, off["categories"]
        assert off["categories"]["parameters"] < plain["categories"]["parameters"] / 100, (plain, off)
        # on the host: the fp32 parameter and gradient shards (4 + 4 bytes per element) and the two
        # moments (8 bytes, what fsdp2 keeps on the device as optimizer state)
        assert off["host_bytes"] >= 2 * plain["categories"]["optimizer"] > 0, (plain, off)
        # host waits, not one per parameter: the gradient shards' copies (one event wait per
        # stream), the replica sums' results (tp, pipeline ends), the clipping coefficient
        assert off["host_syncs"] <= plain["host_syncs"] + 5, (plain["host_sync_sites"], off["host_sync_sites"])
    assert reports["offload"]["host_gib"] > reports["fsdp2"]["host_gib"]
    assert reports["offload"]["nccl_violations"] == [], reports["offload"]["nccl_violations"]


def test_simulated_one_dp_cp_rank_offload_is_host_memory():
    """One dp×cp rank on fake GPUs — one GPU (a world of one, the simulation's fake process group)
    and tp=2×pp=2 (each rank's own group): with offload no parameter, gradient or optimizer-state
    bytes on the device (the replicated state of fsdp2 without offload holds them all there), the
    fp32 parameters, gradients and moments on the host, and no NCCL breach."""
    common = ["configs/tiny.yaml", "train.global_batch_size=1", "parallel.dp=1"]
    for mesh in (["hardware.gpus=1"], ["hardware.gpus=4", "parallel.tp=2", "parallel.pp=2"]):
        reports = {}
        for name, over in (("fsdp2", FSDP2), ("offload", OFFLOAD)):
            proc, report = simulate(*common, *mesh, *over)
            assert report is not None and not report["errors"], proc.stdout[-3000:] + proc.stderr[-3000:]
            reports[name] = report
        for plain, off in zip(reports["fsdp2"]["ranks"], reports["offload"]["ranks"]):
            print(mesh, {k: (plain["categories"][k], off["categories"][k]) for k in plain["categories"]},
                  plain["host_bytes"], off["host_bytes"], off["host_sync_sites"])
            assert off["categories"]["gradients"] == off["categories"]["optimizer"] == 0, off["categories"]
            assert off["categories"]["parameters"] < plain["categories"]["parameters"] / 100, (plain, off)
            # four fp32 copies of the parameters: parameters, gradients and the two moments (fsdp2's
            # replicated state keeps an fp32 gradient bucket of them on the device, padded a little)
            assert off["host_bytes"] >= 3.9 * plain["categories"]["gradients"] > 0, (plain, off)
        assert reports["offload"]["nccl_violations"] == [], reports["offload"]["nccl_violations"]
