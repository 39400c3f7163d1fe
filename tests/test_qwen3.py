"""Qwen3 dense models: per-head RMSNorm of q and k before RoPE (megatron-core's ``qk_layernorm``), no
q/k/v bias, an explicit head_dim (32 here; hidden 64 / 4 heads would give 16). References and
tolerances (fp32):

* transformers' Qwen3ForCausalLM on the same weights (q/k norm weights drawn away from 1): the
  logits of a packed two-document micro-batch max|Δ|/max|ref| ≤ 1e-5, the loss ≤ 1e-6 relative,
  every parameter's gradient ≤ 1e-5 of its max; also with the norms cut into token blocks;
* HF → Megatron (torch_dist; legacy tp=2 pp=2 resharded to tp=1 pp=1) → HF is bit-exact, config
  included; a config rebuilt from the model config alone is a Qwen3ForCausalLM with the same logits;
* one gloo world of 2: megatron-core (local spec, ``qk_layernorm=True``) strict-loads the converted
  torch_dist checkpoint at tp=1 and tp=2 and the legacy shards at tp=2 and gives transformers'
  logits (≤ 1e-5); meshtron loads the torch_dist checkpoint at tp=2 (``model.load``), gives them too
  and exports HF bit-exact; I-5 at tp=2 (also with selective recompute), cp=2 ring, cp=2 Ulysses and
  pp=2 Seq1F1B (test_tp_exact.py's checks and tolerances), the q/k norm weights' gradients — partial
  per tp rank, summed over tp — included;
* the planner: Qwen3-8B has 8.19B parameters, its counts equal GPTModel's (q/k norms replicated over
  tp) and its saved activations equal tools/bench_memory.py's count of what autograd saves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
import transformers

from convert.cli import main as convert
from convert.hf_map import canonical_to_hf, hf_config_from_model_config, hf_to_canonical, model_config_from_hf
from engine.config import ConfigError, ModelConfig, load_config, validate
from engine.data.packing import document_arrays, pack
from engine.loss import token_loss_sum
from engine.mesh import ParallelMesh
from engine.model import layers
from engine.model.gpt import GPTModel
from tests.harness import max_rel_diff, run_world
from tests.test_convert import assert_same_state, hf_state

# test_tp_exact.py's BASE shapes (vocab 300, hidden 64, ffn 96, 2 layers), so its harness runs them
HF_CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=4096,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
QWEN3 = ["model.arch=qwen3", "model.qk_layernorm=true", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.kv_channels=32", "model.norm_epsilon=1e-6", "model.rotary_base=1e6"]
MESHES = [["parallel.tp=2"], ["parallel.tp=2", "train.recompute=selective"], ["parallel.cp=2"],
          ["parallel.cp=2", "parallel.sp_mode=ulysses"],
          ["parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]]
SEQ = 24  # two sequences of 24 tokens: 48, a multiple of tp = 2


def hf_model(tied: bool = False) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**HF_CFG, tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # HF starts norms at 1: draw them so a swapped or missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5)
    return model


def token_ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(3))


# -- transformers parity --------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("norm_block", [None, 1000], ids=["one-block", "token-blocks"])
def test_logits_loss_and_grads_match_transformers(tied, norm_block, monkeypatch):
    if norm_block is not None:  # q: 2 groups x 2 heads x 32 = 128 elements a token: 7 tokens a block
        monkeypatch.setattr(layers, "NORM_BLOCK", norm_block)
    hf = hf_model(tied)
    md = model_config_from_hf(hf.config)
    assert (md["arch"], md["qk_layernorm"], md["kv_channels"], md["add_qkv_bias"]) == ("qwen3", True, 32, False)
    model = GPTModel(ModelConfig(**md), ParallelMesh.single())
    model.load_canonical(hf_to_canonical(hf.state_dict(), md, model.padded_vocab))
    assert model.decoder.layers[0].self_attention.q_layernorm.weight.shape == (32,)

    docs = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (37, 90)]
    batch = pack([document_arrays(d.tolist())[:2] for d in docs])
    ours = model(batch)[:, :300].detach()
    loss = token_loss_sum(model, batch) / batch.num_valid
    loss.backward()
    ref = torch.cat([hf(d[None]).logits[0].detach() for d in docs])
    hf_loss = sum(hf(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs) / batch.num_valid
    hf_loss.backward()
    assert (ours - ref).abs().max() / ref.abs().max() <= 1e-5
    loss, hf_loss = loss.item(), hf_loss.item()
    assert abs(loss - hf_loss) / hf_loss <= 1e-6, (loss, hf_loss)

    grads = canonical_to_hf({n: p.grad for n, p in model.named_parameters()}, md)
    want = {n: p.grad for n, p in hf.named_parameters() if not (tied and n == "lm_head.weight")}
    assert grads.keys() == want.keys(), sorted(grads.keys() ^ want.keys())
    worst = {n: max_rel_diff(grads[n], want[n]) for n in want}
    assert max(worst.values()) <= 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert want["model.layers.1.self_attn.k_norm.weight"].abs().max() > 0


def test_config_maps_and_refusals():
    md = model_config_from_hf(transformers.Qwen3Config(**HF_CFG))
    cfg = hf_config_from_model_config(md)
    assert isinstance(cfg, transformers.Qwen3Config) and cfg.architectures == ["Qwen3ForCausalLM"]
    assert (cfg.model_type, cfg.head_dim, cfg.attention_bias, cfg.use_sliding_window) == ("qwen3", 32, False, False)
    assert model_config_from_hf(cfg) == md
    # head_dim = hidden / heads is still written: Qwen3Config's default is 128
    plain = model_config_from_hf(transformers.Qwen3Config(**{**HF_CFG, "head_dim": 16}))
    assert plain["kv_channels"] is None and hf_config_from_model_config(plain).head_dim == 16
    with pytest.raises(ValueError, match="attention_bias=True"):
        model_config_from_hf(transformers.Qwen3Config(**HF_CFG, attention_bias=True))
    with pytest.raises(ValueError, match="qk_layernorm=True cannot be expressed as a llama"):
        hf_config_from_model_config({**md, "arch": "llama"})
    with pytest.raises(ValueError, match="qk_layernorm=False cannot be expressed as a qwen3"):
        hf_config_from_model_config({**md, "qk_layernorm": False})
    with pytest.raises(ConfigError, match="model.qk_layernorm=true"):
        validate(load_config(None, ["model.arch=qwen3"]), 1, files=False)
    cfg = validate(load_config(None, QWEN3 + ["model.hidden_size=64"]), 1, files=False)
    assert cfg.model.qk_layernorm and cfg.model.head_dim == 32


# -- converters -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3") / "hf"
    hf_model().save_pretrained(path, max_shard_size="100KB")
    return path


def test_hf_megatron_hf_is_bit_exact(hf_dir, tmp_path):
    dist, legacy, resharded = tmp_path / "dist", tmp_path / "legacy", tmp_path / "resharded"
    assert convert(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(dist)]) == 0
    assert convert(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(legacy), "--format", "torch",
                    "--tp", "2", "--pp", "2"]) == 0
    assert convert(["reshard", "--in", str(legacy), "--out", str(resharded), "--tp", "1", "--pp", "1"]) == 0
    for mg in (dist, legacy, resharded):
        back = tmp_path / f"{mg.name}-hf"
        assert convert(["megatron-to-hf", "--megatron", str(mg), "--out", str(back)]) == 0
        assert_same_state(hf_state(back), hf_state(hf_dir))
        assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    # without the source's config.json beside it, the config comes from the model config
    shutil.rmtree(dist / "hf")
    assert convert(["megatron-to-hf", "--megatron", str(dist), "--out", str(tmp_path / "rebuilt")]) == 0
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt", attn_implementation="eager")
    assert type(rebuilt).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        got, want = rebuilt.eval()(token_ids()).logits, hf_model()(token_ids()).logits
    assert torch.equal(got, want)


# -- one world of 2: megatron-core, meshtron loading and exporting, I-5 ------------------------------
def _mesh_checks(rank, world) -> dict:
    from tests.test_tp_exact import compare, make_cfg, run_steps

    ref = run_steps(make_cfg(QWEN3 + ["parallel.dp=1"], 1), ParallelMesh.single())
    norm_grads = [n for n in ref["grads"] if "q_layernorm" in n or "k_layernorm" in n]
    report = {}
    for over in MESHES:
        cfg = make_cfg(QWEN3 + over, world)
        p = cfg.parallel
        mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp)
        got = run_steps(cfg, mesh)
        report[" ".join(over)] = compare(got, ref)
        report[" ".join(over)]["qk_norm_grads"] = max(max_rel_diff(got["grads"][n], ref["grads"][n])
                                                      for n in norm_grads)
    return {"report": report, "norm_grads": len(norm_grads)}


def _meshtron_loads_and_exports(ckpt: str, out: str) -> torch.Tensor:
    """meshtron at tp=2 from the converted checkpoint: its full logits, and an HF export."""
    from engine.checkpoint import export_hf
    from engine.data.packing import concat
    from engine.parallel.comm import gather_shards
    from engine.train import build_model
    from tests.test_tp_exact import make_cfg

    cfg = make_cfg(QWEN3 + [f"model.load={ckpt}", "parallel.tp=2"], 2)
    mesh = ParallelMesh.build(tp=2, dp=1)
    chunks = build_model(cfg, mesh).eval()
    batch = concat([pack([document_arrays(row.tolist())[:2]]) for row in token_ids()])
    with torch.no_grad():
        logits = torch.cat(gather_shards(chunks[0](batch), mesh.group("tp")), dim=-1)[:, :300]
    export_hf(chunks, mesh, out)
    return logits.view(2, SEQ, 300)


def _megatron_core_logits(path: str, fmt: str, tp: int, model: dict) -> torch.Tensor:
    """megatron-core's GPTModel with qk_layernorm, strictly loaded from ``path`` at ``tp``: its
    logits gathered over tp (CPU workarounds of DESIGN §5)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel as McoreGPT
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer import TransformerConfig

    from convert.megatron_legacy import FILE_NAME, rank_dir, read_legacy_args

    torch.cuda.current_device = lambda: "cpu"
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state.initialize_model_parallel(tp, 1)
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        padded = read_legacy_args(path).padded_vocab_size if fmt == "torch" else 384
        cfg = TransformerConfig(
            num_layers=model["num_layers"], hidden_size=model["hidden_size"], ffn_hidden_size=model["ffn_hidden_size"],
            num_attention_heads=model["num_attention_heads"], num_query_groups=model["num_query_groups"],
            kv_channels=model["kv_channels"], qk_layernorm=True, normalization="RMSNorm",
            layernorm_epsilon=model["norm_epsilon"], gated_linear_unit=True, activation_func=F.silu,
            add_bias_linear=False, add_qkv_bias=False, tensor_model_parallel_size=tp, params_dtype=torch.float32,
            use_cpu_initialization=True, perform_initialization=False, attention_dropout=0.0, hidden_dropout=0.0)
        gpt = McoreGPT(cfg, get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True), vocab_size=padded,
                       max_sequence_length=model["max_position_embeddings"], position_embedding_type="rope",
                       rotary_base=int(model["rotary_base"]), share_embeddings_and_output_weights=False).eval()
        if fmt == "torch_dist":
            state = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, path)["model"]
        else:
            state = torch.load(os.path.join(path, "iter_0000000", rank_dir(tp_rank, 0, 1), FILE_NAME),
                               weights_only=False)["model"]
        missing, unexpected = gpt.load_state_dict(state, strict=True)
        assert not missing and not unexpected
        assert gpt.decoder.layers[1].self_attention.k_layernorm.weight.shape == (model["kv_channels"],)
        mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]  # True = masked
        with torch.no_grad():
            out = gpt(token_ids(), torch.arange(SEQ).expand(2, SEQ), mask)
        if tp > 1:
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            out = torch.cat(parts, dim=-1)
        return out[..., :300]
    finally:
        parallel_state.destroy_model_parallel()


