"""Pipeline schedules as per-rank action lists (DESIGN §4).

An action is ``(kind, mb, chunk, unit)``: ``F`` or ``B`` of micro-batch ``mb`` on this rank's
model chunk ``chunk`` (virtual stage ``chunk·pp + rank``), sequence unit ``unit`` (Seq1F1B; 0
otherwise). Every schedule is *warm-up forwards, then one forward / one backward, then the
remaining backwards*; they differ in the order of the units and the warm-up depth:

* ``1f1b``: micro-batches in order; warm-up ``min(pp − rank − 1, m)``.
* ``interleaved`` (Megatron): forward unit k runs chunk ``(k // pp) % vpp`` of micro-batch
  ``(k // (pp·vpp))·pp + k % pp``; backward the same with chunks reversed; warm-up
  ``min(2·(pp − rank − 1) + (vpp − 1)·pp, m·vpp)``. Needs m to be a multiple of pp.
* ``seq1f1b`` (arXiv 2406.03488): every micro-batch is k sequence units; forwards run units
  0 … k−1 of each micro-batch in turn (FIFO), backwards k−1 … 0 (LIFO within a micro-batch, as
  later units' backward gives the gradient of the keys/values earlier units cached); warm-up
  ``min(pp − rank − 1 + k − 1, m·k)``.
With point-to-point sends that never block, any such per-rank order is deadlock-free: a receive
only waits on work that does not wait on this rank.
"""
from __future__ import annotations


def _interleave(warmup: int, fwd: list, bwd: list) -> list:
    steady = len(fwd) - warmup
    actions = [("F",) + u for u in fwd[:warmup]]
    for i in range(steady):
        actions += [("F",) + fwd[warmup + i], ("B",) + bwd[i]]
    return actions + [("B",) + u for u in bwd[steady:]]


def one_f_one_b(pp: int, rank: int, m: int) -> list:
    units = [(mb, 0, 0) for mb in range(m)]
    return _interleave(min(pp - rank - 1, m), units, units)


def interleaved(pp: int, rank: int, m: int, vpp: int) -> list:
    if m % pp:
        raise ValueError(f"the interleaved schedule needs the micro-batch count ({m}) to be a multiple of pp={pp}")

    def unit(k: int, reverse: bool):
        chunk = (k // pp) % vpp
        return ((k // (pp * vpp)) * pp + k % pp, vpp - 1 - chunk if reverse else chunk, 0)

    n = m * vpp
    fwd = [unit(k, False) for k in range(n)]
    bwd = [unit(k, True) for k in range(n)]
    return _interleave(min(2 * (pp - rank - 1) + (vpp - 1) * pp, n), fwd, bwd)


def seq1f1b(pp: int, rank: int, m: int, k: int) -> list:
    fwd = [(mb, 0, j) for mb in range(m) for j in range(k)]
    bwd = [(mb, 0, j) for mb in range(m) for j in reversed(range(k))]
    return _interleave(min(pp - rank - 1 + k - 1, m * k), fwd, bwd)


def build_schedule(name: str, pp: int, rank: int, m: int, vpp: int = 1, seq_chunks: int = 1) -> list:
    """The action list of pipeline rank ``rank``."""
    if name == "1f1b":
        return one_f_one_b(pp, rank, m)
    if name == "interleaved":
        return interleaved(pp, rank, m, vpp)
    if name == "seq1f1b":
        return seq1f1b(pp, rank, m, seq_chunks)
    raise ValueError(f"parallel.pp_schedule={name!r}; expected 1f1b, interleaved or seq1f1b")
