"""Fault injection for the failure tests: ``MESHTRON_FAULT`` makes a run fail on purpose.

``MESHTRON_FAULT="KIND@STEP[/RANK],..."`` — at optimizer step STEP (or every step of a range
``A-B``) on global rank RANK (every rank when omitted):

* ``raise``  raise ``RuntimeError`` at the start of the step;
* ``kill``   SIGKILL this process at the start of the step (no cleanup, no message);
* ``nan``    make this rank's gradients NaN after the step's backward;
* ``kill-in-save``  SIGKILL this process halfway through writing the checkpoint of that step
  (after some of its files are written, before the checkpoint is published).

Faults fire only on a run's first attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT`` = 0), as a
transient failure would: a restarted world runs clean. Unset, this module costs one dictionary
lookup per step.
"""
from __future__ import annotations

import os
import signal

KINDS = ("raise", "kill", "nan", "kill-in-save")


def parse(spec: str) -> list[tuple[str, int, int, int | None]]:
    """``"raise@2/1,nan@3-4"`` → [(kind, first step, last step, rank or None), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, where = item.split("@")
            steps, _, rank = where.partition("/")
            first, _, last = steps.partition("-")
            entry = (kind, int(first), int(last or first), int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"MESHTRON_FAULT item {item!r}: expected KIND@STEP[-STEP][/RANK]") from None
        if kind not in KINDS:
            raise ValueError(f"MESHTRON_FAULT item {item!r}: kind must be one of {', '.join(KINDS)}")
        out.append(entry)
    return out


def active(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("MESHTRON_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    return any(k == kind and a <= step <= b and r in (None, rank) for k, a, b, r in parse(spec))


def at_step_start(step: int, rank: int) -> None:
    if active("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if active("raise", step, rank):
        raise RuntimeError(f"injected failure (MESHTRON_FAULT) at step {step} on rank {rank}")


def poison_gradients(params, step: int, rank: int) -> None:
    """NaN in the first gradient found: the fp32 ``main_grad`` buckets the backward summed into
    (engine/parallel/grads.py), or ``.grad`` (FSDP2)."""
    if active("nan", step, rank):
        for p in params:
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            if grad is not None:
                grad.fill_(float("nan"))
                return


def in_save(step: int, rank: int) -> None:
    if active("kill-in-save", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
