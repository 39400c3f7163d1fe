"""ParallelMesh: the one object that knows every rank's coordinates and builds every group.

Axes (DESIGN §2): ``tp`` tensor, ``cp`` context (= ``hp`` head-parallel × ``rp`` ring), ``dp``
data, ``pp`` pipeline. ``order`` lists the axes innermost (neighbouring ranks) first; the default
``tp-cp-dp-pp`` is Megatron's ``tp-cp-ep-dp-pp``. Inside cp, ``head-first`` puts the hp ranks next
to each other (Ulysses all-to-all inside a node, ring across nodes), ``context-first`` the ring.

The layout is a pure function (:func:`rank_layout`) so it is tested for large worlds without
spawning processes; :class:`ParallelMesh` turns it into process groups through DeviceMesh.
Axes of size 1 get no group at all: every collective on them is the identity.

Double ring (``ring_window`` w, dividing rp): each rp group, in ring order, splits into windows
of w consecutive ring ranks (``rp_inner``) and the rings of the ranks at the same position of
every window (``rp_outer``); both get their own groups so NCCL can overlap them (see
:class:`engine.parallel.context.ring.DoubleRing`). Without a window, ``rp_inner`` is the rp
group and ``rp_outer`` has size 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The atomic axes; cp is hp × rp, composite axes are unions of atomic ones.
ATOMIC_AXES = ("tp", "hp", "rp", "dp", "pp")
#: Composite axes and the atomic axes they span.
COMPOSITE_AXES = {"cp": ("hp", "rp"), "dp_cp": ("hp", "rp", "dp"), "tp_cp": ("tp", "hp", "rp")}
#: The double ring's sub-rings of the rp axis (module docstring).
RING_AXES = ("rp_inner", "rp_outer")


@dataclass(frozen=True)
class RankLayout:
    """Where every global rank sits on the mesh; ``grid[pp, dp, rp, hp, tp]`` is a global rank."""

    grid: torch.Tensor  # int64, dims in ATOMIC_AXES reversed: (pp, dp, rp, hp, tp)
    ring_window: int = 0  # the double ring's inner ring size; 0: one ring of all rp ranks

    _DIMS = ("pp", "dp", "rp", "hp", "tp")

    @property
    def world_size(self) -> int:
        return self.grid.numel()

    def size(self, axis: str) -> int:
        if axis in RING_AXES:
            w = self.ring_window or self.size("rp")
            return w if axis == "rp_inner" else self.size("rp") // w
        return math.prod(self.grid.shape[self._DIMS.index(a)] for a in _atoms(axis))

    def coords(self, rank: int) -> dict[str, int]:
        """Index of ``rank`` on every atomic axis, and on ``cp`` (= rp·hp + hp_index)."""
        where = (self.grid == rank).nonzero()
        if where.shape[0] != 1:
            raise ValueError(f"rank {rank} is not in a world of {self.world_size}")
        c = dict(zip(self._DIMS, where[0].tolist()))
        c["cp"] = c["rp"] * self.size("hp") + c["hp"]
        return c

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis``: the ranks that differ only in that axis' coordinates.

        Inside a group ranks are listed by their index along the axis (for cp: rp-major,
        hp-minor), which is the semantic order, not necessarily the global-rank order.
        """
        if axis in RING_AXES:  # in ring order, inside each rp group
            w, out = self.size("rp_inner"), []
            for ring in self.groups("rp"):
                out += ([ring[i:i + w] for i in range(0, len(ring), w)] if axis == "rp_inner" else
                        [ring[pos::w] for pos in range(w)])
            return out
        axes = _atoms(axis)
        keep = [d for d in self._DIMS if d not in axes]
        # cp index is rp-major, hp-minor whatever the placement
        span = [d for d in ("pp", "dp", "rp", "hp", "tp") if d in axes]
        perm = [self._DIMS.index(d) for d in keep + span]
        g = self.grid.permute(perm).reshape(-1, self.size(axis))
        return [row.tolist() for row in g]

    def group_of(self, axis: str, rank: int) -> list[int]:
        return next(g for g in self.groups(axis) if rank in g)


def _atoms(axis: str) -> tuple[str, ...]:
    if axis in ATOMIC_AXES:
        return (axis,)
    if axis in COMPOSITE_AXES:
        return COMPOSITE_AXES[axis]
    raise ValueError(f"unknown mesh axis {axis!r}; expected one of {ATOMIC_AXES + tuple(COMPOSITE_AXES)}")


