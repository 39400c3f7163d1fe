"""meshtron-plan (engine/plan): parameter bytes against meshtron's GPTModel, saved activations
against tools/bench_memory.py, monotonicity, the fastest-first order, the longest sequence, the
360-LLaMA-Factory validation table and its exit code, and the CLI's errors."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    load_config,
    validate,
)
from engine.mesh import ParallelMesh
from engine.model.gpt import GPTModel
from engine.plan import activations as act
from engine.plan import cli, lf360
from engine.plan.devices import DEVICES, GIB
from engine.plan.memory import Mesh, Run, rank_memory, stage_phases, tokens_per_rank
from engine.plan.models import KNOWN_MODELS, ModelSpec, param_counts, resolve_model
from engine.plan.search import candidate_meshes, max_seq_len, plan
from engine.plan.timing import flops_per_sequence, step_time
from engine.spawn import run_world

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelSpec("tiny", num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=8,
                 num_query_groups=4, vocab_size=500, head_dim=8)
# Bytes bench_memory counts that the planner leaves out: cu_seqlens (int32, a few entries) and the
# 0-d loss; everything else must agree exactly.
SLACK_BYTES = 128


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.plan.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def _model_config(m: ModelSpec, **kw) -> ModelConfig:
    return ModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                       num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                       vocab_size=m.vocab_size, add_qkv_bias=m.add_qkv_bias,
                       tie_word_embeddings=m.tie_word_embeddings, **kw)


# -- parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias,tie", [(False, False), (True, False), (False, True)])
def test_param_counts_equal_gptmodel_on_one_rank(bias, tie):
    m = dataclasses.replace(TINY, add_qkv_bias=bias, tie_word_embeddings=tie)
    mesh = ParallelMesh.build()
    whole = GPTModel(_model_config(m), mesh)
    n = param_counts(m, tp=1)
    assert n["sharded"] + n["replicated"] == sum(p.numel() for p in whole.parameters())
    # pipeline stages: the first holds the embedding, the last the final norm (and output layer)
    for layers, first, last in ((range(2), True, False), (range(2, 3), False, True), (range(1, 2), False, False)):
        stage = GPTModel(_model_config(m), mesh, layers=layers, pre_process=first, post_process=last)
        n = param_counts(m, 1, len(layers), first, last)
        assert n["sharded"] + n["replicated"] == sum(p.numel() for p in stage.parameters()), (layers, first, last)
    # tp = 2: every sharded tensor is split in two, the vocabulary padded to 128·2 (a tp=1 model with
    # make_vocab_size_divisible_by=256 has exactly the tp=2 shapes before the split)
    padded = GPTModel(_model_config(m, make_vocab_size_divisible_by=256), mesh)
    n2 = param_counts(m, tp=2)
    norms = sum(p.numel() for name, p in padded.named_parameters() if name.endswith("layernorm.weight"))
    assert n2["replicated"] == norms
    assert 2 * n2["sharded"] + norms == sum(p.numel() for p in padded.parameters())


def test_state_bytes_follow_the_sharding_table():
    m, P = TINY, sum(param_counts(TINY).values())
    mesh = Mesh(dp=4)
    parts = {s: rank_memory(m, mesh, Run(seq_len=64, sharding=s, recompute="full"), 80).parts
             for s in ("none", "zero1", "fsdp2")}
    assert parts["none"]["params"] == 2 * P and parts["none"]["optimizer"] == 12 * P
    assert parts["zero1"]["optimizer"] == 12 * P / 4
    assert parts["fsdp2"]["optimizer"] == 8 * P / 4
    step = {s: stage_phases(m, mesh, Run(seq_len=64, sharding=s), 0)[0]["step"]["grads"] for s in ("none", "zero1")}
    assert step["none"] == step["zero1"] == 4 * P  # the fp32 main_grad buckets, reduced in place: no copies
    off = rank_memory(m, mesh, Run(seq_len=64, sharding="zero1", offload=True), 80)
    assert off.parts["optimizer"] == 0 and off.host == 12 * P / 4
    dpo = rank_memory(m, mesh, Run(seq_len=64, recipe="dpo"), 80)
    assert dpo.parts["params"] == 2 * 2 * P  # policy + frozen reference


# -- activations against tools/bench_memory.py ----------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "tools" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _predicted(layers, hidden, heads, kv_heads, ffn, vocab, bf16, tp, hp, tokens, recompute="none",
               loss_chunk=TrainConfig.loss_chunk_tokens):
    m = ModelSpec("bench", layers, hidden, ffn, heads, kv_heads, vocab, hidden // heads)
    s = 2 if bf16 else 4
    per_token = (act.kept_per_layer(m, tp, hp, s, recompute) * layers
                 + act.model_extras_per_token(m, tp, s, True, True, 1, recompute, loss_chunk))
    return per_token * tokens


BENCH_MODEL = ["--hidden", "64", "--heads", "8", "--kv-heads", "2", "--ffn", "176", "--vocab", "300"]


def _measure(bench, argv: list[str], tp: int, cp: int, recompute: str) -> dict:
    cfg = bench.make_cfg(bench.parse_args(argv), tp, cp)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, recompute=recompute))
    return bench.measure(cfg, top=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_saved_activations_match_bench_memory_in_process(bf16):
    """Every recompute mode on one rank: the planner's bytes per token × tokens = what autograd
    saves in the forward (tools/bench_memory.py's hook), for 1 and 2 layers (so the per-layer and
    the per-model terms are each checked)."""
    bench = _bench()
    for layers in (1, 2):
        argv = ["--seq", "256", "--layers", str(layers)] + BENCH_MODEL + (["--bf16"] if bf16 else [])
        for recompute in act.RECOMPUTE:
            got = _measure(bench, argv, 1, 1, recompute)
            want = _predicted(layers, 64, 8, 2, 176, 300, bf16, 1, 1, got["tokens"], recompute)
            assert 0 <= got["bytes"] - want <= SLACK_BYTES, (layers, recompute, got["bytes"], want)


MESHES = (("ring", 2, 2, 1), ("ulysses", 1, 4, 4))  # sp_mode, tp, cp, hp


def _world_measure(rank, world):
    bench = _bench()
    out = []
    for mode, tp, cp, hp in MESHES:
        argv = ["--seq", "512", "--layers", "2", "--sp-mode", mode] + BENCH_MODEL
        for recompute in act.RECOMPUTE:
            got = _measure(bench, argv, tp, cp, recompute)
            out.append((mode, recompute, got["bytes"], got["tokens"]))
    return out


def test_saved_activations_match_bench_memory_across_ranks():
    """One world of 4 ranks: tp=2 × zigzag ring cp=2, and Ulysses cp=4 with its 2 KV heads
    replicated to hp=4, every recompute mode: each rank's saved bytes, per token it holds."""
    by_rank = run_world(4, _world_measure, timeout=600)
    for i, (mode, recompute, _, _) in enumerate(by_rank[0]):
        _, tp, _, hp = next(m for m in MESHES if m[0] == mode)
        for rank in by_rank:
            _, _, got, tokens = rank[i]
            want = _predicted(2, 64, 8, 2, 176, 300, False, tp, hp, tokens, recompute)
            assert 0 <= got - want <= SLACK_BYTES, (mode, recompute, got, want)


