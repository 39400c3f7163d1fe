"""engine/kernels/autotune.py and the CPU attention kernels it chooses between (engine/kernels/reference.py).

The tuner: measures a bucket once and keeps the fastest; a later process reads the file instead
of measuring; racing processes on an empty cache measure once and agree; the environment pins;
the key holds the thread count and the file name the platform; writes are atomic; an unwritable
cache directory still works (with a warning). The attention kernels: each candidate, pinned, equals
a float64 reference to fp32 round-off; ``auto`` measures each bucket once, caches it, and then
reproduces its results bitwise; a measurement leaves the global RNG alone and is not seen by an
active dispatch mode; the benchmark's bucket is measured in well under two seconds of CPU time.
Every test uses its own temporary cache directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.kernels import autotune
from engine.kernels import reference as R

ROOT = Path(__file__).resolve().parents[1]
ENV = "MESHTRON_TEST_KERNEL"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(R.KERNEL_ENV, raising=False)
    R.TUNER.forget()
    yield tmp_path
    R.TUNER.forget()


def counting(seconds: dict):
    calls = []

    def measure():
        calls.append(1)
        return dict(seconds)
    return measure, calls


# -- the tuner ---------------------------------------------------------------------------------
def test_measures_once_then_reads_the_file(cache):
    measure, calls = counting({"a": 0.2, "b": 0.1})
    tuner = autotune.Tuner("t", ("a", "b"), ENV)
    assert tuner.choose(("fwd", 128), measure) == "b" and len(calls) == 1
    assert tuner.choose(("fwd", 128), measure) == "b" and len(calls) == 1      # the memo
    again = autotune.Tuner("t", ("a", "b"), ENV)                                  # a later run
    assert again.choose(("fwd", 128), counting({"a": 0.0, "b": 1.0})[0]) == "b"  # the file decides
    [name] = again.decisions()
    assert again.decisions()[name]["source"] == "cache" and tuner.decisions()[name]["source"] == "measured"
    assert tuner.decisions()[name]["seconds"] == {"a": 0.2, "b": 0.1}
    [path] = cache.glob("t-*.json")
    data = json.loads(path.read_text())
    assert data["platform"]["torch"] == torch.__version__ and data["entries"][name]["choice"] == "b"
    assert not list(cache.glob("*.tmp"))  # written through a temporary file renamed into place


def test_ties_go_to_the_first_candidate_and_unknown_names_are_ignored():
    tuner = autotune.Tuner("t", ("a", "b"), ENV)
    assert tuner.choose(("k",), lambda: {"b": 0.1, "a": 0.1, "c": 0.0}) == "a"
    with pytest.raises(RuntimeError, match="timed none"):
        tuner.choose(("other",), lambda: {"c": 0.1})


def test_pinned_by_the_environment(monkeypatch):
    tuner = autotune.Tuner("t", ("a", "b"), ENV)
    measure, calls = counting({"a": 0.1, "b": 0.2})
    monkeypatch.setenv(ENV, "b")
    assert tuner.choose(("k",), measure) == "b" and not calls
    assert list(tuner.decisions().values())[0]["source"] == "pinned"
    monkeypatch.setenv(ENV, "c")
    with pytest.raises(ValueError, match="set it to auto or one of a, b"):
        tuner.choose(("k",), measure)
    monkeypatch.setenv(ENV, "auto")
    assert tuner.choose(("k",), measure) == "a" and len(calls) == 1


def test_key_holds_threads_and_file_holds_platform(cache, monkeypatch):
    tuner = autotune.Tuner("t", ("a", "b"), ENV)
    measure, calls = counting({"a": 0.1, "b": 0.2})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        tuner.choose(("k",), measure)
        torch.set_num_threads(2)
        tuner.choose(("k",), measure)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 and sorted(tuner.decisions()) == ["k threads=1", "k threads=2"]
    other = autotune.Tuner("t", ("a", "b"), ENV)
    monkeypatch.setattr(autotune, "platform_id", lambda: {"cpu": "another CPU"})
    torch.set_num_threads(1)
    try:
        other.choose(("k",), measure)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 and len(list(cache.glob("t-*.json"))) == 2


def test_corrupt_file_is_measured_again(cache):
    tuner = autotune.Tuner("t", ("a", "b"), ENV)
    tuner.path().parent.mkdir(parents=True, exist_ok=True)
    tuner.path().write_text("{not json")
    measure, calls = counting({"a": 0.3, "b": 0.2})
    assert tuner.choose(("k",), measure) == "b" and len(calls) == 1
    assert json.loads(tuner.path().read_text())["entries"]


def test_unwritable_cache_warns_and_still_chooses(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocker / "sub"))  # a directory under a file: no
    tuner = autotune.Tuner("t", ("a", "b"), ENV)
    measure, calls = counting({"a": 0.3, "b": 0.2})
    with pytest.warns(UserWarning, match="for this process only"):
        assert tuner.choose(("k",), measure) == "b"
    assert tuner.choose(("k",), measure) == "b" and len(calls) == 1


RACER = """
import json, os, sys, time
from engine.kernels import autotune
def measure():
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(0.3)
    fast = "a" if os.getpid() % 2 else "b"  # racers that all measured would disagree
    return {"a": 0.1 if fast == "a" else 0.2, "b": 0.1 if fast == "b" else 0.2}
