"""engine/mesh.py: the pure rank layout (DESIGN §2) for worlds of 8 to 64 ranks, no processes.

Every ordered factorisation of 8, 16, 32 and 64 into tp·cp·dp·pp, with every hp dividing cp, is
laid out under several orders and both placements and checked against an independent mixed-radix
formula (innermost axis first; cp expands to hp, rp under ``head-first`` and rp, hp under
``context-first``), plus the structural facts: groups partition the world, have the axis' size,
agree with ``coords`` and are listed by index along the axis (cp: rp-major, hp-minor).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from engine.mesh import ATOMIC_AXES, COMPOSITE_AXES, ParallelMesh, rank_layout

ALL_AXES = ATOMIC_AXES + tuple(COMPOSITE_AXES)
DIMS = ("pp", "dp", "rp", "hp", "tp")  # outer to inner: the grid's dimension order
ORDERS = ("tp-cp-dp-pp", "tp-dp-cp-pp", "cp-tp-dp-pp", "tp-cp-pp-dp")
PLACEMENTS = ("head-first", "context-first")


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(world):
    """Every (tp, cp, hp, dp, pp) with tp·cp·dp·pp == world and hp | cp."""
    out = []
    for tp in divisors(world):
        for cp in divisors(world // tp):
            for dp in divisors(world // (tp * cp)):
                pp = world // (tp * cp * dp)
                out += [dict(tp=tp, cp=cp, hp=hp, dp=dp, pp=pp) for hp in divisors(cp)]
    return out


CONFIGS = [c for w in (8, 16, 32, 64) for c in factorizations(w)]


def atom_sizes(deg):
    return {"tp": deg["tp"], "hp": deg["hp"], "rp": deg["cp"] // deg["hp"], "dp": deg["dp"], "pp": deg["pp"]}


def inner_first_atoms(order, placement):
    atoms = []
    for name in order.split("-"):
        if name == "cp":
            atoms += ["hp", "rp"] if placement == "head-first" else ["rp", "hp"]
        else:
            atoms.append(name)
    return atoms


def expected_grid(deg, order, placement):
    """grid[pp, dp, rp, hp, tp] by the mixed-radix formula, computed without engine code."""
    sizes = atom_sizes(deg)
    strides, s = {}, 1
    for a in inner_first_atoms(order, placement):
        strides[a] = s
        s *= sizes[a]
    grid = torch.zeros([sizes[d] for d in DIMS], dtype=torch.int64)
    for i, d in enumerate(DIMS):
        shape = [1] * len(DIMS)
        shape[i] = sizes[d]
        grid = grid + torch.arange(sizes[d]).view(shape) * strides[d]
    return grid


def axis_index(axis, c, sizes):
    """Index of coordinates ``c`` (array [..., 5] in DIMS order) along ``axis``: mixed radix of the
    axis' atoms, outer (DIMS order) major — for cp rp-major, hp-minor."""
    span = [d for d in DIMS if d in (COMPOSITE_AXES.get(axis) or (axis,))]
    idx = np.zeros(c.shape[:-1], dtype=np.int64)
    for d in span:
        idx = idx * sizes[d] + c[..., DIMS.index(d)]
    return idx


