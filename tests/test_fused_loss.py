"""The fused, chunked, vocab-parallel output layer + cross-entropy (engine/fused_loss.py) against the
unfused head (whole logits, engine/loss.py's ``vocab_parallel_cross_entropy``).

Tolerances: fp32 per-token losses ≤ 1e-6 relative, gradients of the hidden states and of the
output weight ≤ 1e-6 of each tensor's max (the only differences are the log-sum-exp's summation
order and, over several chunks, the order in which dW's partial products are summed); bf16:
losses ≤ 1e-6 (both paths take the fp32 softmax of the same bf16 logits), gradients ≤ 1e-2 (one
bf16 rounding of dW per chunk before the fp32 sum, against one of the whole product).
Memory: a MemTracker over real tensors shows the chunked path's peak is the chunk's logits, not
the whole ``[T, V]``.
"""
from __future__ import annotations

import pytest
import torch

from engine.fused_loss import linear_cross_entropy
from engine.loss import IGNORE_INDEX, vocab_parallel_cross_entropy
from tests.harness import max_rel_diff, run_world

T, H, VOCAB, PADDED = 96, 32, 301, 384


def _problem(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.randn(PADDED, H, generator=g) * 0.5
    w[VOCAB:] = 0.0  # padding rows, as the model keeps them
    labels = torch.randint(0, VOCAB, (T,), generator=g)
    labels[::7] = IGNORE_INDEX
    grad = torch.rand(T, generator=g)  # per-token weights, as DPO gives them
    return x, w.to(dtype), labels, grad


def _run(fn, x, w, labels, grad):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    losses = fn(x, w, labels)
    (losses * grad).sum().backward()
    return losses.detach(), x.grad, w.grad


def _unfused(x, w, labels):
    return vocab_parallel_cross_entropy(x @ w.t(), labels, 0, VOCAB, None)


@pytest.mark.parametrize("chunk", [1, 5, 32, 96, 10_000])
def test_chunked_equals_unfused_fp32(chunk):
    x, w, labels, grad = _problem()
    ref = _run(_unfused, x, w, labels, grad)
    got = _run(lambda x, w, y: linear_cross_entropy(x, w, y, 0, VOCAB, None, chunk), x, w, labels, grad)
    assert torch.equal(got[0] == 0, ref[0] == 0)  # ignored tokens: exactly 0
    for a, b in zip(got, ref):
        assert max_rel_diff(a, b) <= 1e-6, (chunk, max_rel_diff(a, b))


def test_chunked_equals_unfused_bf16():
    x, w, labels, grad = _problem(torch.bfloat16)
    ref = _run(_unfused, x, w, labels, grad)
    got = _run(lambda x, w, y: linear_cross_entropy(x, w, y, 0, VOCAB, None, 16), x, w, labels, grad)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert max_rel_diff(got[0], ref[0]) <= 1e-6
    for a, b in zip(got[1:], ref[1:]):
        assert max_rel_diff(a.float(), b.float()) <= 1e-2


def test_no_grad_keeps_nothing_and_matches():
    x, w, labels, _ = _problem()
    with torch.no_grad():
        got = linear_cross_entropy(x, w, labels, 0, VOCAB, None, 8)
    assert got.grad_fn is None
    assert max_rel_diff(got, _unfused(x, w, labels)) <= 1e-6


def test_peak_memory_is_one_chunk():
    """T = 4096 tokens, V = 8192: the unfused head holds [T, V] fp32 (128 MiB) twice (logits, softmax); the
    chunked one (256 tokens) a few [256, V] chunks (8 MiB each) — its peak must stay under 1/4 of
    the unfused peak and under 40 MiB (chunk logits, the softmax in place, the bf16-free dW)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    t, h, v = 4096, 64, 8192
    x = torch.randn(t, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (t,))

    def peak(fn):
        tracker = MemTracker()
        tracker.track_external(x, w)
        with tracker:
            fn(x, w, labels).sum().backward()
        x.grad = w.grad = None
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    unfused = peak(lambda x, w, y: vocab_parallel_cross_entropy(x @ w.t(), y, 0, v, None))
    chunked = peak(lambda x, w, y: linear_cross_entropy(x, w, y, 0, v, None, 256))
    fixed = (x.numel() + 2 * w.numel()) * 4  # inputs and dW, in both
    assert unfused - fixed >= 1.9 * t * v * 4, unfused  # the logits and their fp32 working copy
    assert chunked - fixed <= 40 * 2**20, chunked - fixed
    assert chunked <= unfused / 4, (chunked, unfused)


def _tp_world(rank, world):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    x, w, labels, grad = _problem(seed=3)
    ref = _run(_unfused, x, w, labels, grad)
    local_vocab = PADDED // world
    start = rank * local_vocab
    out = {}
    for chunk in (8, 24, 10_000):
        def fn(xs, ws, y, chunk=chunk):
            return linear_cross_entropy(xs, ws, y, start, VOCAB, group, chunk)
        t = T // world
        got = _run(fn, x[rank * t:(rank + 1) * t], w[start:start + local_vocab], labels, grad)
        out[chunk] = (max_rel_diff(got[0], ref[0]),
                      max_rel_diff(got[1], ref[1][rank * t:(rank + 1) * t]) * ref[1][rank * t:(rank + 1) * t].abs().max().item()
                      / ref[1].abs().max().item(),
                      max_rel_diff(got[2], ref[2][start:start + local_vocab]) * ref[2][start:start + local_vocab].abs().max().item()
                      / max(ref[2].abs().max().item(), 1e-30))
    return out


@pytest.mark.parametrize("world", [4])
def test_vocab_parallel_sequence_parallel_exact(world):
    """tp = 4: each rank holds a quarter of the tokens (sequence parallel) and of the vocabulary
    (the last quarter is mostly padding); losses on every rank, and each rank's slices of dx and
    dW, equal the single-process unfused head (errors relative to the whole tensor's max)."""
    for rank, report in enumerate(run_world(world, _tp_world)):
        for chunk, errors in report.items():
            assert max(errors) <= 1e-6, (rank, chunk, errors)