# -- monotonicity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2.5-7b", "llama3-70b", "mistral-7b"])
def test_more_cp_means_less_activation_memory_per_rank(name):
    m = KNOWN_MODELS[name]
    for recompute in act.RECOMPUTE:
        for hp_of in (lambda cp: 1, lambda cp: min(cp, 8)):  # ring, and Ulysses up to the heads
            run = Run(seq_len=65536, recompute=recompute)
            prev = None
            for cp in (1, 2, 4, 8, 16):
                hp = hp_of(cp)
                if (m.num_query_groups % hp and hp % m.num_query_groups) or m.num_attention_heads % hp:
                    continue
                phases, _ = stage_phases(m, Mesh(cp=cp, hp=hp), run, 0)
                acts = max(p["activations"] + p["loss"] + p["cp_buffers"] for k, p in phases.items() if k != "step")
                if prev is not None:
                    assert acts < prev, (name, recompute, cp, acts, prev)
                prev = acts


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_recompute_order_full_cached_selective_none(name):
    m = KNOWN_MODELS[name]
    for tp, hp in ((1, 1), (2, 1), (1, 4)):
        kept = {r: act.kept_per_layer(m, tp, hp, 2, r) * m.num_layers + act.rematerialised_per_token(m, tp, hp, 2, r)
                for r in act.RECOMPUTE}
        assert kept["full"] < kept["attention-cached"] < kept["selective"] < kept["none"], (name, tp, hp, kept)
    # whole ranks, where activations (not the model states) set the peak: a small model, long sequence
    for tp, hp in ((1, 1), (2, 1), (1, 4)):
        parts = {r: rank_memory(TINY, Mesh(tp=tp, cp=hp, hp=hp), Run(seq_len=65536, recompute=r), 80)
                 for r in ("full", "selective", "none")}
        assert all(p.phase in ("loss", "backward") for p in parts.values())
        acts = {r: p.parts["activations"] for r, p in parts.items()}
        assert acts["full"] < acts["selective"] < acts["none"], (tp, hp, acts)


