"""What a training run reports, on global rank 0: metrics.jsonl, TensorBoard scalars
(``torch.utils.tensorboard``), Weights & Biases (``wandb_project``), a progress bar (or one plain
line per step when stderr is not a terminal) and a loss-curve PNG.

``tensorboard`` and ``wandb`` are optional extras (``pip install 'meshtron[tensorboard,wandb]'``),
imported only when their logging is on.
"""
from __future__ import annotations

import json
import os
import resource
import sys

import torch
from tqdm import tqdm

WANDB_MODES = ("offline", "online")


def _tensorboard_writer(logdir: str, start_step: int, required: bool):
    """A ``SummaryWriter`` on ``logdir``, or None (after printing why) when the tensorboard package
    is missing and not ``required``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        hint = f"tensorboard is not installed ({e}); pip install 'meshtron[tensorboard]'"
        if required:
            raise ImportError(f"train.tensorboard=true but {hint}, or set train.tensorboard=false") from None
        print(f"skipped TensorBoard events: {hint}", flush=True)
        return None
    # purge_step writes SessionLog.START: TensorBoard hides what an earlier run in this logdir
    # logged at steps >= start_step, so a resumed run's curve replaces them
    return SummaryWriter(logdir, purge_step=start_step or None)


def _wandb_run(project: str, mode: str, output_dir: str, config: dict | None):
    """A wandb run of ``project`` whose files go under ``<output_dir>/wandb``."""
    if mode not in WANDB_MODES:
        raise ValueError(f"train.wandb_mode={mode!r} is not supported; use offline or online")
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"train.wandb_project={project!r} needs wandb, which is not installed ({e}); "
                          f"pip install 'meshtron[wandb]' or unset train.wandb_project") from None
    return wandb.init(project=project, mode=mode, dir=output_dir, config=config,
                      name=os.path.basename(os.path.normpath(output_dir)))


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
    ``tensorboard``: scalars in ``<output_dir>/tensorboard``; True needs the tensorboard package,
    None (default) writes them when it is installed. ``wandb_project``: also log to this Weights &
    Biases project (``wandb_mode`` offline or online; ``run_config`` is the run's config there).
    """

    def __init__(self, output_dir: str, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool | None = None, plot: bool = True, progress: bool | None = None,
                 wandb_project: str | None = None, wandb_mode: str = "offline",
                 run_config: dict | None = None):
        self.enabled, self.output_dir, self.plot = enabled, output_dir, plot
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._events = self._wandb = self._bar = self._f = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if wandb_project is not None:  # first: a missing wandb fails before any file is touched
            self._wandb = _wandb_run(wandb_project, wandb_mode, output_dir, run_config)
        self._truncate(start_step)
        self._f = open(self.path, "a")
        if tensorboard is not False:
            self._events = _tensorboard_writer(os.path.join(output_dir, "tensorboard"), start_step,
                                               required=tensorboard is True)
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
        scalars = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
        if self._events is not None:
            for tag, v in scalars.items():
                self._events.add_scalar(tag, v, step)
            self._events.flush()  # a crashed run's curve is on disk up to its last logged step
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
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
        if self._wandb is not None:
            self._wandb.finish()
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
