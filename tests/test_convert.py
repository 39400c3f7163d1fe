"""meshtron-convert end to end: HF → Megatron → HF is bit-exact for every family, both formats,
tp ∈ {1, 2, 4} and pp ∈ {1, 2, 3 (uneven)}; resharding; the logits check; bad input fails with
one message and leaves nothing half-written; training loads either format at any mesh and
exports HF."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from convert.cli import main as convert
from convert.hf_map import hf_to_canonical, model_config_from_hf

ROOT = Path(__file__).resolve().parents[1]
# the architecture of configs/tiny.yaml, so training can load these checkpoints as they are
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
FAMILIES = {
    "llama": lambda dtype: transformers.LlamaConfig(**TINY, dtype=dtype),
    "qwen2": lambda dtype: transformers.Qwen2Config(**TINY, tie_word_embeddings=True, dtype=dtype),
    "mistral": lambda dtype: transformers.MistralConfig(**TINY, sliding_window=None, dtype=dtype),
}


def make_hf(path: Path, family: str, dtype=torch.float32, max_shard_size="100KB") -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](dtype)).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)  # several shards + index
    return path


def hf_state(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    models = {f: make_hf(base / f, f) for f in FAMILIES}
    models["llama-bf16"] = make_hf(base / "llama-bf16", "llama", torch.bfloat16)
    return models


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "llama-bf16"])
@pytest.mark.parametrize("fmt,tp,pp", [("torch_dist", 1, 1), ("torch", 1, 1), ("torch", 2, 1), ("torch", 4, 1),
                                       ("torch", 1, 2), ("torch", 2, 3), ("torch", 4, 3)])
def test_hf_megatron_hf_is_bit_exact(hf_models, tmp_path, family, fmt, tp, pp):
    src = hf_models[family]
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(mg), "--format", fmt,
                    "--tp", str(tp), "--pp", str(pp)]) == 0
    if fmt == "torch" and pp == 3:  # 4 layers over 3 stages: [1, 2, 1]
        assert sorted(os.listdir(mg / "iter_0000000"))[-1] == f"mp_rank_{tp - 1:02d}_002"
    assert convert(["megatron-to-hf", "--megatron", str(mg), "--out", str(back)]) == 0
    assert_same_state(hf_state(back), hf_state(src))
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "temporary directories left behind"


def test_reshard_and_dtype(hf_models, tmp_path):
    src = hf_models["llama"]
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "a"), "--format", "torch",
                    "--tp", "2", "--pp", "2", "--dtype", "bf16"]) == 0
    assert convert(["reshard", "--in", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--tp", "4",
                    "--pp", "1"]) == 0
    assert convert(["megatron-to-hf", "--megatron", str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    want = {k: v.to(torch.bfloat16) for k, v in hf_state(src).items()}
    assert_same_state(hf_state(tmp_path / "c"), want)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fmt,tp,pp,cp", [("torch", 2, 1, 1), ("torch_dist", 1, 2, 1), ("torch_dist", 1, 1, 2)],
                         ids=["tp2", "pp2", "cp2"])
def test_verify_logits(hf_models, tmp_path, family, fmt, tp, pp, cp, capsys):
    """verify: meshtron at tp=2, pp=2 or cp=2 gives transformers' logits (fp32, max |Δ| ≤ 1e-4)."""
    src = hf_models[family]
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "mg"), "--format", fmt,
                    "--tp", str(tp)]) == 0
    logits = tmp_path / "logits.pt"
    with pytest.raises(SystemExit) as done:
        convert(["verify", "--hf", str(src), "--megatron", str(tmp_path / "mg"), "--tp", str(tp), "--pp", str(pp),
                 "--cp", str(cp), "--seq", "48", "--tolerance", "1e-4", "--save-logits", str(logits)])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "max |logits(meshtron" in out
    assert float(out.split("= ")[1].split()[0]) < 1e-4
    assert torch.load(logits).shape == (2, 48, 512)


