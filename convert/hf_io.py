"""Hugging Face checkpoint directories: read lazily, write sharded safetensors atomically.

Reading opens ``model.safetensors`` or the shards named by ``model.safetensors.index.json`` and
hands out one tensor at a time (``HFCheckpoint.get``), so a 72B model is never loaded whole.
Writing streams (name, tensor) pairs into shards of at most ``max_shard_bytes`` with an index,
beside ``config.json``, ``generation_config.json`` and the tokenizer files of the source, into a
temporary directory renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import torch

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
    """Atomically move a finished temporary directory into place."""
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked by fresh_output_dir)
    os.replace(tmp, out_dir)


def write_hf(tensors: Iterable[tuple[str, torch.Tensor]], config, out_dir: str, *,
             tokenizer_from: str | None = None, max_shard_bytes: int = 5 * 2**30, progress=None) -> None:
    """Write an HF model directory (sharded safetensors + index, config, tokenizer files)."""
    from safetensors.torch import save_file

    tmp = fresh_output_dir(out_dir)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size, total = 0, 0
        files: list[str] = []

        def flush():
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], os.path.join(tmp, name), metadata={"format": "pt"})
            files.append(name)
            shards[-1] = {}

        weight_map: dict[str, int] = {}
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            shards[-1][name] = t.contiguous()
            weight_map[name] = len(files)
            size += nbytes
            total += nbytes
            if progress:
                progress(1)
        if shards[-1]:
            flush()
        n = len(files)
        final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old, new in zip(files, final):
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        if n == 1:
            os.rename(os.path.join(tmp, final[0]), os.path.join(tmp, "model.safetensors"))
        else:
            with open(os.path.join(tmp, _INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total},
                           "weight_map": {k: final[i] for k, i in weight_map.items()}}, f, indent=2)
        config.save_pretrained(tmp)
        _write_generation_config(config, tmp, tokenizer_from)
        for fname in TOKENIZER_FILES:
            if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, fname)):
                shutil.copy2(os.path.join(tokenizer_from, fname), os.path.join(tmp, fname))
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
