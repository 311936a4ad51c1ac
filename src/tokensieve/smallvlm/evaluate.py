"""Held-out exact-match accuracy of a saved small VLM, overall and per question kind.

    python -m tokensieve.smallvlm.evaluate DIR [--split test] [--n 1000]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import model as M
from .train import evaluate, fmt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--split", default="test", choices=["val", "test", "train"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = M.load(args.ckpt)
    acc = evaluate(model, processor, args.split, args.n)
    print(f"{args.split} ({args.n}) {fmt(acc)}  [{time.time() - t0:.0f} s]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split": args.split, "n": args.n, **acc}, f, indent=1)


if __name__ == "__main__":
    main()
