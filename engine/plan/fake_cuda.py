"""A fake ``cuda`` device for ``meshtron-plan --simulate`` on any machine.

Under ``FakeTensorMode`` every tensor of the simulated rank is a FakeTensor: shapes, dtypes and a
device, no storage. That alone is not enough to run a training step on a ``cuda`` device of a
CPU-only torch build: several Python bindings (``Tensor.copy_``, ``.contiguous()``, indexing) and
every autograd node construct a CUDA device guard, which such a build does not have, and autograd
asks torch's accelerator for the streams of ``cuda`` nodes. :func:`install` therefore compiles
(once, cached) and loads ``fake_cuda.cpp``, which registers torch's own no-op ``FakeGuardImpl``
as the CUDA guard and makes the CPU build report a CUDA build without devices; then it replaces
the Python-level ``torch.cuda`` calls that need a driver (streams and events for FSDP2, device
queries for the attention dispatch, ``Tensor.record_stream`` for activation offload) with
stand-ins describing an sm90 GPU. ``torch.cuda.is_available`` stays False: nothing may pin host
memory or touch a real device. Code that pins anyway (FSDP2's
``CPUOffloadPolicy(pin_memory=True)`` on a cuda mesh) gets the host tensor itself from
``Tensor.pin_memory`` (FakeTensorMode has no pinned memory): the same bytes on the same device, and
the copies keep the ``non_blocking`` that pinned memory lets the real run use.

On a CUDA build of torch nothing is compiled (FakeTensorMode installs a fake guard itself when no
GPU is visible), and with a real GPU present the Python-level calls are left alone.

This is process-wide and irreversible: call it only in a process that does nothing but simulate
(``meshtron-plan --simulate`` runs each simulated rank in such a process).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import torch

#: The device of every simulated rank. The fake guard keeps one current device for the process,
#: and a rank's tensors are checked against its mesh device, so every rank simulates as cuda:0.
DEVICE = torch.device("cuda", 0)
#: Compute capability the simulated GPU reports (H100 / H200), for the kernel dispatch.
CAPABILITY = (9, 0)

_SOURCE = os.path.join(os.path.dirname(__file__), "fake_cuda.cpp")
_installed = False


class SimulationSetupError(RuntimeError):
    """The fake CUDA device could not be set up on this machine (the message says why)."""


def _cache_dir() -> str:
    root = os.environ.get("MESHTRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meshtron")
    os.makedirs(root, exist_ok=True)
    return root


def _compile() -> str:
    """Build ``fake_cuda.cpp`` against this torch (cached by torch version, ABI and source)."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(source + f"{torch.__version__}:{abi}".encode()).hexdigest()[:16]
    target = os.path.join(_cache_dir(), f"fake_cuda-{key}.so")
    if os.path.isfile(target):
        return target
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise SimulationSetupError(
            "meshtron-plan --simulate on a CPU-only torch build compiles a small shim "
            f"({_SOURCE}) and needs a C++ compiler: install g++ (or set CXX), or simulate on a machine "
            "with a CUDA build of torch")
    base = os.path.dirname(torch.__file__)
    with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
        out = os.path.join(tmp, "fake_cuda.so")
        cmd = [cxx, "-O1", "-shared", "-fPIC", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               f"-I{os.path.join(base, 'include')}", _SOURCE, f"-L{os.path.join(base, 'lib')}", "-lc10",
               "-ltorch_cpu", f"-Wl,-rpath,{os.path.join(base, 'lib')}", "-o", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SimulationSetupError(f"compiling the fake CUDA shim failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        os.replace(out, target)
    return target


class _Stream:
    """A CUDA stream stand-in: work is ordered anyway (nothing runs)."""

    def __init__(self, *args, **kwargs):
        self.device = DEVICE
        self.recorded = 0  # events recorded on this stream so far
        self.waited = 0    # the host has waited for the first ``waited`` of them

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        _host_sync("stream synchronize")
        self.waited = self.recorded

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Event:
    """A CUDA event stand-in. Events complete in their stream's order, so once the host has waited
    for one, waiting for an earlier event of the same stream costs nothing and is not a host sync
    (FSDP2's CPU offload waits for every gradient shard's copy to the host in turn)."""

    def __init__(self, *args, **kwargs):
        self.stream, self.seq = None, 0

    def record(self, stream=None) -> None:
        self.stream = stream or _DEFAULT_STREAM
        self.stream.recorded += 1
        self.seq = self.stream.recorded

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        if self.stream is not None and self.seq <= self.stream.waited:
            return
        _host_sync("event synchronize")
        if self.stream is not None:
            self.stream.waited = self.seq

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _Stream()


def _host_sync(kind: str) -> None:
    from engine.plan.sim_checks import note_host_sync

    note_host_sync(kind)


def _patch_python_cuda() -> None:
    """The ``torch.cuda`` calls of the engine and of FSDP2 that need a driver."""
    cuda = torch.cuda
    cuda.get_device_capability = lambda device=None: CAPABILITY
    cuda.get_device_name = lambda device=None: "simulated GPU"
    cuda.current_device = lambda: DEVICE.index
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: _host_sync("torch.cuda.synchronize")
    cuda.Stream, cuda.Event = _Stream, _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    # activation offload (engine/model/offload.py) keeps a block from early reuse by a side
    # stream; nothing runs here, and the fake tensor's record_stream would initialise CUDA
    torch.Tensor.record_stream = lambda self, stream: None
    torch.Tensor.pin_memory = lambda self, device=None: self  # see the module docstring
    torch.backends.cuda.is_flash_attention_available = lambda: True


def install() -> None:
    """Make fake ``cuda`` tensors usable in this process (see the module docstring); idempotent."""
    global _installed
    if _installed:
        return
    if not torch.backends.cuda.is_built():
        lib = ctypes.CDLL(_compile())
        lib.meshtron_simulate_cuda.restype = ctypes.c_int
        lib.meshtron_simulate_cuda()
        install._lib = lib  # keep it loaded
    if not torch.cuda.is_available():
        _patch_python_cuda()
    _installed = True
