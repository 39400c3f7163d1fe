#!/usr/bin/env python3
"""Chaos run: train a tiny model under ``torchrun --max-restarts`` while faults hit it, then check
the final weights and optimizer state are bit-identical to an uninterrupted run.

    python tools/chaos.py [--world 4] [--steps 60] [--faults 12] [--seed S] [--config FILE]
                          [--output-dir DIR]

Design: ONE torchrun invocation with ``--max-restarts`` = the number of faults, ``train.resume=auto``
and a checkpoint every ``--every`` steps. The seed draws a schedule of faults — kind, step, rank —
and fault i fires on torchrun attempt i (``MESHTRON_FAULT="KIND@STEP/RANK#i"``, engine/faults.py),
so each restart is a real torchrun restart of the whole world resuming from its last checkpoint.
Steps are drawn in increasing order, so the fault of attempt i always lies at or after the point
attempt i resumes from. Kinds: SIGKILL of a rank in forward, backward, the optimizer step, a
collective and midway through a checkpoint write; an exception; a hang (SIGSTOP: the others must
give up within ``dist.timeout_s``; chaos.py then SIGKILLs the stopped process as a lost node would
be, instead of waiting for torchrun's 30 s SIGTERM grace on a process that cannot run); a NaN step;
a full disk while a checkpoint is written (the chaos run's checkpoints live on a 64 MiB tmpfs
when this process may mount one, and rank 0 fills it midway through a save, so the save meets a
real ENOSPC; elsewhere ENOSPC is raised in the checkpoint writer).

NaN steps: a NaN step is skipped (a no-op on every rank) and is, like bad data, part of the run:
it is given as ``nan@STEP/RANK#*`` (every attempt) to the chaos run AND to the reference run, so
both skip the same steps, and a replay after a restart skips it again. "Recovered" for it means
the run went on and the final weights still equal the reference's.

Output: a table of the faults (kind, step, phase, seconds to detect, recovered) and last one JSON
line ``{"faults", "recovered", "hangs", "final_bitwise_equal", "wall_s"}``; exit 0 only when every
fault fired and was recovered and the weights are equal.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_KINDS = ("kill-forward", "kill-backward", "kill-optimizer", "kill-collective", "raise", "stop")
SAVE_KINDS = ("kill-in-save", "enospc-in-save")
ALL_KINDS = STEP_KINDS[:4] + ("kill-in-save", "raise", "stop", "nan", "enospc-in-save")
ENOSPC_ERROR = "error: checkpoint of step"  # the one line the failing rank prints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="processes (default 4: tp2 x cp2, zero1; 2: cp2)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--faults", type=int, default=12, help="faults to inject (default 12; the first 9 are one of each kind)")
    p.add_argument("--seed", type=int, default=0, help="draws the schedule (default 0)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="training config (default configs/tiny.yaml)")
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "chaos"), help="runs and logs go here (replaced)")
    p.add_argument("--every", type=int, default=4, help="checkpoint every this many steps (default 4)")
    p.add_argument("--timeout-s", type=float, default=15.0, help="dist.timeout_s: how long the others wait for a hung peer")
    p.add_argument("--inject-enospc", action="store_true",
                   help="raise ENOSPC in the checkpoint writer instead of filling a size-limited tmpfs")
    p.add_argument("--limit-s", type=float, default=900.0, help="give up (a hang) after this many seconds per torchrun")
    return p.parse_args(argv)


def mesh_overrides(world: int) -> list[str]:
    if world % 4 == 0:
        return ["parallel.tp=2", "parallel.cp=2"]
    return ["parallel.cp=2"] if world % 2 == 0 else []


def draw_schedule(args, disk: bool = False) -> list[dict]:
    """The faults, in the order they fire: a dict per fault with kind, step, rank, attempt (None:
    every attempt, the NaN steps). ``step`` of a save fault is the checkpoint's iteration. ``disk``:
    the full disk is real (a size-limited file system), filled by rank 0, whose writes come last."""
    rng = random.Random(args.seed)
    kinds = list(ALL_KINDS)
    rng.shuffle(kinds)
    kinds = (kinds + [rng.choice(ALL_KINDS) for _ in range(max(0, args.faults - len(kinds)))])[:args.faults]
    saves = [c for c in range(args.every, args.steps, args.every)]
    if not saves and any(k in SAVE_KINDS for k in kinds):
        raise SystemExit(f"--steps {args.steps} leaves no checkpoint every {args.every} steps for the save faults")
    faults = []
    for kind in kinds:
        if kind in SAVE_KINDS:
            c = rng.choice(saves)
            faults.append({"kind": kind, "step": c, "key": c - 0.5})
        else:
            s = rng.randrange(1, args.steps)
            faults.append({"kind": kind, "step": s, "key": float(s)})
        faults[-1]["rank"] = rng.randrange(args.world)
        if disk and kind == "enospc-in-save":
            faults[-1]["rank"] = 0
    ordered = sorted((f for f in faults if f["kind"] != "nan"), key=lambda f: f["key"])
    for i, f in enumerate(ordered):
        f["attempt"] = i
    taken = {f["step"] for f in ordered}
    for f in faults:  # a NaN step is no other fault's step (a skipped step runs no optimizer update)
        if f["kind"] == "nan":
            free = [s for s in range(1, args.steps) if s not in taken]
            f["step"] = f["step"] if f["step"] in free else rng.choice(free)
            f["attempt"], f["key"] = None, float(f["step"])
            taken.add(f["step"])
    return sorted(faults, key=lambda f: (f["attempt"] is None, f["attempt"] or 0))


def spec(faults: list[dict]) -> str:
    return ",".join(f"{f['kind']}@{f['step']}/{f['rank']}#{'*' if f['attempt'] is None else f['attempt']}"
                    for f in faults)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(args, out: Path, fault_spec: str, max_restarts: int, log: Path, progress=None,
              ckpt_dir: Path | None = None, ballast: Path | None = None) -> tuple[int, bool]:
    """One torchrun invocation; (exit code, gave up as a hang). Stopped ranks (the ``stop`` fault)
    are SIGKILLed once a peer has noticed and left; a full disk (``ballast``) is emptied once the
    ranks of that attempt have left, as an operator would before the restart."""
    overrides = mesh_overrides(args.world) + [
        "optim.sharding=zero1", f"train.steps={args.steps}", f"train.output_dir={out / 'run'}",
        "train.resume=auto", f"checkpoint.every={args.every}", "checkpoint.keep=2", "checkpoint.save_final=true",
        "train.global_batch_size=4", "data.seq_len=128", f"train.log_interval={args.steps}",
        f"dist.timeout_s={args.timeout_s}", "dist.abort_poll_s=0.5"]
    overrides += [f"checkpoint.dir={ckpt_dir}"] if ckpt_dir else []
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHTRON_FAULT=fault_spec, MESHTRON_FAULT_LOG=str(log))
    if ballast:
        env["MESHTRON_FAULT_BALLAST"] = str(ballast)
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.world), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", str(max_restarts),
           "--log-dir", str(out / "logs"), "--redirects", "3", "-m", "engine.cli", args.config, *overrides]
    with open(out / "torchrun.log", "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, killed, freed = time.monotonic() + args.limit_s, set(), set()
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return proc.returncode, True
            events = read_log(log)
            for e in events:
                left = any(x["event"] == "exit" and x["attempt"] == e["attempt"] for x in events)
                # each full disk is emptied once, after its own attempt: an earlier attempt's fire
                # must not free the disk a later attempt has just filled (the soak run caught that)
                if (e["event"] == "fire" and e["kind"] == "enospc-in-save" and left and ballast
                        and e["attempt"] not in freed):
                    freed.add(e["attempt"])
                    ballast.unlink(missing_ok=True)
                if e["event"] == "fire" and e["kind"] == "stop" and e["pid"] not in killed and left:
                    killed.add(e["pid"])
                    try:
                        os.kill(e["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if progress:
                progress(events)
            time.sleep(0.2)
    return proc.returncode, False


def read_log(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def attempt_text(out: Path, attempt: int) -> str:
    """Everything the ranks of one attempt printed (torchrun's --log-dir, --redirects 3)."""
    files = sorted(glob.glob(str(out / "logs" / "*" / f"attempt_{attempt}" / "*" / "*.log")))
    return "".join(Path(f).read_text(errors="replace") for f in files)


def judge(faults: list[dict], events: list[dict], out: Path, rc: int, timeout_s: float) -> int:
    """Fill each fault's phase, detect_s and recovered; returns the number of hangs."""
    hangs = 0
    for f in faults:
        fired = [e for e in events if e["event"] == "fire" and e["kind"] == f["kind"] and e["step"] == f["step"]
                 and e["rank"] == f["rank"] and (f["attempt"] is None or e["attempt"] == f["attempt"])]
        f["phase"] = fired[0]["phase"] if fired else "-"
        f["detect_s"] = None
        f["recovered"] = bool(fired) and rc == 0
        if not fired or f["attempt"] is None:
            continue
        exits = [e["t"] for e in events if e["event"] == "exit" and e["attempt"] == f["attempt"]]
        if exits:
            f["detect_s"] = max(exits) - fired[0]["t"]
            if f["detect_s"] > timeout_s + 10:
                hangs += 1
                f["recovered"] = False
        nxt = attempt_text(out, f["attempt"] + 1)
        resumed = [int(line.rsplit(" ", 1)[1]) for line in nxt.splitlines() if line.startswith("resumed from ")]
        saved_before = f["step"] - (1 if f["kind"] in SAVE_KINDS else 0)
        # the next attempt resumed from the last checkpoint published before the fault (none: step 0)
        expect = (saved_before // f["every"]) * f["every"]
        got = resumed[0] if resumed else 0
        f["resumed_at"] = got
        if got != expect:
            f["recovered"] = False
        if f["kind"] == "enospc-in-save":
            text = attempt_text(out, f["attempt"])
            f["recovered"] &= text.count(ENOSPC_ERROR) == 1 and "Traceback" not in text
    return hangs


def load_final(ckpt_dir: Path, steps: int) -> dict:
    """Every tensor of the final checkpoint (weights, optimizer state, RNG) and its training state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from convert.files import trusted_load

    where = ckpt_dir / f"iter_{steps:07d}"
    flat = ckpt_dir.parent / f"flat_{ckpt_dir.name}_{steps}.pt"
    dcp_to_torch_save(str(where), str(flat))
    state = trusted_load(str(flat))
    train = trusted_load(str(where / "meshtron_train.pt"))
    train.pop("run", None)
    state["meshtron_train"] = train
    for f in sorted((where / "rng").iterdir()):
        state[f"rng/{f.name}"] = trusted_load(str(f))  # torch's and Python's (seeded by train)
    return state


def equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.dtype != torch.bool and a.numel() else a,
                        b.view(torch.uint8) if b.dtype != torch.bool and b.numel() else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def table(faults: list[dict]) -> str:
    rows = [("#", "kind", "step", "rank", "attempt", "phase", "detect_s", "resumed_at", "recovered")]
    for i, f in enumerate(faults):
        rows.append((str(i), f["kind"], str(f["step"]), str(f["rank"]), "*" if f["attempt"] is None else str(f["attempt"]),
                     f["phase"], "-" if f["detect_s"] is None else f"{f['detect_s']:.1f}",
                     str(f.get("resumed_at", "-")), "yes" if f["recovered"] else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def mount_small_disk(where: Path) -> bool:
    """A 64 MiB tmpfs at ``where`` for the chaos run's checkpoints (a disk that can really fill);
    False where the machine does not allow it (not root, no mount): ENOSPC is then injected."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=False,
                          capture_output=True)
    return done.returncode == 0


def unmount(where: Path) -> None:
    if os.path.ismount(where):
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.output_dir).resolve()
    disk = out / "chaos" / "disk"
    unmount(disk)  # a previous chaos run's, interrupted
    shutil.rmtree(out, ignore_errors=True)
    (out / "reference").mkdir(parents=True)
    try:
        real_disk = not args.inject_enospc and mount_small_disk(disk)
        disk.mkdir(parents=True, exist_ok=True)
        return run_chaos(args, out, disk, real_disk, t0)
    finally:
        unmount(disk)


