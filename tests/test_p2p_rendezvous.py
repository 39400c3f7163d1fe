"""DESIGN I-7 on CPU: every p2p batch under the NCCL rendezvous emulation
(``MESHTRON_P2P_RENDEZVOUS=1``, engine/parallel/p2p.py), in one gloo world of 4 ranks.

* I-5 still holds under it: loss, gradients, grad norm and weights after 3 AdamW steps equal the
  single-process run (tolerances of test_tp_exact.py) for 1F1B (pp = 4), interleaved (pp = 4 and
  pp = 2 × dp = 2, where both neighbours are the same rank), Seq1F1B with tp = 2 and with the zigzag
  ring (cp = 2), 1F1B × Ulysses, hybrid cp = 4 and the double ring (rp = 4, window 2 on its own
  groups); pipeline inference (``forward_only``, interleaved pp = 4) gives the single process's
  logits.
* ``PipelineRuntime.grad_sync`` (interleaved pp = 2 × tp = 2, 4 micro-batches): called before
  every backward action, ``last`` true exactly at each chunk's final one, after which the
  chunk's gradients no longer change.
* The old pattern (each rank posts its send, then receives, in separate batches) completes on
  plain gloo, where a posted send does not hold back the receive posted after it, but under the
  emulation (NCCL runs one communicator's ops in order) fails within ``MESHTRON_P2P_TIMEOUT_S``
  with an error naming the rank, its peer and the step — instead of hanging as NCCL would. So does
  the runtime itself given a plan the deadlock checker rejects (interleaved with a batch per
  action, tests/test_p2p_plan.py), at the step the checker names.
"""
from __future__ import annotations

import os
import time

import torch

from tests.harness import max_rel_diff, run_world
from tests.test_tp_exact import MODELS, check, compare, make_cfg, run_steps

LAYERS = ["model.num_layers=8"]
MESHES = [
    ["parallel.pp=4"],
    ["parallel.pp=4", "parallel.pp_schedule=interleaved", "parallel.vpp=2"],
    ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"],
    ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
    ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
    ["parallel.pp=2", "parallel.cp=2", "parallel.sp_mode=ulysses"],
    ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"],
    ["parallel.cp=4", "parallel.ring_window=2"],
]
TIMEOUT_S = 3.0  # the deadlock check's limit (the mesh checks run under the default 60 s)


def forward_only_error(world) -> float:
    """max|pipeline − single| / max|single| of the last stage's logits (0 on other ranks)."""
    from engine.data.packing import concat
    from engine.mesh import ParallelMesh
    from engine.parallel.pipeline.runtime import PipelineRuntime
    from engine.train import build_dataset, build_model

    over = MODELS["llama-gqa"] + LAYERS
    cfg = make_cfg(over + ["parallel.pp=4", "parallel.pp_schedule=interleaved", "parallel.vpp=2"], world)
    ref_cfg = make_cfg(over + ["parallel.dp=1"], 1)
    batch = concat([build_dataset(cfg).sequence(i) for i in range(2)])
    with torch.no_grad():
        want = build_model(ref_cfg, ParallelMesh.single())[0](batch, None)
    mesh = ParallelMesh.build(pp=4)
    got = PipelineRuntime(list(build_model(cfg, mesh)), mesh, "interleaved").forward_only(batch)
    return 0.0 if got is None else max_rel_diff(got, want)


def send_first(group, me: int, peer: int, tag: str) -> float:
    """The old runtime's pattern between ranks ``me`` and ``peer``: post a send, then receive
    and wait, then wait for the send; returns the seconds."""
    from engine.parallel.p2p import exchange

    t0 = time.monotonic()
    sent = exchange([(torch.full((8,), float(me)), peer)], [], group, step=f"{tag} step 0 (send first)")
    buf = torch.empty(8)
    exchange([], [(buf, peer)], group, step=f"{tag} step 1 (then receive)").wait()
    sent.wait()
    assert torch.equal(buf, torch.full((8,), float(peer)))
    return time.monotonic() - t0


def grad_sync_calls(world):
    """Every ``grad_sync`` call of one interleaved run, and per chunk whether its gradients right
    after the ``last=True`` backward equal its final gradients."""
    from engine.mesh import ParallelMesh
    from engine.parallel.pipeline.runtime import PipelineRuntime
    from engine.train import build_dataset, build_model, global_valid_tokens, rank_micro_batches

    cfg = make_cfg(MODELS["llama-gqa"] + ["model.num_layers=4", "parallel.pp=2", "parallel.tp=2",
                                          "parallel.pp_schedule=interleaved", "parallel.vpp=2"], world)
    mesh = ParallelMesh.build(tp=2, pp=2)
    model = build_model(cfg, mesh)
    mbs = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    runtime = PipelineRuntime(list(model), mesh, "interleaved")
    calls, snapshots, after_last = [], {}, []

    def grads(c):
        return [q.grad.clone() if q.grad is not None else None for q in model[c].parameters()]

    def hook(chunk, last):
        if after_last:  # the previous call flagged its chunk's last backward, which has run by now
            c = after_last.pop()
            snapshots[c] = grads(c)
        calls.append((chunk, last))
        if last:
            after_last.append(chunk)

    runtime.grad_sync = hook
    runtime.run([[mb] for mb in mbs], global_valid_tokens(mbs, mesh))
    if after_last:
        c = after_last.pop()
        snapshots[c] = grads(c)
    same = {c: all(a is None and b is None or torch.equal(a, b) for a, b in zip(snap, grads(c)))
            for c, snap in snapshots.items()}
    return calls, same


