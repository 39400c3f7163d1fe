"""Command-line extras: ``meshtron-convert --layers-per-stage`` writes an uneven pipeline split
that round-trips to HF bit-exactly; a plain ``srun meshtron-train`` (no torchrun) takes its rank,
world and rendezvous from SLURM's variables (the node-list parser, the mapping, and a real
two-process world with the SLURM environment emulated)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from convert.cli import main as convert
from convert.megatron_legacy import load_legacy
from engine.cli import first_host, slurm_env
from engine.model.sharding import layer_of
from tests.harness import free_port
from tests.test_convert import assert_same_state, hf_state, make_hf
from tests.test_launch import ROOT, TINY, losses


def stage_layer_counts(mg) -> list[int]:
    """Decoder layers held by each pp stage of a legacy checkpoint (tp rank 0's files)."""
    it_dir = mg / "iter_0000000"
    counts = []
    for rank_dir in sorted(d for d in os.listdir(it_dir) if d.startswith("mp_rank_00")):
        state = torch.load(it_dir / rank_dir / "model_optim_rng.pt", map_location="cpu", weights_only=False, mmap=True)
        counts.append(len({layer_of(k)[0] for k in state["model"] if layer_of(k)}))
    return counts


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")  # 4 layers


def test_layers_per_stage_uneven_split_round_trips(llama, tmp_path):
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert convert(["hf-to-megatron", "--hf", str(llama), "--out", str(mg), "--format", "torch",
                    "--pp", "2", "--layers-per-stage", "3,1"]) == 0
    assert stage_layer_counts(mg) == [3, 1]
    assert load_legacy(str(mg))[2]["layers_per_stage"] == [3, 1]
    assert convert(["megatron-to-hf", "--megatron", str(mg), "--out", str(back)]) == 0
    assert_same_state(hf_state(back), hf_state(llama))

    # reshard to the mirror split at tp=2, then back to HF: still the same tensors
    mg2, back2 = tmp_path / "mg2", tmp_path / "back2"
    assert convert(["reshard", "--in", str(mg), "--out", str(mg2), "--tp", "2", "--pp", "2",
                    "--layers-per-stage", "1,3"]) == 0
    assert stage_layer_counts(mg2) == [1, 3]
    assert convert(["megatron-to-hf", "--megatron", str(mg2), "--out", str(back2)]) == 0
    assert_same_state(hf_state(back2), hf_state(llama))


@pytest.mark.parametrize("args,message", [
    (["--pp", "2", "--layers-per-stage", "2,1"], "adding up to num_layers=4 (got 2 adding up to 3)"),
    (["--pp", "2", "--layers-per-stage", "1,1,2"], "must list pp*vpp = 2*1 = 2 positive layer counts"),
    (["--pp", "2", "--layers-per-stage", "4,0"], "--layers-per-stage 4,0 must list"),
    (["--pp", "2", "--vpp", "2", "--layers-per-stage", "2,2"], "pp*vpp = 2*2 = 4"),
    (["--pp", "2", "--layers-per-stage", "3,1", "--format", "torch_dist"], "--layers-per-stage needs --format torch"),
    (["--pp", "5"], "give the layers per stage explicitly with --layers-per-stage N,N,... (5 numbers)"),
])
def test_bad_layers_per_stage_is_one_clear_error(llama, tmp_path, capsys, args, message):
    out = tmp_path / "mg"
    fmt = [] if "--format" in args else ["--format", "torch"]
    assert convert(["hf-to-megatron", "--hf", str(llama), "--out", str(out), *fmt, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshtron-convert: error:") and message in err, err
    assert not out.exists()


def test_layers_per_stage_not_a_list_is_a_usage_error(llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert(["hf-to-megatron", "--hf", str(llama), "--out", str(tmp_path / "mg"), "--layers-per-stage", "3;1"])
    assert e.value.code == 2 and "not a comma-separated list" in capsys.readouterr().err


@pytest.mark.parametrize("nodelist,host", [
    ("localhost", "localhost"),
    ("node[01-04,07],gpu5", "node01"),
    ("gpu5,node[01-04]", "gpu5"),
    ("node[7,3-4]", "node7"),
    ("rack[2-3]-node[010-012]", "rack2-node010"),
    ("a-b.example.com", "a-b.example.com"),
])
def test_first_host_of_a_compressed_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["node[01-04", "node[x-y]", ",node1"])
def test_first_host_rejects_a_malformed_nodelist(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_host(nodelist)


SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-04,07],gpu5"}


def test_slurm_env_maps_a_plain_srun_task():
    assert slurm_env(SRUN) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "node01",
                               "MASTER_PORT": "29500"}
    # the step's own node list wins over the job's; the user's MASTER_ADDR/PORT are kept
    got = slurm_env({**SRUN, "SLURM_STEP_NODELIST": "node[03-04]", "MASTER_PORT": "1234"})
    assert got["MASTER_ADDR"] == "node03" and "MASTER_PORT" not in got
    assert "MASTER_ADDR" not in slurm_env({**SRUN, "MASTER_ADDR": "10.0.0.1"})


def test_slurm_env_gives_the_nodes_task_count():
    """LOCAL_WORLD_SIZE (the data cache's builders per node) from SLURM's per-node task list."""
    assert slurm_env({**SRUN, "SLURM_TASKS_PER_NODE": "4(x4)"})["LOCAL_WORLD_SIZE"] == "4"
    env = {**SRUN, "SLURM_TASKS_PER_NODE": "2(x2),3", "SLURM_STEP_TASKS_PER_NODE": "4(x3),1"}
    assert slurm_env({**env, "SLURM_NODEID": "1"})["LOCAL_WORLD_SIZE"] == "4"  # the step's list wins
    assert slurm_env({**env, "SLURM_NODEID": "3"})["LOCAL_WORLD_SIZE"] == "1"
    assert "LOCAL_WORLD_SIZE" not in slurm_env(SRUN)  # SLURM does not say: the cache builds alone
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        slurm_env({**SRUN, "SLURM_TASKS_PER_NODE": "4x2"})


def test_slurm_env_leaves_torchrun_and_non_slurm_processes_alone():
    assert slurm_env({**SRUN, "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}) == {}  # torchrun inside srun
    assert slurm_env({"SLURM_JOB_NODELIST": "node1"}) == {}  # a shell on an allocation, not a task
    assert slurm_env({}) == {}
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_plain_srun_world_of_two_trains(tmp_path):
    """Two ``python -m engine.cli`` processes with only SLURM's variables (as ``srun -n2`` on one
    node gives them) form a world of 2 and train; parallel.dp=2 fails validation in a world of 1,
    so two lone single-process runs cannot pass for it."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "engine.cli", TINY, "parallel.dp=2", "train.steps=2", f"train.output_dir={tmp_path}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert len(losses(tmp_path)) == 2


def test_slurm_example_names_shipped_configs():
    text = (ROOT / "tools" / "slurm_example.sbatch").read_text()
    configs = set(re.findall(r"configs/[\w.\-]+\.yaml", text))
    assert configs, "the example should show a config"
    for c in configs:
        assert (ROOT / c).is_file(), f"tools/slurm_example.sbatch names {c}, which does not exist"
    assert "LAUNCH" in text and "tools/launch.sh" in text and "srun --kill-on-bad-exit=1 meshtron-train" in text
