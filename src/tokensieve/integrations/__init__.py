"""Bridges from tokensieve to evaluation harnesses; each needs its optional extra (e.g. `tokensieve[lmms-eval]`)."""
