"""Spawn a gloo world of N CPU processes and run one function on every rank.

Used by the tests (a spawn costs seconds, so a test module spawns one world and runs many checks
inside it) and by tools that need a small world without torchrun (``meshtron-convert verify``).
Each rank's return value is saved and returned in rank order; an exception on any rank fails the
call with that rank's traceback, and a world that does not finish within ``timeout`` is killed
(a test never hangs).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir, fn, args):
    import torch.distributed as dist

    # rendezvous through a file in the private temp dir: no TCP port to race other processes for
    # (MASTER_PORT is still set for code that reads it, e.g. megatron-core's initialisation)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, 'rendezvous')}",
                                rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        os._exit(1)  # do not wait on collectives the failed rank will never join
    dist.barrier()  # no rank tears down its gloo pairs while a peer still finishes p2p
    dist.destroy_process_group()
    os._exit(0)  # skip C++ teardown, which can abort on a still-joinable gloo thread (see engine/cli.py)


def run_world(world: int, fn, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return the results by rank."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, free_port(), outdir, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world of {world} did not finish within {timeout:.0f}s")
        except mp.ProcessExitedException as e:
            failure = e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                results.append(None)
                continue
            # the harness's own result file in its private temp dir (a worker may return any
            # picklable object), never a checkpoint: checkpoints load through convert.files.trusted_load
            r = torch.load(path, weights_only=False)
            if not r["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{r['error']}")
            results.append(r["result"])
        if failure is not None:
            raise AssertionError(f"world of {world} failed: {failure}")
        return results


def max_rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (0 when both are all zeros): the error measure of every
    exactness check, robust to elements whose reference value is near zero."""
    scale = ref.abs().max().item()
    diff = (a.double() - ref.double()).abs().max().item()
    return diff / scale if scale > 0 else diff
