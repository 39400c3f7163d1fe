"""Run configuration: typed dataclasses from YAML plus `section.key=value` overrides.

`load_config` builds a `Config` and checks key names and value types; `validate` checks the
values and how they fit a world size, and resolves `parallel.dp=-1`. Both run before any
process group exists and raise `ConfigError` with a message that says what to change.
"""

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import yaml


class ConfigError(ValueError):
    """A mistake in the config file or on the command line; the message says the fix."""


@dataclass
class ModelConfig:
    arch: str = "llama"
    """Model family: "llama", "qwen2" or "mistral"."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    ffn_hidden_size: int = 176
    """Width of the SwiGLU MLP (each of gate and up)."""
    num_attention_heads: int = 8
    """Number of query heads."""
    num_query_groups: int = 4
    """Number of key/value heads (GQA); equal to num_attention_heads for plain multi-head."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size // num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times tp."""
    norm_epsilon: float = 1e-5
    """Epsilon of RMSNorm."""
    rotary_base: float = 10000.0
    """RoPE base frequency (HF: rope_theta)."""
    rope_scaling: dict | None = None
    """Llama-3 RoPE scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}; None for plain RoPE."""
    add_qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2 uses it)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    max_position_embeddings: int = 4096
    """Longest position the model is meant for (recorded in checkpoints)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    load: str | None = None
    """Checkpoint directory to load weights from; None starts from random weights."""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree; -1 uses the ranks left over by tp, pp and cp."""
    tp: int = 1
    """Tensor-parallel degree (with sequence-parallel activations)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    cp: int = 1
    """Context-parallel degree, hp * rp."""
    hp: int = 1
    """Head-parallel (Ulysses) degree inside cp; the ring degree is rp = cp // hp."""
    placement: str = "head-first"
    """Inside cp, "head-first" puts the hp ranks next to each other, "context-first" the ring."""
    order: str = "tp-cp-dp-pp"
    """Order of the axes on the ranks, innermost (neighbouring ranks) first, joined by '-'."""

    @property
    def rp(self) -> int:
        return self.cp // self.hp


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 2
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainConfig:
    steps: int = 10
    """Number of optimizer steps."""
    seed: int = 1234
    """Seed of weights initialisation and synthetic data."""
    output_dir: str = "runs/default"
    """Where metrics, the resolved config and checkpoints are written."""
    global_batch_size: int = 8
    """Sequences per optimizer step, the same for every mesh."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on each dp rank."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 master weights."""
    log_interval: int = 1
    """Log metrics every this many steps."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """Where sequences come from; only "synthetic" for now."""
    seq_len: int = 256
    """Tokens per packed sequence (LLaMA-Factory: cutoff_len)."""
    min_doc_len: int = 8
    """Shortest synthetic document, in tokens."""
    max_doc_len: int = 200
    """Longest synthetic document, in tokens."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: "auto" (nccl when CUDA is available, else gloo), "gloo" or "nccl"."""
    timeout_s: float = 300.0
    """Collective timeout in seconds; a dead rank ends the run after this."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Degrees and layout of the device mesh."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data pipeline."""
    dist: DistConfig = field(default_factory=DistConfig)
    """torch.distributed settings."""


