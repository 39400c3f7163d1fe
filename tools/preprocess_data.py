#!/usr/bin/env python3
"""Tokenize raw JSONL text into Megatron indexed datasets (``.bin``/``.idx``) for pretraining.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/hf_dir --append-eod --workers 8

Megatron-LM's ``tools/preprocess_data.py``, its flags where they apply: one JSON object per line;
each ``--json-keys`` key (a string) is one document of ``{PREFIX}_{key}_document.bin/.idx``, token
dtype uint16 below 65,500 ids else int32 (megatron-core's choice). A Hugging Face tokenizer encodes
without its special tokens (megatron-core's ``HuggingFaceTokenizer.text_to_ids`` default;
``--tokenizer-hf-include-special-tokens`` adds them, e.g. a BOS); ``--append-eod`` appends the
end-of-document id (HF ``eos_token_id``, sentencepiece ``eos_id()``) to every non-empty document.
Documents with no tokens are skipped (Megatron keeps them as empty documents) and counted; blank
lines are skipped. Output is identical for any ``--workers``. On an error (bad JSON, a missing or
non-string key: one message naming ``file:line``) nothing is written.

Conversation and preference records (SFT, DPO) are not turned into a Megatron corpus: their
tokenization depends on the chat template and the run's settings, and the engine keeps it in
its tokenized cache (engine/data/cache.py). Build a run's cache ahead of time, before the GPUs
are allocated, with ``--workers`` processes each tokenizing its share:

    python tools/preprocess_data.py --cache my.yaml [section.key=value ...] --workers 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engine.data.indexed import IndexedTokensWriter, best_dtype  # noqa: E402

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")
LINES_PER_CHUNK = 256


class PreprocessError(ValueError):
    """Input that cannot be tokenized; the message names ``file:line`` or the tokenizer."""


class Tokenizer:
    """The two tokenizer kinds behind one interface: ``encode(texts)``, ``eod``, ``vocab_size``."""

    def __init__(self, kind: str, model: str, include_special_tokens: bool = False):
        if kind not in TOKENIZER_TYPES:
            raise PreprocessError(f"--tokenizer-type {kind}: expected one of {', '.join(TOKENIZER_TYPES)}")
        if not os.path.exists(model):
            raise PreprocessError(f"--tokenizer-model {model}: no such file or directory")
        self.kind = kind
        if kind == "HuggingFaceTokenizer":
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(model)
            self.vocab_size, self.eod = len(self._tok), self._tok.eos_token_id
            self._special = include_special_tokens
        else:
            import sentencepiece as spm

            self._tok = spm.SentencePieceProcessor(model_file=model)
            eos = self._tok.eos_id()
            self.vocab_size, self.eod = self._tok.get_piece_size(), (eos if eos >= 0 else None)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "HuggingFaceTokenizer":
            return self._tok(texts, add_special_tokens=self._special)["input_ids"]
        return self._tok.encode(texts)


_WORKER: dict = {}


def _init_worker(kind: str, model: str, special: bool) -> None:
    _WORKER["tokenizer"] = Tokenizer(kind, model, special)


def encode_chunk(job):
    """Worker: ``(path, first line number, lines, keys, eod)`` → per key, the chunk's documents as
    ``(flat int64 tokens, lengths)``, or ``("error", message)``."""
    path, first, lines, keys, eod = job
    texts = {k: [] for k in keys}
    for n, line in enumerate(lines, start=first):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return "error", f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
        if not isinstance(obj, dict):
            return "error", f"{path}:{n}: a JSON {type(obj).__name__}, expected an object with keys {list(keys)}"
        for k in keys:
            if k not in obj:
                return "error", f"{path}:{n}: no key {k!r} (keys: {sorted(obj)}); expected --json-keys {' '.join(keys)}"
            if not isinstance(obj[k], str):
                return "error", f"{path}:{n}: key {k!r} is a JSON {type(obj[k]).__name__}, expected a string"
            texts[k].append(obj[k])
    out = {}
    for k in keys:
        docs = _WORKER["tokenizer"].encode(texts[k]) if texts[k] else []
        if eod is not None:
            docs = [d + [eod] if d else d for d in docs]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
        out[k] = flat, lengths
    return out


def _chunks(path: str, keys, eod):
    """``(job, bytes)`` for every ``LINES_PER_CHUNK`` lines of the input."""
    with open(path, encoding="utf-8") as f:
        first = 1
        while True:
            lines = list(islice(f, LINES_PER_CHUNK))
            if not lines:
                return
            yield (path, first, lines, keys, eod), sum(len(line.encode("utf-8")) for line in lines)
            first += len(lines)


def output_prefix(prefix: str, key: str) -> str:
    """Megatron's name for a key's dataset: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


