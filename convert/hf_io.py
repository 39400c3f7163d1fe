"""Hugging Face checkpoint directories: read lazily, write sharded safetensors atomically.

Reading opens ``model.safetensors`` or the shards named by ``model.safetensors.index.json`` and
hands out one tensor at a time (``HFCheckpoint.get``), so a 72B model is never loaded whole.
Writing streams (name, tensor) pairs into shards of at most ``max_shard_bytes`` with an index,
beside ``config.json``, ``generation_config.json`` and the tokenizer files of the source, into a
temporary directory renamed into place at the end. safetensors has no streaming writer, but its
format is simple (8-byte little-endian header length, JSON header with dtype/shape/data_offsets,
raw bytes): with every tensor's shape and dtype known from the model config, :class:`ShardLayout`
writes each file's header first and the tensors land at their offsets as they arrive — from one
process, or from several (one per pipeline stage, engine/checkpoint.py ``export_hf``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from convert.files import fsync_dir, fsync_tree

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """A local HF model directory: its config and a lazy tensor getter."""

    def __init__(self, path: str):
        from safetensors import safe_open
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json — not a Hugging Face model directory")
        self.path = path
        self.config = AutoConfig.from_pretrained(path, local_files_only=True)
        index = os.path.join(path, _INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor {_INDEX} found "
                                    f"(only safetensors checkpoints are read)")
        for shard in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{path}: shard {shard} named in {_INDEX} is missing")
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(name)
        shard = self.weight_map[name]
        if shard not in self._open:
            self._open[shard] = safe_open(os.path.join(self.path, shard), "pt")
        return self._open[shard].get_tensor(name)


def fresh_output_dir(out_dir: str) -> str:
    """A temporary sibling of ``out_dir`` to write into; ``out_dir`` must be absent or empty."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"output directory {out_dir} exists and is not empty; choose a new one or empty it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)


def commit_output_dir(tmp: str, out_dir: str) -> None:
    """Atomically move a finished (fsync'd) temporary directory into place, durably."""
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked by fresh_output_dir)
    os.replace(tmp, out_dir)
    fsync_dir(os.path.dirname(os.path.abspath(out_dir)))


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer

# safetensors' dtype names, and the order its writer (Rust: Dtype's declaration order) sorts a
# file's tensors in: by dtype, descending, then by name.
_ST_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64"}
_ST_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


@dataclass
class ShardLayout:
    """Where every tensor of an HF export goes, known before any tensor exists: the shard file of
    each (greedy in stream order, at most ``max_shard_bytes`` per shard, as ``write_hf`` always
    cut them), and its byte offset there. Files are laid out exactly as safetensors'
    ``save_file`` writes them (8-byte header length, JSON header, data sorted by dtype then
    name), so the streamed files are byte-identical to what saving each shard whole gives."""

    files: list[str]
    headers: list[bytes]
    sizes: list[int]
    where: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]  # name -> (file, offset, shape, dtype)
    total: int
    names: list[str]  # in stream order

    @classmethod
    def plan(cls, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> "ShardLayout":
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = total = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
            total += nbytes
        n = len(shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        headers, sizes, where = [], [], {}
        for i, shard in enumerate(shards):
            order = sorted(shard, key=lambda s: (-_ST_ORDER.index(_ST_NAMES[s[2]]), s[0]))
            entries, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype, nbytes in order:
                entries[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                                 "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header = json.dumps(entries, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            start = 8 + len(header)
            for name, shape, dtype, _ in order:
                where[name] = (i, start + entries[name]["data_offsets"][0], shape, dtype)
            headers.append(struct.pack("<Q", len(header)) + header)
            sizes.append(start + offset)
        return cls(files, headers, sizes, where, total, [n for n, _, _ in specs])

    def create(self, tmp: str) -> None:
        """Every shard file with its header, sized for its data (written later, in any order)."""
        for name, header, size in zip(self.files, self.headers, self.sizes):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(header)
                f.truncate(size)

    def open(self, tmp: str) -> "ShardFiles":
        return ShardFiles(self, tmp)

    def finish(self, tmp: str, config, tokenizer_from: str | None) -> None:
        """Index (several shards), config, generation config, tokenizer files; fsync everything."""
        if len(self.files) > 1:
            with open(os.path.join(tmp, _INDEX), "w") as f:
                weight_map = {k: self.files[self.where[k][0]] for k in self.names}
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        config.save_pretrained(tmp)
        _write_generation_config(config, tmp, tokenizer_from)
        for fname in TOKENIZER_FILES:
            if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, fname)):
                shutil.copy2(os.path.join(tokenizer_from, fname), os.path.join(tmp, fname))
        fsync_tree(tmp)


class ShardFiles:
    """Open shard files of a :class:`ShardLayout`; ``write(name, tensor)`` puts one tensor's bytes
    at its place (positional writes: several processes may fill the same files)."""

    def __init__(self, layout: ShardLayout, tmp: str):
        self.layout = layout
        self.fds = [os.open(os.path.join(tmp, f), os.O_WRONLY) for f in layout.files]
        self.written: set[str] = set()

    def write(self, name: str, t: torch.Tensor) -> None:
        if name not in self.layout.where:
            raise ValueError(f"{name} is not a tensor of this model's export")
        i, offset, shape, dtype = self.layout.where[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}; the export planned {shape} {dtype}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while view:  # pwrite may write less than asked
            done = os.pwrite(self.fds[i], view, offset)
            view, offset = view[done:], offset + done
        self.written.add(name)

    def close(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fds:
            for fd in self.fds:
                os.close(fd)
            self.fds = []


def write_hf(tensors: Iterable[tuple[str, torch.Tensor]], config, out_dir: str, *,
             specs: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None, tokenizer_from: str | None = None,
             max_shard_bytes: int = 5 * 2**30, progress=None) -> None:
    """Write an HF model directory (sharded safetensors + index, config, tokenizer files).

    With ``specs`` (every tensor's ``(name, shape, dtype)`` in stream order, e.g. from
    convert/hf_map.py ``hf_tensor_specs``) the files are laid out first and each tensor is
    written as it arrives and dropped: memory holds one tensor. Without, the stream is read whole
    first."""
    if specs is None:
        tensors = list(tensors)
        specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors]
    layout = ShardLayout.plan(specs, max_shard_bytes)
    tmp = fresh_output_dir(out_dir)
    try:
        layout.create(tmp)
        with layout.open(tmp) as files:
            for name, t in tensors:
                files.write(name, t)
                del t
                if progress:
                    progress(1)
            missing = [n for n, _, _ in specs if n not in files.written]
            if missing:
                raise ValueError(f"the export stream lacks {missing[:4]}")
            files.close()
        layout.finish(tmp, config, tokenizer_from)
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_generation_config(config, out_dir: str, source: str | None) -> None:
    src = os.path.join(source, "generation_config.json") if source else None
    if src and os.path.isfile(src):
        shutil.copy2(src, os.path.join(out_dir, "generation_config.json"))
        return
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
