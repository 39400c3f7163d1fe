"""FlexSP cost model and planner: the cost terms against hand counts, device-file errors, bucketing
against brute force, the MILP against exhaustive search, and the plan invariants over random
batches (hypothesis): aligned partitions, every sequence once, memory, MILP ≤ greedy."""
from __future__ import annotations

import itertools
import json
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import load_config, validate
from engine.flexsp import planner as P
from engine.flexsp.cost import CostModel, activation_bytes_per_token, load_device, num_parameters
from engine.flexsp.planner import AsyncPlanner, Plan, bucketize, plan_makespan, plan_step

SEVEN_B = ["model.num_layers=32", "model.hidden_size=4096", "model.num_attention_heads=32", "model.num_query_groups=32",
           "model.ffn_hidden_size=11008", "model.vocab_size=32000", "train.bf16=true", "train.recompute=full"]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=8", "model.num_query_groups=4",
        "model.ffn_hidden_size=176", "model.vocab_size=512"]


def make_cost(ranks=8, hp=2, cap=4000, device="h100", extra=(), model=TINY) -> CostModel:
    over = model + ["parallel.sp_mode=flexsp", f"parallel.cp={ranks}", f"parallel.hp={hp}", "parallel.dp=1",
                   f"flexsp.cost_model={device}", "flexsp.gpus_per_node=2", f"flexsp.max_tokens_per_rank={cap}", *extra]
    return CostModel.from_config(validate(load_config(None, over), ranks))


def rel(a, b):
    return abs(a - b) / abs(b)


# -- cost model ------------------------------------------------------------------------------------
def test_alphas_and_group_time_by_hand():
    cost = make_cost()  # fp32 (train.bf16 false): the device's bf16 rates × fp32_flops_ratio 0.5
    dev = load_device("h100")
    L, H, G, D, h, f, V = 2, 8, 4, 8, 64, 176, 512
    attn_fwd = L * 2 * H * D                                            # causal: half of 4·s²·H·D
    lin_fwd = L * (2 * h * (H + 2 * G) * D + 2 * H * D * h + 6 * h * f) + 2 * h * V
    assert rel(cost.alpha1, 3.5 * attn_fwd / (dev["attention_flops"] * 0.5)) < 1e-12
    assert rel(cost.alpha2, 3.0 * lin_fwd / (dev["linear_flops"] * 0.5)) < 1e-12
    # one rank: no communication, no padding: (α1·s² + α2·s) summed, plus the fixed cost
    lengths = [100, 2500, 7]
    want = sum(cost.alpha1 * s * s + cost.alpha2 * s for s in lengths) + dev["group_overhead_s"]
    assert rel(cost.group_time(lengths, 1), want) < 1e-12
    assert cost.group_time([], 4) == 0.0
    with pytest.raises(ValueError, match="power of two"):
        cost.group_time([10], 3)


def test_communication_terms_and_leaving_the_node():
    """hp = 2 inside a node (gpus_per_node = 2): all-to-all at the intra-node rate; d = 4 adds a
    ring of 2 that crosses nodes and shows only beyond the sequence's attention compute."""
    cost, dev = make_cost(), load_device("h100")
    s, b = 4096, 4                                                      # fp32 activations
    a2a_bytes = 2 * 2 * (2 * 8 + 2 * 4) * 8 * b                         # layers·passes·(2H + 2·max(G, hp))·D·b
    t2 = cost.seq_times([s], 2)[0]
    compute2 = (cost.alpha1 * s * s + cost.alpha2 * s) / 2
    assert rel(t2, compute2 + (s / 2) * a2a_bytes * 0.5 / dev["intra_node_bw"]) < 1e-12
    ring_bytes = 2 * (2 * 4 / 2 * 8) * (1 * b + b + 4)                  # L·(2·G/hp·D)·(fwd + bwd + fp32 dKV)
    compute4 = (cost.alpha1 * s * s + cost.alpha2 * s) / 4
    a2a4 = (s / 4) * a2a_bytes * 0.5 / dev["intra_node_bw"]
    ring4 = (2 - 1) * (s / 2) * ring_bytes / dev["p2p_inter_bw"]
    exposed = max(0.0, ring4 - cost.alpha1 * s * s / 4)
    assert rel(cost.seq_times([s], 4)[0], compute4 + a2a4 + exposed) < 1e-12
    # Ulysses over 4 ranks on 2-GPU nodes: 1 peer on-node, 2 off-node; the slower share sets the time
    wide = cost.with_max_hp(4)
    a2a_bytes4 = 2 * 2 * (2 * 8 + 2 * 4) * 8 * b
    per_byte = max((1 / 3) / dev["intra_node_bw"], (2 / 3) / dev["inter_node_bw"])
    assert rel(wide.seq_times([s], 4)[0], compute4 + (s / 4) * a2a_bytes4 * 0.75 * per_byte) < 1e-12
    # documents are padded to a multiple of 2·d (I-3)
    assert cost.seq_times([9], 4)[0] == cost.seq_times([16], 4)[0]


