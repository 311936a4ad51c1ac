"""Calibrate ALVTS selectors for a saved small VLM and store them beside its weights.

    python -m tokensieve.smallvlm.calibrate DIR [--rank 24] [--questions 64] [--steps 200] [--lr 3e-4]

The questions come from the training split (scenes no benchmark uses); the selectors are written to
DIR/alvts_selectors.safetensors, which `tokensieve bench accuracy` and the demo pick up.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import model as M
from . import scenes as S
from ..calibrate import calibrate_alvts, fidelity_table

SELECTORS = "alvts_selectors.safetensors"
FIRST_SCENE = 90_000_000  # training-split seeds no training stage draws


def calibration_inputs(processor, questions: int) -> list[dict]:
    """One processed question per training-split scene: a list of model-input dicts (batch of one)."""
    inputs = []
    for i in range(questions):
        image, asked, _, _ = S.training_item(FIRST_SCENE + i, 1)
        inputs.append(dict(processor(images=[image], text=[M.prompt(asked[0].text)], return_tensors="pt")))
    return inputs


def calibrate(model_dir: str | Path, rank: int = 24, questions: int = 64, steps: int = 200, lr: float = 3e-4):
    """Fits, prints the fidelity table and saves the selectors; returns them."""
    model, processor = M.load(str(model_dir))
    selectors = calibrate_alvts(model, calibration_inputs(processor, questions), rank=rank, steps=steps, lr=lr,
                                start_layer=0, ratio=64 / 576)
    print(fidelity_table(selectors))
    path = Path(model_dir) / SELECTORS
    selectors.save(path)
    print(f"wrote {path}")
    return selectors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--rank", type=int, default=24, help="selector rank (default: %(default)s = a quarter of the width)")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (3e-3 overshoots on this model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibrate(args.ckpt, args.rank, args.questions, args.steps, args.lr)


if __name__ == "__main__":
    main()
