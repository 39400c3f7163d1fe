"""A symbolic model of NCCL point-to-point semantics, to prove communication plans deadlock-free
without running a process (DESIGN I-7).

A *program* is one rank's sequence of p2p batches (``batch_isend_irecv`` = one NCCL group);
a batch is a sequence of :class:`Op`. The model is NCCL's, at its strictest:

* **rendezvous**: a send pairs only with a receive the peer has *posted* (NCCL's small
  internal buffer is ignored: a plan that is safe without it is safe with it);
* **order, no tags**: the n-th send from rank a to rank b pairs with the n-th receive at b from
  a (posting order, batches in program order, ops in batch order);
* **blocking batches**: a rank posts its next batch only when every op of the current one has
  paired (what the pipeline runtime does: it waits for each batch before computing).

:func:`simulate` advances every rank whose current batch pairs completely until none can; ranks
left with batches are deadlocked (or wait for an op that no peer ever posts). It also checks
that paired ops carry the same message label, i.e. that ordering alone delivers every message
to the right receive — what tags did on gloo.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, NamedTuple


class Op(NamedTuple):
    """One op of a batch: a send to (``send``) or a receive from ``peer`` of message ``msg``."""

    send: bool
    peer: int
    msg: Hashable


@dataclass
class Outcome:
    """What :func:`simulate` found: ``stuck[rank] = (batch index, ops of it still unpaired)``;
    ``mismatches``: paired ops whose labels differ; ``unmatched``: ops no peer ever posts."""

    stuck: dict[int, tuple[int, list[Op]]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.stuck or self.mismatches or self.unmatched)

    def __str__(self) -> str:
        if self.ok:
            return "every batch pairs; no deadlock"
        lines = [f"rank {r} blocked in batch {b} on "
                 + ", ".join(f"{'send to' if o.send else 'recv from'} {o.peer} {o.msg}" for o in ops)
                 for r, (b, ops) in sorted(self.stuck.items())]
        return "\n".join((["deadlock:"] if self.stuck else []) + lines + self.mismatches + self.unmatched)


def simulate(programs: dict[int, list[list[Op]]]) -> Outcome:
    """Run every rank's batches under NCCL's rendezvous semantics (module docstring)."""
    # where the n-th op of every direction sits: (rank, batch index, op) per (src, dst) and side
    sends, recvs = defaultdict(list), defaultdict(list)
    for rank, batches in programs.items():
        for b, batch in enumerate(batches):
            for op in batch:
                if op.send:
                    sends[(rank, op.peer)].append((b, op))
                else:
                    recvs[(op.peer, rank)].append((b, op))
    # each op's counterpart: (peer rank, the peer's batch index), or None if it never comes
    partner: dict[tuple[int, int], list[tuple[Op, tuple[int, int] | None]]] = defaultdict(list)
    out = Outcome()
    for (src, dst) in sorted(set(sends) | set(recvs)):
        s, r = sends.get((src, dst), []), recvs.get((src, dst), [])
        for n in range(max(len(s), len(r))):
            if n < len(s) and n < len(r) and s[n][1].msg != r[n][1].msg:
                out.mismatches.append(f"message {n} from rank {src} to rank {dst}: sent {s[n][1].msg}, "
                                      f"received as {r[n][1].msg}")
            if n >= len(r):
                out.unmatched.append(f"rank {src} sends {s[n][1].msg} to rank {dst}, which never receives it")
            if n >= len(s):
                out.unmatched.append(f"rank {dst} receives {r[n][1].msg} from rank {src}, which never sends it")
        for n, (b, op) in enumerate(s):
            partner[(src, b)].append((op, (dst, r[n][0]) if n < len(r) else None))
        for n, (b, op) in enumerate(r):
            partner[(dst, b)].append((op, (src, s[n][0]) if n < len(s) else None))
    pos = {rank: 0 for rank in programs}

    def waiting(rank: int) -> list[Op]:  # ops of the current batch whose counterpart is not posted
        return [op for op, p in partner.get((rank, pos[rank]), []) if p is None or pos[p[0]] < p[1]]

    progress = True
    while progress:
        progress = False
        for rank, batches in programs.items():
            while pos[rank] < len(batches) and not waiting(rank):
                pos[rank] += 1
                progress = True
    for rank, batches in programs.items():
        if pos[rank] < len(batches):
            out.stuck[rank] = (pos[rank], waiting(rank))
    return out


def unbatched(programs: dict[int, list[list[Op]]]) -> dict[int, list[list[Op]]]:
    """The same ops with every op its own batch, sends first: bare ``isend``/``irecv`` on one
    NCCL communicator, which executes them in posting order (the pattern that only works where
    each op progresses on its own, as on gloo)."""
    return {rank: [[op] for batch in batches for op in sorted(batch, key=lambda o: not o.send)]
            for rank, batches in programs.items()}
