"""engine/config.py: YAML + overrides, type and key checks, aliases, validation messages."""

import ast
import dataclasses
import inspect
import re

import pytest

from engine import config as C
from engine.config import (ALIASES, Config, ConfigError, config_to_dict, dump_yaml, load_config,
                           parse_cli, validate)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(overrides=(), world_size=None, path=None):
    """The ConfigError message of loading (and, with a world size, validating) a config."""
    with pytest.raises(ConfigError) as info:
        cfg = load_config(path, overrides)
        if world_size is not None:
            validate(cfg, world_size)
    return str(info.value)


def valid(overrides=(), world_size=1):
    return validate(load_config(None, overrides), world_size)


# --- loading ---------------------------------------------------------------------------------

def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.head_dim == 64 // 8
    assert cfg.parallel.rp == 1 and cfg.parallel.dp == -1


def test_yaml_file_sets_values_and_keeps_other_defaults(tmp_path):
    path = write(tmp_path, """
model:
  num_layers: 4
  kv_channels: 32
  rope_scaling: {rope_type: llama3, factor: 8, low_freq_factor: 1,
                 high_freq_factor: 4, original_max_position_embeddings: 8192}
parallel: {tp: 2, cp: 4, hp: 2}
optim:
  lr: 3e-4
  min_lr: 0
train:
  bf16: true
""")
    cfg = load_config(path)
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64
    assert cfg.model.head_dim == 32
    assert cfg.model.rope_scaling["factor"] == 8
    assert cfg.parallel.rp == 2
    # `3e-4` is a string to plain YAML 1.1; a float field must still get a float
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.min_lr == 0.0 and type(cfg.optim.min_lr) is float
    assert cfg.train.bf16 is True


def test_empty_file_and_empty_section_are_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "model:\n", "b.yaml")) == Config()


def test_file_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert error(path=missing) == f"config file {missing!r} not found"
    bad = write(tmp_path, "model:\n  num_layers: [1\n")
    assert error(path=bad).startswith(f"config file {bad!r} is not valid YAML: ")
    assert "line" in error(path=bad)
    listing = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert error(path=listing) == (f"config file {listing!r} must be a mapping of sections "
                                   f"(model:, parallel:, ...), not a list")


def test_section_must_be_a_mapping(tmp_path):
    assert error(path=write(tmp_path, "model: 3\n")) == \
        "section 'model' must be a mapping of keys, got 3"


# --- overrides -------------------------------------------------------------------------------

def test_overrides_parse_values_as_yaml():
    cfg = load_config(None, ["model.num_layers=3", "optim.lr=1e-3", "train.bf16=true",
                             "model.kv_channels=null", "model.rope_scaling={a: 1}",
                             "optim.clip_grad=2", "train.output_dir=runs/x"])
    assert cfg.model.num_layers == 3
    assert cfg.optim.lr == 1e-3
    assert cfg.train.bf16 is True
    assert cfg.model.kv_channels is None
    assert cfg.model.rope_scaling == {"a": 1}
    assert cfg.optim.clip_grad == 2.0 and type(cfg.optim.clip_grad) is float
    assert cfg.train.output_dir == "runs/x"


def test_overrides_win_over_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path, "model: {num_layers: 4, hidden_size: 128}\n")
    cfg = load_config(path, ["model.num_layers=6", "model.num_layers=8"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (8, 128)


def test_override_into_a_dict_field(tmp_path):
    path = write(tmp_path, "model: {rope_scaling: {rope_type: llama3, factor: 8}}\n")
    cfg = load_config(path, ["model.rope_scaling.factor=16"])
    assert cfg.model.rope_scaling == {"rope_type": "llama3", "factor": 16}


@pytest.mark.parametrize("text", ["foo", "=3", "model..x=1", "model.=2", "1model.x=2"])
def test_malformed_override_is_quoted(text):
    assert error([text]) == (f"malformed override {text!r}; write section.key=value, "
                             f"e.g. parallel.tp=2")


def test_unparsable_override_value_is_quoted():
    assert error(["model.rope_scaling=[1"]).startswith(
        "cannot parse the value of override 'model.rope_scaling=[1': ")


def test_setting_inside_a_scalar_is_an_error(tmp_path):
    path = write(tmp_path, "train: {steps: 3}\n")
    assert error(["train.steps.x=1"], path=path) == \
        "cannot set 'train.steps.x': 'train.steps' is not a mapping"


# --- unknown keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("key, suggestion", [
    ("parallel.tpp", "parallel.tp"),       # typo in a field
    ("modle", "model"),                    # typo in a section
    ("train.seq_len", "data.seq_len"),     # right field, wrong section
    ("steps", "train.steps"),              # field without its section
    ("tpp", "parallel.tp"),
    ("optim.lrr", "optim.lr"),
    ("cutof_len", "cutoff_len"),           # typo in an alias
])
def test_unknown_key_suggests_the_closest(key, suggestion):
    assert error([f"{key}=1"]) == f"unknown key {key!r}; did you mean {suggestion!r}?"


