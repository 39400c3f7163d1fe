"""Real megatron-core runs meshtron's converted checkpoints: HF → `meshtron-convert` (legacy
format, tp = 1 and 2) → megatron-core GPTModel built from the checkpoint's args alone, loaded
strictly, gives the logits transformers gives on the same tokens (fp32, max |Δ| ≤ 1e-4 of the
logits' scale; megatron-core on CPU with the workarounds of DESIGN §5)."""
from __future__ import annotations

import os

import pytest
import torch
import transformers

from convert.cli import main as convert
from engine.spawn import run_world

CFG = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
FAMILIES = {"llama": lambda: transformers.LlamaConfig(**CFG),
            "qwen2": lambda: transformers.Qwen2Config(**CFG, tie_word_embeddings=True)}
SEQ = 40


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(3))


def megatron_logits(root: str) -> torch.Tensor:
    """This tp rank's megatron-core logits gathered over tp: ``[batch, seq, vocab]``."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer import TransformerConfig

    from convert.megatron_legacy import FILE_NAME, rank_dir, read_legacy_args

    torch.cuda.current_device = lambda: "cpu"  # DESIGN §5: rotary embedding asks for a device
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    a = read_legacy_args(root)
    parallel_state.initialize_model_parallel(a.tensor_model_parallel_size, 1)
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        cfg = TransformerConfig(
            num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
            num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
            kv_channels=a.kv_channels, normalization=a.normalization, layernorm_epsilon=a.norm_epsilon,
            gated_linear_unit=a.swiglu, activation_func=F.silu, add_bias_linear=a.add_bias_linear,
            add_qkv_bias=a.add_qkv_bias, tensor_model_parallel_size=a.tensor_model_parallel_size,
            params_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False,
            attention_dropout=0.0, hidden_dropout=0.0)
        model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=a.padded_vocab_size,
                         max_sequence_length=a.max_position_embeddings,
                         share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
                         position_embedding_type="rope", rotary_base=a.rotary_base).eval()
        state = torch.load(os.path.join(root, f"iter_{a.iteration:07d}", rank_dir(tp_rank, 0, 1), FILE_NAME),
                           weights_only=False)["model"]
        missing, unexpected = model.load_state_dict(state, strict=True)
        assert not missing and not unexpected
        ids = tokens()
        mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]  # True = masked
        with torch.no_grad():
            out = model(ids, torch.arange(SEQ).expand(2, SEQ), mask)  # [b, s, V/tp]
        if a.tensor_model_parallel_size > 1:
            parts = [torch.empty_like(out) for _ in range(a.tensor_model_parallel_size)]
            dist.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            out = torch.cat(parts, dim=-1)
        return out[..., :a.vocab_size]
    finally:
        parallel_state.destroy_model_parallel()


def _world(rank, world, root):
    return megatron_logits(root)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_core_logits_equal_transformers(tmp_path, family):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = hf(tokens()).logits
    for tp in (1, 2):
        root = str(tmp_path / f"mg{tp}")
        assert convert(["hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out", root, "--format", "torch",
                        "--tp", str(tp)]) == 0
        got = run_world(tp, _world, root, timeout=600)
        for rank_logits in got:
            err = (rank_logits - ref).abs().max() / ref.abs().max()
            print(f"{family} tp={tp}: max |megatron-core - transformers| / max|logit| = {err:.2e}")
            assert err <= 1e-4, f"{family} tp={tp}: megatron-core logits differ from transformers by {err:.2e}"
