"""The command line: tools/launch.sh worlds reproduce the single-process losses, and bad input
fails fast (non-zero exit, one clear message, no hang)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run(cmd, nproc=None, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_cli(*args):
    return [sys.executable, "-m", "engine.cli", TINY, *args]


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert all({"step", "loss", "grad_norm", "lr", "num_tokens"} <= r.keys() for r in rows)
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = run(train_cli("train.steps=3", f"train.output_dir={out}"))
    assert r.returncode == 0, r.stderr
    return losses(out)


@pytest.mark.parametrize("nproc,overrides", [
    (4, ["parallel.tp=2", "parallel.dp=2"]),
    (2, ["parallel.cp=2", "parallel.sp_mode=ring"]),
    (2, ["parallel.cp=2", "parallel.sp_mode=ulysses"]),
    (4, ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]),
    (2, ["sequence_parallel_size=2", "sequence_parallel_mode=zigzag-ring"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"]),
], ids=["tp2-dp2", "cp2-ring", "cp2-ulysses", "cp4-hybrid-hp2", "360lf-keys", "pp2-seq1f1b", "pp2-1f1b",
        "pp2-interleaved"])
def test_launch_sh_matches_single_process(tmp_path, single_losses, nproc, overrides):
    r = run(["bash", "tools/launch.sh", TINY, *overrides, "train.steps=3", f"train.output_dir={tmp_path}"], nproc=nproc)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = losses(tmp_path)
    assert len(got) == 3
    for a, b in zip(got, single_losses):
        assert abs(a - b) / b <= 1e-5, (got, single_losses)


@pytest.mark.parametrize("args,message", [
    (["parallel.tp=3"], "parallel.tp=3 does not divide model.num_attention_heads=8"),
    (["parallel.tpp=2"], "did you mean 'parallel.tp'"),
    (["parallel.tp=2", "parallel.dp=2"], "world size 1 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    (["parallel.dp=2"], "does not match world size 1; set parallel.dp=1"),
    (["train.steps=two"], "train.steps"),
    (["parallel.cp=4", "parallel.sp_mode=ulysses", "parallel.tp=4"],
     "tp*hp = 4*4 = 16 does not divide model.num_attention_heads=8"),
    (["model.num_query_groups=6", "parallel.cp=8", "parallel.sp_mode=hybrid", "parallel.hp=4",
      "model.num_attention_heads=24", "model.hidden_size=96", "parallel.tp=2"],
     "model.num_query_groups=6 over tp=2 leaves 3 KV heads per rank, which neither divides nor is a multiple of hp=4"),
    (["sequence_parallel_mode=striped"], "sequence_parallel_mode='striped' is not supported"),
])
def test_bad_config_fails_fast_single_process(args, message):
    r = run(train_cli(*args), timeout=60)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_degrees_in_a_world_fail_on_every_rank_without_hanging(tmp_path):
    """tp=4 × dp=1 in a world of 2: every rank exits before creating a process group; the error
    is printed once (by rank 0)."""
    r = run(["bash", "tools/launch.sh", TINY, "parallel.tp=4", "parallel.dp=1",
             f"train.output_dir={tmp_path}"], nproc=2, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("meshtron-train: error:") == 1, r.stderr
    assert "world size 2 is not divisible by tp*pp*cp = 4*1*1 = 4" in r.stderr, r.stderr


def test_help():
    r = run([sys.executable, "-m", "engine.cli", "--help"], timeout=60)
    assert r.returncode == 0 and "usage: meshtron-train" in r.stdout
    r = run(["bash", "tools/launch.sh", "--help"], timeout=60)
    assert r.returncode == 0 and "NPROC_PER_NODE" in r.stdout


def test_tiny_flexsp_config_on_four_processes_matches_one(tmp_path):
    """configs/tiny-flexsp.yaml as written (one process) and with FlexSP over 4 processes: the
    same losses (fp32: 1e-5 relative), with the planner's groups of mixed sizes in the metrics."""
    cfg = str(ROOT / "configs" / "tiny-flexsp.yaml")
    one = run([sys.executable, "-m", "engine.cli", cfg, "train.steps=4", f"train.output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    four = run(["bash", "tools/launch.sh", cfg, "parallel.sp_mode=flexsp", "parallel.cp=4", "train.steps=4",
                f"train.output_dir={tmp_path / 'four'}"], nproc=4)
    assert four.returncode == 0, four.stderr[-3000:]
    assert losses(tmp_path / "four") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    rows = [json.loads(l) for l in (tmp_path / "four" / "metrics.jsonl").read_text().splitlines()]
    sizes = {s for r in rows for mb in r["flexsp_groups"] for s in mb}
    assert len(sizes) >= 2, rows
