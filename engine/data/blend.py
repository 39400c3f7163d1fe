"""Megatron's blend of several indexed datasets (``--data-path [w1, prefix1, w2, prefix2, ...]``):
the weights parsed and normalised as megatron-core does, and which dataset each sample comes
from (megatron-core's ``build_blending_indices`` of ``helpers.cpp``, bit for bit, without it)."""
from __future__ import annotations

import os

import numpy as np


def _number(value) -> float | None:
    """``value`` as a weight when it is a number or a string of one, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_blend(path) -> tuple[list[str], list[float]]:
    """Megatron's ``--data-path``: a prefix, a list of prefixes (equal weights), or
    ``[w1, prefix1, w2, prefix2, ...]`` (weights as numbers or strings such as "0.3").
    Returns ``(prefixes, weights)`` with the weights normalised to sum to 1."""
    if isinstance(path, (str, os.PathLike)):
        path = [os.fspath(path)]
    if not isinstance(path, (list, tuple)) or not path:
        raise ValueError(f"expected a dataset prefix, a list of prefixes or [w1, prefix1, w2, prefix2, ...], "
                         f"got {path!r}")
    if _number(path[0]) is None:  # prefixes only
        prefixes, weights = list(path), [1.0] * len(path)
    else:
        if len(path) % 2:
            raise ValueError(f"a weighted blend [w1, prefix1, w2, prefix2, ...] has an even number of elements; "
                             f"got {len(path)}, and element {len(path) - 1} ({path[-1]!r}) has no partner")
        prefixes, weights = list(path[1::2]), []
        for i, w in enumerate(path[0::2]):
            weight = _number(w)
            if weight is None:
                raise ValueError(f"element {2 * i} ({w!r}) is where a weight is expected in [w1, prefix1, "
                                 f"w2, prefix2, ...]; expected a number")
            if not weight > 0 or not np.isfinite(weight):
                raise ValueError(f"element {2 * i}: weight {w!r} for {path[2 * i + 1]!r} must be a finite "
                                 f"number > 0 (megatron-core requires positive weights; drop the dataset instead)")
            weights.append(weight)
    for i, p in enumerate(prefixes):
        where = i if len(prefixes) == len(path) else 2 * i + 1
        if not isinstance(p, (str, os.PathLike)) or _number(p) is not None:
            raise ValueError(f"element {where} ({p!r}) is a number where a dataset prefix is expected; a weighted "
                             f"blend alternates [w1, prefix1, w2, prefix2, ...]")
        if not os.fspath(p).strip():
            raise ValueError(f"element {where} is an empty dataset prefix")
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    return [os.fspath(p).strip() for p in prefixes], (np.asarray(weights, dtype=np.float64) / total).tolist()


def blend_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron-core's ``build_blending_indices`` (helpers.cpp), bit for bit: sample ``s`` comes from
    the dataset ``i`` with the largest ``weights[i] * max(s, 1) - taken[i]`` (the first on ties),
    and is that dataset's ``taken[i]``-th sample. The weights are normalised first, as
    megatron-core's ``BlendedDataset`` does. Returns ``(dataset_index int16, dataset_sample_index
    int64)``, each of ``num_samples``; a prefix of a longer call equals a shorter call.

    Cost: the greedy is sequential, so it runs on ~1024 chunks of the samples at once, each from a
    guessed start (floor of ``w * s`` plus the largest remainders), then re-runs the chunks whose
    guess was wrong from their predecessor's end until the two runs meet (a few steps as a rule).
    That is O(num_samples × datasets) numpy work in ~num_samples/1024 Python steps: 10M samples over a
    few datasets take ~1-2 s on one core, 300 datasets ~15 s (the C++ loop: ~0.2 s and ~6 s). Datasets
    with tiny weights (< ~1e-6) can leave long stretches to re-run in plain Python (~2 µs a sample).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not 0 < w.size < 32767 or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"blend weights must be 1 to 32766 finite numbers > 0, got {weights!r}")
    w = w / np.sum(w)  # megatron.core.datasets.utils.normalize
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    which = _blend_choices(w, int(num_samples))
    sizes = np.bincount(which, minlength=w.size)
    order = np.argsort(which, kind="stable")
    sample = np.empty(which.size, dtype=np.int64)
    sample[order] = np.arange(which.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return which, sample


def _blend_choices(w: np.ndarray, num: int) -> np.ndarray:
    """The greedy's dataset for each of ``num`` samples. Row j of ``out`` always holds the greedy's
    run from the counts ``begin[j]`` at sample ``starts[j]`` to ``end[j]``; once every
    ``begin[j] == end[j - 1]`` (``begin[0]`` is the true zero), which the in-order pass ensures, the
    rows joined are the greedy's run from sample 0."""
    n = w.size
    if num == 0 or n == 1:
        return np.zeros(num, dtype=np.int16)
    length = min(num, max(2048, -(-num // 1024)))
    starts = np.arange(-(-num // length), dtype=np.int64) * length
    out = np.empty((starts.size, length), dtype=np.int16)  # row j: samples starts[j] + [0, length)
    begin = _guess_counts(w, starts)
    begin[0] = 0  # the true start
    end = begin.copy()
    _run(w, starts, end, out)
    for _ in range(4):  # re-run wrong chunks in parallel while there are many
        bad = np.flatnonzero((begin[1:] != end[:-1]).any(1)) + 1
        if bad.size <= 8:
            break
        rows = out[bad]
        _run(w, starts[bad], end[bad - 1].copy(), rows, old=begin[bad])
        out[bad] = rows
        begin[bad] = end[bad - 1]
        end[bad] = begin[bad] + _row_counts(rows, n)
    for j in range(1, starts.size):  # then the rest in order, each from its true start
        if (begin[j] != end[j - 1]).any():
            met = _rerun_one(w.tolist(), out[j], int(starts[j]), end[j - 1].tolist(), begin[j].tolist())
            begin[j] = end[j - 1]
            if met is not None:
                end[j] = met
    return out.reshape(-1)[:num].copy()


def _guess_counts(w: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """A likely count per dataset before each start: ``floor(w * s)``, plus one for the datasets
    with the largest remainders until they sum to ``s`` (those the greedy has served already)."""
    ideal = np.multiply.outer(np.maximum(starts, 1).astype(np.float64), w)
    counts = np.floor(ideal).astype(np.int64)
    ahead = starts - counts.sum(1)
    order = np.argsort(counts - ideal, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(w.size)[None, :].repeat(len(starts), 0), axis=1)
    return counts + (rank < ahead[:, None])


def _row_counts(rows: np.ndarray, n: int) -> np.ndarray:
    flat = rows.astype(np.int64) + n * np.arange(len(rows))[:, None]
    return np.bincount(flat.reshape(-1), minlength=len(rows) * n).reshape(len(rows), n)


def _run(w, starts, counts, out, old=None) -> None:
    """The greedy on every row of ``out`` at once, from ``counts`` (updated in place). With ``old``,
    the counts the rows' present choices started from: a row stops once its counts equal the old
    run's, since from there on the row already holds the answer."""
    rows = np.arange(len(out))
    diff = None if old is None else counts - old
    for t in range(out.shape[1]):
        if diff is not None:
            live = diff.any(1)
            if not live.all():
                rows, starts, diff = rows[live], starts[live], diff[live]
                counts = counts[live]  # a copy: the caller recounts rows that stop
                if not rows.size:
                    return
        err = np.multiply.outer(np.maximum(starts + t, 1).astype(np.float64), w)
        err -= counts  # the C++ sum: weight * max(s, 1) - (double) count
        k = err.argmax(1)  # the first maximum, as the C++ loop's strict '>'
        if diff is not None:
            diff[np.arange(rows.size), k] += 1
            diff[np.arange(rows.size), out[rows, t]] -= 1
        counts[np.arange(rows.size), k] += 1
        out[rows, t] = k


def _rerun_one(w: list, row: np.ndarray, start: int, counts: list, old: list):
    """One chunk from its true start, in plain Python, until it meets its old run; returns the end
    counts when it never does (else ``None``: the old end holds)."""
    diff = [c - o for c, o in zip(counts, old)]
    unequal = sum(1 for d in diff if d)
    for t in range(len(row)):
        if not unequal:
            return None
        x = float(max(start + t, 1))
        err = [wi * x - ci for wi, ci in zip(w, counts)]
        k, o = err.index(max(err)), int(row[t])
        if k != o:
            for i, step in ((k, 1), (o, -1)):
                unequal -= diff[i] != 0
                diff[i] += step
                unequal += diff[i] != 0
            row[t] = k
        counts[k] += 1
    return None if not unequal else np.asarray(counts, dtype=np.int64)
