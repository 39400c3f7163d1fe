"""The next step's batch, prepared while this step runs (no reading, tokenizing or packing on
the critical path).

One background thread builds step ``s+1``'s host batch (CPU tensors and host ints) as soon as
step ``s``'s is handed out. The batch of a step is a pure function of the config and the step,
built with explicit generators only, so building it early — on another thread — changes nothing
the run computes. An error in the worker (a data file changed under the run, say) is raised by
:meth:`StepPrefetcher.get` for the step it belongs to.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class StepPrefetcher:
    """``get(step)`` returns ``build(step)`` for steps ``first, first+1, … < last``, in order,
    each built one step ahead on a background thread."""

    def __init__(self, build: Callable[[int], object], first: int, last: int):
        self._build, self._last = build, last
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshtron-data")
        self._next: tuple[int, Future] | None = None
        self._submit(first)

    def _submit(self, step: int) -> None:
        self._next = (step, self._pool.submit(self._build, step)) if step < self._last else None

    def get(self, step: int):
        assert self._next is not None and self._next[0] == step, (step, self._next)
        out = self._next[1].result()
        self._submit(step + 1)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
