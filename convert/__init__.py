"""Checkpoint converters: HF <-> canonical (megatron-core GPTModel names) <-> sharded."""
