"""meshtron's single-process model against transformers' own implementation of each family.

Tiny random models are built from transformers configs (no download), their weights converted
to the canonical Megatron layout, and two documents of different lengths are packed into one
THD micro-batch (I-4) — each must give the logits HF gives for it run alone, and the loss must
equal HF's mean token loss. Tolerance (fp32): max|logits − HF| / max|HF logits| ≤ 1e-5; loss
relative error ≤ 1e-6.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from convert.hf_map import hf_to_canonical, model_config_from_hf
from engine.config import ModelConfig
from engine.data.packing import document_arrays, pack
from engine.loss import token_loss_sum
from engine.mesh import ParallelMesh
from engine.model.gpt import GPTModel

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=16384)
FAMILIES = {
    "llama3-gqa-rope-scaling": lambda: transformers.LlamaConfig(
        **COMMON, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2-bias-tied": lambda: transformers.Qwen2Config(
        **COMMON, num_key_value_heads=4, rope_theta=1000000.0, tie_word_embeddings=True),
    "mistral-head-dim": lambda: transformers.MistralConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, sliding_window=None),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_loss_match_transformers(family):
    torch.manual_seed(0)
    hf_cfg = FAMILIES[family]()
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    if hf_cfg.tie_word_embeddings is False:
        assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    model_dict = model_config_from_hf(hf_cfg)
    model = GPTModel(ModelConfig(**model_dict), ParallelMesh.single())
    model.load_canonical(hf_to_canonical(hf.state_dict(), model_dict, model.padded_vocab))

    docs = [torch.randint(0, 300, (n,)) for n in (37, 90)]  # 90 > the rope-scaling window of 64
    batch = pack([document_arrays(d.tolist())[:2] for d in docs])
    with torch.no_grad():
        ours = model(batch)[:, :300]
        loss = token_loss_sum(model, batch) / batch.num_valid
        hf_logits = [hf(d[None]).logits[0] for d in docs]
        hf_loss_sum = sum(hf(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs)
    ref = torch.cat(hf_logits)
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"{family}: logits differ by {err:.2e} (relative to max logit)"
    hf_loss = hf_loss_sum / batch.num_valid
    assert abs(loss - hf_loss) / hf_loss <= 1e-6, (float(loss), float(hf_loss))


def test_bf16_model_tracks_transformers():
    """bf16 parameters and activations (RMSNorm in fp32 as HF does): logits within bf16 error."""
    torch.manual_seed(0)
    hf_cfg = FAMILIES["llama3-gqa-rope-scaling"]()
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    model_dict = model_config_from_hf(hf_cfg)
    model = GPTModel(ModelConfig(**model_dict), ParallelMesh.single(), dtype=torch.bfloat16)
    state = {k: v.bfloat16() for k, v in hf.state_dict().items()}
    model.load_canonical(hf_to_canonical(state, model_dict, model.padded_vocab))
    ids = torch.randint(0, 300, (64,))
    with torch.no_grad():
        ours = model(pack([document_arrays(ids.tolist())[:2]]))[:, :300].float()
        ref = hf.to(torch.bfloat16)(ids[None]).logits[0].float()
    assert ours.dtype == torch.float32 and (ours - ref).abs().max() / ref.abs().max() <= 3e-2
