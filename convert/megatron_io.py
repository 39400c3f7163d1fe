"""Find and load a Megatron checkpoint of either on-disk format (DESIGN §5, I-6).

A path may be a checkpoint root (with ``latest_checkpointed_iteration.txt``), an ``iter_NNNNNNN``
directory, or a torch_dist directory (with ``metadata.json``).
"""
from __future__ import annotations

import json
import os

TRACKER = "latest_checkpointed_iteration.txt"


# CheckpointError is also re-exported: callers import it from here
from convert.files import CheckpointError, write_text_durable


def resolve(path: str) -> tuple[str, str]:
    """``(format, directory to read)``: ``torch_dist`` or ``torch`` (legacy)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    meta = os.path.join(path, "metadata.json")
    if os.path.isfile(meta):
        backend = read_json(meta).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{meta}: sharded_backend {backend!r} is not supported (only torch_dist)")
        info = os.path.join(path, "meshtron.json")  # read again by megatron_dist.read_info
        if os.path.isfile(info) and not isinstance(read_json(info).get("model"), dict):
            raise CheckpointError(f"{info} is damaged (no 'model' object); resume from an earlier checkpoint")
        return "torch_dist", path
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        it_dir = os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}")
        if os.path.isfile(os.path.join(it_dir, "metadata.json")):
            return resolve(it_dir)
        return "torch", path
    if os.path.basename(os.path.normpath(path)).startswith("iter_") or os.path.basename(path) == "release":
        return "torch", path
    raise FileNotFoundError(f"{path}: not a Megatron checkpoint (no metadata.json, no {TRACKER}, not an "
                            f"iter_* directory)")


def read_json(path: str) -> dict:
    """A checkpoint's small JSON file, which must hold an object; a damaged one (not UTF-8, not
    JSON, not an object) is one ``CheckpointError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                              f"checkpoint") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is damaged (a JSON {type(doc).__name__}, expected an object)")
    return doc


def open_megatron(path: str):
    """A checkpoint of either format opened for streaming reads: ``model`` (its model config),
    ``meta``, ``has``/``shape``/``dtype`` of torch_dist keys, ``read(requests)`` of rectangles of
    them, ``names()`` and ``get(name)`` of canonical tensors, one at a time."""
    fmt, where = resolve(path)
    if fmt == "torch_dist":
        from convert.megatron_dist import DistSource
        return DistSource(where)
    from convert.legacy_source import LegacySource
    return LegacySource(where)


def load_megatron(path: str) -> tuple[dict, dict, dict]:
    """(canonical state dict, model config dict, meta) of a checkpoint in either format."""
    fmt, where = resolve(path)
    if fmt == "torch_dist":
        from convert.megatron_dist import load_dist
        return load_dist(where)
    from convert.megatron_legacy import load_legacy
    return load_legacy(where)


def write_tracker(root: str, iteration: int) -> None:
    """Megatron's ``latest_checkpointed_iteration.txt``, written atomically and durably."""
    write_text_durable(os.path.join(root, TRACKER), str(iteration))
