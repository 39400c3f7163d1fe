"""What the simulation watches in every op of a simulated rank: NCCL's rules (I-7) and host syncs (I-9).

:class:`StepWatch` is a ``TorchDispatchMode`` above ``FakeTensorMode``. It sees every aten and
c10d op of the rank and records, with the engine's own file:line that issued it:

* **NCCL breaches** (gloo accepts all of them): a tensor handed to a collective or p2p op that
  does not live on the rank's device; a point-to-point send or receive issued on its own instead
  of inside ``batch_isend_irecv`` with the other operations of its schedule step (NCCL does not
  buffer sends: a lone send waits for its receive, and two neighbours sending first deadlock); a
  collective on a group the rank does not belong to (torch only warns and skips it: the warning
  is turned into a breach by :func:`group_warnings`).
* **Host syncs** while ``counting``: ``aten._local_scalar_dense`` on a device tensor (``.item()``,
  ``int(t)``, ``float(t)``, ``bool(t)``), ops whose output shape depends on device data
  (``nonzero``, boolean masks, ``unique``, ``masked_select``, ...), copies between host and device
  with ``non_blocking=False`` (the host waits for the stream), and stream or device waits
  (``torch.cuda.synchronize``; reported by the fake CUDA stand-ins through :func:`note_host_sync`).

Host-side logic keeps its values: an op whose tensor arguments are all real (not fake) CPU
tensors and whose result stays on the CPU runs for real (the mesh layout, index arithmetic on
host tensors), and so does a factory op making a small host tensor, while large host tensors
stay fake (a 72B model's initial weights are drawn on the host and must not be allocated). Fake tensors have no values, so a sync gets a stand-in: 1 for a scalar (a finite loss, a norm,
a count), and for a data-dependent shape the largest shape the op could return; the run goes on
and the sync is counted. Values of host (CPU) fake tensors that cannot be known are stand-ins
too and listed as ``unknown_host_values``: the engine's host-side logic must run on real tensors
(the simulation builds its batches outside the fake mode).
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)
_SKIP = (_HERE, os.path.join(os.path.dirname(_HERE), "fake_cuda.py"))  # the simulation's own frames
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))  # the repository (engine's parent)
aten = torch.ops.aten
_P2P = {"send", "recv_", "recv_any_source_"}
# outputs whose shape depends on the values of the input
_DATA_DEPENDENT = {aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
                   aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
                   aten.repeat_interleave.Tensor, aten.argwhere.default}


def caller() -> str:
    """``file:line (function)`` of the innermost frame of meshtron's own code (engine/, convert/,
    tools/) on the current stack; else of the first frame outside torch and this module."""
    frame = sys._getframe(1)
    fallback = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in _SKIP and not path.startswith(_TORCH_DIR):
            where = f"{os.path.relpath(path, _ROOT) if path.startswith(_ROOT) else path}:{frame.f_lineno} " \
                    f"({frame.f_code.co_name})"
            if path.startswith(_ROOT) and "/site-packages/" not in path:
                return where
            fallback = fallback or where
        frame = frame.f_back
    return fallback or "<unknown>"


def _in_batch_p2p() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "batch_isend_irecv" and frame.f_code.co_filename.startswith(_TORCH_DIR):
            return True
        frame = frame.f_back
    return False


def _full_selection(indices: list) -> list:
    """Boolean masks replaced by the integer indices of every position (each mask all True): the
    largest result a masked index can have, without reading the mask."""
    out = []
    for i in indices:
        if i is None or i.dtype != torch.bool:
            out.append(i)
            continue
        flat = torch.arange(i.numel(), device=i.device)
        out += list(torch.unravel_index(flat, tuple(i.shape))) if i.dim() > 1 else [flat]
    return out


_NONE, _REAL_CPU, _OTHER = range(3)
_SMALL = 1 << 16  # elements: a host tensor made by a factory op below this is made for real


def _kind(args, kwargs) -> int:
    """_NONE: no tensor argument (a factory op); _REAL_CPU: only real (not fake) CPU tensors and no
    other target device; _OTHER: anything else. Arguments are looked at one list deep (aten ops
    nest no deeper). Hot: runs for every op."""
    seen = False
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                if isinstance(t, FakeTensor) or t.device.type != "cpu":
                    return _OTHER
                seen = True
    if not seen:
        return _NONE
    device = kwargs.get("device")
    return _REAL_CPU if device is None or torch.device(device).type == "cpu" else _OTHER


_ACTIVE: list = []  # the StepWatch in force, for syncs that are no aten op (stream waits)


def note_host_sync(kind: str) -> None:
    """A host sync that is not an aten op (``torch.cuda.synchronize``, a stream or event wait):
    the fake CUDA stand-ins (engine/plan/fake_cuda.py) report theirs here."""
    for watch in _ACTIVE:
        watch._sync(kind)


class StepWatch(TorchDispatchMode):
    """Records NCCL breaches always and host syncs while ``counting`` (see the module docstring)."""

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *args):
        _ACTIVE.remove(self)
        return super().__exit__(*args)

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.counting = False
        self.violations: dict[str, str] = {}     # location -> what was wrong (first seen)
        self.syncs: Counter = Counter()          # (location, kind) -> count
        self.unknown_host_values: Counter = Counter()
        self._last_read = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def breach(self, message: str, where: str | None = None) -> None:
        self.violations.setdefault(where or caller(), message)

    def _sync(self, kind: str, source=None) -> None:
        """Count one sync at the engine's calling line. ``source``: the tensor read; the element
        reads of one ``.tolist()`` (one scalar read per element of views of the same tensor, one
        after another) count once."""
        if not self.counting:
            return
        if source is not None:
            base = source._base if source._base is not None else source
            if self._last_read is not None and self._last_read() is base:
                return
            self._last_read = weakref.ref(base)  # not a reference: the tensor must be freed as usual
        else:
            self._last_read = None
        self.syncs[(caller(), kind)] += 1

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    # -- the mode ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            self._check_comm(func, [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)])
            return func(*args, **kwargs)
        kind = _kind(args, kwargs)
        if kind == _REAL_CPU:
            with unset_fake_temporarily():  # host logic on real tensors: real values
                return func(*args, **kwargs)
        if kind == _NONE:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.numel() < _SMALL:
                with unset_fake_temporarily():  # a small host tensor: real, so host logic reads values
                    return func(*args, **kwargs)
            return out
        if func is aten._local_scalar_dense.default:
            return self._scalar(func, args[0])
        if func in _DATA_DEPENDENT and args[0].device.type != "cpu":
            self._sync(func.__name__)
            return self._largest(func, args, kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            self._check_copy(func, args, kwargs)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) \
                and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self._sync(f"{func.__name__} with a boolean mask")  # nonzero of the mask, on the device
            args = (args[0], _full_selection(args[1]), *args[2:])
        return func(*args, **kwargs)

    def _check_comm(self, func, tensors) -> None:
        for t in tensors:
            if t.device != self.device:
                self.breach(f"{func.__name__} on a tensor on {t.device}, not on the rank's device {self.device}")
                break
        if func.__name__.split(".")[0] in _P2P and not _in_batch_p2p():
            self.breach(f"{func.__name__.split('.')[0]} issued alone: a schedule step's sends and receives must "
                        f"go together through batch_isend_irecv (NCCL does not buffer a send)")

    def _check_copy(self, func, args, kwargs) -> None:
        if func is aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device") or args[0].device
            blocking = not kwargs.get("non_blocking", False)
        else:
            src, dst, blocking = args[1].device, args[0].device, not (args[2] if len(args) > 2 else
                                                                       kwargs.get("non_blocking", False))
        dst = torch.device(dst)
        if src.type != "cpu" and dst.type == "cpu" and blocking:
            self._sync("device-to-host copy")
        elif src.type == "cpu" and dst.type != "cpu" and blocking:
            self._sync("blocking host-to-device copy")

    def _scalar(self, func, t: torch.Tensor):
        if t.device.type != "cpu":
            self._sync("item", t)
        else:
            try:
                return func(t)
            except Exception:  # noqa: BLE001 - a host value the fake mode cannot know
                self.unknown_host_values[caller()] += 1
        return True if t.dtype == torch.bool else (1 if not t.is_floating_point() else 1.0)

    @staticmethod
    def _largest(func, args, kwargs):
        """The largest output a data-dependent op could produce (every element selected)."""
        x = args[0]
        if func in (aten.nonzero.default, aten.argwhere.default):
            return x.new_empty((x.numel(), x.dim()), dtype=torch.long)
        if func is aten.nonzero_static.default:
            return func(*args, **kwargs)
        if func is aten.masked_select.default:
            return x.new_empty((torch.broadcast_shapes(x.shape, args[1].shape).numel(),))
        if func is aten.repeat_interleave.Tensor:
            return x.new_empty((int(kwargs.get("output_size") or x.numel() * 8),), dtype=torch.long)
        out = x.new_empty((x.numel(),))
        return (out, x.new_empty((x.numel(),), dtype=torch.long), x.new_empty((x.numel(),), dtype=torch.long))


@contextmanager
def group_warnings(watch: StepWatch):
    """torch warns and skips a collective on a group the rank is not in: record it as a breach."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "does not belong to the given group" in text:
            watch.breach(f"{text.strip()} (the collective was skipped: a group the rank uses must be one it "
                         f"belongs to)")
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=".*does not belong to the given group.*")
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = shown


