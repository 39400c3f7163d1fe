"""A manifest of our own beside a checkpoint: every file's size and checksum, verified before a
load so that a truncated file or a flipped byte is one ``CheckpointError`` naming the file, never a
silently wrong tensor (DCP and ``torch.load`` check neither sizes nor contents of tensor bytes).

``<checkpoint>/meshtron_manifest.json``::

    {"version": 1, "algorithm": "crc32",
     "files": {"<relative path>": {"size": <bytes>, "crc32": "<8 hex digits>"}, ...}}

The checksum is ``zlib.crc32`` streamed in 4 MiB blocks: about 1.4 GB/s per core (measured on
this project's CI CPU; blake2b ran at ~0.34 GB/s there), so a rank re-reading its own freshly
written (page-cached) shards adds well under a second per GB. CRC32 catches every burst error up to
32 bits and any random damage with probability 1 - 2^-32: it guards against damage, not tampering.

Many ranks. Each rank checksums the files it wrote (:func:`file_entries` of its own names), the
entries are gathered to rank 0 (``torch.distributed.gather_object``), and rank 0 merges them
(:func:`merge_entries`) and writes the manifest (:func:`write_manifest`) before the directory is
published. On load, every rank checks the sizes of all files (a ``stat`` each) and the checksums
of its share (``verify_manifest(d, rank, world)``: files ``rank::world`` in sorted order), so the
checkpoint is read once in all, in parallel.

A checkpoint without a manifest (an older meshtron one, or one written by Megatron-LM) is accepted
with verification skipped: :func:`verify_manifest` returns False. Files in the directory that the
manifest does not list (a user's notes) are ignored.
"""
from __future__ import annotations

import json
import os
import secrets
import zlib
from collections.abc import Iterable, Mapping

from convert.files import CheckpointError, fsync_dir, fsync_file

MANIFEST = "meshtron_manifest.json"
VERSION = 1
BLOCK = 4 << 20


def checksum(path: str) -> str:
    """CRC32 of the file's bytes, as 8 hex digits, read in 4 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def list_files(directory: str) -> list[str]:
    """Every regular file under ``directory``, as sorted relative paths with ``/``, except the
    manifest itself and its temporary files."""
    out = []
    for top, dirs, names in os.walk(directory):
        dirs.sort()
        for n in names:
            rel = os.path.relpath(os.path.join(top, n), directory).replace(os.sep, "/")
            if rel != MANIFEST and not rel.startswith(f"{MANIFEST}.tmp-"):
                out.append(rel)
    return sorted(out)


def file_entries(directory: str, names: Iterable[str] | None = None) -> dict[str, dict]:
    """``{relative path: {"size", "crc32"}}`` of ``names`` (relative to ``directory``; all files
    when None). A rank calls it with the files it wrote; rank 0 merges the gathered results."""
    names = list_files(directory) if names is None else sorted(names)
    out = {}
    for rel in names:
        path = os.path.join(directory, rel)
        out[rel.replace(os.sep, "/")] = {"size": os.path.getsize(path), "crc32": checksum(path)}
    return out


def merge_entries(parts: Iterable[Mapping[str, dict]]) -> dict[str, dict]:
    """One dict of the ranks' entries; a file listed twice must agree (the same file, checksummed
    by two ranks), else that is a bug of who-writes-what."""
    merged: dict[str, dict] = {}
    for part in parts:
        for rel, entry in part.items():
            if rel in merged and merged[rel] != entry:
                raise AssertionError(f"two ranks checksummed {rel} differently: {merged[rel]} vs {entry}")
            merged[rel] = dict(entry)
    return dict(sorted(merged.items()))


def write_manifest(directory: str, files: Iterable[str] | Mapping[str, dict] | None = None) -> str:
    """Write ``<directory>/meshtron_manifest.json`` atomically (a temporary file, fsync'd, then
    ``os.replace``) and return its path. ``files``: None checksums every file of the directory
    here; a list of relative paths checksums those; a mapping is taken as entries already computed
    (:func:`merge_entries` of the ranks' :func:`file_entries`)."""
    entries = dict(files) if isinstance(files, Mapping) else file_entries(directory, files)
    path = os.path.join(directory, MANIFEST)
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        json.dump({"version": VERSION, "algorithm": "crc32", "files": dict(sorted(entries.items()))}, f, indent=1)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(directory)
    return path


def read_manifest(directory: str) -> dict[str, dict] | None:
    """The manifest's entries, or None when the checkpoint has none; a damaged manifest is a
    ``CheckpointError`` naming it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        files = doc["files"]
        ok = doc.get("version") == VERSION and doc.get("algorithm") == "crc32" and isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("crc32"), str) for k, v in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                              f"checkpoint, or delete it to load without verification") from e
    if not ok:
        raise CheckpointError(f"{path} is damaged (not a version-{VERSION} crc32 manifest); resume from an "
                              f"earlier checkpoint, or delete it to load without verification")
    return files


def verify_manifest(directory: str, rank: int = 0, world: int = 1) -> bool:
    """Check the checkpoint at ``directory`` against its manifest: True when verified, False when
    it has no manifest (older meshtron or Megatron-LM checkpoints: accepted, verification
    skipped). Raises one ``CheckpointError`` naming the first file (in sorted order) that is
    missing or has another size — every rank checks all sizes — or, among this rank's share
    (``rank::world`` of the sorted files), fails its checksum."""
    files = read_manifest(directory)
    if files is None:
        return False
    names = sorted(files)
    for rel in names:
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST}); the checkpoint is incomplete — "
                                  f"resume from an earlier one")
        size = os.path.getsize(path)
        if size != files[rel]["size"]:
            raise CheckpointError(f"{path} has {size} bytes, {files[rel]['size']} were written (truncated or "
                                  f"overwritten); resume from an earlier checkpoint")
    for rel in names[rank::world]:
        path = os.path.join(directory, rel)
        got = checksum(path)
        if got != files[rel]["crc32"].lower():
            raise CheckpointError(f"{path} fails its checksum (crc32 {got}, {files[rel]['crc32']} was written): "
                                  f"the file is damaged; resume from an earlier checkpoint")
    return True
