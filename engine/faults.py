"""Fault injection for the failure tests and tools/chaos.py: ``MESHTRON_FAULT`` makes a run fail
on purpose.

``MESHTRON_FAULT="KIND@STEP[/RANK][#ATTEMPT],..."`` — at optimizer step STEP (or every step of a
range ``A-B``) on global rank RANK (every rank when omitted), on torchrun attempt ATTEMPT
(``TORCHELASTIC_RESTART_COUNT``; 0 when omitted, as a transient failure would: a restarted world
runs clean; ``*`` = every attempt, a fault the data would cause again on a replay):

* ``raise``            raise ``RuntimeError`` at the start of the step;
* ``kill``             SIGKILL this process at the start of the step (no cleanup, no message);
* ``kill-forward``     SIGKILL in the step's forward (the first module called);
* ``kill-backward``    SIGKILL in the step's backward (the first gradient of a module's output);
* ``kill-optimizer``   SIGKILL as the step's optimizer (torch's AdamW) starts its update;
* ``kill-collective``  SIGKILL on entering the step's first collective (the peers are inside it);
* ``stop``             SIGSTOP this process at the start of the step: a silent, hung peer that
                       the others must notice within ``dist.timeout_s``;
* ``nan``              make this rank's gradients NaN after the step's backward;
* ``kill-in-save``     SIGKILL this process halfway through writing the checkpoint of that step
                       (after some of its files are written, before the checkpoint is published);
* ``enospc-in-save``   the checkpoint of that step fails halfway with ENOSPC (a full disk): with
                       ``MESHTRON_FAULT_BALLAST=FILE`` on a size-limited file system, FILE is
                       grown until the disk is full and the save's next write meets the real
                       error (rank 0 writes last: put the fault there); else ENOSPC is raised.

``MESHTRON_FAULT_LOG=FILE``: each fault that fires, and each rank leaving after a failure, appends
one JSON line (kind, step, rank, attempt, pid, time) — what tools/chaos.py measures. Unset, this
module costs one dictionary lookup per step.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import time

KINDS = ("raise", "kill", "kill-forward", "kill-backward", "kill-optimizer", "kill-collective", "stop", "nan",
         "kill-in-save", "enospc-in-save")
# the collectives kill-collective intercepts (looked up on torch.distributed at call time)
_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "broadcast",
                "all_to_all_single", "barrier", "batch_isend_irecv")


def parse(spec: str) -> list[tuple[str, int, int, int | None, int | None]]:
    """``"raise@2/1,nan@3-4#*"`` → [(kind, first step, last step, rank or None, attempt or None
    for every attempt), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, where = item.split("@")
            where, _, attempt = where.partition("#")
            steps, _, rank = where.partition("/")
            first, _, last = steps.partition("-")
            entry = (kind, int(first), int(last or first), int(rank) if rank else None,
                     None if attempt == "*" else int(attempt or 0))
        except ValueError:
            raise ValueError(f"MESHTRON_FAULT item {item!r}: expected KIND@STEP[-STEP][/RANK][#ATTEMPT|#*]") from None
        if kind not in KINDS:
            raise ValueError(f"MESHTRON_FAULT item {item!r}: kind must be one of {', '.join(KINDS)}")
        out.append(entry)
    return out


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def active(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("MESHTRON_FAULT")
    if not spec:
        return False
    attempt = _attempt()
    return any(k == kind and a <= step <= b and r in (None, rank) and n in (None, attempt)
               for k, a, b, r, n in parse(spec))


def note(event: str, **fields) -> None:
    """One JSON line in ``MESHTRON_FAULT_LOG`` (nothing when unset); one ``write`` on an
    ``O_APPEND`` descriptor, so lines of several ranks never interleave."""
    path = os.environ.get("MESHTRON_FAULT_LOG")
    if not path:
        return
    line = json.dumps({"event": event, "attempt": _attempt(), "pid": os.getpid(), "t": time.time(), **fields})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _die(kind: str, step: int, rank: int, phase: str, sig=signal.SIGKILL) -> None:
    note("fire", kind=kind, step=step, rank=rank, phase=phase)
    os.kill(os.getpid(), sig)


def at_step_start(step: int, rank: int) -> None:
    if active("kill", step, rank):
        _die("kill", step, rank, "step-start")
    if active("stop", step, rank):
        _die("stop", step, rank, "step-start", signal.SIGSTOP)
    if active("raise", step, rank):
        note("fire", kind="raise", step=step, rank=rank, phase="step-start")
        raise RuntimeError(f"injected failure (MESHTRON_FAULT) at step {step} on rank {rank}")
    for phase in ("forward", "backward", "optimizer", "collective"):
        if active(f"kill-{phase}", step, rank):
            _ARM[phase](step, rank)


# Phase kills are armed at the step's start by global hooks that fire once and never return (the
# process dies), so the engine needs no call site per phase.


def _arm_forward(step: int, rank: int) -> None:
    import torch

    torch.nn.modules.module.register_module_forward_pre_hook(
        lambda *_: _die("kill-forward", step, rank, "forward"))


def _arm_backward(step: int, rank: int) -> None:
    import torch

    def on_output(module, args, out):
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g: _die("kill-backward", step, rank, "backward"))

    torch.nn.modules.module.register_module_forward_hook(on_output)


def _arm_optimizer(step: int, rank: int) -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda *_: _die("kill-optimizer", step, rank, "optimizer"))


def _arm_collective(step: int, rank: int) -> None:
    import torch.distributed as dist

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, lambda *a, _n=name, **k: _die("kill-collective", step, rank, f"collective:{_n}"))


_ARM = {"forward": _arm_forward, "backward": _arm_backward, "optimizer": _arm_optimizer,
        "collective": _arm_collective}


def poison_gradients(params, step: int, rank: int) -> None:
    """NaN in the first gradient found: the fp32 ``main_grad`` buckets the backward summed into
    (engine/parallel/grads.py), or ``.grad`` (FSDP2)."""
    if active("nan", step, rank):
        note("fire", kind="nan", step=step, rank=rank, phase="after-backward")
        for p in params:
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            if grad is not None:
                grad.fill_(float("nan"))
                return


def in_save(step: int, rank: int) -> None:
    if active("kill-in-save", step, rank):
        _die("kill-in-save", step, rank, "checkpoint-write")
    if active("enospc-in-save", step, rank):
        ballast = os.environ.get("MESHTRON_FAULT_BALLAST")
        note("fire", kind="enospc-in-save", step=step, rank=rank,
             phase="checkpoint-write" + (" (disk filled)" if ballast else " (injected)"))
        if ballast:  # a size-limited file system: fill it; the rest of this save meets a real ENOSPC
            _fill(ballast)
            return
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected, MESHTRON_FAULT) checkpoint of step {step}")


def _fill(path: str) -> None:
    with open(path, "ab", buffering=0) as f:
        block = b"\0" * (1 << 20)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        try:
            os.fsync(f.fileno())
        except OSError:
            pass
