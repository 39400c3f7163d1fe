"""convert/megatron_legacy.py: bit-exact round trips at every (tp, pp, vpp), and megatron-core's
GPTModel (local spec) loading every written shard with ``strict=True``.

megatron-core on CPU needs, besides DESIGN §5's workarounds: ``Tensor.cuda`` made the identity in
the worker processes (GPTModel's tied-embedding setup for pp > 1 moves the last stage's copy with
``.cuda()`` before all-reducing it over the embedding group).
"""
from __future__ import annotations

import os

import pytest
import torch

from convert.megatron_legacy import FILE_NAME, TRACKER, load_legacy, rank_dir, read_legacy_args, save_legacy
from engine.model.sharding import canonical_names, stage_layers
from tests.harness import run_world

# vocab 300 pads to 384 at tp 1, 2 and 4 with make_vocab_size_divisible_by=96 (96·tp divides 384).
BASE = dict(arch="llama", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
            num_query_groups=2, kv_channels=None, vocab_size=300, make_vocab_size_divisible_by=96,
            norm_epsilon=1e-6, rotary_base=500000.0, rope_scaling=None, add_qkv_bias=False,
            tie_word_embeddings=False, max_position_embeddings=2048, init_method_std=0.02)
PADDED = 384
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
VARIANTS = {
    "fp32": dict(BASE, rope_scaling=LLAMA3),
    "bf16-qkvbias-tied": dict(BASE, arch="qwen2", add_qkv_bias=True, tie_word_embeddings=True),
}
DTYPES = {"fp32": torch.float32, "bf16-qkvbias-tied": torch.bfloat16}
# (tp, pp, vpp, layers_per_stage)
MESHES = [(tp, pp, 1, [1, 2, 1] if pp == 3 else None) for tp in (1, 2, 4) for pp in (1, 2, 3)]
MESHES += [(1, 2, 2, None), (2, 2, 2, None)]


def canonical(model: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, nq = model["hidden_size"], model["ffn_hidden_size"], model["num_attention_heads"]
    d = h // nq
    qkv = (nq + 2 * model["num_query_groups"]) * d
    shapes = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv, h),
              "self_attention.linear_qkv.bias": (qkv,), "self_attention.linear_proj.weight": (h, nq * d),
              "pre_mlp_layernorm.weight": (h,), "mlp.linear_fc1.weight": (2 * f, h),
              "mlp.linear_fc2.weight": (h, f), "embedding.word_embeddings.weight": (PADDED, h),
              "decoder.final_layernorm.weight": (h,), "output_layer.weight": (PADDED, h)}
    out = {}
    for name in canonical_names(model):
        shape = shapes[name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name]
        t = torch.randn(shape, generator=g).to(dtype)
        if shape[0] == PADDED:
            t[model["vocab_size"]:] = 0  # padded vocabulary rows are zeros
        out[name] = t
    return out


def save(state, model, path, tp, pp, vpp=1, lps=None, **kw):
    save_legacy(state.__getitem__, list(state), model, str(path), tp=tp, pp=pp, vpp=vpp,
                layers_per_stage=lps, **kw)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp,pp,vpp,lps", MESHES)