def check_layout(deg, order, placement):
    """All structural invariants of one layout; returns the layout for further checks."""
    lay = rank_layout(**deg, order=order, placement=placement)
    sizes = atom_sizes(deg)
    world = math.prod(sizes.values())
    assert lay.world_size == world
    assert [lay.size(a) for a in ATOMIC_AXES] == [sizes[a] for a in ATOMIC_AXES]
    assert [lay.size(a) for a in COMPOSITE_AXES] == [deg["cp"], deg["dp"] * deg["cp"], deg["tp"] * deg["cp"]]

    # the grid is exactly the independent mixed-radix formula
    assert torch.equal(lay.grid, expected_grid(deg, order, placement)), (deg, order, placement)
    grid = lay.grid.numpy()

    # coords round-trip and agree with the grid; cp index = rp·hp + hp_i
    coords = [lay.coords(r) for r in range(world)]
    assert all(c.keys() == {"pp", "dp", "rp", "hp", "tp", "cp"} for c in coords)
    table = np.array([[c[d] for d in DIMS + ("cp",)] for c in coords], dtype=np.int64)  # [world, 6]
    table, cp_col = table[:, :5], table[:, 5]
    assert (grid[tuple(table.T)] == np.arange(world)).all()  # grid[coords(r)] == r
    assert (cp_col == table[:, 2] * deg["hp"] + table[:, 3]).all()  # cp = rp·hp + hp_i
    assert ((table >= 0) & (table < np.array([sizes[d] for d in DIMS]))).all()

    for axis in ALL_AXES:
        n = lay.size(axis)
        g = np.array(lay.groups(axis), dtype=np.int64)
        assert g.shape == (world // n, n), axis
        # partition: every rank exactly once
        assert (np.sort(g, axis=None) == np.arange(world)).all(), axis
        c = table[g]  # [groups, n, 5]
        span = COMPOSITE_AXES.get(axis) or (axis,)
        rest = [i for i, d in enumerate(DIMS) if d not in span]
        assert (c[..., rest] == c[:, :1, rest]).all(), axis  # same coords outside the axis
        # listed by index along the axis
        assert (axis_index(axis, c, sizes) == np.arange(n)).all(), axis
    return lay


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_factorisation_of_8_to_64(order, placement):
    for deg in CONFIGS:
        check_layout(deg, order, placement)


def megatron_rank(deg, pp_i, dp_i, rp_i, hp_i, tp_i):
    tp, cp, dp = deg["tp"], deg["cp"], deg["dp"]
    cp_i = rp_i * deg["hp"] + hp_i
    return tp_i + tp * (cp_i + cp * (dp_i + dp * pp_i))


@pytest.mark.parametrize("deg", [
    dict(tp=2, cp=2, hp=1, dp=2, pp=1),
    dict(tp=2, cp=4, hp=2, dp=2, pp=2),
    dict(tp=1, cp=8, hp=4, dp=1, pp=2),
    dict(tp=4, cp=2, hp=2, dp=2, pp=4),
    dict(tp=2, cp=8, hp=2, dp=2, pp=1),
])
def test_default_order_is_megatrons(deg):
    lay = rank_layout(**deg)  # defaults: tp-cp-dp-pp, head-first
    s = atom_sizes(deg)
    for pp_i, dp_i, rp_i, hp_i, tp_i in itertools.product(*(range(s[d]) for d in DIMS)):
        r = megatron_rank(deg, pp_i, dp_i, rp_i, hp_i, tp_i)
        assert lay.grid[pp_i, dp_i, rp_i, hp_i, tp_i].item() == r
        assert lay.coords(r) == dict(pp=pp_i, dp=dp_i, rp=rp_i, hp=hp_i, tp=tp_i,
                                     cp=rp_i * deg["hp"] + hp_i)
    tp, cp, dp = deg["tp"], deg["cp"], deg["dp"]
    for g in lay.groups("tp"):  # contiguous rank ranges
        assert g == list(range(g[0], g[0] + tp))
    for g in lay.groups("pp"):  # farthest apart
        assert all(b - a == tp * cp * dp for a, b in zip(g, g[1:]))
    for g in lay.groups("dp"):
        assert all(b - a == tp * cp for a, b in zip(g, g[1:]))
    for g in lay.groups("cp"):  # head-first: the whole cp group in rank order, stride tp
        assert all(b - a == tp for a, b in zip(g, g[1:]))


def strides_of(groups):
    return {b - a for g in groups for a, b in zip(g, g[1:])}


@pytest.mark.parametrize("order", ORDERS)
def test_placement_strides(order):
    deg = dict(tp=2, cp=8, hp=2, dp=2, pp=1)
    sizes = atom_sizes(deg)
    inner = order.split("-")
    before_cp = math.prod(sizes[a] for a in inner[:inner.index("cp")])  # axes inside cp
    head = rank_layout(**deg, order=order, placement="head-first")
    ctx = rank_layout(**deg, order=order, placement="context-first")
    # head-first: hp adjacent (stride of the axes inside cp), rp strided over hp
    assert strides_of(head.groups("hp")) == {before_cp}
    assert strides_of(head.groups("rp")) == {before_cp * deg["hp"]}
    # context-first: rp adjacent, hp strided over rp
    assert strides_of(ctx.groups("rp")) == {before_cp}
    assert strides_of(ctx.groups("hp")) == {before_cp * sizes["rp"]}
    if order.startswith("tp-cp"):
        assert before_cp == deg["tp"]


def test_head_first_vs_context_first_default_order():
    deg = dict(tp=2, cp=4, hp=2, dp=1, pp=1)
    head = rank_layout(**deg, placement="head-first")
    ctx = rank_layout(**deg, placement="context-first")
    assert head.groups("hp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert head.groups("rp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ctx.groups("rp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ctx.groups("hp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # cp groups are rp-major, hp-minor whatever the placement
    assert head.groups("cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ctx.groups("cp") == [[0, 4, 2, 6], [1, 5, 3, 7]]
    for lay in (head, ctx):
        for g in lay.groups("cp"):
            assert [lay.coords(r)["cp"] for r in g] == [0, 1, 2, 3]
            assert [(lay.coords(r)["rp"], lay.coords(r)["hp"]) for r in g] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("order", ORDERS)
def test_dp_cp_is_union_of_cp_groups_over_dp(order, placement):
    deg = dict(tp=2, cp=4, hp=2, dp=4, pp=2)
    lay = rank_layout(**deg, order=order, placement=placement)
    for r in range(lay.world_size):
        dpcp = lay.group_of("dp_cp", r)
        assert r in dpcp
        cps = [lay.group_of("cp", d) for d in lay.group_of("dp", r)]  # by dp index
        assert sorted(dpcp) == sorted(x for g in cps for x in g)
        assert dpcp == [x for g in cps for x in g]  # dp-major, then the cp order
        # tp_cp: the tp groups of the rank's cp group, cp-major
        tpcp = lay.group_of("tp_cp", r)
        assert tpcp == [x for c in lay.group_of("cp", r) for x in lay.group_of("tp", c)]
        for axis in ALL_AXES:
            assert lay.group_of(axis, r) in lay.groups(axis)


@pytest.mark.parametrize("order", ["tp-cp-dp", "tp-cp-dp-pp-tp", "tp-cp-dp-dp", "tp-xp-dp-pp",
                                   "tp,cp,dp,pp", "", "TP-CP-DP-PP"])
def test_bad_order(order):
    with pytest.raises(ValueError, match=r"parallel\.order"):
        rank_layout(tp=2, dp=2, order=order)


@pytest.mark.parametrize("placement", ["ring-first", "", "head_first", "Head-First"])
def test_bad_placement(placement):
    with pytest.raises(ValueError, match=r"parallel\.placement"):
        rank_layout(cp=2, placement=placement)


@pytest.mark.parametrize("cp,hp", [(4, 3), (6, 4), (1, 2), (2, 4)])
def test_hp_must_divide_cp(cp, hp):
    with pytest.raises(ValueError, match=rf"parallel\.hp={hp}.*parallel\.cp={cp}"):
        rank_layout(cp=cp, hp=hp)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("cp,hp,window", [(8, 1, 2), (8, 2, 2), (16, 2, 4), (8, 1, 1), (8, 1, 8), (8, 1, 0)])
def test_double_ring_axes(cp, hp, window, placement):
    """rp_inner: windows of consecutive ring ranks; rp_outer: same position in every window.
    Both partition the world, are listed in ring order and nest inside this rank's rp group."""
    lay = rank_layout(tp=2, cp=cp, hp=hp, dp=2, placement=placement, ring_window=window)
    rp, w = cp // hp, window or cp // hp
    assert (lay.size("rp_inner"), lay.size("rp_outer")) == (w, rp // w)
    for rank in range(lay.world_size):
        ring = lay.group_of("rp", rank)
        r = ring.index(rank)
        assert lay.group_of("rp_inner", rank) == ring[r // w * w:r // w * w + w]
        assert lay.group_of("rp_outer", rank) == [ring[x * w + r % w] for x in range(rp // w)]
    for axis in ("rp_inner", "rp_outer"):
        members = sorted(x for g in lay.groups(axis) for x in g)
        assert members == list(range(lay.world_size)), axis


@pytest.mark.parametrize("window", [3, -1, 16])
def test_ring_window_must_divide_rp(window):
    with pytest.raises(ValueError, match=rf"parallel\.ring_window={window} .*rp=8"):
        rank_layout(cp=8, ring_window=window)


def test_unknown_axis_and_rank():
    lay = rank_layout(tp=2, dp=2)
    with pytest.raises(ValueError, match="ep"):
        lay.groups("ep")
    with pytest.raises(ValueError, match="ep"):
        lay.size("ep")
    with pytest.raises(ValueError, match="rank 4"):
        lay.coords(4)


def test_single_mesh():
    m = ParallelMesh.single()
    assert m.rank == 0 and m.device == torch.device("cpu")
    for axis in ALL_AXES:
        assert getattr(m, axis) == 1
        assert m.group(axis) is None
        assert m.index(axis) == 0
        assert m.ranks(axis) == [0]
    assert m.coords == dict(pp=0, dp=0, rp=0, hp=0, tp=0, cp=0)
    with pytest.raises(ValueError):
        m.group("ep")


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs no process group")
def test_build_without_process_group():
    m = ParallelMesh.build()
    assert m.layout.world_size == 1 and m.rank == 0
    for axis in ALL_AXES:
        assert getattr(m, axis) == 1 and m.group(axis) is None
    m = ParallelMesh.build(tp=1, cp=1, hp=1, dp=1, pp=1, order="cp-tp-dp-pp", placement="context-first")
    assert all(m.group(a) is None for a in ALL_AXES)
    with pytest.raises(ValueError, match=r"tp·cp·dp·pp = 2·1·1·1 = 2 .*1 ranks"):
        ParallelMesh.build(tp=2)
    with pytest.raises(ValueError, match=r"tp·cp·dp·pp = 1·4·2·1 = 8 .*1 ranks"):
        ParallelMesh.build(cp=4, hp=2, dp=2)
    with pytest.raises(ValueError, match=r"= 64 "):
        ParallelMesh.build(tp=4, cp=4, hp=4, dp=2, pp=2)


# -- property test (hypothesis is a dev extra; without it only this test is skipped) -----------
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    @st.composite
    def mesh_degrees(draw):
        tp = draw(st.integers(1, 8))
        rp = draw(st.integers(1, max(1, 64 // tp)))
        hp = draw(st.integers(1, max(1, 64 // (tp * rp))))
        dp = draw(st.integers(1, max(1, 64 // (tp * rp * hp))))
        pp = draw(st.integers(1, max(1, 64 // (tp * rp * hp * dp))))
        order = "-".join(draw(st.permutations(["tp", "cp", "dp", "pp"])))
        placement = draw(st.sampled_from(PLACEMENTS))
        return dict(tp=tp, cp=rp * hp, hp=hp, dp=dp, pp=pp), order, placement

    @settings(max_examples=150, deadline=None, database=None)
    @given(mesh_degrees())
    def test_property_random_degrees(case):
        deg, order, placement = case
        assert deg["tp"] * deg["cp"] * deg["dp"] * deg["pp"] <= 64
        check_layout(deg, order, placement)
else:  # pragma: no cover
    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e .[dev])")
    def test_property_random_degrees():
        pass
