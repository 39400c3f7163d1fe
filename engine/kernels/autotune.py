"""Kernels chosen by measurement: time the candidates once per shape bucket, keep the choice on disk.

A :class:`Tuner` holds one table (e.g. the CPU attention kernels). ``choose(key, measure)`` returns
the candidate for a shape bucket ``key`` (a tuple of plain values): from the process's memo, else
from the cache file, else by calling ``measure()`` (seconds per candidate) and keeping the fastest.
As ``torch.backends.cudnn.benchmark`` does, but persistent, because determinism needs it:

- **Stable choices.** A restarted run must reproduce an uninterrupted one bitwise, so a bucket's
  kernel must not change between runs: the first measurement is written to
  ``<cache dir>/<table>-<platform>.json`` and every later run reads it instead of measuring again.
  The platform hash covers the CPU model and flags and the torch version; the thread count is part
  of every key. Measurements use their own inputs and generator: the global RNG is not touched.
- **Which ranks measure.** The file is the authority. A rank that finds no entry takes an exclusive
  lock on ``<file>.lock``, reads the file again and measures only if the entry is still missing,
  then writes the file atomically (temporary file + ``os.replace``) before releasing the lock. So on
  one host exactly one rank measures a bucket, the others wait on the lock (without using the CPU
  it is measuring on) and adopt its entry: all ranks use the same kernel for the same shape. Hosts
  that do not share the cache directory measure separately; point ``MESHTRON_CACHE_DIR`` at a shared
  directory, or pin the kernel, to make a multi-host CPU run agree everywhere.
- **Pinning.** The table's environment variable (``auto`` by default, or a candidate's name)
  overrides the measurement, e.g. to reproduce a run on another machine. Where the cache directory
  cannot be written the choice lives only in the process (a warning says so).

Cache directory: ``$MESHTRON_CACHE_DIR``, else ``$XDG_CACHE_HOME/meshtron``, else ``~/.cache/meshtron``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

CACHE_ENV = "MESHTRON_CACHE_DIR"


def cache_dir() -> Path:
    """Where tuners keep their files (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshtron"


def _cpuinfo() -> dict:
    """The first CPU's ``model name`` and ``flags`` (Linux), else what ``platform`` knows."""
    info = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "flags", "Features") and name not in info:
                info[name] = value.strip()
            if not line.strip() and info:
                break
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "flags": " ".join(sorted((info.get("flags") or info.get("Features") or "").split()))}


def platform_id() -> dict:
    """What a measurement depends on besides the shape and the thread count."""
    cpu = _cpuinfo()
    return {"cpu": cpu["model"], "flags_sha256": hashlib.sha256(cpu["flags"].encode()).hexdigest()[:16],
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "machine": platform.machine()}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (fcntl; no lock where there is none, e.g. Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Tuner:
    """One table of measured choices among ``candidates``; pinned by ``env_var`` (``auto`` = measure)."""

    def __init__(self, table: str, candidates: tuple[str, ...], env_var: str):
        self.table, self.candidates, self.env_var = table, tuple(candidates), env_var
        self._memo: dict[tuple, str] = {}
        self._log: dict[str, dict] = {}  # key string -> {choice, source, seconds}: what this process used
        self._platform: dict | None = None
        self._warned = False

    # -- settings ------------------------------------------------------------------------------
    def pinned(self) -> str | None:
        """The candidate the environment pins, or None for ``auto``; ValueError for a bad value."""
        value = os.environ.get(self.env_var, "").strip().lower() or "auto"
        if value == "auto":
            return None
        if value not in self.candidates:
            raise ValueError(f"{self.env_var}={value!r} is not a {self.table} kernel; set it to auto or "
                             f"one of {', '.join(self.candidates)}")
        return value

    def path(self) -> Path:
        if self._platform is None:
            self._platform = platform_id()
        digest = hashlib.sha256(json.dumps(self._platform, sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir() / f"{self.table}-{digest}.json"

    # -- the choice ----------------------------------------------------------------------------
    def choose(self, key: tuple, measure: Callable[[], dict[str, float]]) -> str:
        """The candidate for the bucket ``key``; ``measure()`` runs at most once per bucket and
        cache directory (see the module docstring), returning seconds per candidate."""
        pin = self.pinned()
        if pin is not None:
            self._note(key, pin, "pinned", None)
            return pin
        memo_key = key + (torch.get_num_threads(),)
        choice = self._memo.get(memo_key)
        if choice is None:
            choice = self._lookup(self._key_str(key), measure)
            self._memo[memo_key] = choice
        return choice

    def decisions(self) -> dict[str, dict]:
        """What this process used, per bucket: ``{key: {"choice", "source", "seconds"}}`` with source
        ``measured``, ``cache`` or ``pinned``."""
        return dict(self._log)

    def forget(self) -> None:
        """Drop this process's memo (the file stays): the next call reads the file again."""
        self._memo.clear()
        self._log.clear()

    # -- internals -----------------------------------------------------------------------------
    def _key_str(self, key: tuple) -> str:
        return " ".join(str(part) for part in key) + f" threads={torch.get_num_threads()}"

    def _note(self, key, choice: str, source: str, seconds) -> None:
        name = key if isinstance(key, str) else self._key_str(key)
        if name not in self._log:
            self._log[name] = {"choice": choice, "source": source, "seconds": seconds}

    def _entry(self, entries: dict, name: str):
        entry = entries.get(name)
        if isinstance(entry, dict) and entry.get("choice") in self.candidates:
            return entry
        return None

    def _lookup(self, name: str, measure) -> str:
        path = self.path()
        entry = self._entry(self._read(path), name)  # written atomically: no lock needed to read
        if entry is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with _locked(path.with_name(path.name + ".lock")):
                    entries = self._read(path)
                    entry = self._entry(entries, name)
                    if entry is None:  # this rank measures; the others wait on the lock
                        entry = self._measure(measure)
                        entries[name] = entry
                        self._write(path, entries)
                        self._note(name, entry["choice"], "measured", entry["seconds"])
            except OSError as err:
                if not self._warned:
                    warnings.warn(f"{self.table}: cannot keep measured kernel choices in {path.parent} ({err}); "
                                  f"they hold for this process only, so a restarted run may pick differently. "
                                  f"Set {CACHE_ENV} to a writable directory or pin {self.env_var}.",
                                  stacklevel=3)
                    self._warned = True
                if entry is None:
                    entry = self._measure(measure)
                    self._note(name, entry["choice"], "measured", entry["seconds"])
        self._note(name, entry["choice"], "cache", entry.get("seconds"))
        return entry["choice"]

    def _measure(self, measure) -> dict:
        seconds = {name: float(s) for name, s in measure().items() if name in self.candidates}
        if not seconds:
            raise RuntimeError(f"{self.table}: the measurement timed none of {self.candidates}")
        # ties go to the earlier candidate, so equal timings give the same choice everywhere
        choice = min(seconds, key=lambda n: (seconds[n], self.candidates.index(n)))
        return {"choice": choice, "seconds": {n: round(s, 6) for n, s in seconds.items()}}

    def _read(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return dict(data.get("entries", {})) if isinstance(data, dict) else {}

    def _write(self, path: Path, entries: dict) -> None:
        data = {"table": self.table, "platform": self._platform, "entries": dict(sorted(entries.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