class _Phase:
    """What MemTracker asks its module tracker: whether the autograd engine is running (backward)."""

    parents: tuple = ()

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1


_PROPAGATING = [0]


def _mark_dtensor_propagation() -> None:
    """DTensor computes an op's output metadata by running it on stand-in tensors it makes with
    ``torch.empty_strided`` (``OpSchema.gen_fake_args``); under the simulation's FakeTensorMode
    those would count as allocations of the rank (FSDP2's fused AdamW made 16 parameter-sized
    "states"). Flag that phase so the tracker leaves it out."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached
    if getattr(original, "_meshtron_marked", False):
        return

    def propagate(self, op_schema):
        _PROPAGATING[0] += 1
        try:
            return original(self, op_schema)
        finally:
            _PROPAGATING[0] -= 1

    propagate._meshtron_marked = True
    ShardingPropagator._propagate_tensor_meta_non_cached = propagate


def step_memory_tracker():
    """A ``MemTracker`` for one training step of many micro-batches.

    MemTracker hooks every module's forward and backward to keep per-module statistics, which
    assume each module runs once per iteration (it raises on the second call of a root module)
    and cost several autograd hooks per module call; a step runs every module once per
    micro-batch and sequence unit, and only the rank's peak is wanted here. So this tracker keeps
    MemTracker's accounting of every storage (by device and category, with the peak snapshot) and
    replaces the module tracking by one question, "is autograd running": tensors made in forward
    are activations, tensors made in backward temporaries (activation gradients, recomputed
    activations, attention backward buffers), tensors made in the optimizer step optimizer states.
    MemTracker updates its peak only in those module (and optimizer) hooks; this one checks the
    peak after every op, where the step's activations and temporaries reach theirs.
    Built on MemTracker's private members (torch 2.13)."""
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    _mark_dtensor_propagation()

    class StepMemTracker(MemTracker):
        def __init__(self):
            super().__init__()
            self._mod_tracker = _Phase()

        def __enter__(self):
            if self._depth == 0:
                self._fake_mode_on_entry = active_fake_mode()
                self._register_global_optimizer_hook()
                self._track_resize()
                self._peak_mem_snap = self.get_tracker_snapshot()
                self._peak_mem = {dev: snap[_TOTAL_KEY] for dev, snap in self._peak_mem_snap.items()}
            TorchDispatchMode.__enter__(self)
            self._depth += 1
            return self

        def __exit__(self, *args):
            self._depth -= 1
            if self._depth == 0:
                self._deregister_param_and_optimizer_hooks()
                self._restore_resize()
            TorchDispatchMode.__exit__(self, *args)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _PROPAGATING[0]:  # DTensor's metadata propagation: stand-ins, not the rank's memory
                return func(*args, **(kwargs or {}))
            before = sum(v for d, v in self._peak_mem.items() if d.type != "cpu")
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.note_peak()
            if sum(v for d, v in self._peak_mem.items() if d.type != "cpu") > before:
                # where the accelerator's peak was reached (a built-in op's backward has no Python
                # frame of its own: the op names it)
                self.peak_site = " < ".join(x for x in (str(func), _engine_frames()) if x)
            return out

        def note_peak(self) -> None:
            """Take the current totals as the peak where they exceed it (per device)."""
            for dev, snap in self._curr_mem_snap.items():
                if snap[_TOTAL_KEY] > self._peak_mem.get(dev, 0):
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    return StepMemTracker()


def _engine_frames(depth: int = 4) -> str:
    """The innermost engine frames of the current Python stack, outermost first ("file:line fn")."""
    import traceback

    frames = [f for f in traceback.extract_stack() if "/engine/" in f.filename and "/engine/plan/" not in f.filename]
    return " < ".join(f"{f.filename.rsplit('/engine/', 1)[1]}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))