def test_unknown_key_in_yaml_suggests_the_closest(tmp_path):
    path = write(tmp_path, "parallel:\n  tpp: 2\n")
    assert error(path=path) == "unknown key 'parallel.tpp'; did you mean 'parallel.tp'?"


def test_unknown_key_with_nothing_close_lists_the_section():
    assert error(["parallel.zzzz=1"]) == ("unknown key 'parallel.zzzz'; valid keys of 'parallel' "
                                          "are dp, tp, pp, cp, hp, sp_mode, ring_window, pp_schedule, vpp, seq_chunks, "
                                          "seq_partition, layers_per_stage, placement, order")
    assert error(["zzzz=1"]) == ("unknown key 'zzzz'; valid sections are recipe, model, parallel, optim, "
                                 "train, data, dist, checkpoint, dpo, flexsp, hardware, and top-level aliases cutoff_len, sequence_parallel_size, "
                                 "sequence_parallel_mode, sequence_parallel_ulysses_degree, "
                                 "sequence_parallel_ring_degree, report_to")


# --- types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("model.num_layers=2.5", "model.num_layers=2.5 must be int, got float"),
    ("model.num_layers=x", "model.num_layers='x' must be int, got str"),
    ("model.num_layers=true", "model.num_layers=True must be int, got bool"),
    ("model.num_layers=null", "model.num_layers=None must be int, got NoneType"),
    ("optim.lr=fast", "optim.lr='fast' must be float, got str"),
    ("optim.lr=false", "optim.lr=False must be float, got bool"),
    ("train.bf16=1", "train.bf16=1 must be bool, got int"),
    ("model.arch=3", "model.arch=3 must be str, got int"),
    ("model.kv_channels=2.5", "model.kv_channels=2.5 must be int | None, got float"),
    ("model.rope_scaling=[1, 2]", "model.rope_scaling=[1, 2] must be dict | None, got list"),
])
def test_type_errors_name_key_value_and_type(override, message):
    assert error([override]) == message


def test_optional_fields_accept_none_and_their_type():
    cfg = load_config(None, ["model.kv_channels=16", "model.load=ckpt/dir"])
    assert cfg.model.kv_channels == 16 and cfg.model.load == "ckpt/dir"
    assert load_config(None, ["model.kv_channels=null"]).model.kv_channels is None


# --- aliases ---------------------------------------------------------------------------------

def test_cutoff_len_alias_in_yaml_and_as_override(tmp_path):
    assert ALIASES["cutoff_len"] == "data.seq_len"
    assert load_config(write(tmp_path, "cutoff_len: 512\n")).data.seq_len == 512
    assert load_config(None, ["cutoff_len=1024"]).data.seq_len == 1024
    # the command line overrides the file, whichever name each uses
    path = write(tmp_path, "data: {seq_len: 64}\n", "b.yaml")
    assert load_config(path, ["cutoff_len=128"]).data.seq_len == 128
    # the same value under both names is fine
    same = write(tmp_path, "cutoff_len: 64\ndata: {seq_len: 64}\n", "c.yaml")
    assert load_config(same).data.seq_len == 64