def test_memory_limit():
    over = ["parallel.sp_mode=flexsp", "parallel.cp=8", "parallel.hp=2", "parallel.dp=1", "flexsp.cost_model=a100",
            "train.bf16=true", "train.recompute=full", "optim.sharding=zero1", "flexsp.memory_gb=0.5"]
    cfg = validate(load_config(None, TINY + over), 8)
    cost = CostModel.from_config(cfg)
    params = num_parameters(cfg.model, 512)
    states = params * (2 + 2 + 4) + params * (4 + 8) / 8                # bf16 w+g, fp32 main g; optimizer / 8
    assert rel(cost.states_bytes, states) < 1e-12
    per_token = activation_bytes_per_token(cfg.model, 1, 2, "full", 512)
    assert cost.max_tokens_per_rank() == int((0.5 * 2**30 - states) // per_token)
    capped = CostModel.from_config(validate(load_config(None, TINY + over + ["flexsp.max_tokens_per_rank=123"]), 8))
    assert capped.max_tokens_per_rank() == 123
    tiny = CostModel.from_config(validate(load_config(None, TINY + over[:-1] + ["flexsp.memory_gb=0.000001"]), 8))
    with pytest.raises(ValueError, match="flexsp.memory_gb"):
        tiny.max_tokens_per_rank()


def test_device_file_errors(tmp_path):
    cfg = validate(load_config(None, TINY + ["flexsp.cost_model=v100"]), 1)
    with pytest.raises(ValueError, match=r"flexsp.cost_model='v100'.*a100, h100"):
        CostModel.from_config(cfg)
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=f"flexsp.cost_model.*{missing.name}"):
        load_device(str(missing))
    with open(load_device("a100")["path"]) as f:
        partial = {k: v for k, v in json.load(f).items() if k != "inter_node_bw"}
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(partial))
    with pytest.raises(ValueError, match=f"flexsp.cost_model.*{path.name}.*lacks inter_node_bw"):
        load_device(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"flexsp.cost_model.*cannot read.*{path.name}"):
        load_device(str(path))
    path.write_text(json.dumps({**partial, "inter_node_bw": -1}))
    with pytest.raises(ValueError, match="inter_node_bw=-1"):
        load_device(str(path))


def test_measured_alphas_apply_to_their_model_only(tmp_path):
    base = json.loads(open(load_device("h100")["path"]).read())
    cost = make_cost()
    fingerprint = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 8,
                   "num_query_groups": 4, "head_dim": 8, "vocab_size": 512, "tp": 1, "bf16": False, "recompute": "none"}
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({**base, "alpha1": 1e-9, "alpha2": 2e-6, "alpha_model": fingerprint,
                                "alltoall_bw": {"2": 1e9}}))
    measured = make_cost(device=str(path))
    assert (measured.alpha1, measured.alpha2, measured.alpha_source) == (1e-9, 2e-6, "measured")
    other = make_cost(device=str(path), extra=["model.num_layers=3"])
    assert other.alpha_source == "derived" and rel(other.alpha1, cost.alpha1 * 1.5) < 1e-12
    # the measured all-to-all rate of groups of 2 replaces the file's intra-node figure
    t = measured.seq_times([4096], 2)[0] - (1e-9 * 4096**2 + 2e-6 * 4096) / 2
    assert rel(t, 2048 * (2 * 2 * 24 * 8 * 4) * 0.5 / 1e9) < 1e-12


# -- bucketing -------------------------------------------------------------------------------------
def brute_buckets(lengths, k):
    values = sorted(set(lengths))
    best = math.inf
    for cuts in itertools.combinations(range(len(values) - 1), min(k, len(values)) - 1):
        ends, start, pad = list(cuts) + [len(values) - 1], 0, 0
        for e in ends:
            pad += sum(values[e] - s for s in lengths if values[start] <= s <= values[e])
            start = e + 1
        best = min(best, pad)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(1, 5))
def test_bucketing_is_optimal(lengths, k):
    padded, error = bucketize(lengths, k)
    s = np.asarray(lengths)
    assert (padded >= s).all() and len(set(padded.tolist())) <= k
    assert set(padded.tolist()) <= set(lengths)                        # a bucket's length is one of its members
    assert (padded - s).sum() == brute_buckets(lengths, k)
    assert error == pytest.approx((padded - s).sum() / s.sum(), rel=1e-12)


