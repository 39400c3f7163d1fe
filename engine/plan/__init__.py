"""The memory planner ``meshtron-plan`` (engine/plan/cli.py).

* :mod:`engine.plan.models` — model shapes: known models, meshtron YAML, HF config.json; exact
  parameter counts of meshtron's GPTModel.
* :mod:`engine.plan.activations` — bytes saved for backward per token, by recompute and CP mode.
* :mod:`engine.plan.memory` — per-rank memory by component and phase for a mesh.
* :mod:`engine.plan.timing` — a FLOP + communication estimate of the step time.
* :mod:`engine.plan.search` — the meshes that fit, fastest first; the longest sequence a mesh holds.
* :mod:`engine.plan.lf360` — 360-LLaMA-Factory's memory, checked against its published maxima.
* :mod:`engine.plan.devices` — device constants and the fixed / fragmentation terms, with sources.
"""
from engine.plan.memory import Breakdown, Mesh, Run, rank_memory
from engine.plan.models import KNOWN_MODELS, ModelSpec, param_counts, resolve_model
from engine.plan.search import max_seq_len, plan

__all__ = [
           "KNOWN_MODELS",
           "Breakdown",
           "Mesh",
           "ModelSpec",
           "Run",
           "max_seq_len",
           "param_counts",
           "plan",
           "rank_memory",
           "resolve_model",
]