def tokenize_file(path: str, prefix: str, keys=("text",), tokenizer_type: str = "HuggingFaceTokenizer",
                  tokenizer_model: str = "", append_eod: bool = False, workers: int = 1,
                  include_special_tokens: bool = False, log_interval: int = 0, progress: bool = True) -> dict:
    """Tokenize ``path`` into one indexed dataset per key; returns per key ``{"prefix", "documents",
    "tokens", "empty"}`` plus ``"seconds"``. Raises ``PreprocessError``; then nothing is written."""
    from tqdm import tqdm

    t0 = time.time()
    keys = tuple(keys)
    if not os.path.isfile(path):
        raise PreprocessError(f"--input {path}: no such file")
    tok = Tokenizer(tokenizer_type, tokenizer_model, include_special_tokens)
    if append_eod and tok.eod is None:
        raise PreprocessError(f"--append-eod: the tokenizer {tokenizer_model} has no end-of-document token "
                              f"(HF eos_token / sentencepiece eos_id); drop --append-eod or use another tokenizer")
    eod = tok.eod if append_eod else None
    dtype = best_dtype(tok.vocab_size)
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
    stats = {k: {"prefix": output_prefix(prefix, k), "documents": 0, "tokens": 0, "empty": 0} for k in keys}
    writers = {k: IndexedTokensWriter(stats[k]["prefix"], dtype) for k in keys}
    pool = None
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               disable=not progress)
    try:
        jobs = _chunks(path, keys, eod)
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.Pool(workers, _init_worker, (tokenizer_type, tokenizer_model,
                                                                include_special_tokens))
            results = _ordered(pool, jobs, 4 * workers)
        else:
            _WORKER["tokenizer"] = tok
            results = ((encode_chunk(job), size) for job, size in jobs)
        done, next_log = 0, log_interval
        for result, size in results:
            if isinstance(result, tuple):
                raise PreprocessError(result[1])
            for k, (flat, lengths) in result.items():
                _write(writers[k], stats[k], flat, lengths)
            done += len(result[keys[0]][1])
            bar.update(size)
            if log_interval and done >= next_log:
                rate = done / max(time.time() - t0, 1e-9)
                bar.write(f"processed {done} documents ({rate:.0f} docs/s)", file=sys.stderr)
                next_log += log_interval
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats["seconds"] = time.time() - t0
    return stats


def _ordered(pool, jobs, window: int):
    """``pool.imap`` in order, with at most ``window`` chunks in flight (imap would queue the whole
    file in memory)."""
    pending = deque()
    for job, size in jobs:
        pending.append((pool.apply_async(encode_chunk, (job,)), size))
        if len(pending) >= window:
            result, size = pending.popleft()
            yield result.get(), size
    while pending:
        result, size = pending.popleft()
        yield result.get(), size


def _write(writer, stat, flat, lengths) -> None:
    ends = np.cumsum(lengths)
    for end, n in zip(ends.tolist(), lengths.tolist()):
        if n == 0:
            stat["empty"] += 1
            continue
        writer.add_document(flat[end - n:end])
        stat["documents"] += 1
        stat["tokens"] += n


def build_cache(config: str, overrides: list[str], workers: int) -> int:
    """The run's tokenized data cache, built by ``workers`` processes (the protocol of a node's
    ranks: LOCAL_RANK / LOCAL_WORLD_SIZE); a later run with the same data settings reads it."""
    import subprocess
    import uuid

    code = ("import sys, json; from engine.config import load_config; from engine.train import build_dataset; "
            "ds = build_dataset(load_config(sys.argv[1], sys.argv[2:])); "
            "print(json.dumps({'stats': getattr(ds, 'stats', None) or getattr(getattr(ds, 'pairs', None), 'stats', None)}))")
    run_id = f"preprocess-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, "-c", code, config, *overrides], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(workers),
                                   "TORCHELASTIC_RUN_ID": run_id, "OMP_NUM_THREADS": "1"})
             for r in range(workers)]
    outs = [p.communicate() for p in procs]
    failed = [(r, err) for r, (p, (_, err)) in enumerate(zip(procs, outs)) if p.returncode]
    if failed:
        print(f"error: {failed[0][1].strip().splitlines()[-1] if failed[0][1].strip() else 'worker failed'}",
              file=sys.stderr)
        return 1
    print(outs[0][0].strip().splitlines()[-1] if outs[0][0].strip() else "done")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--cache":
        cp = argparse.ArgumentParser(prog="preprocess_data.py --cache",
                                     description="build a run's tokenized data cache ahead of time")
        cp.add_argument("config")
        cp.add_argument("overrides", nargs="*", help="section.key=value, as meshtron-train takes them")
        cp.add_argument("--workers", type=int, default=1)
        a = cp.parse_args(argv[1:])
        if a.workers < 1:
            cp.error("--workers must be >= 1")
        return build_cache(a.config, a.overrides, a.workers)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    ap.add_argument("--output-prefix", required=True, help="writes {PREFIX}_{key}_document.bin/.idx")
    ap.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    ap.add_argument("--tokenizer-model", required=True,
                    help="a Hugging Face tokenizer directory, or a sentencepiece .model file")
    ap.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                    help="HF: add the tokenizer's special tokens (e.g. BOS) to every document")
    ap.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    ap.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    ap.add_argument("--log-interval", type=int, default=0,
                    help="print a progress line every N documents (default: only the progress bar)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    try:
        stats = tokenize_file(args.input, args.output_prefix, args.json_keys, args.tokenizer_type,
                              args.tokenizer_model, args.append_eod, args.workers,
                              args.tokenizer_hf_include_special_tokens, args.log_interval)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    secs = stats.pop("seconds")
    tokens = sum(s["tokens"] for s in stats.values())
    for s in stats.values():
        print(f"{s['prefix']}.bin/.idx: {s['documents']} documents, {s['tokens']} tokens, "
              f"{s['empty']} empty documents skipped")
    print(f"done: {tokens} tokens in {secs:.1f} s ({tokens / max(secs, 1e-9):,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