def test_bucketing_error_reported_and_zero_when_exact():
    lengths = [5, 5, 9, 30, 31, 400]
    assert bucketize(lengths, 6)[1] == 0.0
    padded, error = bucketize(lengths, 3)
    assert padded.tolist() == [9, 9, 9, 31, 31, 400] and error == pytest.approx((4 + 4 + 1) / sum(lengths))
    plan = plan_step(lengths, 4, make_cost(ranks=4), buckets=3, solver="greedy")
    assert plan.bucket_error > 0


# -- plan invariants -------------------------------------------------------------------------------
def check_plan(plan: Plan, lengths, ranks, cost, cap):
    seen = []
    for groups in plan.micro_batches:
        covered = []
        for g in groups:
            assert g.size >= 1 and g.size & (g.size - 1) == 0 and g.start % g.size == 0, g
            covered += range(g.start, g.start + g.size)
            assert sum(lengths[i] for i in g.seqs) <= g.size * cap, (g, cap)   # memory
            seen += g.seqs
        assert sorted(covered) == list(range(ranks))                    # aligned partition of the pool
    assert sorted(seen) == list(range(len(lengths)))                    # every sequence exactly once
    assert rel(plan_makespan(plan, lengths, cost), plan.makespan) < 1e-12
    assert rel(sum(plan.round_times), plan.makespan) < 1e-12