def rank_layout(*, tp: int = 1, cp: int = 1, hp: int = 1, dp: int = 1, pp: int = 1,
                order: str = "tp-cp-dp-pp", placement: str = "head-first", ring_window: int = 0) -> RankLayout:
    """Global rank of every mesh coordinate.

    ``order`` is innermost first: rank = tp_i + tp·(cp-part + cp·(dp_i + dp·pp_i)) for the
    default. Inside cp, ``head-first`` makes hp the faster-varying of (hp, rp). ``ring_window``:
    the double ring's inner ring size (0: a plain ring).
    """
    names = order.split("-")
    if sorted(names) != ["cp", "dp", "pp", "tp"]:
        raise ValueError(f"parallel.order={order!r} must be a permutation of tp, cp, dp, pp joined by '-'")
    if placement not in ("head-first", "context-first"):
        raise ValueError(f"parallel.placement={placement!r}; expected 'head-first' or 'context-first'")
    if cp % hp:
        raise ValueError(f"parallel.hp={hp} does not divide parallel.cp={cp}")
    if ring_window < 0 or (ring_window and (cp // hp) % ring_window):
        raise ValueError(f"parallel.ring_window={ring_window} does not divide the ring degree rp={cp // hp}; "
                         f"use 0 (one ring) or a divisor of rp")
    sizes = {"tp": tp, "hp": hp, "rp": cp // hp, "dp": dp, "pp": pp}
    inner_first: list[str] = []
    for n in names:
        inner_first += (["hp", "rp"] if placement == "head-first" else ["rp", "hp"]) if n == "cp" else [n]
    outer_first = inner_first[::-1]
    world = math.prod(sizes.values())
    grid = torch.arange(world).reshape([sizes[a] for a in outer_first])
    grid = grid.permute([outer_first.index(d) for d in RankLayout._DIMS]).contiguous()
    return RankLayout(grid, ring_window)


class ParallelMesh:
    """Degrees, this rank's coordinates and the process group of every axis.

    Built once per run (I-1) and passed explicitly; ``group(axis)`` is ``None`` for an axis of
    size 1, which every function of ``engine.parallel`` treats as "no communication".
    """

    def __init__(self, layout: RankLayout, rank: int, device: torch.device, groups: dict):
        self.layout = layout
        self.rank = rank
        self.device = device
        self._groups = groups
        self.coords = layout.coords(rank)
        self.ring_window = layout.ring_window
        for axis in ATOMIC_AXES + tuple(COMPOSITE_AXES):
            setattr(self, axis, layout.size(axis))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelMesh":
        """The one-process mesh: every degree 1, no groups (the reference of I-5)."""
        return cls(rank_layout(), 0, torch.device(device), {})

    @classmethod
    def build(cls, *, tp=1, cp=1, hp=1, dp=1, pp=1, order="tp-cp-dp-pp", placement="head-first",
              ring_window: int = 0, device: torch.device | str = "cpu") -> "ParallelMesh":
        """Create the groups of every axis of size > 1 on the initialised default process group
        (``ring_window``: also the double ring's inner-window and outer-ring groups)."""
        import torch.distributed as dist

        layout = rank_layout(tp=tp, cp=cp, hp=hp, dp=dp, pp=pp, order=order, placement=placement,
                             ring_window=ring_window)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != layout.world_size:
            raise ValueError(f"tp·cp·dp·pp = {tp}·{cp}·{dp}·{pp} = {layout.world_size} but the world has "
                             f"{world} ranks; make the product equal the number of processes")
        if world == 1:
            return cls.single(device)
        device = torch.device(device)
        return cls(layout, dist.get_rank(), device, _make_groups(layout, device))

    # -- queries --------------------------------------------------------------------------------
    def group(self, axis: str):
        """Process group of ``axis`` containing this rank, or None when the axis has size 1."""
        if axis != "pp_ends" and axis not in RING_AXES:  # pp_ends: first and last stage (tied embeddings)
            _atoms(axis)
        return self._groups.get(axis)

    def own_group(self):
        """A process group of this rank alone, or None: made (with every rank's, by every rank) only
        when dp×cp has one rank in a world of several, for FSDP2's 1-rank DeviceMesh under CPU
        offload (engine/parallel/fsdp.py, which starts a world of one for a single process)."""
        return self._groups.get("own")

    def index(self, axis: str) -> int:
        """This rank's index along ``axis`` (for cp: rp-major, hp-minor)."""
        if axis in self.coords:
            return self.coords[axis]
        return self.layout.group_of(axis, self.rank).index(self.rank)

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's ``axis`` group, in axis-index order."""
        return self.layout.group_of(axis, self.rank)

    def __repr__(self) -> str:
        deg = " ".join(f"{a}={getattr(self, a)}" for a in ("dp", "pp", "tp", "cp", "hp", "rp"))
        window = f" ring_window={self.ring_window}" if self.ring_window else ""
        return f"ParallelMesh(rank={self.rank}, {deg}{window})"


def _make_groups(layout: RankLayout, device: torch.device) -> dict:
    """One DeviceMesh over the atomic axes of size > 1; composite axes flattened from it."""
    from torch.distributed.device_mesh import DeviceMesh

    dims = [d for d in RankLayout._DIMS if layout.size(d) > 1]
    grid = layout.grid.reshape([layout.size(d) for d in dims])
    dm = DeviceMesh(device.type, grid, mesh_dim_names=tuple(dims))
    groups = {d: dm.get_group(d) for d in dims}
    for name, atoms in COMPOSITE_AXES.items():
        present = tuple(d for d in dims if d in atoms)
        if len(present) == 1:
            groups[name] = groups[present[0]]
        elif len(present) > 1:
            groups[name] = dm[present]._flatten(name).get_group()
    if layout.size("pp") > 2:  # Megatron's embedding group, for tied embeddings split over stages
        groups["pp_ends"] = _subgroups([[g[0], g[-1]] for g in layout.groups("pp")])
    elif layout.size("pp") == 2:
        groups["pp_ends"] = groups["pp"]
    if layout.size("dp_cp") == 1:  # ParallelMesh.own_group
        groups["own"] = _subgroups([[r] for r in range(layout.world_size)])
    for axis in RING_AXES:  # the double ring's windows and outer rings
        size = layout.size(axis)
        if size == layout.size("rp") and "rp" in groups:
            groups[axis] = groups["rp"]
        elif size > 1:
            groups[axis] = _subgroups(layout.groups(axis))
    return groups


def _subgroups(members: list[list[int]]):
    """A new group per rank list (every rank creates every group, in the same order, as
    ``new_group`` requires); returns this rank's."""
    import torch.distributed as dist

    mine = None
    for ranks in members:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine
