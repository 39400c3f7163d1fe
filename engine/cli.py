"""``meshtron-train CONFIG.yaml [section.key=value ...]``: one process, or one rank of a torchrun world.

The config is loaded and validated against the world size before any process group exists, so a
bad config fails at once on every rank with one message (printed by rank 0) and exit code 2.
After that, a rank that fails prints its traceback, tells the others through the rendezvous store
and exits non-zero at once without waiting on collectives; the others leave within
``dist.abort_poll_s`` (engine.watchdog), with or without torchrun; ``dist.timeout_s`` bounds the
wait for a peer that vanished or went silent without a word (the watchdog's heartbeats notice a
stopped or hung peer even where gloo's p2p would wait forever).

Launchers: torchrun (or tools/launch.sh) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Under a plain ``srun meshtron-train CONFIG`` (one task per GPU, no torchrun) they are
derived from SLURM's variables instead (:func:`slurm_env`).
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import traceback

USAGE = """usage: meshtron-train CONFIG.yaml [section.key=value ...]

Train with the given YAML config; overrides use dotted keys, e.g.
  meshtron-train configs/tiny.yaml parallel.tp=2 train.steps=3
Run it under torchrun (or tools/launch.sh) for several processes, or as one srun
task per GPU (rank and rendezvous from SLURM's variables; MASTER_PORT, default
29500, must be free on the first node); the product dp·pp·tp·cp must equal the
number of processes (parallel.dp=-1 takes the rest)."""

DEFAULT_MASTER_PORT = "29500"


def _bad_input_errors() -> tuple[type, ...]:
    """Errors about the user's files (data, checkpoints) whose message is the whole story."""
    from convert.megatron_io import CheckpointError
    from engine.config import ConfigError
    from engine.data.records import DataError
    from engine.train import NonFiniteTraining

    return (CheckpointError, ConfigError, DataError, NonFiniteTraining)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list in its compressed syntax, without ``scontrol``:
    ``node[01-04,07],gpu5`` -> ``node01``; ``a[3-4]b[1-2]`` -> ``a3b1``; ``localhost`` -> ``localhost``.
    Only the first host is needed, so each bracket contributes the start of its first range."""
    host, i = "", 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: '[' without ']'")
            first = nodelist[i + 1:end].split(",")[0].split("-")[0]
            if not first.isdigit():
                raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the range {nodelist[i:end + 1]!r}")
            host, i = host + first, end + 1  # zero padding is part of the name: node[01-04] -> node01
        else:
            host, i = host + nodelist[i], i + 1
    if not host:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return host


def slurm_env(env) -> dict[str, str]:
    """The torch.distributed variables a plain ``srun`` task lacks, from SLURM's: RANK from
    SLURM_PROCID, WORLD_SIZE from SLURM_NTASKS, LOCAL_RANK from SLURM_LOCALID, MASTER_ADDR from
    the first host of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST: srun
    starts task 0 on its first node) and MASTER_PORT 29500. Empty when torchrun already set RANK
    (a torchrun per node inside srun also sees SLURM_PROCID, which then numbers nodes, not ranks)
    or when this is not a SLURM task. Variables already set are kept."""
    if env.get("RANK") or not env.get("SLURM_PROCID") or not env.get("SLURM_NTASKS"):
        return {}
    # the step's nodes: an srun on part of the allocation starts task 0 on the first of them
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        raise ValueError("srun task without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's address")
    derived = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
               "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "LOCAL_WORLD_SIZE": slurm_local_world(env),
               "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
               "MASTER_PORT": DEFAULT_MASTER_PORT}
    return {k: v for k, v in derived.items() if v is not None and not env.get(k)}


def slurm_local_world(env) -> str | None:
    """This node's task count: SLURM_STEP_TASKS_PER_NODE (else SLURM_TASKS_PER_NODE), a list
    such as ``4(x2),3`` in node order, at SLURM_NODEID; None when SLURM does not say."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: expected counts such as '4(x2),3'")
        counts += [m.group(1)] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def local_device_index(env, device_count: int) -> int:
    """This process's GPU on its node, from the launcher's environment ``env`` and the number of
    visible GPUs: ``LOCAL_RANK`` (torchrun), else ``SLURM_LOCALID`` (plain ``srun``), else 0 when
    one GPU is visible or the job has one process. With one visible GPU it is always 0 (e.g. a
    launcher that gives each rank its own ``CUDA_VISIBLE_DEVICES``)."""
    if device_count == 1:
        return 0
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = env.get(name)
        if value is not None and value.strip() != "":
            index = int(value)
            if not 0 <= index < device_count:
                raise RuntimeError(f"{name}={index} but this process sees {device_count} GPUs (0-{device_count - 1}); "
                                   f"launch at most {device_count} processes per node or check CUDA_VISIBLE_DEVICES")
            return index
    if int(env.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"cannot tell which of the {device_count} visible GPUs this rank should use: neither "
                           f"LOCAL_RANK nor SLURM_LOCALID is set; launch with torchrun (sets LOCAL_RANK) or srun "
                           f"(sets SLURM_LOCALID), or give each process one GPU with CUDA_VISIBLE_DEVICES")
    return 0


