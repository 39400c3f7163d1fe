"""Megatron ``torch_dist`` checkpoints (convert/megatron_dist.py).

Round trips are bit-exact (torch.equal, same dtype). The reference reader is megatron-core's own
``dist_checkpointing.load`` into a local-spec GPTModel, at tp=1 and tp=2 in a 2-process gloo
world: every tensor of each rank must equal our canonical tensor split as meshtron splits it. The
reverse holds too: what megatron-core itself saves at tp=2 loads back through ``load_dist``.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from convert.megatron_dist import (
    MEGATRON_CONFIG,
    canonical_name,
    dist_key,
    extra_state_keys,
    load_dist,
    save_dist,
)
from engine.config.schema import ModelConfig
from engine.model.sharding import canonical_names, tp_split
from engine.parallel.tensor import shard_tensor
from tests.harness import run_world

PADDED = 384  # vocab_size 300 padded to a multiple of 128 (tp=1); 384 also splits over tp=2
LAYER_SHAPES = {  # hidden 64, 8 heads of 8, 2 KV groups, ffn 96
    "input_layernorm.weight": (64,), "self_attention.linear_qkv.weight": (96, 64),
    "self_attention.linear_qkv.bias": (96,), "self_attention.linear_proj.weight": (64, 64),
    "pre_mlp_layernorm.weight": (64,), "mlp.linear_fc1.weight": (192, 64), "mlp.linear_fc2.weight": (64, 96),
}
VARIANTS = {  # (dtype, add_qkv_bias, tie_word_embeddings)
    "fp32-bias-untied": (torch.float32, True, False),
    "bf16-tied": (torch.bfloat16, False, True),
    "fp32-tied": (torch.float32, False, True),
    "bf16-bias-untied": (torch.bfloat16, True, False),
}


def make_model(bias: bool, tied: bool) -> dict:
    cfg = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=2,
                      vocab_size=300, make_vocab_size_divisible_by=128, add_qkv_bias=bias,
                      tie_word_embeddings=tied, rotary_base=500000.0, norm_epsilon=1e-6)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "load"}


def random_canonical(model: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    canon = {}
    for name in canonical_names(model):
        shape = (PADDED, 64) if name in ("embedding.word_embeddings.weight", "output_layer.weight") else \
            (64,) if name == "decoder.final_layernorm.weight" else LAYER_SHAPES[name.split(".", 3)[3]]
        t = torch.randn(shape, generator=g).to(dtype)
        if shape[0] == PADDED:
            t[model["vocab_size"]:] = 0  # Megatron's vocab padding rows
        canon[name] = t
    return canon


def write(tmp_path, variant: str, **kw) -> tuple[str, dict, dict]:
    dtype, bias, tied = VARIANTS[variant]
    model = make_model(bias, tied)
    canon = random_canonical(model, dtype)
    out = str(tmp_path / variant)
    save_dist(canon.__getitem__, list(canon), model, out, **kw)
    return out, model, canon


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_bit_exact(tmp_path, variant):
    out, model, canon = write(tmp_path, variant, iteration=7, common={"num_floating_point_operations_so_far": 3})
    back, model_back, meta = load_dist(out)
    assert back.keys() == canon.keys()
    for name, t in canon.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert model_back == model
    assert meta == {"iteration": 7, "common": {"num_floating_point_operations_so_far": 3}}


def test_on_disk_layout(tmp_path):
    out, _, _ = write(tmp_path, "fp32-bias-untied", iteration=3)
    with open(os.path.join(out, "metadata.json")) as f:
        assert json.load(f) == MEGATRON_CONFIG
    common = torch.load(os.path.join(out, "common.pt"), weights_only=False)
    assert (common["checkpoint_version"], common["iteration"]) == (3.0, 3)
    assert common["args"].ckpt_format == "torch_dist" and common["args"].no_save_optim
    md = FileSystemReader(out).read_metadata().state_dict_metadata
    sizes = {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size")}
    assert sizes == {
        "embedding.word_embeddings.weight": (PADDED, 64),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (4, 64),
        "decoder.layers.self_attention.linear_qkv.weight": (4, 96, 64),
        "decoder.layers.self_attention.linear_qkv.bias": (4, 96),
        "decoder.layers.self_attention.linear_proj.weight": (4, 64, 64),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (4, 64),
        "decoder.layers.mlp.linear_fc1.weight": (4, 192, 64),
        "decoder.layers.mlp.linear_fc2.weight": (4, 64, 96),
        "decoder.final_layernorm.weight": (64,),
        "output_layer.weight": (PADDED, 64),
    }
    assert set(md) - set(sizes) == set(extra_state_keys(4))
    assert len(md["decoder.layers.mlp.linear_fc1.weight"].chunks) == 4  # one chunk per layer


def test_key_mapping():
    assert dist_key("decoder.layers.3.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert dist_key("decoder.layers.0.pre_mlp_layernorm.weight") == (
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", 0)
    assert dist_key("decoder.layers.12.mlp.linear_fc1.weight") == ("decoder.layers.mlp.linear_fc1.weight", 12)
    assert dist_key("output_layer.weight") == ("output_layer.weight", None)
    for name in canonical_names(make_model(True, False)):
        assert canonical_name(*dist_key(name)) == name
    with pytest.raises(ValueError, match="not a canonical"):
        dist_key("decoder.rotary_pos_emb.inv_freq")


def test_fetches_each_tensor_once_in_order(tmp_path):
    model = make_model(False, True)
    canon = random_canonical(model, torch.float32)
    asked, ticks = [], []
    get = lambda n: asked.append(n) or canon[n]
    save_dist(get, list(canon), model, str(tmp_path / "ck"), progress=ticks.append)
    assert asked == list(canon) and sum(ticks) == len(canon)


def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    model = make_model(False, True)
    canon = random_canonical(model, torch.float32)
    with pytest.raises(ValueError, match=re.escape(str(out))):
        save_dist(canon.__getitem__, list(canon), model, str(out))
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["taken"]  # no temp dir left


def test_missing_layer_leaves_nothing(tmp_path):
    model = make_model(False, True)
    canon = random_canonical(model, torch.float32)
    del canon["decoder.layers.2.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match=r"decoder\.layers\.2\.mlp\.linear_fc2\.weight"):
        save_dist(canon.__getitem__, list(canon), model, str(tmp_path / "ck"))
    assert os.listdir(tmp_path) == []


def test_missing_meshtron_json(tmp_path):
    out, _, _ = write(tmp_path, "fp32-tied")
    os.remove(os.path.join(out, "meshtron.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(out, "meshtron.json"))):
        load_dist(out)


# ---------------------------------------------------------------------------------------------
# megatron-core reads it


def _megatron_gpt(model: dict, dtype: torch.dtype, tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=model["num_layers"], hidden_size=model["hidden_size"], ffn_hidden_size=model["ffn_hidden_size"],
        num_attention_heads=model["num_attention_heads"], num_query_groups=model["num_query_groups"],
        kv_channels=model["kv_channels"], add_qkv_bias=model["add_qkv_bias"], add_bias_linear=False,
        normalization="RMSNorm", layernorm_epsilon=model["norm_epsilon"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, tensor_model_parallel_size=tp, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16)
    gpt = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=PADDED,
                   max_sequence_length=128, position_embedding_type="rope", rotary_base=model["rotary_base"],
                   share_embeddings_and_output_weights=model["tie_word_embeddings"])
    # The local spec's torch RMSNorm ignores params_dtype; Megatron-LM's Float16Module casts the
    # whole model to bf16 the same way.
    return gpt.to(dtype)


def _megatron_loads(rank, world, cases):
    """On every rank, at tp=1 then tp=2: megatron-core loads each checkpoint strictly and each of
    its tensors equals our canonical tensor split for this tp rank."""
    from megatron.core import dist_checkpointing, parallel_state

    done = []
    try:
        for tp in (1, 2):
            parallel_state.initialize_model_parallel(tp, 1)
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            for path, canon_path in cases:
                canon = torch.load(canon_path)
                with open(os.path.join(path, "meshtron.json")) as f:
                    model = json.load(f)["model"]
                gpt = _megatron_gpt(model, canon["embedding.word_embeddings.weight"].dtype, tp)
                # Megatron-LM's layout: model weights under "model", common.pt's entries beside them.
                loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, path)
                assert loaded["iteration"] == 5 and loaded["checkpoint_version"] == 3.0
                gpt.load_state_dict(loaded["model"], strict=True)
                mine = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
                assert mine.keys() == canon.keys(), sorted(mine.keys() ^ canon.keys())
                for name, t in mine.items():
                    dim, parts = tp_split(name) or (None, 1)
                    want = shard_tensor(canon[name], dim, parts, tp, tp_rank)
                    assert t.dtype == want.dtype and torch.equal(t, want), (tp, tp_rank, name)
                done.append((tp, os.path.basename(path), len(mine)))
                if tp == 2:  # and megatron's own tp=2 save, for load_dist to read back
                    _cpu_megatron_save()
                    dist_checkpointing.save({"model": gpt.sharded_state_dict()}, path + "-by-megatron")
            parallel_state.destroy_model_parallel()
    finally:  # megatron's writer leaves the queue manager process it spawned running
        for child in multiprocessing.active_children():
            child.terminate()
            child.join()
    return done


def _cpu_megatron_save() -> None:
    """megatron-core's torch_dist writer on CPU: it calls torch.cuda.synchronize(), puts a flag on
    torch.cuda.current_device() and logs its memory use through psutil, which this venv lacks."""
    import importlib.util

    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa

    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    if importlib.util.find_spec("psutil") is None:
        fa._process_memory = lambda: 0


def test_megatron_core_loads_at_tp1_and_tp2(tmp_path):
    pytest.importorskip("megatron.core")
    cases = []
    for variant in ("fp32-bias-untied", "bf16-tied"):
        out, _, canon = write(tmp_path, variant, iteration=5)
        torch.save(canon, str(tmp_path / f"{variant}.pt"))
        cases.append((out, str(tmp_path / f"{variant}.pt")))
        os.makedirs(out + "-by-megatron")
    results = run_world(2, _megatron_loads, cases, timeout=300)
    want = [(tp, v, n) for tp in (1, 2) for v, n in (("fp32-bias-untied", 31), ("bf16-tied", 26))]
    assert results == [want, want]
    for out, canon_path in cases:  # what megatron wrote at tp=2 reads back bit-exact
        shutil.copy(os.path.join(out, "meshtron.json"), out + "-by-megatron")
        back, _, _ = load_dist(out + "-by-megatron")
        canon = torch.load(canon_path)
        assert back.keys() == canon.keys()
        for name, t in canon.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
