"""``model.load`` of a Hugging Face directory (config.json + safetensors), with no conversion step.

Tiny random models are built with transformers from a config and saved with ``save_pretrained``:
a Llama with untied embeddings, sharded into many files with an index, and a Qwen2 with q/k/v
biases and tied embeddings in one file. Checked:

* the model section comes from config.json; a field the config gives that disagrees is one
  ConfigError naming it with both values; a .bin-only directory is refused; the tokenizer
  defaults to the directory;
* one process: the step-0 loss of the loaded model equals transformers' on the same tokens
  (fp32, relative 1e-5);
* one gloo world of 4 ranks, tp2×pp2 and tp2×cp2 for both models: the loss equals the
  single-process one (relative 1e-5), and every rank read exactly its own slices — counted by
  wrapping ``safe_open``: 1/tp of each tp-split tensor (embedding and output layer included), the
  whole of each norm, only its pipeline stage's layers, and nothing twice;
* ``meshtron-train`` (engine.cli in this process) trains 2 steps from the directory with its
  tokenizer and exports the result with it.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers

from tests.harness import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {  # name -> (config, max_shard_size of save_pretrained)
    "llama-untied-sharded": (lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0), "40KB"),
    "qwen2-bias-tied": (lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True), None),
}
# every vocabulary row is real (no padding rows), so a tp rank's share of the embedding is exactly 1/tp
BASE = ["model.make_vocab_size_divisible_by=1", "data.seq_len=64", "data.min_doc_len=5", "data.max_doc_len=40",
        "train.global_batch_size=2"]
MESHES = [["parallel.tp=2", "parallel.pp=2"], ["parallel.tp=2", "parallel.cp=2"]]
TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (directory, the transformers model saved there); the Llama directory also holds a
    tokenizer (tools/make_tiny_data.py's)."""
    from tools.make_tiny_data import build_tokenizer

    out = {}
    for name, (make, shard) in FAMILIES.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        where = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(where, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
        out[name] = (where, hf)
    llama = out["llama-untied-sharded"][0]
    assert os.path.isfile(os.path.join(llama, "model.safetensors.index.json"))
    assert "lm_head.weight" in json.load(open(os.path.join(llama, "model.safetensors.index.json")))["weight_map"]
    build_tokenizer(llama)
    return out


def load(overrides):
    from engine.config import load_config

    return load_config(None, overrides)


# --- config ----------------------------------------------------------------------------------

def test_model_section_comes_from_config_json(hf_dirs, tmp_path):
    from convert.hf_map import model_config_from_hf
    from engine.config import dump_yaml, load_config

    for name, (where, hf) in hf_dirs.items():
        cfg = load([f"model.load={where}", "model.make_vocab_size_divisible_by=1", "model.init_method_std=0.5"])
        expected = {"sliding_window": None, **model_config_from_hf(hf.config)}
        assert {k: getattr(cfg.model, k) for k in expected} == expected, name
        # fields that are not architecture stay the config's
        assert cfg.model.make_vocab_size_divisible_by == 1 and cfg.model.init_method_std == 0.5
        assert cfg.model.load == where
        # agreeing fields are fine (head size 16 = the implied hidden_size // heads)
        same = load([f"model.load={where}", "model.hidden_size=64", "model.kv_channels=16", "model.norm_epsilon=1e-6",
                     "model.make_vocab_size_divisible_by=1", "model.init_method_std=0.5"])
        assert same == cfg
        path = str(tmp_path / f"{name}.yaml")  # the resolved config round-trips
        dump_yaml(cfg, path)
        assert load_config(path) == cfg


def test_disagreeing_model_field_is_one_error_naming_it(hf_dirs):
    from engine.config import ConfigError

    where = hf_dirs["llama-untied-sharded"][0]
    with pytest.raises(ConfigError) as info:
        load([f"model.load={where}", "model.hidden_size=128"])
    msg = str(info.value)
    assert "model.hidden_size=128 but config.json has hidden_size=64" in msg, msg
    with pytest.raises(ConfigError) as info:
        load([f"model.load={where}", "model.num_layers=2", "model.tie_word_embeddings=true", "model.hidden_size=64"])
    msg = str(info.value)
    assert "model.num_layers=2 but config.json has num_hidden_layers=4" in msg, msg
    assert "model.tie_word_embeddings=True but config.json has tie_word_embeddings=False" in msg, msg
    assert "hidden_size" not in msg.split("remove")[1], msg  # the agreeing field is not named


def test_bin_weights_and_missing_weights_are_refused(tmp_path, hf_dirs):
    import shutil

    from engine.config import ConfigError

    where = tmp_path / "bin"
    where.mkdir()
    shutil.copy(os.path.join(hf_dirs["qwen2-bias-tied"][0], "config.json"), where)
    with pytest.raises(ConfigError, match="neither model.safetensors"):
        load([f"model.load={where}"])
    (where / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="safetensors only"):
        load([f"model.load={where}"])


def test_tokenizer_defaults_to_the_hf_directory(hf_dirs):
    from engine.config import ConfigError, validate
    from engine.config.hf_model import tokenizer_dir

    data = ["data.source=files", f"data.path={ROOT}/configs/data/tiny/sft.jsonl", "data.format=messages"]
    llama, qwen = hf_dirs["llama-untied-sharded"][0], hf_dirs["qwen2-bias-tied"][0]
    cfg = validate(load([f"model.load={llama}", *data]), 1)
    assert tokenizer_dir(cfg) == llama
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        validate(load([f"model.load={qwen}", *data]), 1)
    given = validate(load([f"model.load={qwen}", f"data.tokenizer={llama}", *data]), 1)
    assert tokenizer_dir(given) == llama


# --- one process: transformers' loss ---------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step0_loss_equals_transformers(hf_dirs, family):
    from engine.config import validate
    from engine.data.packing import document_arrays, pack
    from engine.loss import token_loss_sum
    from engine.mesh import ParallelMesh
    from engine.train import build_model

    where, hf = hf_dirs[family]
    cfg = validate(load([f"model.load={where}"]), 1)
    model = build_model(cfg, ParallelMesh.single())[0]
    torch.manual_seed(1)
    docs = [torch.randint(0, 256, (n,)) for n in (37, 90)]
    batch = pack([document_arrays(d.tolist())[:2] for d in docs])
    with torch.no_grad():
        loss = token_loss_sum(model, batch) / batch.num_valid
        ref = sum(hf(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs) / batch.num_valid
    assert abs(float(loss) - float(ref)) / float(ref) <= TOL, (float(loss), float(ref))


def test_source_serves_any_rectangle_and_casts(hf_dirs, tmp_path):
    """Every rectangle of every torch_dist global key (partial rows included: what a ZeRO/FSDP2
    flat range asks for) equals the same rectangle of the converted canonical tensors; bf16 HF
    weights load into fp32 and bf16 runs as the cast of the file's values."""
    import copy

    from convert.hf_map import hf_to_canonical, model_config_from_hf
    from convert.hf_source import HFSource
    from convert.layout import STACKED, Request, canonical_name
    from engine.config import validate
    from engine.mesh import ParallelMesh
    from engine.train import build_model

    gen = torch.Generator().manual_seed(0)
    for family, (where, hf) in hf_dirs.items():
        md = model_config_from_hf(hf.config)
        canon = hf_to_canonical(hf.state_dict(), md, md["vocab_size"])
        source = HFSource(where)
        assert sorted(source.names()) == sorted(canon), family
        for key, shape in source.shapes.items():
            whole = (torch.stack([canon[canonical_name(key, i)] for i in range(shape[0])])
                     if key.startswith(STACKED) else canon[key])
            assert tuple(whole.shape) == shape, (key, whole.shape, shape)
            for _ in range(6):
                lo = [int(torch.randint(0, n, (), generator=gen)) for n in shape]
                hi = [int(torch.randint(a + 1, n + 1, (), generator=gen)) for a, n in zip(lo, shape)]
                sizes = tuple(b - a for a, b in zip(lo, hi))
                dest = torch.full(sizes, float("nan"))
                source.read([Request(key, tuple(lo), sizes, dest)])
                assert torch.equal(dest, whole[tuple(slice(a, b) for a, b in zip(lo, hi))]), (family, key, lo, hi)
    where, hf = hf_dirs["qwen2-bias-tied"]
    bf16_dir = str(tmp_path / "bf16")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True)
    md = model_config_from_hf(hf.config)
    canon = hf_to_canonical({k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}, md, md["vocab_size"])
    for bf16 in (False, True):
        cfg = validate(load([f"model.load={bf16_dir}", "model.make_vocab_size_divisible_by=1",
                             f"train.bf16={bf16}"]), 1)
        chunk = build_model(cfg, ParallelMesh.single())[0]
        for name, p in chunk.named_parameters():
            want = canon[chunk.canonical_name(name)].to(torch.bfloat16 if bf16 else torch.float32)
            assert p.dtype == want.dtype and torch.equal(p.detach(), want), (bf16, name)


# --- a world of 4: the loss, and what each rank read -----------------------------------------

def counting_safe_open(reads: dict):
    """A ``safe_open`` that adds the elements each tensor read returns to ``reads[name]``."""
    from safetensors import safe_open

    class Slice:
        def __init__(self, sl, name):
            self.sl, self.name = sl, name

        def get_shape(self):
            return self.sl.get_shape()

        def get_dtype(self):
            return self.sl.get_dtype()

        def __getitem__(self, index):
            t = self.sl[index]
            reads[self.name] = reads.get(self.name, 0) + t.numel()
            return t

    class File:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return Slice(self.f.get_slice(name), name)

        def get_tensor(self, name):
            t = self.f.get_tensor(name)
            reads[name] = reads.get(name, 0) + t.numel()
            return t

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    return File


def step0_loss(cfg, mesh, reads=None):
    import convert.hf_source as hf_source
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    real = hf_source.safe_open
    if reads is not None:
        hf_source.safe_open = counting_safe_open(reads)
    try:
        model = build_model(cfg, mesh)
    finally:
        hf_source.safe_open = real
    loss, _ = forward_backward(model, rank_micro_batches(build_dataset(cfg), 0, cfg, mesh), mesh, cfg.parallel)
    return float(loss), model


def world_checks(rank, world, dirs):
    from engine.config import validate
    from engine.mesh import ParallelMesh

    out = {}
    for family, where in dirs.items():
        over = BASE + [f"model.load={where}"]
        ref, _ = step0_loss(validate(load(over + ["parallel.dp=1"]), 1), ParallelMesh.single())
        for mesh_over in MESHES:
            cfg = validate(load(over + mesh_over), world)
            p = cfg.parallel
            mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp)
            reads: dict = {}
            loss, model = step0_loss(cfg, mesh, reads)
            layers = [i for chunk in model for i in range(chunk.layer_offset,
                                                         chunk.layer_offset + len(chunk.decoder.layers))]
            out[family, " ".join(mesh_over)] = dict(
                loss=loss, ref=ref, reads=reads, tp=mesh.tp, layers=layers,
                first=any(c.pre_process for c in model), last=any(c.post_process for c in model))
    return out