def per_action_interleaved(world) -> str | None:
    """One training step of interleaved pp = 2 × tp = 2 (4 micro-batches) with a p2p batch per
    action instead of per steady-state pair; returns the P2PTimeout message (None: no error)."""
    from engine.mesh import ParallelMesh
    from engine.parallel.p2p import P2PTimeout
    from engine.parallel.pipeline import runtime, schedules
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    def plan(schedule, pp, rank, m, vpp=1, k=1, forward_only=False):
        actions = schedules.build_schedule(schedule, pp, rank, m, vpp, k)
        return schedules.comm_plan([(a,) for a in actions], pp, rank, vpp)

    cfg = make_cfg(MODELS["llama-gqa"] + ["model.num_layers=4", "parallel.pp=2", "parallel.tp=2",
                                          "parallel.pp_schedule=interleaved", "parallel.vpp=2"], world)
    mesh = ParallelMesh.build(tp=2, pp=2)
    model, data = build_model(cfg, mesh), build_dataset(cfg)
    runtime.pipeline_plan, real = plan, runtime.pipeline_plan
    try:
        forward_backward(model, rank_micro_batches(data, 0, cfg, mesh), mesh, cfg.parallel)
    except P2PTimeout as e:
        return str(e)
    finally:
        runtime.pipeline_plan = real
    return None


def rendezvous_world(rank, world):
    import torch.distributed as dist

    from engine.mesh import ParallelMesh
    from engine.parallel.p2p import P2PTimeout

    os.environ["MESHTRON_P2P_RENDEZVOUS"] = "1"
    report = {}
    over = MODELS["llama-gqa"] + LAYERS
    ref = run_steps(make_cfg(over + ["parallel.dp=1"], 1), ParallelMesh.single())
    for mesh_over in MESHES:
        cfg = make_cfg(over + mesh_over, world)
        p = cfg.parallel
        mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement,
                                  ring_window=p.ring_window)
        report[" ".join(mesh_over)] = compare(run_steps(cfg, mesh), ref)
    forward_err = forward_only_error(world)
    sync_calls, sync_final = grad_sync_calls(world)

    # the old pattern, between ranks 0-1 and 2-3, each time on fresh groups (a gloo timeout closes
    # the group's connection to the peer)
    peer = rank ^ 1
    os.environ["MESHTRON_P2P_TIMEOUT_S"] = str(TIMEOUT_S)
    interleaved_error = per_action_interleaved(world)
    os.environ["MESHTRON_P2P_RENDEZVOUS"] = "0"
    buffered = send_first(ParallelMesh.build(dp=2, pp=2).group("dp"), rank, peer, "buffered")
    os.environ["MESHTRON_P2P_RENDEZVOUS"] = "1"
    group = ParallelMesh.build(dp=2, pp=2).group("dp")
    assert sorted(dist.get_process_group_ranks(group)) == sorted([rank, peer])
    t0, error = time.monotonic(), None
    try:
        send_first(group, rank, peer, "rendezvous")
    except P2PTimeout as e:
        error = str(e)
    return report, forward_err, (sync_calls, sync_final), interleaved_error, buffered, error, time.monotonic() - t0


def test_schedules_exact_under_nccl_rendezvous_and_send_first_fails_fast():
    t0 = time.monotonic()
    results = run_world(4, rendezvous_world, timeout=1500)
    for rank, (report, forward_err, sync, interleaved_error, buffered, error, waited) in enumerate(results):
        for key, worst in report.items():
            if rank == 0:
                print(key, {k: f"{v:.2e}" for k, v in worst.items()})
            check(worst, key)
        assert forward_err <= 1e-5, (rank, forward_err)
        calls, final = sync
        for c in (0, 1):  # 4 micro-batches: 4 backward actions per chunk, the last one flagged
            assert [last for chunk, last in calls if chunk == c] == [False, False, False, True], (rank, calls)
        assert len(calls) == 8 and final == {0: True, 1: True}, (rank, calls, final)
        # ranks 0, 1 are pipeline rank 0 (tp = 2), 2, 3 pipeline rank 1: the checker's deadlock, both
        # pipeline ranks stuck posting a gradient send at step 6
        stage = rank // 2
        assert interleaved_error is not None and f"rank {rank} waited" in interleaved_error, interleaved_error
        assert f"rank {(rank + 2) % 4} to post the receive" in interleaved_error, interleaved_error
        assert f"pipeline rank {stage}, interleaved step 6" in interleaved_error, interleaved_error
        assert buffered < 30, "on plain gloo the old pattern completes"
        peer = rank ^ 1
        assert error is not None, f"rank {rank}: the send-first pattern did not fail under the emulation"
        assert f"rank {rank} waited more than {TIMEOUT_S:g} s for rank {peer}" in error, error
        assert "rendezvous step 0 (send first)" in error, error
        assert 0.9 * TIMEOUT_S <= waited < TIMEOUT_S + 10, waited  # gloo's timer is a little coarse
    print(f"world: {time.monotonic() - t0:.0f} s")
