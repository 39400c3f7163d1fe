"""What a training run reports, on global rank 0: metrics.jsonl, TensorBoard scalars, a progress
bar (or one plain line per step when stderr is not a terminal) and a loss-curve PNG.

TensorBoard event files are written here directly (TFRecord framing + hand-encoded ``Event``
protobufs) so that the heavy ``tensorboard`` package is only needed to *view* them.
"""
from __future__ import annotations

import json
import math
import os
import resource
import socket
import struct
import sys
import time

import torch
from tqdm import tqdm

# ---------------------------------------------------------------- crc32c (Castagnoli), TF masking

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (reflected, init and final xor 0xFFFFFFFF)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC that TFRecord stores (masking keeps CRCs of CRCs well distributed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- protobuf + TFRecord encoding

def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int64 are ten-byte two's complement on the wire
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    if wire == 2:  # length-delimited
        payload = _varint(len(payload)) + payload
    return _varint(num << 3 | wire) + payload


def _float32(v: float) -> bytes:
    f32_max = 3.4028234663852886e38  # struct refuses finite values past float32 range
    if math.isfinite(v) and abs(v) > f32_max:
        v = math.copysign(math.inf, v)
    return struct.pack("<f", v)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None, session_start: bool = False) -> bytes:
    """An ``Event`` protobuf: wall_time(1) double, step(2) int64, file_version(3) string,
    summary(5) -> Summary.value(1) -> Value{tag(1), simple_value(2)}, session_log(7)."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, _float32(v)))
                          for tag, v in scalars.items())
        msg += _field(5, 2, values)
    if session_start:  # SessionLog{status(1)=START}: TensorBoard drops older events at step >= this
        msg += _field(7, 2, _field(1, 0, _varint(1)))
    return msg


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, uint32 masked_crc(length), data, uint32 masked_crc(data)."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


class EventWriter:
    """Scalars to ``<logdir>/events.out.tfevents.<time>.<hostname>``, flushed on every write."""

    def __init__(self, logdir: str, start_step: int = 0):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))
        # a (re)started run purges what an earlier run in this logdir wrote from start_step on
        self._f.write(tfrecord(encode_event(time.time(), start_step, session_start=True)))
        self._f.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._f.write(tfrecord(encode_event(time.time(), step, scalars=scalars)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------- the run logger

def peak_memory_gib() -> float:
    """Peak accelerator memory allocated by torch on GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _summary(row: dict, mem_gib: float) -> str:
    parts = []
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
                            ("lr", "lr", "{:.3e}"), ("grad_norm", "grad_norm", "{:.3f}")):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{label} {fmt.format(row[key])}")
    parts.append(f"mem {mem_gib:.2f} GiB")
    return " | ".join(parts)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RunLogger:
    """Everything a run reports, written by global rank 0 (``enabled=False`` makes every method a
    no-op, so other ranks can hold one too).

    ``start_step > 0`` resumes: metrics.jsonl keeps its rows with step < start_step and continues.
    ``progress``: a tqdm bar (default: when stderr is a TTY), else one plain line per row.
    """

    def __init__(self, output_dir: str, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, plot: bool = True, progress: bool | None = None):
        self.enabled, self.output_dir, self.plot = enabled, output_dir, plot
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._events = self._bar = self._f = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._truncate(start_step)
        self._f = open(self.path, "a")
        if tensorboard:
            self._events = EventWriter(os.path.join(output_dir, "tensorboard"), start_step)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def _truncate(self, start_step: int) -> None:
        """Keep rows from before ``start_step`` (all of them gone on a fresh run), atomically."""
        kept = []
        if start_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] < start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, row: dict, echo: bool = True) -> None:
        """Record one step's ``row`` (must hold "step"); ``echo=False`` skips the plain line."""
        if not self.enabled:
            return
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        step = int(row["step"])
        if self._events is not None:
            scalars = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
            self._events.add_scalars(step, scalars)
        text = _summary(row, peak_memory_gib())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(max(step + 1 - self._bar.n, 0))
        elif echo:
            print(f"step {step:>5d} | {text}", flush=True)

    def close(self) -> None:
        """Close the bar and files; write ``loss.png`` when ``plot``."""
        if not self.enabled or self._f is None:
            return
        if self._bar is not None:
            self._bar.close()
        if self._events is not None:
            self._events.close()
        self._f.close()
        self._f = None
        if self.plot:
            plot_loss_curves({"loss": self.path}, os.path.join(self.output_dir, "loss.png"),
                             title=os.path.basename(os.path.normpath(self.output_dir)))

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(runs: dict[str, str], out_png: str, title: str = "loss") -> bool:
    """Overlay the loss curves of several runs ({label: metrics.jsonl path}) in one PNG.

    Returns False (after printing why) when matplotlib is not installed; it is optional.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on training nodes
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"skipped {out_png}: matplotlib is not installed ({e}); pip install matplotlib",
              flush=True)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, path in runs.items():
        rows = [r for r in read_metrics(path) if _is_number(r.get("loss"))]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label, linewidth=1.2)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True
