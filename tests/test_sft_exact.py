"""SFT on real records (the shipped key-value retrieval conversations: chat template, loss on
assistant tokens only, packed several per sequence, two sequences per micro-batch) is mesh-exact:
loss, gradients and weights equal the single-process run (I-5; tolerances of test_tp_exact.py)."""
from __future__ import annotations

from pathlib import Path

from tests.harness import run_world
from tests.test_tp_exact import check_reports, mesh_world_checks

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny"
SFT = ["data.source=files", f"data.path={DATA / 'sft.jsonl'}", f"data.tokenizer={DATA / 'tokenizer'}",
       "data.format=messages", "data.seq_len=128", "train.micro_batch_size=2"]
MESHES = [["parallel.tp=2", "parallel.cp=2"], ["parallel.dp=2", "parallel.pp=2"],
          ["parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.dp=2"]]


def test_sft_mesh_exact():
    check_reports(run_world(4, mesh_world_checks, MESHES, SFT, timeout=1200))
