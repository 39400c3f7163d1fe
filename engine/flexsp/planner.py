"""FlexSP planner: per step, the SP groups of each micro-batch and the sequences of every group.

The pool is the N = dp×cp ranks (a power of two). A plan is a list of micro-batches (rounds); each
splits range(N) into aligned blocks of sizes 2^i (``Group(start, size, seqs)``, start % size == 0)
and gives every sequence of the step to exactly one group, with Σ lengths / size ≤ the token limit
per rank (memory). The predicted step time is Σ over rounds of the slowest group (CostModel).

1. Rounds: the fewest micro-batches whose token totals fit N × max_tokens_per_rank (balancing
   predicted work under that capacity), and a couple more (FlexSP tries a few counts).
2. Buckets: DP over the sorted lengths into ``buckets`` contiguous buckets, minimising the padding
   to each bucket's longest length in one-rank seconds (rare long sequences, quadratic in cost,
   get buckets of their own); padded / real tokens is ``Plan.bucket_error``.
3. Per round a MILP (scipy.optimize.milp / HiGHS, :func:`milp_round`): group slots of every size
   2^i used or not, integer counts of each bucket per slot, Σ sizes ≤ N, memory per slot, slot
   time ≤ C; minimise the makespan C, bounded above by the greedy plan and below by work / N.
4. Counts back to sequences, longest first, to the owing slot whose projected time is least (real
   lengths, memory checked); the MILP's layout is also re-scheduled by LPT.
5. Greedy (fallback, ``solver="greedy"``, and the MILP's bound): earliest-finish LPT over
   candidate layouts (every uniform size; "tail" layouts giving each long sequence the smallest
   group that finishes it by a target time, the rest groups of a base size), then split/merge
   moves while they help. Deterministic.

Per round the better of the MILP and the greedy plan (by predicted time on the real lengths) is
kept. A time-limited MILP is not reproducible across processes: plan on one rank and broadcast.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


MIN_SOLVE_S = 0.05  # a MILP solve given less time than this is not started (HiGHS needs that much)


@dataclass
class Group:
    """An SP group of one micro-batch: ranks [start, start + size) and the indices of its sequences."""

    start: int
    size: int
    seqs: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """A step's plan: ``micro_batches[r]`` is round r's groups, partitioning range(num_ranks)."""

    micro_batches: list[list[Group]]
    makespan: float
    """Predicted seconds of the step: Σ over rounds of the slowest group."""
    solver: str
    """"milp" when the MILP's plan was kept for at least one round, else "greedy"."""
    solve_time_s: float
    bucket_error: float = 0.0
    """Padded tokens of the bucketing / real tokens (0 when buckets cover every distinct length)."""
    round_times: list[float] = field(default_factory=list)
    status: str = ""
    """What happened: rounds tried, MILP outcome per round."""