def _world(rank, world, dist_dir, legacy_dir, export_dir):
    out = _mesh_checks(rank, world)
    out["meshtron_tp2"] = _meshtron_loads_and_exports(dist_dir, export_dir)
    with open(os.path.join(dist_dir, "meshtron.json")) as f:
        model = json.load(f)["model"]
    out["megatron"] = {(fmt, tp): _megatron_core_logits(path, fmt, tp, model)
                       for path, fmt, tp in ((dist_dir, "torch_dist", 1), (dist_dir, "torch_dist", 2),
                                             (legacy_dir, "torch", 2))}
    return out


@pytest.fixture(scope="module")
def world(hf_dir, tmp_path_factory):
    pytest.importorskip("megatron.core")
    base = tmp_path_factory.mktemp("qwen3-world")
    dist_dir, legacy_dir, export_dir = base / "dist", base / "legacy", base / "export"
    assert convert(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(dist_dir)]) == 0
    assert convert(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(legacy_dir), "--format", "torch",
                    "--tp", "2"]) == 0
    results = run_world(2, _world, str(dist_dir), str(legacy_dir), str(export_dir), timeout=900)
    return results, export_dir


def test_megatron_core_and_meshtron_give_transformers_logits(world, hf_dir):
    results, export_dir = world
    with torch.no_grad():
        ref = hf_model()(token_ids()).logits
    for rank, res in enumerate(results):
        runs = {**{f"megatron-core {fmt} tp={tp}": v for (fmt, tp), v in res["megatron"].items()},
                "meshtron tp=2": res["meshtron_tp2"]}
        for name, logits in runs.items():
            err = (logits - ref).abs().max() / ref.abs().max()
            print(f"rank {rank} {name}: max |Δ logits| / max |logit| = {err:.2e}")
            assert err <= 1e-5, (rank, name, float(err))
    assert_same_state(hf_state(export_dir), hf_state(hf_dir))  # training's HF export at tp=2


