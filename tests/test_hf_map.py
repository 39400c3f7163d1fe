"""convert/hf_map.py against tiny random HF Llama / Qwen2 / Mistral models built locally."""

import types

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config)

from convert.hf_map import (canonical_to_hf, hf_config_from_model_config, hf_to_canonical, interleave_qkv,
                            iter_hf_to_canonical, model_config_from_hf, pad_vocab, padded_vocab_size,
                            split_qkv, unpad_vocab)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, vocab_size=300)


def llama_config():  # GQA 8:2, llama3 rope scaling
    return LlamaConfig(**TINY, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                       rms_norm_eps=1e-5, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})


def qwen2_config():  # q/k/v biases, tied embeddings
    return Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def mistral_config():  # head_dim != hidden / heads
    return MistralConfig(**TINY, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                         max_position_embeddings=1024, sliding_window=None)


CONFIGS = {"llama": llama_config, "qwen2": qwen2_config, "mistral": mistral_config}
PADDED = padded_vocab_size(300, 128, 2)


def tiny_model(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).to(dtype)
    with torch.no_grad():  # HF inits norms to ones and biases to zeros; make them distinguishable
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_()
    return model


def expected_hf_keys(model):
    keys = list(model.state_dict())
    return [k for k in keys if k != "lm_head.weight"] if model.config.tie_word_embeddings else keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_canonical_round_trip(name, dtype):
    hf_model = tiny_model(name, dtype)
    hf = hf_model.state_dict()
    mc = model_config_from_hf(hf_model.config)
    canon = hf_to_canonical(hf, mc, PADDED)

    h, L, nq, ng = 64, 2, mc["num_attention_heads"], mc["num_query_groups"]
    d = mc["kv_channels"] or h // nq
    assert PADDED == 512
    expect_shapes = {"embedding.word_embeddings.weight": (PADDED, h), "decoder.final_layernorm.weight": (h,)}
    if not mc["tie_word_embeddings"]:
        expect_shapes["output_layer.weight"] = (PADDED, h)
    for i in range(L):
        p = f"decoder.layers.{i}."
        expect_shapes |= {p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,),
                          p + "self_attention.linear_qkv.weight": ((nq + 2 * ng) * d, h),
                          p + "self_attention.linear_proj.weight": (h, nq * d),
                          p + "mlp.linear_fc1.weight": (2 * 96, h), p + "mlp.linear_fc2.weight": (h, 96)}
        if mc["add_qkv_bias"]:
            expect_shapes[p + "self_attention.linear_qkv.bias"] = ((nq + 2 * ng) * d,)
    assert {k: tuple(v.shape) for k, v in canon.items()} == expect_shapes
    assert all(v.dtype == dtype for v in canon.values())

    # Hand-built layout: per group g, [q heads of g, k_g, v_g].
    qpg = nq // ng
    for s in ("weight", "bias") if mc["add_qkv_bias"] else ("weight",):
        qkv = canon[f"decoder.layers.1.self_attention.linear_qkv.{s}"]
        q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.{s}"] for p in "qkv")
        block = (qpg + 2) * d
        for g in range(ng):
            rows = qkv[g * block:(g + 1) * block]
            assert torch.equal(rows[:qpg * d], q[g * qpg * d:(g + 1) * qpg * d])
            assert torch.equal(rows[qpg * d:(qpg + 1) * d], k[g * d:(g + 1) * d])
            assert torch.equal(rows[(qpg + 1) * d:], v[g * d:(g + 1) * d])
    fc1 = canon["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:96], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[96:], hf["model.layers.0.mlp.up_proj.weight"])
    emb = canon["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:300], hf["model.embed_tokens.weight"]) and not emb[300:].any()

    back = canonical_to_hf(canon, mc)
    assert list(back) == expected_hf_keys(hf_model)
    for k, t in back.items():
        assert t.dtype == hf[k].dtype and torch.equal(t, hf[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_model_matches_logits(name):
    hf_model = tiny_model(name).eval()
    mc = model_config_from_hf(hf_model.config)
    back = canonical_to_hf(hf_to_canonical(hf_model.state_dict(), mc, PADDED), mc)
    fresh = AutoModelForCausalLM.from_config(hf_config_from_model_config(mc)).eval()
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if mc["tie_word_embeddings"] else [])
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, hf_model(tokens).logits)


def test_tied_export_matches_save_pretrained(tmp_path):
    from safetensors.torch import load_file
    hf_model = tiny_model("qwen2")
    hf_model.save_pretrained(tmp_path)
    mc = model_config_from_hf(hf_model.config)
    back = canonical_to_hf(hf_to_canonical(hf_model.state_dict(), mc, PADDED), mc)
    assert sorted(back) == sorted(load_file(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name):
    cfg = CONFIGS[name]()
    mc = model_config_from_hf(cfg)
    cfg2 = hf_config_from_model_config(mc, torch_dtype="bfloat16")
    assert type(cfg2) is type(cfg) and cfg2.dtype == torch.bfloat16
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                  "max_position_embeddings", "rope_parameters", "hidden_act"):
        assert getattr(cfg2, field) == getattr(cfg, field), field
    assert getattr(cfg2, "head_dim", 64 // cfg.num_attention_heads) == getattr(cfg, "head_dim", 64 // cfg.num_attention_heads)
    assert model_config_from_hf(cfg2) == mc


def test_model_config_values():
    mc = model_config_from_hf(llama_config())
    assert mc == {"arch": "llama", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96,
                  "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": None, "vocab_size": 300,
                  "norm_epsilon": 1e-5, "rotary_base": 500000.0, "rope_scaling": LLAMA3_ROPE,
                  "add_qkv_bias": False, "tie_word_embeddings": False, "max_position_embeddings": 16384}
    assert model_config_from_hf(mistral_config())["kv_channels"] == 16
    q = model_config_from_hf(qwen2_config())
    assert (q["add_qkv_bias"], q["tie_word_embeddings"], q["rotary_base"], q["rope_scaling"]) == (True, True, 1e6, None)


def test_transformers4_style_config():
    # transformers 4.x kept rope_theta as an attribute and rope_scaling with a "type" key.
    old = types.SimpleNamespace(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                num_attention_heads=8, num_key_value_heads=None, vocab_size=300,
                                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                                rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                                   if k != "rope_type"}},
                                max_position_embeddings=16384, attention_bias=False, hidden_act="silu")
    mc = model_config_from_hf(old)
    assert mc["rotary_base"] == 500000.0 and mc["rope_scaling"] == LLAMA3_ROPE and mc["num_query_groups"] == 8


def test_streaming_reads_lazily():
    hf_model = tiny_model("llama")
    hf, mc, seen = hf_model.state_dict(), model_config_from_hf(hf_model.config), []

    def get(name):
        seen.append(name)
        return hf[name]
    it = iter_hf_to_canonical(get, mc, PADDED)
    assert seen == []
    assert next(it)[0] == "embedding.word_embeddings.weight" and seen == ["model.embed_tokens.weight"]
    assert dict(it).keys() | {"embedding.word_embeddings.weight"} == hf_to_canonical(hf, mc, PADDED).keys()


def test_helpers():
    q, k, v = torch.randn(8 * 4), torch.randn(2 * 4), torch.randn(2 * 4)
    fused = interleave_qkv(q, k, v, 8, 2, 4)
    assert torch.equal(fused[:16], q[:16]) and torch.equal(fused[16:20], k[:4]) and torch.equal(fused[44:48], v[4:])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 8, 2, 4), (q, k, v)))
    w = torch.randn(24, 5)  # MHA: one q head per group
    assert torch.equal(interleave_qkv(*split_qkv(w, 2, 2, 4), 2, 2, 4), w)
    assert [padded_vocab_size(300, 128, 1), padded_vocab_size(300, 128, 2), padded_vocab_size(256, 128, 2)] == [384, 512, 256]
    t = torch.randn(3, 2, dtype=torch.bfloat16)
    p = pad_vocab(t, 8)
    assert p.shape == (8, 2) and p.dtype == torch.bfloat16 and not p[3:].any()
    assert torch.equal(unpad_vocab(p, 3), t)
    with pytest.raises(ValueError, match="padded_vocab=2"):
        pad_vocab(t, 2)


