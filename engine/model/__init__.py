"""Decoder-only GPT of the Llama / Qwen2 / Mistral family with megatron-core parameter names."""