def test_tp_and_cp_match_one_process(world):
    from tests.test_tp_exact import check

    results, _ = world
    for rank, res in enumerate(results):
        assert res["norm_grads"] == 4  # q and k norms of both layers are among the compared gradients
        for key, worst in res["report"].items():
            print(rank, key, {k: f"{v:.2e}" for k, v in worst.items()})
            check(worst, key)
            assert worst["qk_norm_grads"] <= 1e-5, (key, worst)


# -- planner --------------------------------------------------------------------------------------
def test_planner_counts_qwen3_parameters():
    from engine.plan.models import KNOWN_MODELS, ModelSpec, hf_param_count, param_counts
    from tests.test_plan import run_cli

    out = run_cli("--model", "Qwen/Qwen3-8B", "--gpus", "8", "--seq-len", "32768", "--top", "1")
    assert out.returncode == 0, out.stderr
    count = float(out.stdout.split("(")[1].split("B parameters")[0]) * 1e9
    assert abs(count - 8.19e9) / 8.19e9 <= 0.01, out.stdout.splitlines()[0]
    # published sizes: HF parameter counts of Qwen3-0.6B … 32B
    sizes = {"0.6b": 0.596e9, "1.7b": 1.72e9, "4b": 4.02e9, "8b": 8.19e9, "14b": 14.77e9, "32b": 32.76e9}
    for size, n in sizes.items():
        m = KNOWN_MODELS[f"qwen3-{size}"]
        assert m.arch == "qwen3" and m.head_dim == 128 and m.vocab_size == 151936
        assert abs(hf_param_count(m) - n) / n <= 0.005, (size, hf_param_count(m))
    # GPTModel's own count: q/k norms replicated over tp, head_dim != hidden / heads
    tiny = ModelSpec("tiny", 3, 64, 96, 4, 2, 300, 32, qk_layernorm=True)
    cfg = dict(arch="qwen3", qk_layernorm=True, num_layers=3, hidden_size=64, ffn_hidden_size=96,
               num_attention_heads=4, num_query_groups=2, kv_channels=32, vocab_size=300)
    whole = GPTModel(ModelConfig(**cfg), ParallelMesh.single())
    n = param_counts(tiny, tp=1)
    assert n["sharded"] + n["replicated"] == sum(p.numel() for p in whole.parameters())
    padded = GPTModel(ModelConfig(**cfg, make_vocab_size_divisible_by=256), ParallelMesh.single())
    replicated = sum(p.numel() for p in padded.parameters() if p.tp_dim is None)
    n2 = param_counts(tiny, tp=2)
    assert n2["replicated"] == replicated and 2 * n2["sharded"] + replicated == sum(p.numel() for p in padded.parameters())