def test_round_trip_bit_exact(tmp_path, variant, tp, pp, vpp, lps):
    model, dtype = VARIANTS[variant], DTYPES[variant]
    state = canonical(model, dtype)
    fetched, ticks = [], []
    get = lambda name: fetched.append(name) or state[name]
    extra = {"opt_param_scheduler": {"num_steps": 7}, "rng_state": [{"seed": 1}]}
    save_legacy(get, list(state), model, str(tmp_path / "ckpt"), tp=tp, pp=pp, vpp=vpp,
                layers_per_stage=lps, iteration=7, extra=extra, progress=ticks.append)

    # Streaming: each canonical tensor is fetched once (the tied embedding twice: its last-stage copy).
    copies = int(model["tie_word_embeddings"] and pp > 1)
    assert sorted(fetched) == sorted(list(state) + ["embedding.word_embeddings.weight"] * copies)
    assert sum(ticks) == len(fetched)

    root = tmp_path / "ckpt"
    assert (root / TRACKER).read_text() == "7"
    assert sorted(os.listdir(root)) == ["iter_0000007", TRACKER]
    stages = stage_layers(4, pp, vpp, lps)
    for t in range(tp):
        for r in range(pp):
            f = torch.load(root / "iter_0000007" / rank_dir(t, r, pp) / FILE_NAME, weights_only=False)
            assert f["checkpoint_version"] == 3.0 and f["iteration"] == 7 and f["rng_state"] == [{"seed": 1}]
            a = f["args"]
            assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (tp, pp)
            assert a.padded_vocab_size == PADDED and a.params_dtype == dtype
            assert a.bf16 == (dtype == torch.bfloat16)
            keys = ["model"] if vpp == 1 else [f"model{c}" for c in range(vpp)]
            assert [k for k in f if k.startswith("model")] == keys
            for c, key in enumerate(keys):
                sd = f[key]
                layers = {int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}
                assert layers == set(range(len(stages[r][c])))  # local layer numbers
                assert ("embedding.word_embeddings.weight" in sd) == (r == 0 and c == 0)
                last = r == pp - 1 and c == vpp - 1
                assert ("decoder.final_layernorm.weight" in sd) == last
                assert ("output_layer.weight" in sd) == (last and (not model["tie_word_embeddings"] or pp > 1))
                for k, v in sd.items():
                    if v is not None:  # a view would have pickled the whole storage of the full tensor
                        assert v.is_contiguous(), k
                        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
                        assert v.dtype == dtype, k

    for where in (root, root / "iter_0000007"):
        canon, config, meta = load_legacy(str(where))
        assert list(canon) == list(state)
        for k, v in state.items():
            assert canon[k].dtype == v.dtype and torch.equal(canon[k], v), k
        assert config == model
        assert meta == {"tp": tp, "pp": pp, "vpp": vpp, "iteration": 7, "extra": extra,
                        "layers_per_stage": [len(stages[v % pp][v // pp]) for v in range(pp * vpp)]}
    assert read_legacy_args(str(root)).num_query_groups == 2


def test_uneven_split_args(tmp_path):
    save(canonical(BASE, torch.float32), BASE, tmp_path / "a", tp=1, pp=3, lps=[1, 2, 1])
    a = read_legacy_args(str(tmp_path / "a"))
    assert (a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers) == (1, 1)
    save(canonical(BASE, torch.float32), BASE, tmp_path / "b", tp=1, pp=2)
    a = read_legacy_args(str(tmp_path / "b"))
    assert (a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers) == (None, None)
    with pytest.raises(ValueError, match="cannot be expressed in Megatron-LM"):
        model = dict(BASE, num_layers=6)
        save(canonical(model, torch.float32), model, tmp_path / "c", tp=1, pp=2, vpp=2, lps=[1, 2, 2, 1])


# ---------------------------------------------------------------------------------------------
# Errors


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "x").write_text("")
    with pytest.raises(ValueError, match="ckpt already exists and is not empty"):
        save(canonical(BASE, torch.float32), BASE, tmp_path / "ckpt", tp=1, pp=1)
    (tmp_path / "empty").mkdir()  # an empty directory is replaced
    save(canonical(BASE, torch.float32), BASE, tmp_path / "empty", tp=1, pp=1)
    assert (tmp_path / "empty" / TRACKER).exists()


def test_failed_save_leaves_nothing(tmp_path):
    state = canonical(BASE, torch.float32)
    del state["decoder.layers.3.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError):
        save_legacy(state.__getitem__, canonical_names(BASE), BASE, str(tmp_path / "ckpt"), tp=2, pp=2)
    assert os.listdir(tmp_path) == []


def test_wrong_vocab_padding(tmp_path):
    with pytest.raises(ValueError, match="pads vocab_size=300 to 512"):
        model = dict(BASE, make_vocab_size_divisible_by=128)  # 384 at tp 1, but 512 at tp 2
        save(canonical(model, torch.float32), model, tmp_path / "ckpt", tp=2, pp=1)


def test_missing_shard(tmp_path):
    save(canonical(BASE, torch.float32), BASE, tmp_path / "ckpt", tp=2, pp=2)
    gone = tmp_path / "ckpt" / "iter_0000000" / "mp_rank_01_001" / FILE_NAME
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone)):
        load_legacy(str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match="neither a Megatron checkpoint root"):
        load_legacy(str(tmp_path))


def test_shape_mismatch_across_tp(tmp_path):
    save(canonical(BASE, torch.float32), BASE, tmp_path / "ckpt", tp=2, pp=1)
    path = tmp_path / "ckpt" / "iter_0000000" / "mp_rank_01" / FILE_NAME
    f = torch.load(path, weights_only=False)
    name = "decoder.layers.2.mlp.linear_fc2.weight"
    f["model"][name] = f["model"][name][:, :40].clone()
    torch.save(f, path)
    with pytest.raises(ValueError, match=r"decoder\.layers\.2\.mlp\.linear_fc2\.weight .*different shapes"):
        load_legacy(str(tmp_path / "ckpt"))


def test_tied_copy_must_equal_embedding(tmp_path):
    model = VARIANTS["bf16-qkvbias-tied"]
    save(canonical(model, torch.bfloat16), model, tmp_path / "ckpt", tp=1, pp=2)
    path = tmp_path / "ckpt" / "iter_0000000" / "mp_rank_00_001" / FILE_NAME
    f = torch.load(path, weights_only=False)
    f["model"]["output_layer.weight"][0, 0] += 1
    torch.save(f, path)
    with pytest.raises(ValueError, match="differs from the embedding"):
        load_legacy(str(tmp_path / "ckpt"))


def test_reads_megatron_lm_written_files(tmp_path):
    """Files as Megatron-LM writes them: no meshtron_* args, Transformer Engine spec names (norms
    fused into the next linear), ``_extra_state`` as BytesIO."""
    import io

    model, state = VARIANTS["fp32"], canonical(VARIANTS["fp32"], torch.float32)
    save(state, model, tmp_path / "ckpt", tp=2, pp=1)
    for t in range(2):
        path = tmp_path / "ckpt" / "iter_0000000" / rank_dir(t, 0, 1) / FILE_NAME
        f = torch.load(path, weights_only=False)
        del f["args"].meshtron_arch, f["args"].meshtron_rope_scaling
        te = {}
        for k, v in f["model"].items():
            k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
            te[k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")] = (
                io.BytesIO() if k.endswith("_extra_state") else v)
        f["model"] = te
        torch.save(f, path)
    canon, config, _ = load_legacy(str(tmp_path / "ckpt"))
    assert canon.keys() == state.keys() and all(torch.equal(canon[k], v) for k, v in state.items())
    assert config == model  # llama3 scaling rebuilt from use_rope_scaling with megatron-core's constants


# ---------------------------------------------------------------------------------------------
# megatron-core loads the shards


def _mcore_setup():
    torch.cuda.current_device = lambda: "cpu"  # rotary embedding asks for the current device
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied-embedding setup with pp > 1 (see docstring)
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _mcore_load(root: str, variant: str, tp_rank: int, pp_rank: int) -> set[str]:
    """Build this rank's GPTModel chunks from the checkpoint's args alone, load the shard file
    strictly, and check every tensor against the canonical state through megatron-core's own
    global view (``sharded_state_dict``: global layer numbers, tp offsets, SwiGLU halves).
    Returns the canonical names checked."""
    import torch.nn.functional as F
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    a = read_legacy_args(root)
    pp, vpp = a.pipeline_model_parallel_size, a.virtual_pipeline_model_parallel_size or 1
    f = torch.load(os.path.join(root, f"iter_{a.iteration:07d}", rank_dir(tp_rank, pp_rank, pp), FILE_NAME),
                   weights_only=False)
    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels, normalization=a.normalization, layernorm_epsilon=a.norm_epsilon,
        gated_linear_unit=a.swiglu, activation_func=F.silu, add_bias_linear=a.add_bias_linear,
        add_qkv_bias=a.add_qkv_bias, tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=a.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=a.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=a.decoder_last_pipeline_num_layers,
        params_dtype=a.params_dtype, pipeline_dtype=a.params_dtype, bf16=a.bf16,
        use_cpu_initialization=True, perform_initialization=False)
    canon = canonical(VARIANTS[variant], DTYPES[variant])
    checked = set()
    for c in range(vpp):
        m = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=a.padded_vocab_size,
                     max_sequence_length=a.max_position_embeddings,
                     pre_process=pp_rank == 0 and c == 0, post_process=pp_rank == pp - 1 and c == vpp - 1,
                     share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
                     position_embedding_type=a.position_embedding_type, rotary_base=a.rotary_base,
                     rope_scaling=a.use_rope_scaling, rope_scaling_factor=a.rope_scaling_factor,
                     vp_stage=c if vpp > 1 else None)
        result = m.load_state_dict(f["model" if vpp == 1 else f"model{c}"], strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        for sh in nested_values(m.sharded_state_dict()):
            for t in (sh.build() if isinstance(sh, ShardedTensorFactory) else [sh]):
                if not isinstance(t, ShardedTensor):
                    continue  # _extra_state objects
                # sharded_state_dict names the norms as Transformer Engine fuses them, for both specs
                name = t.key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
                name = name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
                offset = t.global_offset[t.prepend_axis_num:]
                if t.prepend_axis_num:  # layers stacked along a leading axis: its offset is the global layer
                    name = name.replace("decoder.layers.", f"decoder.layers.{t.global_offset[0]}.")
                want = canon[name][tuple(slice(o, o + n) for o, n in zip(offset, t.data.shape))]
                assert torch.equal(t.data, want.to(t.data.dtype)), (name, t.global_offset)
                checked.add(name)
    return checked


def _mcore_world(rank: int, world: int, cases: list[tuple[str, str, int, int, int]]) -> list[set[str]]:
    from megatron.core import parallel_state

    _mcore_setup()
    checked = []
    for root, variant, tp, pp, vpp in cases:
        parallel_state.initialize_model_parallel(
            tp, pp, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
        checked.append(_mcore_load(root, variant, parallel_state.get_tensor_model_parallel_rank(),
                                   parallel_state.get_pipeline_model_parallel_rank()))
        parallel_state.destroy_model_parallel()
    return checked


def test_megatron_core_loads_tp1_in_process(tmp_path):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from tests.harness import free_port

    cuda_device, tensor_cuda = torch.cuda.current_device, torch.Tensor.cuda
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        _mcore_setup()
        parallel_state.initialize_model_parallel(1, 1)
        for variant, model in VARIANTS.items():
            save(canonical(model, DTYPES[variant]), model, tmp_path / variant, tp=1, pp=1)
            assert _mcore_load(str(tmp_path / variant), variant, 0, 0) == set(canonical_names(model))
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()
        torch.cuda.current_device, torch.Tensor.cuda = cuda_device, tensor_cuda


def test_megatron_core_loads_sharded(tmp_path):
    cases = []  # (root, variant, tp, pp, vpp), all run in one world of 4 gloo processes
    for tp, pp, vpp, lps, variant in [(2, 1, 1, None, "fp32"), (2, 1, 1, None, "bf16-qkvbias-tied"),
                                      (1, 2, 1, None, "bf16-qkvbias-tied"), (2, 2, 1, None, "fp32"),
                                      (2, 2, 1, [1, 3], "bf16-qkvbias-tied"), (1, 2, 2, None, "fp32"),
                                      (2, 2, 2, None, "bf16-qkvbias-tied")]:
        root = tmp_path / f"tp{tp}-pp{pp}-vpp{vpp}-{lps}-{variant}"
        model = VARIANTS[variant]
        save(canonical(model, DTYPES[variant]), model, root, tp=tp, pp=pp, vpp=vpp, lps=lps)
        cases.append((str(root), variant, tp, pp, vpp))
    checked = run_world(4, _mcore_world, cases, timeout=300)
    for i, (root, variant, *_) in enumerate(cases):  # together the ranks saw every canonical tensor
        assert set().union(*(c[i] for c in checked)) == set(canonical_names(VARIANTS[variant])), root