CASES = st.integers(0, 4).flatmap(lambda k: st.tuples(
    st.just(2**k), st.integers(2000, 30000),
    st.lists(st.one_of(st.integers(1, 3000), st.integers(1, 2**k * 30000)), min_size=1, max_size=40)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CASES, st.sampled_from([1, 2, 4]), st.sampled_from([TINY, SEVEN_B]))
def test_plan_invariants_greedy_and_milp(case, hp, model):
    ranks, cap, lengths = case
    lengths = [min(s, ranks * cap) for s in lengths]
    cost = make_cost(ranks=max(ranks, 2), hp=min(hp, max(ranks, 2)), cap=cap, model=model)
    greedy = plan_step(lengths, ranks, cost, buckets=4, solver="greedy")
    check_plan(greedy, lengths, ranks, cost, cap)
    assert greedy.solver == "greedy"
    again = plan_step(lengths, ranks, cost, buckets=4, solver="greedy")
    assert again.micro_batches == greedy.micro_batches                   # deterministic
    milp = plan_step(lengths, ranks, cost, buckets=4, solver="milp", time_limit=0.3)
    check_plan(milp, lengths, ranks, cost, cap)
    assert milp.makespan <= greedy.makespan * (1 + 1e-12)
    assert len(milp.micro_batches) >= math.ceil(sum(lengths) / (ranks * cap))


def test_rounds_mix_group_sizes_in_aligned_blocks():
    """A round holding a long and several short sequences uses groups of several sizes, placed
    largest first on aligned starts (the invariant the runtime relies on)."""
    cost = make_cost(ranks=8, hp=2, cap=8000, model=SEVEN_B)
    lengths = [20000] + [2000 + 300 * i for i in range(8)]
    plan = plan_step(lengths, 8, cost, solver="greedy")
    check_plan(plan, lengths, 8, cost, 8000)
    mixed = [mb for mb in plan.micro_batches if len({g.size for g in mb}) > 1]
    assert mixed, plan.micro_batches
    for mb in mixed:
        assert [g.start for g in mb] == sorted(g.start for g in mb) and mb[0].start == 0


def best_static(lengths, ranks, cost, cap):
    """The best uniform layout (one group size for every round) over the planner's round splits."""
    best = math.inf
    for split in P.round_options(lengths, ranks * cap, cost.seq_times(lengths, 1)):
        for k in range(int(math.log2(ranks)) + 1):
            total = 0.0
            for idx in split:
                out = P._Round(idx, lengths, lengths, ranks, cost, cap).lpt([k] * (ranks >> k))
                total = math.inf if out is None else total + max(
                    (cost.group_time([lengths[idx[i]] for i in m], 2**k) for _, m in out[0]), default=0.0)
            best = min(best, total)
    return best


def test_plan_mixes_group_sizes_for_a_long_tail():
    """A 7B model on 2-GPU nodes, one long sequence and many short ones: the long one gets a
    group that leaves the node (memory), the short ones groups inside a node, and the plan beats
    the best uniform layout by a clear margin (the short ones do not pay inter-node traffic)."""
    cost = make_cost(ranks=8, hp=2, cap=8000, model=SEVEN_B)
    lengths = [50000] + [500 + 97 * i for i in range(60)]
    plan = plan_step(lengths, 8, cost, solver="greedy")
    check_plan(plan, lengths, 8, cost, 8000)
    home = next(g for mb in plan.micro_batches for g in mb if 0 in g.seqs)
    assert home.size == 8                                               # 50000 > 4 × 8000 tokens
    short = {g.size for mb in plan.micro_batches for g in mb if g.seqs and 0 not in g.seqs}
    assert max(short) <= 2, short
    static = best_static(lengths, 8, cost, 8000)
    assert plan.makespan < 0.9 * static, (plan.makespan, static)


def exhaustive(lengths, ranks, cost, cap):
    """The best single-round makespan over every multiset of group sizes and every assignment."""
    sizes = [2**k for k in range(int(math.log2(ranks)) + 1)]
    layouts = {tuple(sorted(c, reverse=True)) for n in range(1, ranks + 1)
               for c in itertools.combinations_with_replacement(sizes, n) if sum(c) == ranks}
    best = math.inf
    for layout in layouts:
        for assign in itertools.product(range(len(layout)), repeat=len(lengths)):
            span = 0.0
            for g, d in enumerate(layout):
                members = [lengths[i] for i in range(len(lengths)) if assign[i] == g]
                if sum(members) > d * cap:
                    span = math.inf
                    break
                span = max(span, cost.group_time(members, d))
            best = min(best, span)
    return best


@pytest.mark.parametrize("lengths", [[3000, 2500, 900, 400, 120], [7000, 300, 280, 260, 240],
                                     [1500, 1500, 1400, 1300, 200], [5000, 3100, 2000, 800]])
def test_milp_finds_the_exhaustive_optimum(lengths):
    ranks, cap = 4, 3000
    cost = make_cost(ranks=4, hp=2, cap=cap, model=SEVEN_B)
    best = exhaustive(lengths, ranks, cost, cap)
    rnd = P._Round(range(len(lengths)), lengths, lengths, ranks, cost, cap)
    groups, status = P.milp_round(rnd, 10.0, relax=0.0, gap=1e-9)
    assert "optimal" in status, status
    assert rel(rnd.span(groups), best) < 1e-9, (status, rnd.span(groups), best)
    plan = plan_step(lengths, ranks, cost, buckets=16, solver="milp", time_limit=5.0, extra_rounds=0)
    check_plan(plan, lengths, ranks, cost, cap)
    assert len(plan.micro_batches) == 1 and plan.makespan >= best * (1 - 1e-12)
    assert plan.makespan <= best * (1 + 1e-3)                            # HiGHS's default gap, 0.1 %


# -- errors and the async wrapper ------------------------------------------------------------------
def test_bad_inputs_name_the_fix():
    cost = make_cost(ranks=4, cap=1000)
    with pytest.raises(ValueError, match=r"sequence 1 has 4001 tokens.*4 × 1000 = 4000.*flexsp.max_tokens_per_rank"):
        plan_step([10, 4001], 4, cost)
    with pytest.raises(ValueError, match="num_ranks=6 must be a power of two"):
        plan_step([10], 6, cost)
    with pytest.raises(ValueError, match="lengths\\[0\\]=0"):
        plan_step([0], 4, cost)
    with pytest.raises(ValueError, match="solver='cplex'.*flexsp.solver"):
        plan_step([10], 4, cost, solver="cplex")
    with pytest.raises(ValueError, match="max_hp=3"):
        plan_step([10], 4, cost, max_hp=3)
    assert plan_step([], 4, cost).micro_batches == []


def test_async_planner_runs_in_the_background_and_reraises():
    cost = make_cost(ranks=4, cap=1000)
    threads = []

    def fn(step):
        threads.append(threading.current_thread().name)
        if step == 3:
            raise RuntimeError("step 3 has no data")
        return plan_step([100 * (step + 1), 50], 4, cost, solver="greedy")

    with AsyncPlanner(fn) as planner:
        planner.submit(0)
        planner.submit(1)
        first, second = planner.result(0), planner.result(1)
        for step, plan in ((0, first), (1, second)):                    # each step's own plan
            assert plan.makespan == plan_step([100 * (step + 1), 50], 4, cost, solver="greedy").makespan
        assert first.makespan != second.makespan
        assert planner.result(2).makespan > 0                            # never submitted: planned on demand
        planner.submit(3)
        with pytest.raises(RuntimeError, match="step 3 has no data"):
            planner.result(3)
    assert threads and all(name.startswith("flexsp-planner") for name in threads)