def test_planner_saved_activations_match_bench_memory():
    """What autograd saves in the forward (tools/bench_memory.py's hook) for a Qwen3 layer stack, every
    recompute mode: the q/k norms keep the QKV projection's output and an fp32 rstd per q/k head."""
    from engine.config import TrainConfig
    from engine.plan import activations as act
    from engine.plan.models import ModelSpec
    from tests.test_plan import SLACK_BYTES, _bench

    bench = _bench()
    argv = ["--seq", "256", "--layers", "2", "--hidden", "64", "--heads", "8", "--kv-heads", "2", "--ffn", "176",
            "--vocab", "300"]
    m = ModelSpec("qwen3-tiny", 2, 64, 176, 8, 2, 300, 16, qk_layernorm=True)
    for recompute in act.RECOMPUTE:
        cfg = bench.make_cfg(bench.parse_args(argv), 1, 1, recompute)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="qwen3", qk_layernorm=True,
                                                                 kv_channels=16))
        got = bench.measure(cfg, top=0)
        want = got["tokens"] * (act.kept_per_layer(m, 1, 1, 4, recompute) * 2 + act.model_extras_per_token(
            m, 1, 4, True, True, 1, recompute, TrainConfig.loss_chunk_tokens))
        assert 0 <= got["bytes"] - want <= SLACK_BYTES, (recompute, got["bytes"], want)
