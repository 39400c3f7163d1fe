"""Pipeline schedules as per-rank action lists (DESIGN §4), and the communication plan that
attaches their point-to-point messages to them.

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

Communication (:func:`pipeline_plan`, DESIGN I-7). Virtual stage s lives on pipeline rank
s mod pp, so the stages form a ring: stage pp−1 of chunk c sends to stage 0 of chunk c+1 on rank 0.
The action list is cut into *slots*; before each slot the rank posts ONE batch
(``batch_isend_irecv``, one NCCL group) holding the sends of what the previous slot produced
(activations to the next stage, input gradients to the previous one) and the receives of what
this slot consumes; a last batch sends what the last slot produced.

* ``1f1b``, ``seq1f1b``: a slot per action — Megatron's ``send_forward_recv_backward`` after a
  steady-state forward and ``send_backward_recv_forward`` after a backward, so an activation
  leaves as soon as it is computed.
* ``interleaved``: warm-up and cool-down actions alone, the steady state's (F, B) pairs as one
  slot — Megatron's ``send_forward_backward_recv_forward_backward``. A slot per action deadlocks
  here, because the ring wraps: with pp = 2, vpp = 2, m = 4 both ranks reach a batch whose
  gradient send the other rank only receives in its next batch.

Nothing relies on tags: messages between two ranks in one direction pair in posting order, and
:func:`engine.parallel.p2p_check.simulate` proves (tests/test_p2p_plan.py) that the plans of all
ranks pair up in that order, each send meeting the receive of the same message, and never
deadlock under NCCL's rendezvous semantics (a send completes only when its receive is posted; a
batch blocks its rank until all of it pairs).
"""
from __future__ import annotations

from typing import NamedTuple

from engine.parallel.p2p_check import Op


def _slots(warmup: int, fwd: list, bwd: list) -> list[tuple]:
    steady = len(fwd) - warmup
    slots = [(("F",) + u,) for u in fwd[:warmup]]
    slots += [(("F",) + fwd[warmup + i], ("B",) + bwd[i]) for i in range(steady)]
    return slots + [(("B",) + u,) for u in bwd[steady:]]


def one_f_one_b(pp: int, rank: int, m: int) -> list[tuple]:
    units = [(mb, 0, 0) for mb in range(m)]
    return _slots(min(pp - rank - 1, m), units, units)


def interleaved(pp: int, rank: int, m: int, vpp: int) -> list[tuple]:
    if m % pp:
        raise ValueError(f"the interleaved schedule needs the micro-batch count ({m}) to be a multiple of pp={pp}")

    def unit(k: int, reverse: bool):
        chunk = (k // pp) % vpp
        return ((k // (pp * vpp)) * pp + k % pp, vpp - 1 - chunk if reverse else chunk, 0)

    n = m * vpp
    fwd = [unit(k, False) for k in range(n)]
    bwd = [unit(k, True) for k in range(n)]
    return _slots(min(2 * (pp - rank - 1) + (vpp - 1) * pp, n), fwd, bwd)


def seq1f1b(pp: int, rank: int, m: int, k: int) -> list[tuple]:
    fwd = [(mb, 0, j) for mb in range(m) for j in range(k)]
    bwd = [(mb, 0, j) for mb in range(m) for j in reversed(range(k))]
    return _slots(min(pp - rank - 1 + k - 1, m * k), fwd, bwd)


def build_slots(name: str, pp: int, rank: int, m: int, vpp: int = 1, seq_chunks: int = 1) -> list[tuple]:
    """The action list of pipeline rank ``rank`` as slots: warm-up forwards alone, the steady
    state's (forward, backward) pairs, cool-down backwards alone."""
    if name == "1f1b":
        return one_f_one_b(pp, rank, m)
    if name == "interleaved":
        return interleaved(pp, rank, m, vpp)
    if name == "seq1f1b":
        return seq1f1b(pp, rank, m, seq_chunks)
    raise ValueError(f"parallel.pp_schedule={name!r}; expected 1f1b, interleaved or seq1f1b")


def build_schedule(name: str, pp: int, rank: int, m: int, vpp: int = 1, seq_chunks: int = 1) -> list:
    """The action list of pipeline rank ``rank``."""
    return [a for slot in build_slots(name, pp, rank, m, vpp, seq_chunks) for a in slot]


# -- communication ---------------------------------------------------------------------------
class Msg(NamedTuple):
    """One pipeline message: the activation (``act``) entering virtual stage ``stage`` or the
    gradient (``grad``) of the output of ``stage``, for micro-batch ``mb``, unit ``unit``."""

    kind: str
    mb: int
    stage: int
    unit: int


def input_msg(action, pp: int, rank: int, vpp: int) -> Op | None:
    """The receive ``action`` needs (None on the first stage's forward, the last's backward)."""
    kind, mb, c, j = action
    s, last = c * pp + rank, pp * vpp - 1
    if kind == "F" and s > 0:
        return Op(False, (s - 1) % pp, Msg("act", mb, s, j))
    if kind == "B" and s < last:
        return Op(False, (s + 1) % pp, Msg("grad", mb, s, j))
    return None


def output_msg(action, pp: int, rank: int, vpp: int) -> Op | None:
    """The send ``action`` produces (None on the last stage's forward, the first's backward)."""
    kind, mb, c, j = action
    s, last = c * pp + rank, pp * vpp - 1
    if kind == "F" and s < last:
        return Op(True, (s + 1) % pp, Msg("act", mb, s + 1, j))
    if kind == "B" and s > 0:
        return Op(True, (s - 1) % pp, Msg("grad", mb, s - 1, j))
    return None


class Step(NamedTuple):
    """Post the p2p batch ``ops`` (peers are pipeline ranks) and wait for it, then run the
    ``actions`` in order (none after the final batch)."""

    ops: tuple[Op, ...]
    actions: tuple


def comm_plan(slots: list[tuple], pp: int, rank: int, vpp: int) -> list[Step]:
    """Attach the messages of this rank's ``slots`` to batches: before each slot, the sends the
    previous slot produced together with the receives this slot needs (module docstring)."""
    if pp == 1 and vpp > 1:
        raise ValueError(f"vpp={vpp} needs pp >= 2 (stage c·pp + 0 would send to itself)")
    steps, pending = [], ()
    for slot in slots:
        needs = tuple(op for op in (input_msg(a, pp, rank, vpp) for a in slot) if op)
        steps.append(Step(pending + needs, tuple(slot)))
        pending = tuple(op for op in (output_msg(a, pp, rank, vpp) for a in slot) if op)
    steps.append(Step(pending, ()))
    return steps


def pipeline_plan(schedule: str, pp: int, rank: int, m: int, vpp: int = 1, seq_chunks: int = 1,
                  forward_only: bool = False) -> list[Step]:
    """The steps :class:`~engine.parallel.pipeline.runtime.PipelineRuntime` runs on pipeline rank
    ``rank`` for ``m`` micro-batches (``forward_only``: one micro-batch through every chunk) —
    a pure function of the schedule, so the deadlock checker sees exactly what the runtime runs."""
    if forward_only:
        slots = [(("F", 0, c, 0),) for c in range(vpp)]
    else:
        slots = build_slots(schedule, pp, rank, m, vpp, seq_chunks)
        if schedule != "interleaved":  # a batch per action (module docstring)
            slots = [(a,) for slot in slots for a in slot]
    return comm_plan(slots, pp, rank, vpp)
