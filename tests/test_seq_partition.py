"""Seq1F1B sequence partitions against the paper's 7B example and an independent cost count."""
import itertools

import pytest

from engine.parallel.pipeline.partition import (
    chunk_bounds,
    compute_partition,
    uniform_partition,
)

LLAMA_7B = {"hidden": 4096, "num_layers": 32, "num_heads": 32, "head_dim": 128, "ffn": 11008, "vocab": 32000}
SMALL = {"hidden": 512, "num_layers": 4, "num_heads": 8, "head_dim": 64, "ffn": 1376, "vocab": 1000}


def token_cost(q, *, hidden, num_layers, num_heads, head_dim, ffn, vocab, mlp=6):
    """Forward FLOPs of the query at position q (0-based), written out term by term rather than
    with partition.py's closed form: embedding + output layer, then per layer the Q/K/V/O
    projections, the SwiGLU MLP (gate, up, down) and attention over the q + 1 keys it sees."""
    h, n, d = hidden, num_heads, head_dim
    embed_and_head = 2 * h * vocab + 2 * h * vocab
    qkvo = 3 * 2 * h * n * d + 2 * n * d * h
    attn = (q + 1) * n * (2 * d + 2 * d + 3)  # QKᵀ, P·V and softmax, per visible key
    return embed_and_head + num_layers * (qkvo + mlp * h * ffn + attn)


def chunk_costs(lengths, model, mlp=6):
    return [sum(token_cost(q, **model, mlp=mlp) for q in range(s, e)) for s, e in chunk_bounds(lengths)]


def test_published_7b_example():
    # Paper (and REFERENCES.md): 7B Llama at 32k, k=4 -> about [11040, 8416, 7080, 6232]. We get
    # [11056, 8416, 7072, 6224] (multiple 8; [11054, 8417, 7074, 6223] unrounded): every chunk
    # within 0.2 %; the test allows 1 %.
    got = compute_partition(32768, 4, 8, **LLAMA_7B)
    assert got == [11056, 8416, 7072, 6224]
    for g, want in zip(got, [11040, 8416, 7080, 6232]):
        assert abs(g - want) / want < 0.01
    # The paper's formula taken literally (4·l·h·f for the MLP, no SwiGLU gate) misses by ~5 %:
    # that is why partition.py counts the gate.
    plain = compute_partition(32768, 4, 8, swiglu=False, **LLAMA_7B)
    assert abs(plain[0] - 11040) / 11040 > 0.04


@pytest.mark.parametrize("model", [LLAMA_7B, SMALL], ids=["7b", "small"])
@pytest.mark.parametrize("total,k,multiple", [(32768, 4, 16), (32768, 4, 1), (65536, 8, 16), (4096, 3, 16),
                                              (131072, 16, 64), (8192, 2, 8)])
def test_compute_partition_invariants(model, total, k, multiple):
    got = compute_partition(total, k, multiple, **model)
    assert len(got) == k and sum(got) == total
    assert all(n % multiple == 0 and n >= multiple for n in got)
    assert all(a >= b for a, b in itertools.pairwise(got)), got


@pytest.mark.parametrize("model", [LLAMA_7B, SMALL], ids=["7b", "small"])
@pytest.mark.parametrize("total,k", [(32768, 4), (16384, 2), (24576, 6)])
def test_equal_cost(model, total, k):
    # multiple=1: only integer rounding (< 1 token a boundary) separates this from the exact solution.
    costs = chunk_costs(compute_partition(total, k, 1, **model), model)
    assert (max(costs) - min(costs)) / min(costs) < 0.02, costs
    assert sum(costs) == sum(token_cost(q, **model) for q in range(total))
    # Equal lengths are far from equal cost at these lengths (why the paper partitions by FLOPs).
    uniform = chunk_costs(uniform_partition(total, k, 1), model)
    assert (max(uniform) - min(uniform)) / min(uniform) > 0.1


def test_equal_cost_plain_mlp():
    costs = chunk_costs(compute_partition(32768, 4, 1, swiglu=False, **LLAMA_7B), LLAMA_7B, mlp=4)
    assert (max(costs) - min(costs)) / min(costs) < 0.02, costs


def test_k1_and_tight_fits():
    assert compute_partition(32768, 1, 16, **LLAMA_7B) == [32768]
    assert uniform_partition(32768, 1, 16) == [32768]
    # total == k·multiple: the only partition; rounding would otherwise leave empty chunks.
    assert compute_partition(64, 4, 16, **LLAMA_7B) == [16, 16, 16, 16]
    assert compute_partition(80, 4, 16, **LLAMA_7B) == [32, 16, 16, 16]


def test_uniform_partition():
    assert uniform_partition(32768, 4, 16) == [8192] * 4
    assert uniform_partition(100, 3, 4) == [36, 32, 32]
    assert uniform_partition(48, 3, 16) == [16, 16, 16]
    assert uniform_partition(7, 7, 1) == [1] * 7
    got = uniform_partition(32768, 5, 16)
    assert sum(got) == 32768 and all(n % 16 == 0 for n in got) and max(got) - min(got) <= 16


def test_chunk_bounds():
    assert chunk_bounds([10, 6, 4]) == [(0, 10), (10, 16), (16, 20)]
    assert chunk_bounds([]) == []


@pytest.mark.parametrize("fn", [uniform_partition,
                                lambda t, k, m: compute_partition(t, k, m, **LLAMA_7B)], ids=["uniform", "compute"])
def test_impossible_inputs(fn):
    with pytest.raises(ValueError, match=r"total=48 .*k=4 .*multiple=16.*needs total >= 64"):
        fn(48, 4, 16)
    with pytest.raises(ValueError, match=r"total=100 .*multiple=16.*pad the sequence to 112"):
        fn(100, 2, 16)
    with pytest.raises(ValueError, match=r"k=0"):
        fn(64, 0, 16)
    with pytest.raises(ValueError, match=r"multiple=0"):
        fn(64, 2, 0)