def test_bad_input_is_one_clear_error(hf_models, tmp_path, capsys):
    src = hf_models["llama"]
    # output directory not empty
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    # tp not dividing the KV heads
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "o"), "--format", "torch",
                    "--tp", "8"]) == 2
    assert "--tp 8 does not divide num_query_groups=4" in capsys.readouterr().err
    # unknown architecture
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    assert convert(["hf-to-megatron", "--hf", str(gpt2), "--out", str(tmp_path / "o2")]) == 2
    assert "gpt2" in capsys.readouterr().err
    # a shard named by the index is missing
    broken = tmp_path / "broken"
    make_hf(broken, "llama")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert convert(["hf-to-megatron", "--hf", str(broken), "--out", str(tmp_path / "o3")]) == 2
    assert shard.name in capsys.readouterr().err
    # not a checkpoint at all
    assert convert(["megatron-to-hf", "--megatron", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o4")]) == 2
    assert "not a Megatron checkpoint" in capsys.readouterr().err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("o")]
    assert leftovers == [], leftovers


def run_train(*args, nproc=1):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC_PER_NODE=str(nproc))
    cmd = (["bash", "tools/launch.sh"] if nproc > 1 else [sys.executable, "-m", "engine.cli"])
    r = subprocess.run(cmd + [str(ROOT / "configs" / "tiny.yaml"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def first_loss(out_dir: Path) -> float:
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def loaded_canonical(path: Path) -> dict:
    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.model.gpt import canonical_tensors
    from engine.train import build_model

    cfg = validate(load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.num_layers=4", f"model.load={path}"]), 1)
    model = build_model(cfg, ParallelMesh.single())
    return {k: v[:512] if "word_embeddings" in k or "output_layer" in k else v
            for k, v in canonical_tensors(model, {n: p.detach() for n, p in model.named_parameters()}).items()}


def test_training_loads_either_format_at_any_mesh_and_exports_hf(hf_models, tmp_path):
    src = hf_models["llama"]
    convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "dist")])
    convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "legacy"), "--format", "torch",
             "--tp", "2", "--pp", "2"])
    run_train(f"model.load={tmp_path / 'dist'}", "train.steps=2", f"train.output_dir={tmp_path / 'r1'}",
              f"checkpoint.export_hf={tmp_path / 'exported'}")
    run_train(f"model.load={tmp_path / 'legacy'}", "train.steps=1", f"train.output_dir={tmp_path / 'r2'}",
              "parallel.tp=2", "parallel.dp=2", nproc=4)
    run_train("train.steps=1", f"train.output_dir={tmp_path / 'r3'}")
    assert first_loss(tmp_path / "r1") == pytest.approx(first_loss(tmp_path / "r2"), rel=1e-5)
    assert abs(first_loss(tmp_path / "r1") - first_loss(tmp_path / "r3")) > 1e-6 * first_loss(tmp_path / "r3")
    # the weights training starts from are the HF model's, whichever format they came through
    for ckpt in ("dist", "legacy"):
        loaded = loaded_canonical(tmp_path / ckpt)
        want = hf_to_canonical(hf_state(src), model_config_from_hf(FAMILIES["llama"](torch.float32)), 512)
        assert_same_state(loaded, want)
    # the final torch_dist checkpoint and the HF export hold the same trained weights
    final = tmp_path / "r1" / "checkpoints"
    assert (final / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    convert(["megatron-to-hf", "--megatron", str(final), "--out", str(tmp_path / "from_ckpt")])
    assert_same_state(hf_state(tmp_path / "exported"), hf_state(tmp_path / "from_ckpt"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", local_files_only=True)
    trained = hf_state(tmp_path / "exported")["model.norm.weight"]
    assert torch.equal(model.model.norm.weight.detach(), trained)
    assert not torch.equal(trained, hf_state(src)["model.norm.weight"]), "two steps must change the weights"


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2_with_the_same_next_step_loss(tmp_path):
    run_train("train.steps=2", "parallel.tp=2", f"train.output_dir={tmp_path / 'tp2'}", nproc=2)
    ckpt = tmp_path / "tp2" / "checkpoints"
    losses = {}
    for name, mesh, nproc in (("tp2", ["parallel.tp=2"], 2), ("tp1", [], 1), ("pp2", ["parallel.pp=2"], 2),
                              ("pp2-seq1f1b", ["parallel.pp=2", "parallel.pp_schedule=seq1f1b",
                                               "parallel.seq_chunks=2"], 2)):
        out = tmp_path / f"next-{name}"
        run_train(f"model.load={ckpt}", "train.steps=1", f"train.output_dir={out}", "checkpoint.save_final=false",
                  *mesh, nproc=nproc)
        losses[name] = first_loss(out)
    for name, loss in losses.items():
        assert loss == pytest.approx(losses["tp1"], rel=1e-5), losses
    assert abs(losses["tp1"] - first_loss(tmp_path / "tp2")) > 1e-4, "the loaded weights are the trained ones"


def test_rerun_into_the_same_output_dir_replaces_the_final_checkpoint(tmp_path):
    for steps in (1, 1):
        run_train(f"train.steps={steps}", f"train.output_dir={tmp_path}")
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
