"""Tokenize once: the encoded records of a run, memory-mapped from a cache (``data.cache``).

Tokenizing conversations with a chat template costs ~0.5 ms a record; a million records are
minutes per rank per start. The cache holds what the first pass computes — token ids and target
masks (SFT) or prompt/chosen/rejected ids (DPO) — as Megatron indexed datasets, so every later
start and restart memory-maps it.

Key: the data files' identity (path, size, mtime), the tokenizer directory's files (the chat
template lives there), the record kind and every setting that changes an encoding (format,
seq_len, overflow, skip_bad_records) and the cache version. A key is a directory
``<cache dir>/<kind>-<digest>``; a changed input is a new key, so a stale cache is never read.

Build, in parallel and without a process group (it runs before one exists): the ranks of a node
(torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE) walk the records in the same order; rank r encodes
the usable records at positions p ≡ r (mod W) into its part (``part-r``: the indexed files and
the positions), written atomically with a ``done`` marker last, or an ``error`` file naming the
record. Local rank 0 waits for every part, writes ``manifest.json`` (each file's size and the
.idx files' crc32) and renames the build directory into place; the others wait for that. Nodes
that share the cache directory build in their own directories; the first rename wins.

Load: the manifest must match the key, each file its size, each ``.idx`` its checksum, and the
indexed files must validate (engine/data/indexed.py); anything else is reported and rebuilt,
never trusted. Records come back in the order an uncached first pass gives, so a run's data —
and its losses — are the same with and without the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from engine.data.records import DataError, RecordError, RecordSource, expand_paths, iter_samples
from engine.data.store import IndexedStore, TokenStore

try:
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover - transformers needs jinja2 for chat templates
    TemplateError = RecordError

VERSION = 1
FIELDS = {"sft": ("tokens", "targets"), "preference": ("prompt", "chosen", "rejected")}


def cache_root(cfg) -> str:
    """``data.cache_dir``, else ``<meshtron cache dir>/data`` ($MESHTRON_CACHE_DIR, ~/.cache/meshtron)."""
    from engine.kernels.autotune import cache_dir

    return cfg.data.cache_dir or str(cache_dir() / "data")


def file_identity(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def tree_identity(path: str) -> dict:
    """Every file under ``path`` (a directory; else the name itself) with size and mtime."""
    if not os.path.isdir(path):
        return {"path": path}
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    return {"path": os.path.abspath(path), "files": [[os.path.relpath(f, path)] + file_identity(f)[1:] for f in files]}


def data_identity(path: str):
    """A data file's identity, or every file's of a directory (a datasets save_to_disk)."""
    return tree_identity(path) if os.path.isdir(path) else file_identity(path)


def cache_key(cfg, kind: str, tokenizer_path: str, cutoff_len: int) -> str:
    d = cfg.data
    files = [data_identity(f) for f in expand_paths(d.path)]
    key = {"version": VERSION, "kind": kind, "format": d.format, "cutoff_len": cutoff_len, "overflow": d.overflow,
           "skip_bad_records": d.skip_bad_records, "files": files, "tokenizer": tree_identity(tokenizer_path)}
    return json.dumps(key, sort_keys=True)


@dataclass
class EncodedRecords:
    """The run's encoded records: one store per field (FIELDS[kind]), in first-pass order."""

    stores: dict[str, TokenStore]
    stats: dict
    path: str

    @property
    def num_records(self) -> int:
        return next(iter(self.stores.values())).num_documents


