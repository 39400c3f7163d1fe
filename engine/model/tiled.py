"""Tiled MLP (``train.tile_mlp``, ALST's TiledMLP): the MLP over token tiles, recomputed inside.

Legend: t this rank's token slice (T/tp under sequence parallelism), h hidden size, F ffn size of
this tp rank, N the number of tiles.

Why: at long sequence the MLP's intermediates are a layer's largest activations. The column-parallel
``linear_fc1`` sees every tp rank's tokens, so its output is ``[tp·t, 2F]`` and SwiGLU's ``[tp·t, F]``
(plus their gradients in backward), against the layer input's ``[t, h]``. The MLP is token-wise, so
it can run over tiles of tokens whose intermediates never exist at the same time.

Mechanism: one autograd function around the whole MLP. Its forward runs each tile without a graph
(a Function's forward runs with grad disabled) and writes the tile into the output; it saves only the
input ``x_th``. Its backward takes the tiles one by one: rebuild the tile's graph from its slice of
x with the same modules (so the tp collectives and their backward are the linears' own), take the
gradients with ``torch.autograd.grad``, write the tile's slice of dx and add the weight gradients
into accumulators; the tile's graph and intermediates are freed before the next tile is rebuilt.
Under ``train.recompute`` full / attention-cached the layer's checkpoint sees one op saving x: it
rebuilds x in backward by rerunning the layer (this function's forward included), then this
function rebuilds its tiles. Tile bounds come from x's shape (host ints; no device sync, I-9).

Tensor parallelism: every tp rank holds the same t tokens (I-3), so every rank cuts the same tiles
and runs them in the same order, forward and backward, and the collectives pair up. Tile i's fc1
all-gathers every rank's tile i, and fc2's reduce-scatter hands each rank back its own tile i; the
gathered tokens are in another order than the untiled gather's, which a token-wise MLP does not see.

Gradient placement: the weights are inputs of the function and their gradients are returned once,
summed over tiles, so autograd's AccumulateGrad runs once per backward as it does untiled. What hangs
on it sees one gradient: the post-accumulate-grad hooks of engine/parallel/grads.py (which add it to
``main_grad`` and mark the parameter complete; a second arrival after the bucket's reduction has
started is an error), and FSDP2, which reads the unsharded ``.grad`` after the layer's backward.
``torch.autograd.grad`` never touches ``.grad``. The sums over tiles are fp32 (I-10), cast to the
parameter dtype once.

Memory: the peak holds one tile's intermediates (``~1/N`` of the untiled ones), in forward and
backward. Paid back: the fp32 accumulators (the size of the MLP weights) and one tile's weight
gradient during this MLP's backward, where the untiled backward holds one weight gradient at a time;
a gain when tokens ≫ h, the long-sequence regime tiling is for. Compute: the MLP forward runs once
more than untiled in every recompute mode (each tile again in backward), and smaller tiles make
smaller matmuls (keep a tile's tokens in the thousands on a GPU).

Exactness: each output row is the same operations on the same row; what differs is the matmuls'
blocking and the order of the weight-gradient sums (over tiles, then within one) — fp32 round-off
(tests/test_tiled_mlp.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def tile_bounds(num_tokens: int, num_tiles: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``min(num_tiles, num_tokens)`` contiguous tiles covering ``num_tokens``
    (at least one, possibly empty), the first ``num_tokens % n`` one token longer."""
    n = max(1, min(num_tiles, num_tokens))
    size, extra = divmod(num_tokens, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


class _Tiled(torch.autograd.Function):
    """``cat([fn(x[s:e]) for s, e in bounds])`` saving only x; see the module docstring."""

    @staticmethod
    def forward(ctx, x, fn, module, bounds, *params):
        ctx.fn, ctx.module, ctx.bounds = fn, module, bounds
        ctx.save_for_backward(x)
        # tiles of a detached x: a view taken under no_grad still says requires_grad without a
        # grad_fn, which trips forward hooks that hang gradient hooks on module inputs (ModTracker)
        out, x_free = None, x.detach()
        for start, end in bounds:
            y = fn(x_free[start:end])
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[start:end] = y
        return out

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        # the module's parameters now: the objects a rebuilt tile uses (FSDP2 unshards into the
        # same unsharded parameters before the layer's backward)
        params = list(ctx.module.parameters())
        assert len(params) == len(ctx.needs_input_grad) - 4, "the module's parameters changed since forward"
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if need_dx else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        for start, end in ctx.bounds:
            with torch.enable_grad():
                x_tile = x[start:end].detach().requires_grad_(need_dx)
                y = ctx.fn(x_tile)
            inputs = ([x_tile] if need_dx else []) + wanted
            grads = torch.autograd.grad(y, inputs, dy[start:end], allow_unused=True)
            del y  # this tile's graph and intermediates go before the next tile's are built
            if need_dx:
                dx[start:end] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is None:
                    continue
                if sums[i] is None:
                    sums[i] = g.to(torch.float32, copy=True)  # copy: a gradient may alias dy
                else:
                    sums[i].add_(g)
            grads = g = None  # this tile's weight gradients go before the next tile's are made
        sums = iter(s if s is None else s.to(p.dtype) for s, p in zip(sums, wanted))
        return (dx, None, None, None, *(next(sums) if need else None for need in ctx.needs_input_grad[4:]))


def tiled(fn, x: torch.Tensor, num_tiles: int, module: nn.Module) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn`` (rows of x independent), computed over ``num_tiles`` tiles
    of x's dim 0 with each tile's intermediates rebuilt in backward; ``fn``'s weights are
    ``module``'s parameters."""
    return _Tiled.apply(x, fn, module, tile_bounds(x.shape[0], num_tiles), *module.parameters())