def test_errors():
    with pytest.raises(ValueError, match="'gpt2'.*llama"):
        model_config_from_hf(GPT2Config())
    with pytest.raises(ValueError, match="yarn"):
        model_config_from_hf(LlamaConfig(**TINY, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    with pytest.raises(ValueError, match="attention_bias"):
        model_config_from_hf(LlamaConfig(**TINY, attention_bias=True))

    hf_model = tiny_model("llama")
    mc = model_config_from_hf(hf_model.config)
    hf = hf_model.state_dict()
    missing = {k: v for k, v in hf.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
        hf_to_canonical(missing, mc, PADDED)
    assert isinstance(err.value, KeyError)
    with pytest.raises(ValueError, match="o_proj.bias"):
        hf_to_canonical({**hf, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, mc, PADDED)
    canon = hf_to_canonical(hf, mc, PADDED)
    del canon["output_layer.weight"]
    with pytest.raises(KeyError, match="output_layer.weight"):
        canonical_to_hf(canon, mc)


def test_mistral_window_is_kept_and_longer_sequences_refused():
    """No silent change of a model's attention: Mistral's sliding window travels HF -> meshtron ->
    HF, and a seq_len above it is refused by the config check (meshtron's attention is full)."""
    from engine.config import ConfigError, load_config, validate

    hf = MistralConfig(**TINY, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                       max_position_embeddings=1024, sliding_window=64)
    model = model_config_from_hf(hf)
    assert model["sliding_window"] == 64
    assert hf_config_from_model_config(model).sliding_window == 64
    assert "sliding_window" not in model_config_from_hf(mistral_config())  # no window: full attention
    over = [f"model.{k}={v}" for k, v in model.items() if k not in ("rope_scaling", "kv_channels")]
    validate(load_config(None, over + ["data.seq_len=64"]), 1)
    with pytest.raises(ConfigError, match=r"data.seq_len=128 exceeds model.sliding_window=64"):
        validate(load_config(None, over + ["data.seq_len=128"]), 1)