def expected_fraction(name: str, r: dict, tied: bool) -> float:
    """The share of HF tensor ``name`` a rank must read: 1/tp of a tp-split tensor, all of a norm,
    nothing of another stage's."""
    if name.startswith("model.layers."):
        if int(name.split(".")[2]) not in r["layers"]:
            return 0.0
        return 1.0 if name.endswith("layernorm.weight") else 1 / r["tp"]
    if name == "model.embed_tokens.weight":
        return 1 / r["tp"] if r["first"] or (tied and r["last"]) else 0.0
    if name == "lm_head.weight":
        return 1 / r["tp"] if r["last"] else 0.0
    assert name == "model.norm.weight", name
    return 1.0 if r["last"] else 0.0


def test_world_loads_own_slices_and_matches_one_process(hf_dirs):
    from safetensors import safe_open

    from convert.hf_source import _weight_map

    dirs = {name: where for name, (where, _) in hf_dirs.items()}
    reports = run_world(4, world_checks, dirs, timeout=900)
    numel = {}
    for family, where in dirs.items():
        for name, shard in _weight_map(where).items():
            with safe_open(os.path.join(where, shard), framework="pt") as f:
                numel[family, name] = math.prod(f.get_slice(name).get_shape())
    for rank, report in enumerate(reports):
        for (family, mesh), r in report.items():
            print(rank, family, mesh, f"loss {r['loss']:.7f} ref {r['ref']:.7f}", "layers", r["layers"])
            assert abs(r["loss"] - r["ref"]) / r["ref"] <= TOL, (rank, family, mesh, r["loss"], r["ref"])
            tied = family.startswith("qwen2")
            for (fam, name), n in numel.items():
                if fam == family:
                    assert r["reads"].get(name, 0) == n * expected_fraction(name, r, tied), \
                        (rank, family, mesh, name, r["reads"].get(name, 0), n)
            assert set(r["reads"]) <= {name for fam, name in numel if fam == family}


# --- meshtron-train ----------------------------------------------------------------------------

def test_cli_trains_from_the_hf_directory_with_its_tokenizer(hf_dirs, tmp_path):
    from engine.cli import main

    where = hf_dirs["llama-untied-sharded"][0]
    export = tmp_path / "export"
    rc = main([f"model.load={where}", "data.source=files", f"data.path={ROOT}/configs/data/tiny/sft.jsonl",
               "data.format=messages", "data.seq_len=256", "train.steps=2", "train.global_batch_size=2",
               f"train.output_dir={tmp_path / 'run'}", "checkpoint.save_final=false", f"checkpoint.export_hf={export}"])
    assert rc == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows), rows
    tok = transformers.AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    assert len(tok) == len(transformers.AutoTokenizer.from_pretrained(where, local_files_only=True))
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert trained.config.num_hidden_layers == 4 and trained.config.vocab_size == 256
