#!/usr/bin/env python3
"""Start-up of an SFT run's data with and without the tokenized cache (engine/data/cache.py).

    python tools/bench_data.py [--records 1000000] [--sample 5000] [--seq-len 4096] [--ranks 2]

Writes ``--records`` short conversations (the shipped tiny tokenizer's vocabulary) to a JSONL
file in a temporary directory, then measures:

* tokenizing with the chat template, per record, on ``--sample`` records (what every rank pays
  at every start without a cache), and that rate extrapolated to all records;
* building the cache for all records with ``--ranks`` processes (each tokenizes its share, as
  the ranks of a node do);
* start-up from the cache: a fresh process builds the dataset (memory-maps the cache, reads the
  epoch's bins) and the first step's batch — the figure the cache is for (target: < 5 s for a
  million records).

Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "data" / "tiny" / "tokenizer"
sys.path.insert(0, str(ROOT))


def write_records(path: Path, n: int, seed: int = 0) -> None:
    from tqdm import tqdm

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in tqdm(range(n), desc="writing records", unit="rec", mininterval=1.0, file=sys.stderr):
            facts = [f"k{rng.randrange(100)} = v{rng.randrange(100)}" for _ in range(rng.randrange(2, 12))]
            ask = rng.randrange(100)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": "facts : " + " ; ".join(facts) + f" ; what is the value of k{ask} ?"},
                {"role": "assistant", "content": f"v{rng.randrange(100)}"}]}) + "\n")


def overrides(data: Path, cache: Path, seq_len: int, use_cache: bool) -> list[str]:
    return ["recipe=sft", "data.source=files", f"data.path={data}", f"data.tokenizer={TOKENIZER}",
            "data.format=messages", f"data.seq_len={seq_len}", f"data.cache_dir={cache}",
            f"data.cache={'true' if use_cache else 'false'}", "train.global_batch_size=8",
            "model.vocab_size=512"]


def child(args: list[str]) -> None:
    """In a fresh process: build the dataset and the first step's batch; print the seconds."""
    t0 = time.perf_counter()
    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.train import build_dataset, host_step

    cfg = validate(load_config(str(ROOT / "configs" / "tiny.yaml"), args), 1)
    t1 = time.perf_counter()
    ds = build_dataset(cfg)
    t2 = time.perf_counter()
    host_step(ds, 0, cfg, ParallelMesh.single())
    t3 = time.perf_counter()
    print(json.dumps({"imports_s": t1 - t0, "dataset_s": t2 - t1, "first_batch_s": t3 - t2,
                      "sequences": ds.sequences_per_epoch}))


def run_child(args: list[str], env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if r.returncode:
        sys.exit(f"bench_data: child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--sample", type=int, default=5000, help="records tokenized without the cache (rate)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--ranks", type=int, default=2, help="processes building the cache (the ranks of a node)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a, rest = p.parse_known_args(argv)
    if a.child:
        child(rest)
        return 0
    with tempfile.TemporaryDirectory(prefix="meshtron-bench-data-") as tmp:
        tmp = Path(tmp)
        data, sample = tmp / "records.jsonl", tmp / "sample.jsonl"
        write_records(data, a.records)
        with open(data) as f, open(sample, "w") as g:
            for _, line in zip(range(a.sample), f):
                g.write(line)
        uncached = run_child(overrides(sample, tmp / "cache-sample", a.seq_len, False))
        per_record = uncached["dataset_s"] / a.sample
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--child",
                                   *overrides(data, tmp / "cache", a.seq_len, True)], cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_RANK": str(r),
                                       "LOCAL_WORLD_SIZE": str(a.ranks), "TORCHELASTIC_RUN_ID": "bench"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(a.ranks)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                sys.exit(f"bench_data: cache build failed:\n{err[-3000:]}")
        build_s = time.perf_counter() - t0
        cached = run_child(overrides(data, tmp / "cache", a.seq_len, True))
        startup = cached["dataset_s"] + cached["first_batch_s"]
    rows = [("records", f"{a.records:,}"),
            ("tokenize at start, per record (no cache)", f"{per_record * 1e3:.3f} ms"),
            (f"start-up without cache, {a.records:,} records (extrapolated)", f"{per_record * a.records:.1f} s per rank"),
            (f"cache build with {a.ranks} ranks (once)", f"{build_s:.1f} s"),
            ("start-up from the cache: dataset + first batch", f"{startup:.2f} s"),
            ("sequences per epoch", f"{cached['sequences']:,}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"records": a.records, "tokenize_ms_per_record": per_record * 1e3,
                      "uncached_startup_s": per_record * a.records, "cache_build_s": build_s,
                      "cached_startup_s": startup, "sequences": cached["sequences"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