def test_alias_and_target_with_different_values_is_an_error(tmp_path):
    path = write(tmp_path, "cutoff_len: 512\ndata: {seq_len: 256}\n")
    assert error(path=path) == (f"cutoff_len=512 and data.seq_len=256 are both given in {path}; "
                                f"cutoff_len is an alias of data.seq_len, keep one")
    assert error(["data.seq_len=256", "cutoff_len=512"]) == (
        "cutoff_len=512 and data.seq_len=256 are both given on the command line; "
        "cutoff_len is an alias of data.seq_len, keep one")


def test_function_alias_edits_the_raw_dict(monkeypatch):
    def sp_size(raw, value):
        raw.setdefault("parallel", {})["cp"] = value

    monkeypatch.setitem(ALIASES, "sequence_parallel_size", sp_size)
    assert load_config(None, ["sequence_parallel_size=4"]).parallel.cp == 4
    # an explicit dotted key wins over a function alias
    assert load_config(None, ["parallel.cp=2", "sequence_parallel_size=4"]).parallel.cp == 2


# --- validation ------------------------------------------------------------------------------

def test_valid_config_resolves_dp():
    cfg = load_config(None, ["parallel.tp=2", "parallel.cp=2", "data.seq_len=256"])
    out = validate(cfg, 8)
    assert out.parallel.dp == 2 and cfg.parallel.dp == -1  # a copy; the input is untouched
    assert dataclasses.replace(out, parallel=cfg.parallel) == cfg
    assert valid(["parallel.dp=4"], world_size=4).parallel.dp == 4


