"""Instruments: `tokensieve bench speed` (prefill, decode, memory, KV cache and FLOPs of each method)."""