# Keys of other tools (LLaMA-Factory) accepted at the top level of the YAML and as overrides
# without a section -> the dotted key they set, or a function (raw_nested_dict, value) -> None
# for keys that map onto several fields; such a function raises ConfigError itself when the
# dict already holds a different value. A dotted key on the command line wins over a function.
ALIASES: dict[str, str | Callable[[dict, Any], None]] = {
    "cutoff_len": "data.seq_len",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML at `path` (None: defaults), apply `section.key=value` overrides, type-check."""
    raw = _read_yaml(path) if path is not None else {}
    _move_aliases(raw, {k: raw.pop(k) for k in list(raw) if k in ALIASES}, raw, f"in {path}")
    pairs = [_parse_override(text) for text in overrides]
    given: dict = {}
    for key, value in pairs:
        if key not in ALIASES:
            _set(given, key, value)
    # Aliases first, so that an explicit dotted key beside a function alias wins.
    _move_aliases(raw, {k: v for k, v in pairs if k in ALIASES}, given, "on the command line")
    for key, value in pairs:
        if key not in ALIASES:
            _set(raw, key, value)
    return _build(raw)


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict | None):
        raise ConfigError(f"config file {path!r} must be a mapping of sections (model:, "
                          f"parallel:, ...), not a {type(raw).__name__}")
    return raw or {}


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _parse_override(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key.strip()):
        raise ConfigError(f"malformed override {text!r}; write section.key=value, "
                          f"e.g. parallel.tp=2")
    try:
        return key.strip(), yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {text!r}: "
                          f"{_yaml_problem(e)}") from None


def _move_aliases(raw: dict, aliased: dict, given: dict, where: str) -> None:
    """Write alias values into `raw`; an error if `given` sets the target to something else."""
    for name, value in aliased.items():
        target = ALIASES[name]
        if callable(target):
            target(raw, value)
            continue
        section, leaf = target.split(".")
        current = given[section].get(leaf, value) if isinstance(given.get(section), dict) else value
        if current != value:
            raise ConfigError(f"{name}={value!r} and {target}={current!r} are both given {where}; "
                              f"{name} is an alias of {target}, keep one")
        _set(raw, target, value)


def _set(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parents[:i + 1])!r} is not a mapping")
    node[leaf] = value


def _build(raw: dict) -> Config:
    sections = {f.name: f.type for f in fields(Config)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise _unknown_key(str(name))
        if not isinstance(values, dict | None):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {values!r}")
        annotations = {f.name: f.type for f in fields(sections[name])}
        kwargs = {}
        for key, value in (values or {}).items():
            if key not in annotations:
                raise _unknown_key(f"{name}.{key}")
            kwargs[key] = _coerce(f"{name}.{key}", value, annotations[key])
        built[name] = sections[name](**kwargs)
    return Config(**built)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` as the annotated type (an int becomes a float for a float field), or an error."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for t in typing.get_args(annotation) if union else (annotation,):
        if value is None and t is type(None):
            return None
        if isinstance(value, bool) and t is not bool:
            continue  # bool is an int subclass; `true` is never a number here
        if t is float and isinstance(value, int | float):
            return float(value)
        if t is not type(None) and isinstance(value, t):
            return value
    expected = getattr(annotation, "__name__", str(annotation)).replace("NoneType", "None")
    raise ConfigError(f"{key}={value!r} must be {expected}, got {type(value).__name__}")


def _unknown_key(key: str) -> ConfigError:
    sections = [f.name for f in fields(Config)]
    dotted = [f"{s.name}.{f.name}" for s in fields(Config) for f in fields(s.type)]
    section, _, leaf = key.rpartition(".")
    # A field name put in the wrong section (or in none) points at its real section; a typo is
    # matched against the names of its own section first, then against every name.
    close = [d for d in dotted if d.endswith("." + leaf)]
    own = {d.split(".")[1]: d for d in dotted if d.startswith(section + ".")}
    every = {d.split(".")[1]: d for d in dotted}
    if not section:
        every.update({**{s: s for s in sections}, **{a: a for a in ALIASES}})
    for names in (own, every):
        close += [names[c] for c in difflib.get_close_matches(leaf, names, n=1)]
    if close:
        return ConfigError(f"unknown key {key!r}; did you mean {close[0]!r}?")
    if section:
        return ConfigError(f"unknown key {key!r}; valid keys of {section!r} are {', '.join(own)}")
    return ConfigError(f"unknown key {key!r}; valid sections are {', '.join(sections)}, "
                       f"and top-level aliases {', '.join(ALIASES)}")


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict of `cfg`; `load_config` of its YAML gives back an equal Config."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into the config path (the argument ending in .yaml/.yml) and the overrides."""
    path, overrides = None, []
    for arg in argv:
        if "=" not in arg and arg.endswith((".yaml", ".yml")) and path is None:
            path = arg
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}; expected one .yaml config file and "
                              f"section.key=value overrides, e.g. parallel.tp=2")
    return path, overrides


# --- validation: every check in one place, each message says what to change -----------------

_AT_LEAST_ONE = ("model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
                 "model.num_attention_heads", "model.num_query_groups", "model.vocab_size",
                 "model.make_vocab_size_divisible_by", "model.max_position_embeddings",
                 "parallel.tp", "parallel.pp", "parallel.cp", "parallel.hp", "train.steps",
                 "train.global_batch_size", "train.micro_batch_size", "train.log_interval")
_POSITIVE = ("model.norm_epsilon", "model.rotary_base", "model.init_method_std", "optim.lr",
             "optim.eps", "dist.timeout_s")
_NON_NEGATIVE = ("optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip_grad")
_CHOICES = {"model.arch": ("llama", "qwen2", "mistral"), "data.source": ("synthetic",),
            "parallel.placement": ("head-first", "context-first"),
            "dist.backend": ("auto", "gloo", "nccl")}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def validate(cfg: Config, world_size: int) -> Config:
    """Check `cfg` for `world_size` ranks; return a copy with `parallel.dp` resolved."""
    assert world_size >= 1, world_size
    _check_values(cfg)
    _check_model(cfg.model, cfg.parallel)  # before the world size: a model-vs-degree error is the root cause
    dp = _resolve_dp(cfg.parallel, world_size)
    _check_batch_and_data(cfg, dp)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp))


