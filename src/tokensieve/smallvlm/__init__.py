"""The small VLM the project trained and ships: `tokensieve demo` and `tokensieve bench accuracy` run it.

    model         its LLaVA-1.5-architecture model, word-level tokenizer and processor
    scenes        the deterministic synthetic scenes and one-word questions it answers
    ground_truth  the accuracy benchmark's reference that keeps the patches holding objects
    checkpoint/   the shipped weights, tokenizer, processor and ALVTS selectors (package data)

Developer commands (not needed at run time): `python -m tokensieve.smallvlm.train` trains it,
`python -m tokensieve.smallvlm.calibrate DIR` refits its ALVTS selectors and
`python -m tokensieve.smallvlm.evaluate DIR` measures its held-out accuracy.
"""
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
