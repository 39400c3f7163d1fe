"""Property tests of config validation over random meshes and model shapes (hypothesis).

For any degrees, model sizes, batch sizes and world size, ``validate`` either returns a config
whose mesh really builds (degrees multiply to the world size, the rank layout exists, every
head/sequence split the model will do divides), or raises ``ConfigError`` — never another
exception, never a hang — whose message names the offending field (``section.key=value``) and
says what would work. When the message proposes values for a field, taking the first proposal
must get past that error (the next error, if any, is about something else).
"""
from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, load_config, validate
from engine.mesh import rank_layout

POW2 = st.sampled_from([1, 2, 4, 8])
MODES = st.sampled_from(["ring", "ulysses", "hybrid", "flexsp"])
SUGGESTION = re.compile(r"use ([a-z_]+\.[a-z_]+)=([\w.\-]+)")


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4, 8, 16) if g <= heads] or [1]))
    cp = draw(st.sampled_from([1, 2, 3, 4, 8]))
    over = {
        "model.num_layers": draw(st.integers(1, 6)),
        "model.num_attention_heads": heads,
        "model.num_query_groups": groups,
        "model.hidden_size": draw(st.sampled_from([16, 24, 32, 48, 64, 96])),
        "parallel.tp": draw(st.sampled_from([1, 2, 3, 4])),
        "parallel.pp": draw(st.sampled_from([1, 2, 3, 4])),
        "parallel.cp": cp,
        "parallel.sp_mode": draw(MODES),
        "parallel.hp": draw(st.sampled_from([1, 2, 4, 8])),
        "train.global_batch_size": draw(st.integers(1, 16)),
        "train.micro_batch_size": draw(st.integers(1, 4)),
        "data.seq_len": draw(st.sampled_from([16, 32, 48, 64, 100, 128, 256])),
    }
    if over["parallel.sp_mode"] in ("ring", "ulysses"):
        over["parallel.hp"] = draw(st.sampled_from([1, over["parallel.hp"]]))
    world = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    return over, world


def attempt(over: dict, world: int):
    try:
        cfg = validate(load_config(None, [f"{k}={v}" for k, v in over.items()]), world)
    except ConfigError as e:
        return None, str(e)
    return cfg, None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_validate_builds_a_mesh_or_names_the_fix(case):
    over, world = case
    cfg, error = attempt(over, world)
    if cfg is not None:
        p, m = cfg.parallel, cfg.model
        assert p.dp * p.tp * p.pp * p.cp == world
        layout = rank_layout(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, order=p.order, placement=p.placement)
        assert layout.world_size == world
        assert m.num_attention_heads % (p.tp * p.hp) == 0 and m.num_query_groups % p.tp == 0
        assert p.pp <= m.num_layers and cfg.train.global_batch_size % (p.dp * cfg.train.micro_batch_size) == 0
        if p.sp_mode != "flexsp":
            unit = 2 * p.cp * p.tp if p.cp > 1 else p.tp
            assert cfg.data.seq_len % unit == 0
        return
    assert re.search(r"[a-z_]+\.[a-z_]+=|world size", error), error  # names a field (or the world)
    for key, value in SUGGESTION.findall(error)[:1]:
        if key not in over and key != "parallel.dp":
            continue
        fixed = dict(over, **{key: value})
        _, again = attempt(fixed, world)
        assert again != error, f"following the advice {key}={value} gives the same error: {error}"


def test_a_suggested_fix_is_taken_literally():
    """One concrete walk: each error's first suggestion, applied, until the config is valid."""
    over, world = {"parallel.tp": 3, "parallel.cp": 4, "parallel.sp_mode": "hybrid", "parallel.hp": 3,
                   "data.seq_len": 100}, 8
    seen = []
    for _ in range(6):
        cfg, error = attempt(over, world)
        if cfg is not None:
            break
        seen.append(error)
        key, value = SUGGESTION.findall(error)[0]
        over[key] = value
    assert cfg is not None, seen
    assert len(seen) >= 2  # tp, then hp, then seq_len
