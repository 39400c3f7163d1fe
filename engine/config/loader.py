"""YAML + `section.key=value` overrides + aliases -> typed `Config` (key names and types checked)."""

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import fields
from typing import Any, Callable, Sequence

import yaml

from engine.config.hf_model import with_hf_model
from engine.config.schema import Config, ConfigError

def _lf_mode(raw: dict, value: Any) -> None:
    modes = {"zigzag-ring": "ring", "ulysses": "ulysses", "usp": "hybrid"}
    if value not in modes:
        raise ConfigError(f"sequence_parallel_mode={value!r} is not supported; use "
                          f"{', '.join(modes)} (or parallel.sp_mode=ring|ulysses|hybrid)")
    _set_once(raw, "parallel.sp_mode", modes[value], "sequence_parallel_mode")


def _lf_ring_degree(raw: dict, value: Any) -> None:
    """USP's ring degree is implied by cp / hp; only check it is consistent."""
    par = raw.get("parallel") or {}
    cp, hp = par.get("cp"), par.get("hp")
    if cp and hp and cp // hp != value:
        raise ConfigError(f"sequence_parallel_ring_degree={value} but sequence_parallel_size / "
                          f"sequence_parallel_ulysses_degree = {cp}/{hp} = {cp // hp}; make them agree")
    if hp and not cp:
        _set_once(raw, "parallel.cp", hp * value, "sequence_parallel_ring_degree")


def _lf_report_to(raw: dict, value: Any) -> None:
    """LLaMA-Factory's ``report_to`` (transformers' integrations): tensorboard -> train.tensorboard,
    wandb -> train.wandb_project (from ``WANDB_PROJECT``, as transformers reads it, else "meshtron"),
    none -> neither, all -> both."""
    import os

    known = ("none", "tensorboard", "wandb", "all")
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n in known for n in names):
        raise ConfigError(f"report_to={value!r} is not supported; use one or a list of {', '.join(known)}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"report_to={value!r}: 'none' cannot be combined with other integrations")
    every = "all" in names
    _set_once(raw, "train.tensorboard", every or "tensorboard" in names, "report_to")
    if every or "wandb" in names:
        _set_once(raw, "train.wandb_project", os.environ.get("WANDB_PROJECT") or "meshtron", "report_to")


def _set_once(raw: dict, key: str, value: Any, alias: str) -> None:
    section, leaf = key.split(".")
    current = (raw.get(section) or {}).get(leaf, value)
    if current != value:
        raise ConfigError(f"{alias} sets {key}={value!r} but {key}={current!r} is also given; keep one")
    _set(raw, key, value)


# LLaMA-Factory / 360-LLaMA-Factory keys accepted at the top level (and as bare overrides).
# Order matters: sequence_parallel_size before the USP degrees that are checked against it.
ALIASES: dict[str, str | Callable[[dict, Any], None]] = {
    "cutoff_len": "data.seq_len",
    "sequence_parallel_size": "parallel.cp",
    "sequence_parallel_mode": _lf_mode,
    "sequence_parallel_ulysses_degree": "parallel.hp",
    "sequence_parallel_ring_degree": _lf_ring_degree,
    "report_to": _lf_report_to,
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML at `path` (None: defaults), apply `section.key=value` overrides, type-check;
    a model.load of a Hugging Face directory fills the model section from its config.json."""
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
    # model.load of a Hugging Face directory: the architecture is its config.json's
    return with_hf_model(_build(raw), raw.get("model"))


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
    for name in sorted(aliased, key=list(ALIASES).index):
        value, target = aliased[name], ALIASES[name]
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
        if not dataclasses.is_dataclass(sections[name]):  # a top-level setting such as `recipe`
            built[name] = _coerce(name, values, sections[name])
            continue
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
    dotted = [f"{s.name}.{f.name}" for s in fields(Config) if dataclasses.is_dataclass(s.type)
              for f in fields(s.type)]
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
