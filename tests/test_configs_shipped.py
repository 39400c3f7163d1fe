"""Every shipped config validates for the world it is written for (with its checkpoint and data
paths pointed at stand-ins), and the tiny ones also at every world size up to 8 they allow."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config, validate

ROOT = Path(__file__).resolve().parents[1]
BIG = {"llama3-8b-sft-64k": 8, "llama3-8b-dpo-32k": 8, "qwen2.5-7b-sft-128k": 16, "qwen2.5-7b-dpo-64k": 8,
       "qwen2.5-72b-sft-128k": 64, "qwen2.5-72b-dpo-64k": 64}


@pytest.mark.parametrize("name,world", sorted(BIG.items()))
def test_big_configs_validate(tmp_path, name, world):
    (tmp_path / "ckpt" / "hf").mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    cfg = validate(load_config(str(ROOT / "configs" / f"{name}.yaml"),
                               [f"model.load={tmp_path / 'ckpt'}", f"data.path={data}"]), world)
    p = cfg.parallel
    assert p.dp * p.tp * p.pp * p.cp == world and cfg.data.seq_len >= 32768


@pytest.mark.parametrize("name", ["tiny", "tiny-sft", "tiny-dpo", "tiny-flexsp"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_tiny_configs_validate_at_every_world_size(name, world):
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the tiny configs name the shipped data relative to the repository
    try:
        cfg = validate(load_config(f"configs/{name}.yaml"), world)
    finally:
        os.chdir(cwd)
    assert cfg.parallel.dp == world