@pytest.mark.parametrize("overrides, world_size, message", [
    (["parallel.tp=0"], 1, "parallel.tp=0 must be >= 1"),
    (["parallel.pp=-1"], 1, "parallel.pp=-1 must be >= 1"),
    (["parallel.dp=0"], 1, "parallel.dp=0 must be >= 1, or -1 for the ranks left over"),
    (["parallel.cp=4", "parallel.hp=3"], 4,
     "parallel.hp=3 does not divide parallel.cp=4; use parallel.hp=1, 2 or 4"),
    (["parallel.tp=4"], 6, "world size 6 is not divisible by tp*pp*cp = 4*1*1 = 4; change "
                           "parallel.tp, pp or cp, or run on a multiple of 4 ranks"),
    (["parallel.tp=2", "parallel.dp=2"], 8,
     "tp*pp*cp*dp = 2*1*1*2 = 4 does not match world size 8; set parallel.dp=4 (or -1)"),
    (["parallel.tp=3", "model.num_attention_heads=9", "model.num_query_groups=9",
      "model.hidden_size=72", "data.seq_len=255"], 3, None),
    (["parallel.tp=3"], 3, "parallel.tp=3 does not divide model.num_attention_heads=8; use "
                           "parallel.tp=1, 2 or 4 (tp must divide both num_attention_heads=8 and "
                           "num_query_groups=4)"),
    (["parallel.tp=8"], 8, "parallel.tp=8 does not divide model.num_query_groups=4; use "
                           "parallel.tp=1, 2 or 4 (tp must divide both num_attention_heads=8 and "
                           "num_query_groups=4)"),
    (["model.num_query_groups=8", "parallel.tp=3"], 3,
     "parallel.tp=3 does not divide model.num_attention_heads=8; use parallel.tp=1, 2, 4 or 8"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups=3 does not divide "
                                      "model.num_attention_heads=8; use model.num_query_groups="
                                      "1, 2, 4 or 8"),
    (["parallel.tp=4", "parallel.cp=4", "parallel.sp_mode=ulysses"], 16,
     "tp*hp = 4*4 = 16 does not divide model.num_attention_heads=8; with tp=4, cp=4 use "
     "parallel.sp_mode=ring, or parallel.sp_mode=hybrid with parallel.hp=2 (ulysses puts all cp ranks on heads)"),
    (["parallel.pp=3"], 3, "parallel.pp=3 is more than model.num_layers=2; use pp <= 2"),
    (["train.global_batch_size=10"], 4, "train.global_batch_size=10 is not divisible by "
     "dp*micro_batch_size = 4*1 = 4; use train.global_batch_size=8 or 12"),
    (["train.global_batch_size=2", "train.micro_batch_size=2"], 2,
     "train.global_batch_size=2 is not divisible by dp*micro_batch_size = 2*2 = 4; use "
     "train.global_batch_size=4"),
    (["data.seq_len=1"], 1, "data.seq_len=1 must be >= 2"),
    (["data.seq_len=100", "parallel.cp=4"], 4, "data.seq_len=100 is not divisible by "
                                               "2*cp*tp = 2*4*1 = 8; use data.seq_len=96 or 104"),
    (["data.seq_len=100", "parallel.cp=2", "parallel.tp=2"], 4,
     "data.seq_len=100 is not divisible by 2*cp*tp = 2*2*2 = 8; use data.seq_len=96 or 104"),
    (["data.seq_len=101", "parallel.tp=2"], 2,
     "data.seq_len=101 is not divisible by tp=2; use data.seq_len=100 or 102"),
    (["data.min_doc_len=50", "data.max_doc_len=10"], 1,
     "data.min_doc_len=50 and data.max_doc_len=10 must satisfy 2 <= min_doc_len <= max_doc_len"),
    (["data.min_doc_len=1"], 1,
     "data.min_doc_len=1 and data.max_doc_len=200 must satisfy 2 <= min_doc_len <= max_doc_len"),
    (["parallel.placement=ring"], 1, "parallel.placement='ring' is not supported; use "
                                     "parallel.placement=head-first or context-first"),
    (["parallel.order=tp-dp-pp"], 1, "parallel.order='tp-dp-pp' must name each of tp, cp, dp, "
                                     "pp once, joined by '-', innermost first, e.g. 'tp-cp-dp-pp'"),
    (["parallel.order=tp,cp,dp,pp"], 1, "parallel.order='tp,cp,dp,pp' must name each of tp, cp, "
                                        "dp, pp once, joined by '-', innermost first, e.g. "
                                        "'tp-cp-dp-pp'"),
    (["model.arch=gpt"], 1, "model.arch='gpt' is not supported; use model.arch=llama, qwen2, qwen3 "
                            "or mistral"),
    (["dist.backend=mpi"], 1, "dist.backend='mpi' is not supported; use dist.backend=auto, gloo "
                              "or nccl"),
    (["data.source=hf"], 1, "data.source='hf' is not supported; use data.source=synthetic or files"),
    (["optim.lr=0"], 1, "optim.lr=0.0 must be > 0"),
    (["optim.lr=-1e-3", "optim.min_lr=0"], 1, "optim.lr=-0.001 must be > 0"),
    (["train.steps=0"], 1, "train.steps=0 must be >= 1"),
    (["optim.min_lr=-1"], 1, "optim.min_lr=-1.0 must be >= 0"),
    (["optim.min_lr=0.1"], 1, "optim.min_lr=0.1 is above optim.lr=0.001; lower min_lr or raise lr"),
    (["optim.beta2=1"], 1, "optim.beta2=1.0 must be in [0, 1)"),
    (["model.kv_channels=0"], 1, "model.kv_channels=0 must be >= 1, or null"),
    (["model.hidden_size=100"], 1, "model.hidden_size=100 is not divisible by "
                                   "model.num_attention_heads=8; set model.kv_channels or use "
                                   "model.hidden_size=96 or 104"),
    (["model.rope_scaling={rope_type: yarn, factor: 4}"], 1,
     "model.rope_scaling.rope_type='yarn' is not supported; use 'llama3', or "
     "model.rope_scaling=null"),
    (["model.rope_scaling={rope_type: llama3, factor: 8, low_freq_factor: x}"], 1,
     "model.rope_scaling with rope_type 'llama3' needs a number for each of low_freq_factor, "
     "high_freq_factor, original_max_position_embeddings"),
])
def test_validation_messages_say_what_to_change(overrides, world_size, message):
    if message is None:  # a control: the same kind of setting, valid
        valid(overrides, world_size)
        return
    assert error(overrides, world_size) == message


def test_validation_accepts_what_it_suggests():
    valid(["model.hidden_size=100", "model.kv_channels=16"])  # head dim given explicitly
    valid(["parallel.tp=2", "parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.order=pp-dp-cp-tp",
           "parallel.placement=context-first", "data.seq_len=8"], world_size=8)
    valid(["parallel.pp=2", "optim.min_lr=0", "optim.lr=1e-3", "optim.clip_grad=0"], 2)
    valid(["model.kv_channels=null", "model.rope_scaling={rope_type: llama3, factor: 8, "
           "low_freq_factor: 1, high_freq_factor: 4.0, original_max_position_embeddings: 8192}"])


