"""Instruments: `tokensieve bench speed` (prefill, decode, memory, KV cache and FLOPs of each method on a
real model shape), `tokensieve bench accuracy` and `tokensieve demo` (every method on the shipped small
VLM, `tokensieve.smallvlm`), and `python -m tokensieve.bench.alvts_overhead` (ALVTS's selector cost on it)."""
