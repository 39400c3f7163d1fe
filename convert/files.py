"""Checkpoint files on disk: trusted loading of pickles, durable writes, and the one error type.

Loading. Every ``torch.load`` of meshtron runs with ``weights_only=True``: tensors, containers and
an allow-list of the objects Megatron-LM checkpoints hold (``args`` is an ``argparse.Namespace``
with torch dtypes; Megatron-LM's legacy files add numpy RNG states, ``BytesIO`` extra states,
``SimpleNamespace``/``PosixPath``/``Signals`` values and megatron-core enums — the list
megatron-core 0.16 registers in ``megatron/core/safe_globals.py``). The megatron-core classes are
imported only when a file names one of them (importing megatron-core is slow), so meshtron's own
checkpoints load without it.

Writing. A file or directory becomes visible only once complete: written, ``fsync``'d, renamed
into place, and the directory holding it ``fsync``'d, so a crash (or SIGKILL) at any point leaves
the previous state or the new one, never a half-written file under the final name.
"""
from __future__ import annotations

import io
import os
import pickle
from argparse import Namespace
from pathlib import PosixPath
from signal import Signals
from types import SimpleNamespace

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it should: the message names the file."""


def _numpy_globals() -> list:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    out = [np.ndarray, np.dtype, (_reconstruct, "numpy.core.multiarray._reconstruct"),
           (_reconstruct, "numpy._core.multiarray._reconstruct")]
    out += [getattr(np.dtypes, n) for n in ("UInt32DType", "Float64DType", "Int64DType") if hasattr(np, "dtypes")]
    return out


SAFE_GLOBALS = [Namespace, SimpleNamespace, PosixPath, io.BytesIO, bytes, Signals]  # bytes: an empty BytesIO


def _megatron_globals() -> list:
    """megatron-core's own allow-list (its enums and configs), when it is installed."""
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS as MCORE
    except ImportError:
        return []
    return list(MCORE)


def trusted_load(path: str, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with the allow-list above (CPU tensors; ``mmap``
    maps tensor data instead of reading it, so slicing a big file reads only the slices)."""
    allowed = SAFE_GLOBALS + _numpy_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "megatron" not in str(e):
            raise
    with torch.serialization.safe_globals(allowed + _megatron_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path} holds an object meshtron does not load ({e}); "
                                  f"install megatron-core if it names a megatron class") from e


# ---------------------------------------------------------------------------------------------
# Durable writes


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; nothing more can be done
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for where, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync_file(os.path.join(where, f))
        fsync_dir(where)


def save_durable(obj, path: str) -> None:
    """``torch.save`` to ``path`` and fsync it (the caller renames a directory into place)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_durable(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temporary file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
