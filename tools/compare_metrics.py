#!/usr/bin/env python3
"""Compare the losses of two runs' metrics.jsonl files step by step.

    python tools/compare_metrics.py REFERENCE.jsonl OTHER.jsonl [--rtol 1e-5]

Prints a table and the largest relative difference; exits 1 when it exceeds --rtol or the step
lists differ.
"""
import argparse
import json
import sys


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--rtol", type=float, default=1e-5, help="largest allowed relative loss difference")
    args = ap.parse_args(argv)
    ref, other = read(args.reference), read(args.other)
    if [r["step"] for r in ref] != [r["step"] for r in other]:
        print(f"step lists differ: {len(ref)} rows vs {len(other)} rows")
        return 1
    print(f"{'step':>5} {'reference':>12} {'other':>12} {'rel diff':>10}")
    worst = 0.0
    for a, b in zip(ref, other):
        rel = abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-30)
        worst = max(worst, rel)
        print(f"{a['step']:>5} {a['loss']:>12.6f} {b['loss']:>12.6f} {rel:>10.2e}")
    verdict = "same losses" if worst <= args.rtol else "LOSSES DIFFER"
    print(f"max relative loss difference {worst:.2e} (tolerance {args.rtol:.0e}): {verdict}")
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
