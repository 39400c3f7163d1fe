"""Point-to-point communication: the one primitive every p2p user calls (the pipeline runtime,
the ring attention), with NCCL's rules (DESIGN I-7) and a CPU mode that enforces them.

:func:`exchange` posts a step's sends and receives together as ONE ``batch_isend_irecv`` (one
NCCL group): NCCL pairs a send with a receive only once both are posted (past its small internal
buffer), completes a group only when every op of it pairs, runs the ops of one communicator in
order, and ignores tags — messages between two ranks, per direction, pair in posting order.
Every op here uses tag 0, so gloo pairs them the same way.

On gloo every op progresses on its own (a posted send never holds back the receive posted after
it), so on CPU a pattern that hangs NCCL (two neighbours each posting a send, then receiving)
completes. ``MESHTRON_P2P_RENDEZVOUS=1`` (read at every call) makes every batch
behave like NCCL's instead: a receiver first sends a one-element *ready* token to the source of
each of its receives; a sender posts its data only after the token of the matching receive
arrives (tokens travel on their own tag, data on tag 0, each pairing in order), and the call
returns once the whole batch has paired — a rank blocks on each batch, so its batches also run
one after another in posting order, as NCCL runs one communicator's (stricter across groups,
never looser). A wait longer than
``MESHTRON_P2P_TIMEOUT_S`` seconds (default 60) raises :class:`P2PTimeout` naming the rank, the
peer and the schedule step, instead of hanging. (gloo only; a timed-out group's connection to
that peer is closed, so the run must stop.)
"""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from engine.parallel.comm import COUNTER

_TOKEN_TAG = 1  # the emulation's ready tokens; data always travels on tag 0


class P2PTimeout(RuntimeError):
    """A p2p batch did not pair within ``MESHTRON_P2P_TIMEOUT_S`` (rendezvous mode): under NCCL
    this step would hang."""


def rendezvous_mode() -> bool:
    """Whether batches emulate NCCL's rendezvous (``MESHTRON_P2P_RENDEZVOUS=1``)."""
    return os.environ.get("MESHTRON_P2P_RENDEZVOUS", "0") == "1"


def rendezvous_timeout_s() -> float:
    return float(os.environ.get("MESHTRON_P2P_TIMEOUT_S", "60"))


class Batch:
    """The requests of one posted batch; :meth:`wait` before reading a received buffer or
    reusing a sent one."""

    def __init__(self, works=()):
        self._works = list(works)

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []


def exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group, *,
             step: str, kind: str | None = None) -> Batch:
    """Post ``sends`` (tensor, global destination rank) and ``recvs`` (buffer, global source
    rank) as one batch in ``group``; ``step`` names the schedule step for errors, ``kind`` counts
    the sent bytes (:data:`engine.parallel.comm.COUNTER`). No autograd: the callers are autograd
    functions or the pipeline runtime, which route gradients themselves.

    Ops between the same two ranks in the same direction pair in list order on both sides."""
    sends = [(t.contiguous(), peer) for t, peer in sends]
    if kind is not None:
        for t, _ in sends:
            COUNTER.record(kind, group, t.numel() * t.element_size())
    if not sends and not recvs:
        return Batch()
    if rendezvous_mode():
        _rendezvous(sends, recvs, group, step)
        return Batch()
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer, group) for buf, peer in recvs]
    return Batch(dist.batch_isend_irecv(ops))


def _rendezvous(sends, recvs, group, step: str) -> None:
    """One batch with NCCL's pairing rule, on gloo (module docstring). Blocks until it pairs."""
    if group is not None and dist.get_backend(group) != "gloo":
        raise ValueError("MESHTRON_P2P_RENDEZVOUS=1 emulates NCCL on gloo; unset it on other backends")
    timeout = rendezvous_timeout_s()
    deadline = time.monotonic() + timeout
    me, pending = dist.get_rank(), []
    for buf, peer in recvs:  # "my receive is posted": one token per receive, in order
        token = torch.ones(1, dtype=torch.int32)
        pending.append((dist.isend(token, peer, group, tag=_TOKEN_TAG), f"the ready token it sent to rank {peer}",
                        peer, token))
    for buf, peer in recvs:
        pending.append((dist.irecv(buf, peer, group), f"data from rank {peer}", peer, buf))
    for t, peer in sends:
        token = torch.empty(1, dtype=torch.int32)
        _wait(dist.irecv(token, peer, group, tag=_TOKEN_TAG), deadline, timeout, me, step,
              f"rank {peer} to post the receive of its send")
        pending.append((dist.isend(t, peer, group), f"its send to rank {peer} to complete", peer, t))
    for work, what, _, _ in pending:
        _wait(work, deadline, timeout, me, step, what)


def _wait(work, deadline: float, timeout: float, me: int, step: str, what: str) -> None:
    left = max(deadline - time.monotonic(), 0.001)
    try:
        work.wait(timeout=datetime.timedelta(seconds=left))
    except RuntimeError as e:
        raise P2PTimeout(f"p2p rendezvous: rank {me} waited more than {timeout:g} s for {what} at {step}; "
                         f"under NCCL this step hangs (a p2p deadlock, or an op the peer never posts). "
                         f"MESHTRON_P2P_TIMEOUT_S sets the limit. ({e})") from e
