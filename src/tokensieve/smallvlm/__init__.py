"""The small VLMs the project trained and ships: `tokensieve demo` and `tokensieve bench accuracy` run them.

    model                the LLaVA-1.5-architecture model, word-level tokenizer and processor
    scenes               the deterministic synthetic scenes and one-word questions they answer
    ground_truth         the accuracy benchmark's reference that keeps the patches holding objects
    checkpoint/          "local": the first model, whose visual tokens know only their own patch
    checkpoint_context/  "context": the second, grown from the first, whose visual tokens also carry
                         the scene's global facts (weights, tokenizer, processor, ALVTS selectors)

Developer commands (not needed at run time): `python -m tokensieve.smallvlm.train` trains the first,
`python -m tokensieve.smallvlm.train_context` the second, `python -m tokensieve.smallvlm.calibrate DIR`
refits ALVTS selectors and `python -m tokensieve.smallvlm.evaluate DIR` measures held-out accuracy.
"""
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
CHECKPOINT_CONTEXT = Path(__file__).resolve().parent / "checkpoint_context"
CHECKPOINTS = {"local": CHECKPOINT, "context": CHECKPOINT_CONTEXT}  # short names the CLI's --model accepts


def checkpoint_folder(model: str | Path | None) -> Path:
    """A short name in CHECKPOINTS, a folder, or None (the first model) -> the model's folder."""
    if model is None:
        return CHECKPOINT
    return CHECKPOINTS.get(str(model), Path(model))
