"""Fail fast as a world: one rank's failure ends every rank within ``dist.abort_poll_s``.

A rank that fails writes an abort record (its rank and the error's last line) to the world's
rendezvous store — torchrun's agent store, or the store ``init_process_group`` made — and prints
its traceback. Every rank runs a daemon thread that polls the store for that record; on seeing it
a rank prints one line naming the failed rank and leaves with exit code 1 at once, even from
inside a collective that would otherwise wait for the dead peer until ``dist.timeout_s``.

So the traceback appears once (a rank whose own collective failed *because* a peer died finds
the record already there and prints the one-line note instead), and no launcher is needed for
the others to stop: plain ``srun`` or hand-started ranks behave like torchrun. A rank killed
without a word (SIGKILL, a lost node) writes nothing; its peers then fail in their next
collective with it (gloo notices the closed connection at once, NCCL at ``dist.timeout_s`` at the
latest) and that failure takes the same path.

A rank that is alive but silent — stopped (SIGSTOP), hung in a p2p exchange that gloo never
times out, its host frozen — writes nothing either, and its peers may wait for it forever (gloo's
send/recv take no timeout). So each rank's thread also beats a heartbeat counter in the store
every poll and reads those of the next two ranks; a peer whose counter has not moved for
``dist.timeout_s`` is reported like a failure ("rank R has been silent for N s") and every live
rank leaves non-zero, so torchrun restarts the world. A rank that has finished marks its
heartbeat "done".

Records are keyed by torchrun's restart count, so a restarted world does not see the abort of
the attempt before it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_KEY = "meshtron/abort/{}"
_BEAT = "meshtron/heartbeat/{}/{}"
_DONE = b"done"
_STORE_GONE = "the rendezvous store is gone (rank 0 has exited)"


def _store():
    """The default process group's store (the rendezvous store), or None."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _get_default_store  # stable since torch 1.x

    return _get_default_store()


class Watchdog:
    """Polls the abort record of this attempt; ``report`` writes it."""

    def __init__(self, rank: int, poll_s: float = 1.0, exit=os._exit, silent_s: float | None = None,
                 world: int = 1):
        """``silent_s``: report a peer whose heartbeat has not moved for this long (None: no
        heartbeats); ``world``: the number of ranks."""
        self.rank, self.poll_s, self._exit = rank, poll_s, exit
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.key = _KEY.format(attempt)
        self.silent_s = silent_s if world > 1 else None
        self._beats = {r: _BEAT.format(attempt, r) for r in range(world)}
        # each rank watches the next two (mod world): every rank is watched twice, and the store
        # serves O(world) reads per poll, not O(world²)
        self._watched = sorted({(rank + i) % world for i in (1, 2)} - {rank})
        self._count, self._seen = 0, {}
        self.store = _store()
        # without torchrun's agent, rank 0's process serves the store: it lingers a few polls
        # before leaving so the others can still read the record
        hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        self.linger_s = 3 * poll_s + 0.5 if hosts and self.store is not None else 0.0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Watchdog":
        if self.store is not None:
            if self.silent_s:
                self._beat()  # before the thread: a peer that reads it first sees it present
                now = time.monotonic()
                self._seen = {r: (None, now) for r in self._watched}
            self._thread = threading.Thread(target=self._watch, name="meshtron-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.silent_s and self.store is not None:
            # finished: a peer still finishing must not take this quiet for a hang
            with contextlib.suppress(Exception):  # the store's host is gone: nobody is waiting
                self.store.set(self._beats[self.rank], _DONE)

    def _beat(self) -> None:
        self._count += 1
        self.store.set(self._beats[self.rank], str(self._count))

    def silent_peer(self) -> tuple[int, float] | None:
        """(rank, seconds) of a peer whose heartbeat has not moved for ``silent_s``, else None."""
        now = time.monotonic()
        try:
            self._beat()
            for r in self._watched:
                key = self._beats[r]
                value = self.store.get(key) if self.store.check([key]) else None
                last, since = self._seen[r]
                if value != last:
                    self._seen[r] = (value, now)
                elif value != _DONE and now - since > self.silent_s:
                    return r, now - since
        except Exception:  # noqa: BLE001 - the store's host is gone: failed_peer says so
            return None
        return None

    def failed_peer(self) -> str | None:
        """The abort record, if some rank has written one (or word that the store is gone: its
        host, rank 0, has exited, so the world is ending)."""
        if self.store is None:
            return None
        try:
            if self.store.check([self.key]):
                return self.store.get(self.key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store's host is gone
            return _STORE_GONE
        return None

    def report(self, what: str) -> bool:
        """Record this rank's failure for the others; False when another rank failed first (then
        this failure is a consequence and the caller should not print its traceback)."""
        if self.store is None:
            return True
        try:
            first = self.store.compare_set(self.key, "", f"rank {self.rank}: {what}").decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store's host has exited: it, or a rank before it, failed first
            return False
        return first.startswith(f"rank {self.rank}:")

    def leave(self, code: int) -> None:
        """Exit now (after the store host's linger), skipping teardown that could wait on peers."""
        from engine import faults

        faults.note("exit", rank=self.rank, code=code)  # tools/chaos.py times detection by it
        sys.stdout.flush()
        sys.stderr.flush()
        if self.linger_s:
            self._stop.set()
            threading.Event().wait(self.linger_s)
        self._exit(code)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            record = self.failed_peer()
            if record is not None and not record.startswith(f"rank {self.rank}:"):
                print(f"meshtron-train: rank {self.rank} stopping: {peer_summary(record)} "
                      f"(its error is printed by that rank)", file=sys.stderr, flush=True)
                self.leave(1)
            silent = self.silent_peer() if self.silent_s else None
            if silent is not None:
                what = (f"rank {silent[0]} has been silent for {silent[1]:.0f}s (dist.timeout_s={self.silent_s:g}): "
                        f"stopped, hung or unreachable")
                if self.report(f"RuntimeError: {what}"):  # the first to notice says it, in full
                    print(f"meshtron-train: rank {self.rank} stopping: {what}", file=sys.stderr, flush=True)
                else:
                    print(f"meshtron-train: rank {self.rank} stopping: {peer_summary(self.failed_peer() or '')} "
                          f"(its error is printed by that rank)", file=sys.stderr, flush=True)
                self.leave(1)


def peer_summary(record: str, width: int = 80) -> str:
    """The start of another rank's abort record, for this rank's notice: the failing rank and
    its error's first words (the whole message is printed once, by that rank)."""
    line = record.splitlines()[0] if record else record
    return line if len(line) <= width else line[:width - 1].rstrip() + "…"


def last_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
