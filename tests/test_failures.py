"""Failure behaviour of a CPU world (issue: fail loudly, early and cleanly).

* a rank that raises mid-step: every rank exits non-zero within seconds, the traceback is
  printed once (by the failing rank), the others name it in one line;
* a rank SIGKILLed mid-run: the others exit non-zero, bounded by the collective timeout;
* the ranks are started by hand (RANK / WORLD_SIZE / MASTER_ADDR, as ``srun`` would), not by
  torchrun, so nothing but meshtron itself stops the survivors.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from engine.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def start_world(world: int, args: list[str], fault: str, tmp_path) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MESHTRON_FAULT=fault)
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        err = open(tmp_path / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "engine.cli", TINY, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err))
    return procs


def wait_all(procs, limit: float) -> tuple[list[int], float]:
    """Exit codes, and seconds from the first exit to the last (the others' reaction time)."""
    deadline, first, codes = time.monotonic() + limit, None, [None] * len(procs)
    while None in codes and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if codes[i] is None and p.poll() is not None:
                codes[i] = p.returncode
                first = first or time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    assert None not in codes, f"ranks still running after {limit}s: {codes}"
    return codes, time.monotonic() - first


ARGS = ["parallel.dp=2", "parallel.tp=2", "train.steps=8", "checkpoint.save_final=false", "dist.timeout_s=60",
        "dist.abort_poll_s=0.5"]


def test_a_raising_rank_stops_the_world_and_is_reported_once(tmp_path):
    procs = start_world(4, ARGS + [f"train.output_dir={tmp_path / 'run'}"], "raise@2/1", tmp_path)
    codes, spread = wait_all(procs, 180)
    assert all(c != 0 for c in codes), codes
    assert spread < 15, f"the others took {spread:.1f}s to stop"
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(4)]
    assert sum(e.count("Traceback") for e in errs) == 1, errs
    assert "injected failure (MESHTRON_FAULT) at step 2 on rank 1" in errs[1]
    for r in (0, 2, 3):
        assert "stopping: rank 1: RuntimeError: injected failure" in errs[r], errs[r]


def test_a_killed_rank_stops_the_world(tmp_path):
    procs = start_world(4, ARGS + [f"train.output_dir={tmp_path / 'run'}"], "kill@2/2", tmp_path)
    codes, spread = wait_all(procs, 180)
    assert codes[2] == -9 and all(c not in (0, None) for c in codes), codes
    assert spread < 60 + 15, f"the others took {spread:.1f}s to stop"
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(4)]
    assert sum(e.count("Traceback") for e in errs) <= 1, errs  # the first survivor to notice explains


def metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(args: list[str], fault: str = "", nproc: int = 0, restarts: int = 0, timeout: float = 300):
    """meshtron-train as one process, or under torchrun (tools/launch.sh) with ``nproc`` ranks."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MESHTRON_FAULT=fault)
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    if nproc:
        env.update(NPROC_PER_NODE=str(nproc), MAX_RESTARTS=str(restarts))
        cmd = ["bash", "tools/launch.sh", TINY, *args]
    else:
        cmd = [sys.executable, "-m", "engine.cli", TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


RUN = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=0", "checkpoint.save_final=false", "train.resume=auto"]


def test_torchrun_restart_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """rank 1 crashes at the start of step 5 (after the step-4 checkpoint and step 4's metrics
    row); torchrun restarts the world, which resumes at step 4 and ends with the same losses."""
    mesh = ["parallel.dp=2"]
    clean = train(RUN + mesh + [f"train.output_dir={tmp_path / 'clean'}"], nproc=2)
    assert clean.returncode == 0, clean.stderr[-3000:]
    crashed = train(RUN + mesh + [f"train.output_dir={tmp_path / 'crash'}"], fault="raise@5/1", nproc=2, restarts=1)
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "injected failure (MESHTRON_FAULT) at step 5 on rank 1" in crashed.stderr
    assert "resumed from" in crashed.stdout and "iter_0000004" in crashed.stdout
    got, ref = metrics(tmp_path / "crash"), metrics(tmp_path / "clean")
    assert [r["step"] for r in got] == list(range(6))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bit-identical on CPU


def test_checkpoint_killed_midway_leaves_the_previous_one_and_resume_uses_it(tmp_path):
    out = tmp_path / "run"
    killed = train(RUN + [f"train.output_dir={out}"], fault="kill-in-save@4/0")
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (ckpt / "iter_0000002" / "meshtron_train.pt").is_file() and not (ckpt / "iter_0000004").exists()
    resumed = train(RUN + [f"train.output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "iter_0000002" in resumed.stdout
    clean = train(RUN + [f"train.output_dir={tmp_path / 'clean'}"])
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "clean")]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not (ckpt / "iter_0000004.new").exists()  # the half-written one is gone


def test_missing_or_corrupt_shard_is_named(tmp_path):
    import shutil

    out = tmp_path / "run"
    r = train(["train.steps=2", "checkpoint.save_final=true", f"train.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    good = out / "checkpoints" / "iter_0000002"
    shards = sorted(p for p in good.iterdir() if p.suffix == ".distcp")
    assert shards
    for damage in ("missing", "truncated", "state"):
        bad = tmp_path / f"bad-{damage}"
        shutil.copytree(good, bad)
        victim = bad / (shards[0].name if damage != "state" else "meshtron_train.pt")
        if damage == "missing":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        r = train(["train.steps=3", f"train.resume={bad}", f"train.output_dir={tmp_path / damage}"])
        assert r.returncode != 0
        assert str(victim) in r.stderr, (damage, r.stderr[-3000:])
        assert r.stderr.count("Traceback") <= 1


def test_non_finite_gradients_skip_the_update(tmp_path):
    """In-process, for every optimizer-state layout that runs on one rank: a NaN gradient leaves
    weights, moments, masters and the schedule untouched, and the next good step is the step an
    optimizer that never saw the bad one would take."""
    import torch

    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    for over in (["optim.sharding=none"], ["optim.sharding=zero1"], ["optim.sharding=zero1", "optim.offload=true"],
                 ["optim.sharding=none", "train.bf16=true"]):
        cfg = validate(load_config(TINY, over + ["model.num_layers=2", "train.global_batch_size=2"]), 1)
        mesh = ParallelMesh.single()
        runs = []
        for poison in (False, True):
            torch.manual_seed(0)
            model = build_model(cfg, mesh)
            opt, data = MeshOptimizer(model, cfg.optim, mesh, 4), build_dataset(cfg)
            losses = [forward_backward(model, rank_micro_batches(data, 0, cfg, mesh), mesh)[0]]
            assert opt.step(losses[0])["skipped"] == 0
            if poison:
                before = [p.detach().clone() for p in model.parameters()]
                forward_backward(model, rank_micro_batches(data, 1, cfg, mesh), mesh)
                first = next(iter(model.parameters()))  # backward summed its gradient into main_grad
                (first.main_grad if hasattr(first, "main_grad") else first.grad).view(-1)[0] = float("nan")
                stats = opt.step(1.0)
                assert stats["skipped"] == 1 and stats["grad_norm"] != stats["grad_norm"], (over, stats)
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), over
                assert opt.step_count == 1
                inf = opt.step(float("inf"))  # a non-finite loss with no gradients at all
                assert inf["skipped"] == 1 and opt.step_count == 1
            losses.append(forward_backward(model, rank_micro_batches(data, 2, cfg, mesh), mesh)[0])
            assert opt.step(losses[-1])["skipped"] == 0
            runs.append(([p.detach().clone() for p in model.parameters()], losses))
        (clean, l_clean), (skipped, l_skipped) = runs
        assert l_clean == l_skipped, over
        assert all(torch.equal(a, b) for a, b in zip(clean, skipped)), over


def test_consecutive_bad_steps_stop_the_run_with_one_message(tmp_path):
    """Two ranks; NaN gradients on rank 1 only from step 2 on: every rank skips together (the
    norm is global), the metrics count the skips, and after train.max_bad_steps=3 the run stops."""
    import json

    out = tmp_path / "run"
    r = train(["parallel.dp=2", "train.steps=10", "train.max_bad_steps=3", f"train.output_dir={out}",
               "checkpoint.save_final=false"], fault="nan@2-99/1", nproc=2)
    assert r.returncode != 0
    assert r.stderr.count("the last 3 steps (train.max_bad_steps=3) had a NaN/Inf loss or gradient") == 1, r.stderr[-3000:]
    assert " failed:\nTraceback" not in r.stderr  # a message, not a traceback (torchrun adds its own summary)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped"] for row in rows] == [0, 0, 1, 1, 1]
    assert [row["skipped_steps"] for row in rows] == [0, 0, 1, 2, 3]
    assert rows[2]["loss"] == rows[2]["loss"]  # the loss was fine, the gradient was not