def test_sharding_and_longer_sequences_order_memory():
    m = KNOWN_MODELS["llama3-8b"]
    mesh = Mesh(cp=2, dp=4)
    totals = [rank_memory(m, mesh, Run(seq_len=8192, sharding=s), 80).total for s in ("none", "zero1", "fsdp2")]
    assert totals[0] > totals[1] > totals[2]
    lengths = [rank_memory(m, mesh, Run(seq_len=n, recompute="full", sharding="fsdp2"), 80).total
               for n in (4096, 16384, 65536)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 3


# -- search, time, longest sequence ---------------------------------------------------------------
def test_candidate_meshes_are_valid_meshtron_configs():
    """Every mesh the planner tries passes engine.config.validate, and every valid one is tried."""
    m = dataclasses.replace(TINY, num_layers=4, num_query_groups=2)
    run = Run(seq_len=256, global_batch_size=8)
    meshes = set(candidate_meshes(m, 8, run))
    for tp in (1, 2, 4, 8):
        for cp in (1, 2, 4, 8):
            for hp in (1, 2, 4, 8):
                for pp in (1, 2, 4, 8):
                    if 8 % (tp * cp * pp) or cp % hp:
                        continue
                    mode = "ring" if hp == 1 else ("ulysses" if hp == cp else "hybrid")
                    cfg = Config(model=_model_config(m), train=TrainConfig(global_batch_size=8),
                                 parallel=ParallelConfig(tp=tp, cp=cp, hp=hp, pp=pp, sp_mode=mode),
                                 data=DataConfig(seq_len=256), optim=OptimConfig())
                    try:
                        validate(cfg, 8)
                        ok = True
                    except ConfigError:
                        ok = False
                    assert ok == (Mesh(tp, cp, hp, pp, 8 // (tp * cp * pp)) in meshes), (tp, cp, hp, pp)


def test_plan_is_fastest_first_and_every_row_fits():
    m = KNOWN_MODELS["qwen2.5-7b"]
    fits, tried = plan(m, 16, Run(seq_len=131072, recompute="full", global_batch_size=16), 80, DEVICES["a100"])
    assert 0 < len(fits) < tried
    times = [c.time["total"] for c in fits]
    assert times == sorted(times)
    assert all(c.memory.total <= 80 * GIB for c in fits)
    out = run_cli("--model", "qwen2.5-7b", "--gpus", "16", "--seq-len", "131072", "--top", "50")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["tp", "cp", "hp"]) + 1
    printed = [float(line.split()[-1]) for line in lines[start:]]
    assert len(printed) == 50 and printed == sorted(printed)


def test_step_time_compute_is_flops_over_rate():
    m, dev = KNOWN_MODELS["llama3-8b"], DEVICES["h100"]
    run = Run(seq_len=8192, global_batch_size=8)
    t = step_time(m, Mesh(dp=8), run, dev)
    f = flops_per_sequence(m, 8192)
    h, H, G, d, L = 4096, 32, 8, 128, 32
    assert f["attention"] == 2 * L * H * d * 8192**2
    assert f["qkv"] + f["proj"] + f["mlp"] + f["head"] == 8192 * (L * (2 * h * (H + 2 * G) * d + 2 * H * d * h
                                                                         + 6 * h * 14336) + 2 * h * 128256)
    lin = f["qkv"] + f["proj"] + f["mlp"] + f["head"]
    # the fused loss runs the output layer once more (its chunks' logits are rebuilt in backward)
    assert t["compute"] == pytest.approx(8 * ((3 * lin + f["head"]) / dev.linear_flops
                                              + 3.5 * f["attention"] / dev.attention_flops) / 8, rel=1e-12)
    tiled = step_time(m, Mesh(dp=8), dataclasses.replace(run, tile_mlp=4), dev)["compute"]
    assert tiled == pytest.approx(t["compute"] + f["mlp"] / dev.linear_flops, rel=1e-12)
    full = step_time(m, Mesh(dp=8), dataclasses.replace(run, recompute="full"), dev)["compute"]
    assert full == pytest.approx(t["compute"] + (lin - f["head"]) / dev.linear_flops
                                 + f["attention"] / dev.attention_flops, rel=1e-12)
    assert t["bubble"] == t["tp"] == t["ring"] == t["ulysses"] == t["pp"] == 0
    assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"), rel=1e-12)
    piped = step_time(m, Mesh(pp=4, dp=2), dataclasses.replace(run, global_batch_size=8), dev)
    assert piped["bubble"] == pytest.approx(piped["compute"] * 3 / 4, rel=1e-12)  # 4 micro-batches per dp rank


def test_max_seq_len_is_the_boundary():
    m = KNOWN_MODELS["qwen2.5-7b"]
    mesh, run = Mesh(tp=2, cp=4, hp=2, dp=1), Run(seq_len=2, recompute="full", sharding="zero1")
    best = max_seq_len(m, mesh, run, 80)
    unit = 2 * 4 * 2
    assert best > 0 and best % unit == 0
    assert rank_memory(m, mesh, dataclasses.replace(run, seq_len=best), 80).fits
    assert not rank_memory(m, mesh, dataclasses.replace(run, seq_len=best + unit), 80).fits
    more = max_seq_len(m, Mesh(tp=2, cp=8, hp=2, dp=1), run, 80)
    assert more > best  # more context parallelism holds a longer sequence
    assert tokens_per_rank(best, mesh) == best // 4


def test_max_seq_len_cli_searches_levers(tmp_path):
    """--max-seq-len on a pinned mesh and pinned recompute/sharding still turns the other levers
    (tiles, activation offload, optimizer offload): it reaches past the plain run's boundary, the
    JSON line is last, and --emit-config writes a config that validates for that world."""
    m = KNOWN_MODELS["qwen2.5-7b"]
    mesh, run = Mesh(tp=2, cp=4, hp=2, dp=1), Run(seq_len=2, recompute="full", sharding="zero1")
    plain = max_seq_len(m, mesh, run, 80)
    emitted = tmp_path / "long.yaml"
    out = run_cli("--model", "qwen2.5-7b", "--gpus", "8", "--max-seq-len", "--tp", "2", "--cp", "4", "--hp", "2",
                  "--recompute", "full", "--sharding", "zero1", "--emit-config", str(emitted))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    s = got["settings"]
    assert (s["tp"], s["cp"], s["hp"], s["recompute"], s["sharding"]) == (2, 4, 2, "full", "zero1")
    assert got["max_seq_len"] > plain and got["max_seq_len"] % 16 == 0
    assert got["peak_gib"] < 80 and got["host_gib_per_node"] <= 2048 and got["step_s"] > 0
    cfg = validate(load_config(str(emitted)), 8, files=False)
    assert (cfg.data.seq_len, cfg.train.recompute, cfg.optim.sharding) == (got["max_seq_len"], "full", "zero1")
    assert cfg.train.offload_activations == s["offload_activations"] and cfg.train.tile_mlp == s["tile_mlp"]


# -- models from files ----------------------------------------------------------------------------
def test_models_from_yaml_and_hf_config(tmp_path):
    known = KNOWN_MODELS["qwen2.5-7b"]
    from_yaml = resolve_model(str(ROOT / "configs" / "qwen2.5-7b-sft-128k.yaml"))
    assert dataclasses.replace(from_yaml, name=known.name) == known
    hf = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert dataclasses.replace(resolve_model(str(tmp_path)), name=known.name) == known
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == known
    assert resolve_model("meta-llama/Meta-Llama-3-8B") == KNOWN_MODELS["llama3-8b"]


# -- 360-LLaMA-Factory ----------------------------------------------------------------------------
def test_validate_360lf_table_and_exit_code():
    rows = lf360.validate()
    published = [(r["model"], r["recipe"], r["gpus"], r["sp"], r["published"] // 1024) for r in rows]
    assert published == [("qwen2.5-7b", "sft", 8, 8, 210), ("qwen2.5-14b", "sft", 8, 8, 175),
                         ("qwen2.5-72b", "sft", 32, 8, 128), ("qwen2.5-7b", "dpo", 8, 4, 32),
                         ("qwen2.5-7b", "dpo", 8, 8, 84), ("qwen2.5-14b", "dpo", 8, 4, 32),
                         ("qwen2.5-14b", "dpo", 8, 8, 72), ("qwen2.5-72b", "dpo", 32, 8, 46),
                         ("qwen2.5-72b", "dpo", 32, 16, 86)]
    for r in rows:  # each prediction is the largest fitting cutoff_len, a multiple of 8·sp
        m, unit = KNOWN_MODELS[r["model"]], 8 * r["sp"]
        assert r["predicted"] % unit == 0
        budget = lf360.usable_bytes()
        assert max(lf360.phases(m, r["recipe"], r["predicted"] // r["sp"]).values()) <= budget
        assert max(lf360.phases(m, r["recipe"], (r["predicted"] + unit) // r["sp"]).values()) > budget
        assert r["ok"] == (abs(r["predicted"] / r["published"] - 1) <= 0.10)
        need = max(lf360.phases(m, r["recipe"], r["published"] // r["sp"]).values())
        assert r["need_gib"] == need / lf360.GIB and (need <= budget) == (r["predicted"] >= r["published"])
    out = run_cli("--validate-360lf")
    table = [line.split() for line in out.stdout.splitlines() if line.startswith("qwen2.5-")]
    assert [(t[0], t[1], int(t[4]), int(t[5])) for t in table] == [
        (r["model"], r["recipe"], r["published"], r["predicted"]) for r in rows]
    assert out.returncode == 0  # a report since issue 14: the published rows contradict each other
    lo, hi = min(r["need_gib"] for r in rows), max(r["need_gib"] for r in rows)
    assert f"rows need {lo:.1f} (" in out.stdout and f"to {hi:.1f} GiB" in out.stdout


def test_360lf_components_exact():
    """The ZeRO-3 terms of the 360-LF model count real parameters: layers + embedding + lm_head + final
    norm equal the Qwen2.5 checkpoints' published parameter counts (safetensors totals), and the
    persistent set (numel < 10·h, DeepSpeed's "auto" stage3_param_persistence_threshold) is every
    RMSNorm weight and q/k/v bias. The loss phase's per-token slope is exactly 14·V (SFT) or 2·22·V
    (DPO, chosen + rejected) plus the kept checkpoints and the dummy forward's bf16 logits (2·V)."""
    published = {"qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "qwen2.5-72b": 72_706_203_648}
    for name, count in published.items():
        m = KNOWN_MODELS[name]
        h, V, L, d, G = m.hidden_size, m.vocab_size, m.num_layers, m.head_dim, m.num_query_groups
        assert lf360.layer_params(m) * L + 2 * V * h + h == count
        assert lf360.persistent_params(m) == L * (3 * h + 2 * G * d) + h
        for recipe, coeff in (("sft", 14), ("dpo", 2 * 22)):
            slope = lf360.phases(m, recipe, 1001)["loss"] - lf360.phases(m, recipe, 1000)["loss"]
            kept = (2 * h * L + 4 * d + 8 * h + 2 * V) * (2 if recipe == "dpo" else 1)  # + dummy logits
            assert slope == coeff * V + kept
    rows = lf360.validate()
    assert [r["example_setting"] for r in rows] == [r["recipe"] == "dpo" and r["sp"] == 4 for r in rows]
    assert "(a)" in run_cli("--validate-360lf").stdout


def test_published_7b_dpo_pair_rules_out_any_per_rank_model():
    """A rank holds 2·cutoff_len/sp tokens of a pair, so a model in which memory depends on the tokens
    per rank (and not on sp itself) predicts cutoff(sp=8) = 2·cutoff(sp=4) on the same 8 GPUs. The
    published 7B DPO maxima (32k at sp=4, 84k at sp=8) cannot then both be met within 10 %: the
    per-rank capacities they allow do not overlap. (For 14B, 32k and 72k, they do.)"""
    def capacity(cutoff_k, sp):  # per-rank tokens allowed by ±10 %
        return (0.9 * 2 * cutoff_k / sp, 1.1 * 2 * cutoff_k / sp)
    assert capacity(32, 4)[1] < capacity(84, 8)[0]
    assert capacity(72, 8)[0] < capacity(32, 4)[1]


# -- CLI errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,flag", [
    (["--gpus", "8", "--seq-len", "4096"], "--model"),
    (["--model", "qwen2.5-7b", "--gpus", "0", "--seq-len", "4096"], "--gpus"),
    (["--model", "no-such-model", "--gpus", "8", "--seq-len", "4096"], "--model"),
    (["--model", "qwen2.5-7b", "--gpus", "8"], "--seq-len"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--seq-len", "4096", "--tp", "3"], "--tp"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--seq-len", "4096", "--offload", "--sharding", "none"], "--offload"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--seq-len", "4096", "--vpp", "2"], "--vpp"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--seq-len", "4096", "--fragmentation", "1.5"], "--fragmentation"),
    (["--model", "qwen2.5-7b", "--gpus", "8", "--max-seq-len", "--tp", "2", "--hp", "2", "--cp", "1"], "--hp"),
])
def test_cli_errors_name_the_flag(args, flag, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshtron-plan: error: ") and flag in err[0], err


def test_cli_bad_config_file_names_model(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 64}))
    out = run_cli("--model", str(bad), "--gpus", "8", "--seq-len", "4096")
    assert out.returncode == 2 and "--model" in out.stderr and "num_hidden_layers" in out.stderr
