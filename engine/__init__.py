"""meshtron: a Megatron-style training engine for long-sequence LLM post-training."""

__version__ = "0.1.0"