print(autotune.Tuner("race", ("a", "b"), "MESHTRON_TEST_KERNEL").choose(("bucket",), measure))
"""


def test_racing_ranks_measure_once_and_agree(cache, tmp_path):
    log = tmp_path / "measured.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(log)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for _ in range(3)]
    choices = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().split()) == 1, "exactly one rank measured"
    assert len(set(choices)) == 1 and choices[0] in ("a", "b"), choices


# -- the CPU attention kernels -----------------------------------------------------------------
def naive(q, k, v, lens, causal):
    """float64 attention document by document (bottom-right causal), differentiable."""
    outs, start = [], 0
    a = q.shape[1] // k.shape[1]
    for n in lens:
        qd, kd, vd = (x[start:start + n].double() for x in (q, k, v))
        kd, vd = kd.repeat_interleave(a, 1), vd.repeat_interleave(a, 1)
        s = torch.einsum("qhd,khd->hqk", qd, kd) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vd))
        start += n
    return torch.cat(outs)


def inputs(lens, heads=8, groups=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, dout = torch.randn(t, heads, dim, generator=g), torch.randn(t, heads, dim, generator=g)
    k, v = torch.randn(t, groups, dim, generator=g), torch.randn(t, groups, dim, generator=g)
    cu = torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32)
    return q, k, v, dout, cu


def run(q, k, v, dout, cu, causal=True):
    out, lse = R.attention_forward(q, k, v, cu, cu, causal=causal)
    return (out, lse) + tuple(R.attention_backward(dout, q, k, v, out, lse, cu, cu, causal=causal))


def test_bucket():
    assert [R._bucket(n) for n in (1, 64, 65, 1000, 1024, 1025, 4096, 100_000)] == [
        64, 64, 128, 1024, 1024, 2048, 4096, 4096]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kernel", ["fused", "blocked"])
def test_each_candidate_equals_the_reference(monkeypatch, kernel, causal):
    monkeypatch.setenv(R.KERNEL_ENV, kernel)
    lens = [300, 17, 700]
    q, k, v, dout, cu = inputs(lens)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = naive(*leaves, lens, causal)
    ref.backward(dout.double())
    got = run(q, k, v, dout, cu, causal)
    refs = (ref.detach(),) + tuple(x.grad for x in leaves)
    for name, x, r in zip(("out", "dq", "dk", "dv"), (got[0],) + got[2:], refs):
        err = float((x.double() - r).abs().max() / r.abs().max())
        assert err <= 1e-5, (kernel, name, err)
    assert {d["choice"] for d in R.TUNER.decisions().values()} == {kernel}


def test_auto_measures_each_bucket_once_and_reproduces_bitwise(cache, monkeypatch):
    calls = []
    real = R._measure
    monkeypatch.setattr(R, "_measure", lambda *a: calls.append(a[:2]) or real(*a))
    lens = [100, 120, 300]  # buckets 128 (twice) and 512
    q, k, v, dout, cu = inputs(lens)
    first = run(q, k, v, dout, cu)
    assert sorted(calls) == sorted([("forward", torch.float32), ("backward", torch.float32)] * 2), calls
    entries = json.loads(R.TUNER.path().read_text())["entries"]
    assert sorted(entries) == sorted(R.TUNER.decisions())
    assert {name.split()[3] for name in entries} == {"q=128", "q=512"}
    R.TUNER.forget()  # a restarted run: the file, not a new measurement, decides
    again = run(q, k, v, dout, cu)
    assert len(calls) == 4
    assert {d["source"] for d in R.TUNER.decisions().values()} == {"cache"}
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_measurement_leaves_rng_and_dispatch_modes_alone(cache):
    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    q, k, v, dout, cu = inputs([200])
    state = torch.get_rng_state()
    with Count():
        run(q, k, v, dout, cu)   # measures both directions
    measured = Count.n
    assert torch.equal(torch.get_rng_state(), state)
    Count.n = 0
    with Count():
        run(q, k, v, dout, cu)   # from the memo
    assert Count.n == measured, "the mode saw the measurement's runs"


def test_float64_stays_on_the_fused_kernel(monkeypatch):
    monkeypatch.setenv(R.KERNEL_ENV, "blocked")  # blocked computes in fp32: not for float64
    q, k, v, dout, cu = (x.double() if x.is_floating_point() else x for x in inputs([64]))
    assert R._use_fused("backward", q, k, True, 64, 64)


def test_benchmark_bucket_costs_well_under_two_seconds():
    """The bucket of tools/bench_cpu.py at its README settings: 4,096 tokens, 8/2 heads of 32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.thread_time()
        seconds = {d: R._measure(d, torch.float32, True, 4096, 4096, 4, 32) for d in ("forward", "backward")}
        cost = time.thread_time() - t0
    finally:
        torch.set_num_threads(threads)
    assert all(set(s) == {"fused", "blocked"} for s in seconds.values()), seconds
    assert cost < 2.0, (cost, seconds)