def run_chaos(args, out: Path, disk: Path, real_disk: bool, t0: float) -> int:
    faults = draw_schedule(args, real_disk)
    for f in faults:
        f["every"] = args.every
    attempts = sum(f["attempt"] is not None for f in faults)
    nan_spec = spec([f for f in faults if f["attempt"] is None])
    tty = sys.stderr.isatty()
    shown = [None]

    def progress(events, what="chaos"):
        """One status line: carriage-returned on a terminal, a new line per fault otherwise."""
        fired = len({(e["kind"], e["step"], e["rank"], None if e["kind"] == "nan" else e["attempt"])
                     for e in events if e["event"] == "fire"})  # a NaN step fires again on each replay
        if tty or (what, fired) != shown[0]:
            line = f"[{what}] faults fired {fired} (scheduled: {len(faults)}) | {time.time() - t0:.0f}s"
            print(("\r" if tty else "") + line, end="" if tty else "\n", file=sys.stderr, flush=True)
            shown[0] = (what, fired)

    print(f"chaos: world {args.world}, {args.steps} steps, checkpoint every {args.every}, seed {args.seed}; "
          f"full disk: {'a 64 MiB tmpfs filled' if real_disk else 'ENOSPC injected (no tmpfs mount here)'}; "
          f"MESHTRON_FAULT={spec(faults)}", flush=True)
    log = out / "chaos" / "faults.jsonl"
    rc, gave_up = run_world(args, out / "chaos", spec(faults), attempts, log, progress, ckpt_dir=disk,
                            ballast=disk / "ballast" if real_disk else None)
    if tty:
        print(file=sys.stderr)
    print(f"chaos run: torchrun exit {rc}" + (" (killed: hang)" if gave_up else ""), flush=True)
    ref_rc, ref_hang = run_world(args, out / "reference", nan_spec, 0, out / "reference" / "faults.jsonl",
                                 lambda ev: progress(ev, "reference"))
    if tty:
        print(file=sys.stderr)
    print(f"reference run: torchrun exit {ref_rc}", flush=True)
    events = read_log(log)
    hangs = judge(faults, events, out / "chaos", rc, args.timeout_s) + gave_up + ref_hang
    bitwise = False
    if rc == 0 and ref_rc == 0:
        bitwise = equal(load_final(disk, args.steps),
                        load_final(out / "reference" / "run" / "checkpoints", args.steps))
    print(table(faults), flush=True)
    recovered = sum(f["recovered"] and bitwise for f in faults)
    result = {"faults": len(faults), "recovered": recovered, "hangs": hangs, "final_bitwise_equal": bitwise,
              "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(result), flush=True)
    return 0 if recovered == len(faults) and bitwise and hangs == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