# -- bucketing --------------------------------------------------------------------------------------
def bucketize(lengths, num_buckets: int, weight=None, max_atoms: int = 1024) -> tuple[np.ndarray, float]:
    """Each sequence's bucket length (the longest length of its bucket) from contiguous buckets of
    the sorted distinct lengths, chosen by dynamic programming to minimise the padding
    Σ w(bucket length) − w(length) (w: ``weight``, a vectorised increasing function of the length;
    None counts tokens); returns (bucket length per sequence, padded tokens / real tokens).
    Beyond ``max_atoms`` distinct lengths, runs of neighbouring lengths (equal counts) are merged
    first, which bounds the DP's k×k table."""
    s = np.asarray(lengths, dtype=np.int64)
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    if len(values) <= num_buckets:
        return s.copy(), 0.0
    atom = np.arange(len(values))
    if len(values) > max_atoms:  # atom of each distinct value: equal shares of the sequences
        atom = np.minimum((np.cumsum(counts) - 1) * max_atoms // len(s), max_atoms - 1)
        atom = np.unique(atom, return_inverse=True)[1]
    k = int(atom.max()) + 1
    w = values.astype(np.float64) if weight is None else np.asarray(weight(values), dtype=np.float64)
    top = np.zeros(k)
    np.maximum.at(top, atom, w)
    cnt = np.concatenate([[0.0], np.cumsum(np.bincount(atom, counts, k))])
    tok = np.concatenate([[0.0], np.cumsum(np.bincount(atom, counts * w, k))])
    i_idx, j_idx = np.arange(k)[:, None], np.arange(k)[None, :]
    cost = top[None, :] * (cnt[j_idx + 1] - cnt[i_idx]) - (tok[j_idx + 1] - tok[i_idx])
    cost = np.where(i_idx <= j_idx, cost, np.inf)  # cost[i, j]: atoms i..j padded to atom j's top
    best = cost[0].copy()  # best[j]: atoms 0..j in at most b + 1 buckets
    back = np.full((num_buckets, k), -1, dtype=np.int64)  # start of the last bucket, -1: fewer buckets
    for b in range(1, min(num_buckets, k)):
        cand = best[:-1, None] + cost[1:, :]
        arg = np.argmin(cand, axis=0)
        new = cand[arg, np.arange(k)]
        take = new < best
        back[b] = np.where(take, arg + 1, -1)
        best = np.where(take, new, best)
    rep = np.empty(k)
    j, b = k - 1, min(num_buckets, k) - 1
    while j >= 0:
        while b > 0 and back[b, j] < 0:
            b -= 1
        i = int(back[b, j]) if b > 0 else 0
        rep[i:j + 1] = j
        j, b = i - 1, b - 1
    longest = np.zeros(k, dtype=np.int64)
    np.maximum.at(longest, atom, values)
    padded = longest[rep.astype(np.int64)][atom][inverse]
    return padded, float((padded - s).sum() / max(1, s.sum()))


# -- rounds -----------------------------------------------------------------------------------------
def split_rounds(lengths, num_rounds: int, capacity: int, work) -> list[list[int]] | None:
    """Sequences (indices) into ``num_rounds`` rounds of at most ``capacity`` tokens, longest first
    to the round with the least work that has room; None when they do not fit."""
    rounds: list[list[int]] = [[] for _ in range(num_rounds)]
    tokens, loads = np.zeros(num_rounds), np.zeros(num_rounds)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        room = tokens + lengths[i] <= capacity
        if not room.any():
            return None
        r = int(np.argmin(np.where(room, loads, np.inf)))
        rounds[r].append(i)
        tokens[r] += lengths[i]
        loads[r] += work[i]
    return rounds


def round_options(lengths, capacity: int, work, extra: int = 2) -> list[list[list[int]]]:
    """Round splits for the fewest rounds that fit and ``extra`` more."""
    r = max(1, math.ceil(sum(lengths) / capacity))
    while (split := split_rounds(lengths, r, capacity, work)) is None:
        r += 1
    options = [split]
    for more in range(r + 1, min(r + extra, len(lengths)) + 1):
        if (split := split_rounds(lengths, more, capacity, work)) is not None:
            options.append(split)
    return options


# -- one round: shared tables ----------------------------------------------------------------------
class _Round:
    """Times of a round's sequences in every group size (real and bucketed lengths)."""

    def __init__(self, idx, lengths, bucketed, num_ranks, cost, cap):
        self.idx, self.cap, self.n_ranks, self.cost = list(idx), cap, num_ranks, cost
        self.sizes = [2**i for i in range(int(math.log2(num_ranks)) + 1)]
        self.lens = np.asarray([lengths[i] for i in idx], dtype=np.float64)
        self.reps = np.asarray([bucketed[i] for i in idx], dtype=np.float64)
        self.beta = np.array([cost.overhead(d) for d in self.sizes])
        self.times = np.stack([cost.seq_times(self.lens, d) for d in self.sizes], axis=1)  # [sequence, size]
        self.order = sorted(range(len(idx)), key=lambda i: (-self.lens[i], i))
        self.min_size = [next(k for k, d in enumerate(self.sizes) if self.lens[i] <= d * cap) for i in range(len(idx))]
        # this round's buckets for the MILP: longest length, count, mean tokens, mean time per size
        self.bucket_len, self.bucket = np.unique(self.reps, return_inverse=True)
        self.bucket_count = np.bincount(self.bucket, minlength=len(self.bucket_len))
        nb, count = len(self.bucket_len), np.maximum(self.bucket_count, 1)
        self.bucket_tokens = np.bincount(self.bucket, self.lens, nb) / count
        sums = [np.bincount(self.bucket, self.times[:, k], nb) for k in range(len(self.sizes))]
        self.bucket_time = np.stack(sums) / count  # [size index, bucket]

    def lpt(self, layout: list[int]):
        """Earliest-finish list scheduling, longest first, on groups of the given size indices
        (largest first); returns (members, group times) or None when memory forbids."""
        k = np.asarray(sorted(layout, reverse=True))
        g_cap = np.asarray([self.sizes[j] for j in k], dtype=np.float64) * self.cap
        load, tokens, count = np.zeros(len(k)), np.zeros(len(k)), np.zeros(len(k), dtype=np.int64)
        members = [[] for _ in k]
        beta = self.beta[k]
        for i in self.order:
            finish = load + self.times[i, k] + np.where(count == 0, beta, 0.0)
            finish[tokens + self.lens[i] > g_cap] = np.inf
            g = int(np.argmin(finish))
            if not np.isfinite(finish[g]):
                return None
            load[g], tokens[g], count[g] = finish[g], tokens[g] + self.lens[i], count[g] + 1
            members[g].append(i)
        return [(int(j), m) for j, m in zip(k, members)], load

    def span(self, groups) -> float:
        return max((self.times[m, j].sum() + self.beta[j] for j, m in groups if m), default=0.0)


def _tail_layouts(rnd: _Round) -> list[list[int]]:
    """Layouts giving each long sequence the smallest group that finishes it by a target time T,
    the remaining ranks groups of a base size, for a few T and every base size."""
    n, K = rnd.n_ranks, len(rnd.sizes)
    if not rnd.idx:
        return []
    total = sum(float(np.min(rnd.times[i] * np.asarray(rnd.sizes))) for i in rnd.order) / n
    longest = min(rnd.times[rnd.order[0], k] + rnd.beta[k] for k in range(rnd.min_size[rnd.order[0]], K))
    lb, layouts = max(total, longest), []
    for factor in (1.0, 1.1, 1.25, 1.5, 2.0, 3.0):
        need = []
        for i in rnd.order:
            ok = [k for k in range(rnd.min_size[i], K) if rnd.times[i, k] + rnd.beta[k] <= lb * factor]
            need.append(ok[0] if ok else K - 1)
        for base in range(K):
            counts, used = {}, 0
            for k in need:
                if k <= base:
                    break
                counts[k] = counts.get(k, 0) + 1
                used += rnd.sizes[k]
            if used > n:
                continue
            counts[base] = counts.get(base, 0) + (n - used) // rnd.sizes[base]
            rest = (n - used) % rnd.sizes[base]  # covered by its binary decomposition
            layout = [k for k, c in counts.items() for _ in range(c)] + [k for k in range(K) if rest >> k & 1]
            layouts.append(sorted(layout, reverse=True))
    return layouts


def greedy_round(rnd: _Round, max_moves: int = 40):
    """Best LPT schedule over candidate layouts, then split/merge moves while they help; returns
    ((size index, member positions) per group, makespan)."""
    K, best, best_span = len(rnd.sizes), None, math.inf
    uniform = [(k,) * (rnd.n_ranks >> k) for k in range(K)]
    for layout in dict.fromkeys(uniform + [tuple(t) for t in _tail_layouts(rnd)]):  # distinct, in order
        out = rnd.lpt(list(layout))
        if out is not None and (s := rnd.span(out[0])) < best_span:
            best, best_span = out[0], s
    return climb(rnd, best, best_span, max_moves)


def climb(rnd: _Round, groups, span: float, max_moves: int = 40, deadline: float = math.inf):
    """Split one group into two halves or merge two equal groups, re-run LPT, keep the best move;
    repeat while the makespan drops (deterministic: moves in a fixed order, strict improvement;
    ``deadline`` (perf_counter seconds) stops it early)."""
    K = len(rnd.sizes)
    layout = [j for j, _ in groups]
    for _ in range(max_moves):
        if time.perf_counter() > deadline:
            break
        counts = np.bincount(layout, minlength=K)
        moves = [(k, k - 1, 1, 2) for k in range(1, K) if counts[k]]             # split a group in halves
        moves += [(k, k + 1, 2, 1) for k in range(K - 1) if counts[k] >= 2]    # merge two equal groups
        improved = None
        for src, dst, take, give in moves:
            c = counts.copy()
            c[src] -= take
            c[dst] += give
            cand = [j for j in range(K - 1, -1, -1) for _ in range(c[j])]
            out = rnd.lpt(cand)
            if out is not None and (s := rnd.span(out[0])) < span * (1 - 1e-9):
                improved, span, groups = cand, s, out[0]
        if improved is None:
            break
        layout = improved
    return groups, span


# -- one round: MILP -------------------------------------------------------------------------------
def milp_round(rnd: _Round, time_limit: float, upper: float = math.inf, relax: float = 0.02, gap: float = 1e-3):
    """The round's MILP; returns (groups as (size index, member positions), status), groups None
    when no solution came back in time. A size admits a bucket if it holds the bucket's longest
    sequence; a count of a bucket costs its members' mean tokens and mean time (exact on average).
    Slots of a size are used in order (symmetry); Σ d·time ≤ N·C tightens the relaxation. Counts of
    buckets under ``relax`` × the lower bound even on one rank are continuous (integrality there
    moves C by less, and it is what makes the model hard); handing out sequences rounds them.
    ``gap``: HiGHS's relative optimality gap."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, K, cap, sizes = rnd.n_ranks, len(rnd.sizes), rnd.cap, np.asarray(rnd.sizes, dtype=np.float64)
    reps, need, c, mean_len = rnd.bucket_len, rnd.bucket_count, rnd.bucket_time, rnd.bucket_tokens
    B = len(reps)
    allowed = (reps[None, :] <= sizes[:, None] * cap) & (c + rnd.beta[:, None] <= upper)
    if not allowed.any(axis=0).all():
        return None, "milp: a bucket fits no group under the greedy bound"
    work = float(sum(need[b] * np.min(np.where(allowed[:, b], c[:, b] * sizes, np.inf)) for b in range(B)))
    single = max(float(np.min(np.where(allowed[:, b], c[:, b] + rnd.beta, np.inf))) for b in range(B))
    lower = max(work / n, single)
    small = np.max(np.where(allowed, c, 0.0), axis=0) < relax * lower  # relaxed buckets
    slots = [k for k in range(K) for _ in range(min(n // rnd.sizes[k], int(need[allowed[k]].sum())))]
    S = len(slots)
    pairs = [(s, b) for s, k in enumerate(slots) for b in range(B) if allowed[k, b]]
    nv = 1 + S + len(pairs)
    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(entries, lb, ub):  # one constraint lb ≤ Σ v·x[col] ≤ ub
        rows.extend([len(lo)] * len(entries))
        cols.extend(col for col, _ in entries)
        vals.extend(v for _, v in entries)
        lo.append(lb), hi.append(ub)

    by_slot, by_bucket = [[] for _ in range(S)], [[] for _ in range(B)]
    for p, (s, b) in enumerate(pairs):
        by_slot[s].append((1 + S + p, b))
        by_bucket[b].append(1 + S + p)
    row([(1 + s, sizes[k]) for s, k in enumerate(slots)], -np.inf, n)                     # Σ sizes ≤ N
    for b in range(B):
        row([(col, 1.0) for col in by_bucket[b]], need[b], need[b])                       # bucket placed
    agg = [(0, -float(n))]
    for s, k in enumerate(slots):
        row([(col, mean_len[b] / cap) for col, b in by_slot[s]] + [(1 + s, -sizes[k])], -np.inf, 0)  # memory
        row([(col, c[k, b]) for col, b in by_slot[s]] + [(1 + s, rnd.beta[k]), (0, -1.0)], -np.inf, 0)  # ≤ C
        agg += [(col, sizes[k] * c[k, b]) for col, b in by_slot[s]] + [(1 + s, sizes[k] * rnd.beta[k])]
        if s + 1 < S and slots[s + 1] == k:  # interchangeable slots: the used ones first
            row([(1 + s, 1.0), (2 + s, -1.0)], 0, np.inf)
    row(agg, -np.inf, 0)                                                                   # Σ d·time ≤ N·C
    ub_x = [min(need[b], math.floor(rnd.sizes[slots[s]] * cap / mean_len[b])) for s, b in pairs]
    bounds = Bounds([lower] + [0] * (nv - 1), [upper] + [1] * S + ub_x)
    integrality = np.array([0] + [1] * S + [0 if small[b] else 1 for _, b in pairs])
    objective = np.eye(1, nv)[0]  # minimise C
    A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv)).tocsr()
    res = milp(objective, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=bounds,
               options={"time_limit": max(0.01, time_limit), "mip_rel_gap": gap, "disp": False})
    if res.x is None:
        return None, f"milp: no solution ({res.message.split('(')[0].strip()})"
    quota = {}  # slot -> {bucket: count}
    for (s, b), x in zip(pairs, res.x[1 + S:]):
        if x > 1e-6:
            quota.setdefault(s, {})[b] = float(x)
    groups = _fill_quotas(rnd, slots, quota)
    state = "optimal" if res.status == 0 else "time limit"
    state += "" if groups is not None else ", counts do not fit the real lengths"
    return groups, (f"milp {state} ({S} slots × {B} buckets, {int(small.sum())} relaxed; C={res.fun:.4g}s, "
                    f"bound {lower:.4g}s)")


def _fill_quotas(rnd: _Round, slots, quota):
    """Concrete sequences for the MILP's bucket counts, longest first: each goes to the slot with
    quota left for its bucket and memory room whose projected time (so far + the quotas still
    owed at bucket-mean times) is least, so the real times track the MILP's; once a bucket's
    quotas are spent (relaxed counts round this way), to the slot that finishes it first. None if
    memory leaves a sequence nowhere."""
    mean = rnd.bucket_time
    load = {s: rnd.beta[slots[s]] for s in quota}
    owed = {s: sum(max(q, 0.0) * mean[slots[s], b] for b, q in quota[s].items()) for s in quota}
    tokens = {s: 0.0 for s in quota}
    members = {s: [] for s in quota}
    for i in rnd.order:
        b = rnd.bucket[i]
        room = [s for s in quota if tokens[s] + rnd.lens[i] <= rnd.sizes[slots[s]] * rnd.cap]
        if not room:
            return None
        due = [s for s in room if quota[s].get(b, 0.0) >= 0.5]
        if due:
            s = min(due, key=lambda s: (load[s] + owed[s], s))
        else:
            s = min(room, key=lambda s: (load[s] + owed[s] + rnd.times[i, slots[s]], s))
        k = slots[s]
        owed[s] -= min(max(quota[s].get(b, 0.0), 0.0), 1.0) * mean[k, b]
        quota[s][b] = quota[s].get(b, 0.0) - 1
        members[s].append(i)
        load[s] += rnd.times[i, k]
        tokens[s] += rnd.lens[i]
    return [(slots[s], members[s]) for s in sorted(members)]


# -- the step --------------------------------------------------------------------------------------
def _place(rnd: _Round, groups) -> list[Group]:
    """Aligned blocks: non-empty groups largest first (then slowest first) from rank 0, the ranks
    left covered by empty groups of the largest aligned sizes."""
    used = sorted((g for g in groups if g[1]), key=lambda g: (-g[0], -float(rnd.times[g[1], g[0]].sum()), min(g[1])))
    out, start = [], 0
    for j, m in used:
        size = rnd.sizes[j]
        out.append(Group(start, size, sorted(rnd.idx[i] for i in m)))
        start += size
    while start < rnd.n_ranks:  # start is a multiple of the last size: take the largest aligned block
        size = start & -start if start else rnd.n_ranks
        while start + size > rnd.n_ranks:
            size //= 2
        out.append(Group(start, size, []))
        start += size
    return out


def _check_inputs(lengths, num_ranks, solver, buckets, time_limit, cap):
    if not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1 or num_ranks & (num_ranks - 1):
        raise ValueError(f"num_ranks={num_ranks} must be a power of two >= 1 (the dp×cp pool)")
    if solver not in ("milp", "greedy"):
        raise ValueError(f"solver={solver!r}: expected 'milp' or 'greedy' (flexsp.solver)")
    if not isinstance(buckets, (int, np.integer)) or buckets < 1:
        raise ValueError(f"buckets={buckets!r}: expected an integer >= 1 (flexsp.buckets)")
    if not time_limit > 0:
        raise ValueError(f"time_limit={time_limit!r}: expected seconds > 0 (flexsp.solve_time_s)")
    for i, s in enumerate(lengths):
        if not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"lengths[{i}]={s!r}: every sequence needs a positive integer length")
        if s > num_ranks * cap:
            raise ValueError(f"sequence {i} has {s} tokens but one micro-batch holds at most num_ranks × "
                             f"max_tokens_per_rank = {num_ranks} × {cap} = {num_ranks * cap}; raise "
                             "flexsp.max_tokens_per_rank (or flexsp.memory_gb), add ranks, or cut it (data.seq_len)")


def plan_step(lengths, num_ranks: int, cost, *, max_hp: int | None = None, buckets: int = 16, solver: str = "milp",
              time_limit: float = 5.0, max_tokens_per_rank: int | None = None, extra_rounds: int = 2) -> Plan:
    """Plan one step: rounds, group layouts and sequence assignment (module doc).

    ``cost``: a CostModel; ``max_hp`` overrides its Ulysses cap; ``max_tokens_per_rank`` its token
    limit; ``time_limit`` bounds the MILP solves of the step together (the greedy plans are always
    made: they bound the MILP and replace it where it is worse or late).
    """
    t0 = time.perf_counter()
    lengths = [int(s) if isinstance(s, np.integer) else s for s in lengths]
    if max_hp is not None:
        cost = cost.with_max_hp(max_hp)
    cap = int(max_tokens_per_rank or cost.max_tokens_per_rank())
    _check_inputs(lengths, num_ranks, solver, buckets, time_limit, cap)
    if not lengths:
        return Plan([], 0.0, "greedy", time.perf_counter() - t0, status="no sequences")
    # padding measured in one-rank seconds: long sequences, rare but quadratic, get fine buckets
    bucketed, error = bucketize(lengths, buckets, weight=lambda v: cost.seq_times(v, 1))
    work = cost.seq_times(lengths, 1)
    options = []  # (greedy total, rounds, [(groups, span)])
    for split in round_options(lengths, num_ranks * cap, work, extra_rounds):
        rounds = [_Round(idx, lengths, bucketed, num_ranks, cost, cap) for idx in split]
        plans = [greedy_round(r) for r in rounds]
        options.append([sum(span for _, span in plans), rounds, plans, ["greedy"] * len(rounds)])
    options.sort(key=lambda o: o[0])
    notes = []
    if solver == "milp":
        deadline = t0 + time_limit
        for option in options:
            _, rounds, plans, sources = option
            for r, rnd in enumerate(rounds):
                share = (deadline - time.perf_counter()) / (len(rounds) - r)
                if share < MIN_SOLVE_S:
                    notes.append(f"{len(rounds)} rounds: out of time before round {r}")
                    break
                start = time.perf_counter()
                # only solutions the MILP predicts to beat the greedy plan matter: that bounds C
                upper = min(_bucketed_span(rnd, plans[r][0]), plans[r][1])
                groups, status = milp_round(rnd, 0.8 * share, upper * (1 + 1e-6))  # the rest: mapping back
                notes.append(f"{len(rounds)} rounds, round {r}: {status}")
                if groups is None:  # no MILP solution, or its counts do not map onto the real lengths
                    continue
                # the MILP's plan, and its layout re-scheduled by LPT and improved by moves
                again = rnd.lpt([j for j, _ in groups])
                again = climb(rnd, again[0], rnd.span(again[0]), deadline=start + share) if again else (None, 0)
                for cand, span in ((groups, rnd.span(groups)), again):
                    if cand is not None and span < plans[r][1] * (1 - 1e-9):
                        plans[r], sources[r] = (cand, span), "milp"
            option[0] = sum(span for _, span in plans)
            if time.perf_counter() > deadline - MIN_SOLVE_S:
                break
        options.sort(key=lambda o: o[0])
    total, rounds, plans, sources = options[0]
    micro_batches = [_place(rnd, groups) for rnd, (groups, _) in zip(rounds, plans)]
    return Plan(micro_batches, float(total), "milp" if "milp" in sources else "greedy", time.perf_counter() - t0,
                bucket_error=error, round_times=[float(span) for _, span in plans],
                status=f"{len(rounds)} rounds; " + ("; ".join(notes) if notes else "greedy"))


def _bucketed_span(rnd: _Round, groups) -> float:
    """A plan's makespan as the MILP sees it (bucket means; inf if it breaks memory there): the
    MILP's upper bound."""
    span = 0.0
    for j, m in groups:
        if not m:
            continue
        if rnd.bucket_tokens[rnd.bucket[m]].sum() > rnd.sizes[j] * rnd.cap * (1 + 1e-9):
            return math.inf
        span = max(span, float(rnd.bucket_time[j, rnd.bucket[m]].sum() + rnd.beta[j]))
    return span


def plan_makespan(plan: Plan, lengths, cost) -> float:
    """Predicted seconds of a plan on real lengths (the sum over rounds of the slowest group)."""
    return sum(max((cost.group_time([lengths[i] for i in g.seqs], g.size) for g in mb), default=0.0)
               for mb in plan.micro_batches)


class AsyncPlanner:
    """Runs ``fn(step) -> Plan`` on a background thread, so step i+1 is planned while step i trains.

    ``submit(step)`` starts it (once per step); ``result(step)`` waits for it (starting it first if
    nobody did) and re-raises the planner's exception, if any. ``close()`` (or ``with``) stops the thread.
    """

    def __init__(self, fn):
        self._fn = fn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexsp-planner")
        self._futures = {}

    def submit(self, step: int) -> None:
        if step not in self._futures:
            self._futures[step] = self._pool.submit(self._fn, step)

    def result(self, step: int, timeout: float | None = None) -> Plan:
        self.submit(step)
        return self._futures.pop(step).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "AsyncPlanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AsyncPlanner", "Group", "Plan", "bucketize", "greedy_round", "milp_round", "plan_makespan", "plan_step",
           "round_options", "split_rounds"]