def encoded_records(cfg, kind: str, tokenizer_path: str, tokenizer_fn, cutoff_len: int,
                    encode, log=print) -> EncodedRecords:
    """The cache of this config, built first when missing or unusable (see the module docstring).
    ``encode(tokenizer, sample, counts, where)`` -> the record's encoding (a tuple of token lists,
    FIELDS[kind] in order) or None when dropped."""
    key = cache_key(cfg, kind, tokenizer_path, cutoff_len)
    final = os.path.join(cache_root(cfg), f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}")
    found, why = _open(final, key, kind)
    if found is not None:
        return found
    rank, world, alone = _local_share()
    if rank == 0:
        log(f"data cache: building {final} ({why}) with {world} rank(s)")
        if os.path.isdir(final) and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # damaged: never read
            shutil.rmtree(final, ignore_errors=True)
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or (
        f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}" if "SLURM_JOB_ID" in os.environ
        else str(os.getppid()))
    attempt = "-".join([socket.gethostname(), launch, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")])
    build = f"{final}.build-{attempt}" + (f"-alone{os.getpid()}" if alone else "")
    os.makedirs(build, exist_ok=True)
    timeout = cfg.dist.timeout_s
    _build_part(cfg, kind, build, rank, world, tokenizer_fn, encode)
    if rank == 0:
        stats = _wait_parts(build, world, timeout)
        _write_manifest(build, key, kind, world, stats)
        try:
            os.rename(build, final)
        except OSError:  # another node's build is in place already
            shutil.rmtree(build, ignore_errors=True)
    else:
        _wait_for(lambda: os.path.isfile(os.path.join(final, "manifest.json")) or _error(build), timeout,
                  f"local rank 0 to finish the data cache {final}")
        err = _error(build)
        if err and not os.path.isfile(os.path.join(final, "manifest.json")):
            raise DataError(err)
    found, why = _open(final, key, kind)
    if found is None:
        raise DataError(f"data cache {final}: just built but unusable ({why}); is the disk full?")
    return found


def _local_share() -> tuple[int, int, bool]:
    """(this rank's share, the node's number of building ranks, whether it builds alone).
    LOCAL_RANK without LOCAL_WORLD_SIZE (a launcher that does not say how many ranks share the
    node) builds the whole cache alone in its own directory: redundant work, never a build that
    waits for ranks that do not exist or is renamed away under another rank."""
    rank_s, world_s = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if rank_s is None:
        return 0, 1, False
    if world_s is None:
        return 0, 1, True
    rank, world = int(rank_s), int(world_s)
    if not 0 <= rank < world:
        raise DataError(f"LOCAL_RANK={rank} with LOCAL_WORLD_SIZE={world}: expected 0 <= LOCAL_RANK < "
                        f"LOCAL_WORLD_SIZE (the launcher's environment is inconsistent)")
    return rank, world, False


def _build_part(cfg, kind, build, rank, world, tokenizer_fn, encode) -> None:
    from engine.data.indexed import IndexedTokensWriter, best_dtype

    d = cfg.data
    source = RecordSource(d.path, d.skip_bad_records)
    counts: Counter = Counter()
    positions = []
    prefix = os.path.join(build, f"part-{rank}")
    try:
        tokenizer = tokenizer_fn()
        dtype = best_dtype(len(tokenizer))
        writers = {f: IndexedTokensWriter(f"{prefix}-{f}", np.uint8 if f == "targets" else dtype)
                   for f in FIELDS[kind]}
        p = -1
        for loc, sample in iter_samples(source, kind, _record_format(d.format)):
            p += 1
            if p % world != rank:
                continue
            where = source.where(loc)
            try:
                enc = encode(tokenizer, sample, counts, where)
            except (RecordError, TemplateError) as e:
                source.bad(loc, e)
                continue
            if enc is None:
                continue
            for f, part in zip(FIELDS[kind], enc):
                writers[f].add_document(part)
            positions.append(p)
        for w in writers.values():
            w.finalize()
        np.save(f"{prefix}-positions.npy", np.asarray(positions, dtype=np.int64))
        stats = {"records": len(positions), "skipped": source.num_skipped, "truncated": counts["truncated"],
                 "dropped": counts["dropped"]}
        _atomic_write(f"{prefix}.done", json.dumps(stats))
    except DataError as e:
        _atomic_write(f"{prefix}.error", str(e))
        raise


def _record_format(fmt: str) -> str:
    return "auto" if fmt in ("auto", "preference", "hf") else {"messages": "openai"}.get(fmt, fmt)


def _wait_parts(build: str, world: int, timeout: float) -> dict:
    done = [os.path.join(build, f"part-{r}.done") for r in range(world)]
    _wait_for(lambda: all(map(os.path.isfile, done)) or _error(build), timeout,
              f"the node's {world} ranks to encode their shares of the data")
    err = _error(build)
    if err:
        raise DataError(err)
    total: Counter = Counter()
    for f in done:
        with open(f) as fh:
            total.update(json.load(fh))
    return dict(total)


def _error(build: str) -> str | None:
    if not os.path.isdir(build):
        return None
    for name in sorted(os.listdir(build)):
        if name.endswith(".error"):
            with open(os.path.join(build, name)) as f:
                return f.read()
    return None


def _wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise DataError(f"data cache: waited {timeout:g} s (dist.timeout_s) for {what}; a rank died or "
                            f"the cache directory is not shared as expected")
        time.sleep(0.05)


def _files(build: str, kind: str, world: int) -> list[str]:
    names = []
    for r in range(world):
        names += [f"part-{r}-{f}{ext}" for f in FIELDS[kind] for ext in (".bin", ".idx")]
        names.append(f"part-{r}-positions.npy")
    return names


def _write_manifest(build: str, key: str, kind: str, world: int, stats: dict) -> None:
    files = {}
    for name in _files(build, kind, world):
        path = os.path.join(build, name)
        entry = {"bytes": os.path.getsize(path)}
        if not name.endswith(".bin"):  # small: checksummed whole; a .bin is checked by its size and index
            with open(path, "rb") as f:
                entry["crc32"] = zlib.crc32(f.read())
        files[name] = entry
    _atomic_write(os.path.join(build, "manifest.json"),
                  json.dumps({"key": key, "kind": kind, "parts": world, "stats": stats, "files": files}))


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _open(final: str, key: str, kind: str) -> tuple[EncodedRecords | None, str]:
    """The cache at ``final`` when it verifies, else (None, why)."""
    manifest = os.path.join(final, "manifest.json")
    if not os.path.isfile(manifest):
        return None, "no cache yet"
    try:
        with open(manifest) as f:
            m = json.load(f)
        if m.get("key") != key or m.get("kind") != kind:
            return None, "its key differs (another config hashed alike?)"
        for name, entry in m["files"].items():
            path = os.path.join(final, name)
            if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
                return None, f"{name} is missing or has another size"
            if "crc32" in entry:
                with open(path, "rb") as f:
                    if zlib.crc32(f.read()) != entry["crc32"]:
                        return None, f"{name} fails its checksum"
        parts = [{f: IndexedStore(os.path.join(final, f"part-{r}-{f}")) for f in FIELDS[kind]}
                 for r in range(m["parts"])]
        positions = [np.load(os.path.join(final, f"part-{r}-positions.npy")) for r in range(m["parts"])]
    except (OSError, ValueError, KeyError, TypeError) as e:  # DataError is a ValueError
        return None, f"unreadable ({e})"
    stores = {f: InterleavedStore([p[f] for p in parts], positions) for f in FIELDS[kind]}
    if kind == "sft":
        stores["tokens"].attach_targets(stores.pop("targets"))
    return EncodedRecords(stores, m["stats"], final), "ok"


class InterleavedStore(TokenStore):
    """Parts' documents in the order of their global positions (each part holds the records at
    its positions, ascending)."""

    def __init__(self, parts: list[IndexedStore], positions: list[np.ndarray]):
        self.parts, self.name = parts, parts[0].name.rsplit("/part-", 1)[0]
        part_of = np.concatenate([np.full(len(p), k, dtype=np.int32) for k, p in enumerate(positions)])
        local_of = np.concatenate([np.arange(len(p), dtype=np.int64) for p in positions])
        order = np.argsort(np.concatenate(positions), kind="stable")
        self.part_of, self.local_of = part_of[order], local_of[order]
        self.lengths = np.concatenate([p.lengths for p in parts])[order] if parts else np.zeros(0, np.int64)
        self._targets: InterleavedStore | None = None

    def attach_targets(self, targets: "InterleavedStore") -> None:
        """The target mask, stored as a uint8 document per record."""
        self._targets, self.has_targets = targets, True

    def tokens(self, d, lo=0, hi=None):
        return self.parts[self.part_of[d]].tokens(int(self.local_of[d]), lo, hi)

    def targets(self, d, lo=0, hi=None):
        if self._targets is None:
            return None
        return self._targets.tokens(d, lo, hi).astype(bool)

    def valid_counts(self) -> np.ndarray:
        if self._targets is None:
            return self.lengths - 1
        t = self._targets
        flat = [p.data.tokens(0, p.data.num_tokens) for p in t.parts]
        per_part = [(np.add.reduceat(f, p.starts, dtype=np.int64) - f[p.starts]) if len(p.starts) else
                    np.zeros(0, np.int64) for f, p in zip(flat, t.parts)]
        counts = np.concatenate(per_part)
        offsets = np.cumsum([0] + [len(x) for x in per_part[:-1]])
        return counts[offsets[t.part_of] + t.local_of]