def _select_backend(cfg):
    """(backend name, this rank's device): NCCL on CUDA, gloo on CPU, unless dist.backend says.
    The CUDA device always carries its index (:func:`local_device_index`)."""
    import torch

    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local = local_device_index(os.environ, torch.cuda.device_count())
        torch.cuda.set_device(local)
        return backend, torch.device("cuda", local)
    return backend, torch.device("cpu")


def init_mesh(cfg):
    """Initialise the default process group (when in a torchrun world) and build the mesh."""
    import torch.distributed as dist

    from engine.mesh import ParallelMesh

    backend, device = _select_backend(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    if world > 1 and not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's static rendezvous keeps one store across --max-restarts: keys of the
            # failed attempt (gloo's peer addresses) would meet the new one, so every attempt
            # gets its own key space
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"meshtron/attempt{attempt}", store),
                                    rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    p = cfg.parallel
    return ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, order=p.order,
                              placement=p.placement, ring_window=p.ring_window, device=device)


def main(argv: list[str] | None = None) -> int:
    from engine.config import ConfigError, load_config, parse_cli, validate

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:  # before anything reads RANK or WORLD_SIZE; init_process_group's env:// reads the rest
        os.environ.update(slurm_env(os.environ))
    except ValueError as e:
        print(f"meshtron-train: error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    try:
        path, overrides = parse_cli(argv)
        cfg = validate(load_config(path, overrides), int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        if rank == 0:
            print(f"meshtron-train: error: {e}", file=sys.stderr)
        return 2
    from engine.data.records import DataError

    try:  # the data first: a bad file is one error on every rank, before any rendezvous
        from engine.train import build_dataset

        dataset = build_dataset(cfg)
        stats = getattr(dataset, "stats", None) or getattr(getattr(dataset, "pairs", None), "stats", None)
        if rank == 0 and stats:  # nothing is dropped silently
            print("data: " + ", ".join(f"{v} {k}" for k, v in stats.items()), flush=True)
    except DataError as e:
        if rank == 0:
            print(f"meshtron-train: error: {e}", file=sys.stderr)
        return 2
    watchdog, bad_input = None, _bad_input_errors()
    try:
        from engine.train import train
        from engine.watchdog import Watchdog

        mesh = init_mesh(cfg)
        watchdog = Watchdog(rank, cfg.dist.abort_poll_s, silent_s=cfg.dist.timeout_s,
                            world=int(os.environ.get("WORLD_SIZE", "1"))).start()
        train(cfg, mesh, dataset)
    except BaseException as e:  # noqa: BLE001 - any failure must end this rank now, not hang the others
        from engine.watchdog import last_line

        if watchdog is None or watchdog.report(last_line(e)):  # the first failure: print it
            if isinstance(e, bad_input):  # the message says what to fix; a traceback would bury it
                print(f"meshtron-train: rank {rank}: error: {e}", file=sys.stderr, flush=True)
            else:
                print(f"meshtron-train: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        else:  # a consequence of another rank's failure, which that rank prints
            from engine.watchdog import peer_summary

            print(f"meshtron-train: rank {rank} stopping: {peer_summary(watchdog.failed_peer())} "
                  f"(its error is printed by that rank)", file=sys.stderr, flush=True)
        if watchdog is not None:
            watchdog.leave(1)
        sys.stderr.flush()
        os._exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        # every rank reaches the barrier before any tears its connections down (gloo aborts a
        # peer whose pairs close while it is still finishing its last p2p exchange)
        dist.barrier()
        watchdog.stop()
        dist.destroy_process_group()
        # leave without running C++ static destructors: with gloo, a background thread still
        # joinable at interpreter teardown intermittently aborts the process ("terminate called
        # without an active exception") after all work is done and written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
