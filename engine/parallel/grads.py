"""fp32 gradient accumulation (megatron-core's ``main_grad``) and its bucketed, overlapped
reduction over dp×cp (I-10).

Every trainable parameter gets ``p.main_grad``: an fp32 view of a contiguous *bucket* buffer.
After each backward, autograd's gradient of ``p`` (in the parameter's dtype: bf16 under
``train.bf16``) is added into ``p.main_grad`` by a post-accumulate-grad hook and freed, so
micro-batch gradients are summed in fp32 whatever the parameter dtype, and the per-parameter
``.grad`` never outlives its backward.

Buckets hold parameters of one model chunk in backward order (the reverse of registration) up
to ``bucket_size`` elements, padded to a multiple of ``multiple`` (the dp×cp size, so a bucket
splits evenly for a reduce-scatter). Their owner (engine/optim.py, engine/parallel/zero.py)
decides what a bucket's reduction is (all-reduce, or reduce-scatter into its shard) and gives
it as ``launch(bucket) -> work``.

Overlap: the pipeline runtime calls :meth:`GradBuffers.grad_sync` before every backward action
with whether it is the chunk's last one of the step (``PipelineRuntime.grad_sync``). During a
chunk's last backward, each parameter's hook marks it complete; a bucket whose parameters are
all complete launches its asynchronous reduction at once — while backward goes on with the
earlier layers, as megatron-core's DDP does. Buckets launch strictly in bucket order (bucket 0
holds the last layers, which finish first), so every rank of the dp×cp group issues the same
collectives in the same order whatever its timing (NCCL needs that). Buckets not launched by the
end of backward (no runtime hook, or a parameter that got no gradient) launch in order in
:meth:`finish`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class GradBucket:
    """One contiguous fp32 gradient buffer: ``params`` at ``offsets`` of ``data`` (padded)."""

    index: int
    chunk: int
    params: list[torch.nn.Parameter]
    offsets: list[int]
    data: torch.Tensor
    key: tuple = ()
    pending: int = 0
    work: object = field(default=None, repr=False)

    def views(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``flat`` (laid out like ``data``; default ``data``) cut into parameter-shaped views."""
        flat = self.data if flat is None else flat
        return [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]


def plan_buckets(chunks: list[list[torch.nn.Parameter]], bucket_size: int, multiple: int,
                 key: Callable[[torch.nn.Parameter], tuple] = lambda p: ()) -> list[tuple]:
    """``[(chunk, key, params, offsets, padded numel)]``: each chunk's parameters in backward
    order (reverse of ``chunks[c]``), grouped by ``key(p)`` (parameters of different keys never
    share a bucket: ZeRO-1 keeps weight-decay and tied-embedding parameters apart), cut into
    buckets of at most ``bucket_size`` elements (a larger parameter gets a bucket of its own),
    each padded to a multiple of ``multiple``, and ordered by when backward completes them.
    Chunks are taken last first: interleaved backward finishes the last model chunk first."""
    out = []
    for c in reversed(range(len(chunks))):
        buckets: list[tuple[tuple, list]] = []
        current: dict[tuple, list] = {}
        size: dict[tuple, int] = {}
        for p in reversed(chunks[c]):
            k = key(p)
            if k not in current or (current[k] and size[k] + p.numel() > bucket_size):
                current[k], size[k] = [], 0
                buckets.append((k, current[k]))
            current[k].append(p)
            size[k] += p.numel()
        # in the order backward completes them (their last parameter), so launching in bucket
        # order never makes a finished bucket wait behind one still filling
        position = {id(p): i for i, p in enumerate(reversed(chunks[c]))}
        buckets.sort(key=lambda kp: position[id(kp[1][-1])])
        for k, params in buckets:
            offsets, total = [], 0
            for p in params:
                offsets.append(total)
                total += p.numel()
            out.append((c, k, params, offsets, -(-total // multiple) * multiple))
    return out


class GradBuffers:
    """The fp32 ``main_grad`` buckets of a set of parameters, with their hooks and reductions.

    ``plan`` comes from :func:`plan_buckets`; ``launch(bucket)`` starts the bucket's reduction
    and returns something with ``wait()`` (or None when it completed synchronously)."""

    def __init__(self, plan: list[tuple], device: torch.device, launch: Callable[[GradBucket], object]):
        self.launch_fn = launch
        self.buckets: list[GradBucket] = []
        self._where: dict[int, GradBucket] = {}
        for i, (chunk, key, params, offsets, padded) in enumerate(plan):
            b = GradBucket(i, chunk, params, offsets, torch.zeros(padded, dtype=torch.float32, device=device), key)
            for p, view in zip(params, b.views()):
                p.main_grad = view
                self._where[id(p)] = b
            self.buckets.append(b)
        self._final: set[int] = set()
        self._done: set[int] = set()
        self._next = 0
        for b in self.buckets:
            for p in b.params:
                # a new optimizer over the same model supersedes the old buffers: their hook would
                # otherwise take the gradient first (and keep the old buffers alive)
                old = getattr(p, "_main_grad_hook", None)
                if old is not None:
                    old.remove()
                p._main_grad_hook = p.register_post_accumulate_grad_hook(self._accumulate)
        self._reset_pending()

    # -- accumulation and overlap --------------------------------------------------------------
    def grad_sync(self, chunk: int, last: bool) -> None:
        """Called before each backward action of model chunk ``chunk``; ``last``: it is the
        chunk's final backward of the step, after which its buckets may reduce."""
        if last:
            self._final.add(chunk)
        else:
            self._final.discard(chunk)

    def _accumulate(self, p: torch.nn.Parameter) -> None:
        b = self._where[id(p)]
        if b.index < self._next:
            raise RuntimeError(f"a gradient of a parameter of bucket {b.index} arrived after the bucket's "
                               f"reduction started: a backward ran after the chunk's last one (grad_sync)")
        p.main_grad.add_(p.grad)  # fp32 += the backward's gradient (any dtype)
        p.grad = None
        if b.chunk in self._final and id(p) not in self._done:
            self._done.add(id(p))
            b.pending -= 1
            if b.pending == 0:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._start(self.buckets[self._next])

    def _start(self, b: GradBucket) -> None:
        for p, view in zip(b.params, b.views()):  # a gradient set by hand (not through backward)
            if p.grad is not None:
                view.add_(p.grad)
                p.grad = None
        b.work = self.launch_fn(b)
        self._next = b.index + 1

    def finish(self) -> None:
        """Launch what backward did not, in bucket order, and wait for every reduction."""
        while self._next < len(self.buckets):
            self._start(self.buckets[self._next])
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None

    def zero(self) -> None:
        """Empty every bucket for the next step (after the update or a skipped step)."""
        for b in self.buckets:
            b.data.zero_()
            b.work = None
        self._final.clear()
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._done.clear()
        self._next = 0
        for b in self.buckets:
            b.pending = len(b.params)

    def tensors(self) -> list[torch.Tensor]:
        return [b.data for b in self.buckets]