def _check_values(cfg: Config) -> None:
    def value(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, allowed in _CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"{key}={value(key)!r} is not supported; use {key}={_list(allowed)}")
    for keys, rule, ok in ((_AT_LEAST_ONE, ">= 1", lambda v: v >= 1),
                           (_POSITIVE, "> 0", lambda v: v > 0),
                           (_NON_NEGATIVE, ">= 0", lambda v: v >= 0),
                           (("optim.beta1", "optim.beta2"), "in [0, 1)", lambda v: 0 <= v < 1)):
        for key in keys:
            if not ok(value(key)):
                raise ConfigError(f"{key}={value(key)} must be {rule}")
    if cfg.model.kv_channels is not None and cfg.model.kv_channels < 1:
        raise ConfigError(f"model.kv_channels={cfg.model.kv_channels} must be >= 1, or null")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}; "
                          f"lower min_lr or raise lr")
    p = cfg.parallel
    if p.dp < 1 and p.dp != -1:
        raise ConfigError(f"parallel.dp={p.dp} must be >= 1, or -1 for the ranks left over")
    if sorted(p.order.split("-")) != ["cp", "dp", "pp", "tp"]:
        raise ConfigError(f"parallel.order={p.order!r} must name each of tp, cp, dp, pp once, "
                          f"joined by '-', innermost first, e.g. 'tp-cp-dp-pp'")
    if p.cp % p.hp:
        raise ConfigError(f"parallel.hp={p.hp} does not divide parallel.cp={p.cp}; use "
                          f"parallel.hp={_list(_divisors(p.cp))}")


def _resolve_dp(p: ParallelConfig, world_size: int) -> int:
    inner = p.tp * p.pp * p.cp
    if world_size % inner:
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*"
                          f"{p.cp} = {inner}; change parallel.tp, pp or cp, or run on a multiple "
                          f"of {inner} ranks")
    if p.dp != -1 and p.dp * inner != world_size:
        raise ConfigError(f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} = {inner * p.dp} does not "
                          f"match world size {world_size}; set parallel.dp={world_size // inner} "
                          f"(or -1)")
    return world_size // inner


def _check_model(m: ModelConfig, p: ParallelConfig) -> None:
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads % groups:
        raise ConfigError(f"model.num_query_groups={groups} does not divide "
                          f"model.num_attention_heads={heads}; "
                          f"use model.num_query_groups={_list(_divisors(heads))}")
    if heads % p.tp or groups % p.tp:
        name, n = ("num_attention_heads", heads) if heads % p.tp else ("num_query_groups", groups)
        raise ConfigError(f"parallel.tp={p.tp} does not divide model.{name}={n}; use "
                          f"parallel.tp={_list(_divisors(groups))}"
                          + (f" (tp must divide both num_attention_heads={heads} and "
                             f"num_query_groups={groups})" if groups != heads else ""))
    if heads % (p.tp * p.hp):
        hp_ok = [h for h in _divisors(p.cp) if heads % (p.tp * h) == 0]
        raise ConfigError(f"tp*hp = {p.tp}*{p.hp} = {p.tp * p.hp} does not divide "
                          f"model.num_attention_heads={heads}; with tp={p.tp}, cp={p.cp} use "
                          f"parallel.hp={_list(hp_ok)}")
    if p.pp > m.num_layers:
        raise ConfigError(f"parallel.pp={p.pp} is more than model.num_layers={m.num_layers}; use "
                          f"pp <= {m.num_layers}")
    if m.kv_channels is None and m.hidden_size % heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={heads}; set model.kv_channels or use "
                          f"model.hidden_size={_list(_near_multiples(m.hidden_size, heads))}")
    rs = m.rope_scaling
    if rs is not None and rs.get("rope_type") != "llama3":
        raise ConfigError(f"model.rope_scaling.rope_type={rs.get('rope_type')!r} is not supported; "
                          f"use 'llama3', or model.rope_scaling=null")
    bad = [k for k in _LLAMA3_KEYS if rs is not None and
           (isinstance(rs.get(k), bool) or not isinstance(rs.get(k), int | float))]
    if bad:
        raise ConfigError(f"model.rope_scaling with rope_type 'llama3' needs a number for each "
                          f"of {', '.join(bad)}")


def _check_batch_and_data(cfg: Config, dp: int) -> None:
    t, d, p = cfg.train, cfg.data, cfg.parallel
    per_step = dp * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"dp*micro_batch_size = {dp}*{t.micro_batch_size} = {per_step}; use "
                          f"train.global_batch_size="
                          f"{_list(_near_multiples(t.global_batch_size, per_step))}")
    if d.seq_len < 2:
        raise ConfigError(f"data.seq_len={d.seq_len} must be >= 2")
    # cp cuts every sequence into 2*cp zigzag chunks, then tp's sequence parallelism splits them.
    unit, why = (2 * p.cp * p.tp, f"2*cp*tp = 2*{p.cp}*{p.tp} = ") if p.cp > 1 else (p.tp, "tp=")
    if d.seq_len % unit:
        raise ConfigError(f"data.seq_len={d.seq_len} is not divisible by {why}{unit}; use "
                          f"data.seq_len={_list(_near_multiples(d.seq_len, unit))}")
    if min(d.min_doc_len, d.max_doc_len) < 2 or d.min_doc_len > d.max_doc_len:
        raise ConfigError(f"data.min_doc_len={d.min_doc_len} and data.max_doc_len={d.max_doc_len} "
                          f"must satisfy 2 <= min_doc_len <= max_doc_len")


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _near_multiples(n: int, unit: int) -> list[int]:
    below = n // unit * unit
    return [m for m in (below, below + unit) if m > 0]


def _list(values) -> str:
    *rest, last = map(str, values)
    return f"{', '.join(rest)} or {last}" if rest else last