# --- round trip, CLI, documentation ----------------------------------------------------------

def test_missing_input_paths_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="model.load=.*nope does not exist"):
        validate(load_config(None, [f"model.load={tmp_path / 'nope'}"]), 1)
    with pytest.raises(ConfigError, match="train.resume=.*nope does not exist"):
        validate(load_config(None, [f"train.resume={tmp_path / 'nope'}"]), 1)


def test_round_trip_through_yaml(tmp_path):
    rope = ("{rope_type: llama3, factor: 8.0, low_freq_factor: 1, high_freq_factor: 4, "
            "original_max_position_embeddings: 8192}")
    (tmp_path / "ckpt").mkdir()
    cfg = load_config(None, [f"model.rope_scaling={rope}",
                             "model.norm_epsilon=1e-6", "optim.eps=1e-8", "parallel.tp=2",
                             f"model.load={tmp_path / 'ckpt'}", "train.bf16=true"])
    raw = config_to_dict(cfg)
    assert raw["model"]["rope_scaling"]["factor"] == 8.0
    assert raw["parallel"]["tp"] == 2 and set(raw) == {"model", "parallel", "optim", "train",
                                                       "data", "dist", "checkpoint", "recipe", "dpo", "flexsp",
                                                           "hardware"}
    path = str(tmp_path / "resolved.yaml")
    dump_yaml(cfg, path)
    assert load_config(path) == cfg
    resolved = validate(cfg, 4)
    dump_yaml(resolved, path)
    assert load_config(path) == resolved


def test_parse_cli():
    assert parse_cli([]) == (None, [])
    assert parse_cli(["configs/tiny.yaml", "parallel.tp=2", "cutoff_len=64"]) == \
        ("configs/tiny.yaml", ["parallel.tp=2", "cutoff_len=64"])
    assert parse_cli(["parallel.tp=2", "a.yml"]) == ("a.yml", ["parallel.tp=2"])
    assert parse_cli(["train.output_dir=out.yaml"]) == (None, ["train.output_dir=out.yaml"])
    for bad in (["a.yaml", "b.yaml"], ["a.yaml", "tp"], ["--help"], ["--parallel.tp=2"]):
        with pytest.raises(ConfigError, match=re.escape(f"unexpected argument {bad[-1]!r}; "
                                                        f"expected one .yaml config file")):
            parse_cli(bad)


def test_every_field_has_a_docstring():
    for cls in (Config, C.ModelConfig, C.ParallelConfig, C.OptimConfig, C.TrainConfig,
                C.DataConfig, C.DistConfig):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for stmt, after in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign):
                assert isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str), f"{cls.__name__}.{stmt.target.id}"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("overrides,reason", [
    (["parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"], "log-sigmoid of whole-sequence"),
    (["parallel.sp_mode=flexsp", "parallel.cp=2"], "couples a pair's chosen and rejected"),
])
def test_restrictions_say_why(overrides, reason):
    """The README's restrictions: each refused before any work, with its reason in the error."""
    with pytest.raises(ConfigError, match=reason):
        validate(load_config(None, ["recipe=dpo"] + overrides), 2)


def test_llama_factory_report_to(monkeypatch):
    """LLaMA-Factory's report_to: tensorboard / wandb (project from WANDB_PROJECT) / none / all."""
    monkeypatch.setenv("WANDB_PROJECT", "lf-proj")
    cfg = load_config(None, ["report_to=wandb"])
    assert cfg.train.wandb_project == "lf-proj" and cfg.train.tensorboard is False
    cfg = load_config(None, ["report_to=all"])
    assert cfg.train.wandb_project == "lf-proj" and cfg.train.tensorboard is True
    assert load_config(None, ["report_to=none"]).train.tensorboard is False
    with pytest.raises(ConfigError, match="report_to='mlflow' is not supported"):
        load_config(None, ["report_to=mlflow"])
    # an explicit dotted key beside the alias wins, as for the other aliases
    assert load_config(None, ["report_to=tensorboard", "train.tensorboard=false"]).train.tensorboard is False
