"""DESIGN I-7 for the pipeline, without processes: the communication plan the runtime executes
(``pipeline_plan``, the function PipelineRuntime.run / forward_only call) is deadlock-free under
NCCL's rendezvous semantics and pairs every message by posting order alone, for 1F1B,
interleaved and Seq1F1B over pp ∈ 2..8 (property test), and the checker
(engine/parallel/p2p_check.py) does find the deadlocks it must: the old bare send-first pattern,
a slot-per-action interleaved plan, crossed message order, a receive nobody sends.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parallel.p2p_check import Op, simulate, unbatched
from engine.parallel.pipeline.schedules import Msg, build_schedule, comm_plan, pipeline_plan


def programs(schedule, pp, m, vpp=1, k=1, forward_only=False):
    """Every pipeline rank's sequence of p2p batches, as the runtime posts them."""
    plans = {r: pipeline_plan(schedule, pp, r, m, vpp, k, forward_only) for r in range(pp)}
    return {r: [list(step.ops) for step in plan if step.ops] for r, plan in plans.items()}


@st.composite
def pipelines(draw):
    schedule = draw(st.sampled_from(["1f1b", "interleaved", "seq1f1b"]))
    pp = draw(st.integers(2, 8))
    if schedule == "interleaved":
        return schedule, pp, pp * draw(st.integers(1, 4)), draw(st.integers(2, 4)), 1
    k = draw(st.integers(1, 4)) if schedule == "seq1f1b" else 1
    return schedule, pp, draw(st.integers(1, 12)), 1, k


@settings(max_examples=400, deadline=None)
@given(pipelines())
def test_runtime_plan_pairs_in_order_and_never_deadlocks(case):
    schedule, pp, m, vpp, k = case
    progs = programs(schedule, pp, m, vpp, k)
    outcome = simulate(progs)
    assert outcome.ok, (case, str(outcome))
    # every message of the schedule travels exactly once: activations into stages 1…pp·vpp−1 and
    # gradients out of stages 0…pp·vpp−2, per micro-batch and unit
    sent = sorted(op.msg for batches in progs.values() for batch in batches for op in batch if op.send)
    stages = pp * vpp
    want = sorted([Msg("act", mb, s, j) for mb in range(m) for s in range(1, stages) for j in range(k)]
                  + [Msg("grad", mb, s, j) for mb in range(m) for s in range(stages - 1) for j in range(k)])
    assert sent == want, case
    # the old pattern (each op alone, sends first) deadlocks as soon as there is a steady state
    if m >= 2:
        assert not simulate(unbatched(progs)).ok, case


@pytest.mark.parametrize("pp", range(2, 9))
@pytest.mark.parametrize("vpp", [1, 2, 3])
def test_forward_only_plan(pp, vpp):
    assert simulate(programs("1f1b", pp, 1, vpp, forward_only=True)).ok


def test_old_send_first_pattern_deadlocks():
    """1F1B, pp = 2, 3 micro-batches: after its second forward rank 0 sends activation 1 while
    rank 1, after its first backward, sends gradient 0; each send waits for a receive the other
    rank posts only after its own send."""
    outcome = simulate(unbatched(programs("1f1b", 2, 3)))
    assert set(outcome.stuck) == {0, 1}
    assert outcome.stuck[0][1] == [Op(True, 1, Msg("act", 1, 1, 0))]
    assert outcome.stuck[1][1] == [Op(True, 0, Msg("grad", 0, 0, 0))]
    assert "deadlock" in str(outcome)


def test_interleaved_needs_pair_slots():
    """A batch per action deadlocks the interleaved schedule (its stages wrap around the ring),
    which is why its plan batches each steady-state (F, B) pair together."""
    pp, m, vpp = 2, 4, 2
    per_action = {r: [list(s.ops) for s in comm_plan([(a,) for a in build_schedule("interleaved", pp, r, m, vpp)],
                                                       pp, r, vpp) if s.ops] for r in range(pp)}
    outcome = simulate(per_action)
    assert set(outcome.stuck) == {0, 1} and all(op.send for _, ops in outcome.stuck.values() for op in ops)
    assert simulate(programs("interleaved", pp, m, vpp)).ok


def test_checker_finds_crossed_order_and_missing_ops():
    a, b = Msg("act", 0, 1, 0), Msg("act", 1, 1, 0)
    good = {0: [[Op(True, 1, a), Op(True, 1, b)]], 1: [[Op(False, 0, a)], [Op(False, 0, b)]]}
    assert simulate(good).ok
    crossed = {0: [[Op(True, 1, a), Op(True, 1, b)]], 1: [[Op(False, 0, b), Op(False, 0, a)]]}
    assert len(simulate(crossed).mismatches) == 2  # without tags, a lands in b's buffer and back
    missing = {0: [[Op(True, 1, a)]], 1: [[Op(False, 0, a)], [Op(False, 0, b)]]}
    outcome = simulate(missing)
    assert outcome.stuck == {1: (1, [Op(False, 0, b)])} and "never sends" in outcome.unmatched[0]
    # a batch pairs as a whole: both ranks send and receive in one batch each (a ring step)
    ring = {r: [[Op(True, (r + 1) % 3, r), Op(False, (r - 1) % 3, (r - 1) % 3)]] for r in range(3)}
    assert simulate(ring).ok
    assert not simulate(unbatched(ring)).ok  # every rank sends first: the classic ring deadlock
