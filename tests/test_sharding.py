"""The canonical sharding rules agree with the model's own parameters, and pipeline stage splits."""
from __future__ import annotations

import dataclasses

import pytest

from engine.config import ModelConfig
from engine.mesh import ParallelMesh
from engine.model.gpt import GPTModel
from engine.model.sharding import canonical_names, stage_layers, tp_split


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_model_parameters_follow_the_canonical_rules(tie, bias):
    cfg = ModelConfig(tie_word_embeddings=tie, add_qkv_bias=bias)
    model = GPTModel(cfg, ParallelMesh.single())
    assert [n for n, _ in model.named_parameters()] == canonical_names(dataclasses.asdict(cfg))
    for name, p in model.named_parameters():
        split = tp_split(name)
        assert (p.tp_dim, p.tp_parts) == split if split else p.tp_dim is None, name


def test_stage_layers():
    assert stage_layers(4, 1) == [[range(0, 4)]]
    assert stage_layers(4, 2) == [[range(0, 2)], [range(2, 4)]]
    assert stage_layers(4, 3) == [[range(0, 1)], [range(1, 3)], [range(3, 4)]]   # first/last fewer
    assert stage_layers(8, 2, vpp=2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    assert stage_layers(6, 3, layers_per_stage=[3, 2, 1]) == [[range(0, 3)], [range(3, 5)], [range(5, 6)]]
    with pytest.raises(ValueError, match="adding up to num_layers=6"):
        stage_layers(6, 3, layers_per_stage=[3, 2, 2])
    with pytest.raises(ValueError, match="cannot be split evenly over 2 stages"):
        stage_layers(5, 2)
