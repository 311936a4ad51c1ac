"""How much of the whole scene one visual token carries: a linear probe from one token to the object count.

    python -m tokensieve.smallvlm.probe [--model local|context|DIR] [--train 1500] [--test 500]

For each scene one visual token is drawn at random (seeded), as the decoder receives it (the
projector's output) and as the vision tower gives it; a multinomial logistic regression on the
standardised features of the training scenes predicts the scene's object count (2 to 6), and its
accuracy on held-out scenes is printed beside the share of the most frequent count (what a token
that knows nothing of the scene scores). Training scenes come from training-split seeds no training
stage draws; the held-out scenes are the validation split's.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint_folder
from . import model as M
from . import scenes as S

FIRST_SCENE = 96_000_000  # training-split seeds no training stage or calibration draws


@torch.no_grad()
def one_token_each(model, seeds: list[int], rng: np.random.Generator, batch: int = 25):
    """-> (projected (N, Dt), tower (N, Dv), object counts (N,)): one random visual token per scene."""
    projected, tower, counts = [], [], []
    for i in range(0, len(seeds), batch):
        items = [S.training_item(s, 0) for s in seeds[i:i + batch]]
        pix = M.pixels([item[0] for item in items])
        out = model.model.vision_tower(pix, output_hidden_states=True)
        feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # (B, 576, Dv)
        pick = torch.from_numpy(rng.integers(0, feats.shape[1], size=len(items)))
        chosen = feats[torch.arange(len(items)), pick]
        tower.append(chosen)
        projected.append(model.model.multi_modal_projector(chosen))
        counts += [len(item[3].objects) for item in items]
    return torch.cat(projected), torch.cat(tower), torch.tensor(counts)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   steps: int = 500, decay: float = 1e-3) -> float:
    """Logistic regression (full batch, LBFGS, L2 `decay`) on standardised features; held-out accuracy."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(0)
    linear = torch.nn.Linear(xs.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xs), train_y) + decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(xt).argmax(-1) == test_y).float().mean())


def measure(model_dir, n_train: int = 1500, n_test: int = 500, seed: int = 0) -> dict:
    """{'projected': acc, 'tower': acc, 'majority': share of the most frequent count on the test scenes}."""
    model, _ = M.load(str(checkpoint_folder(model_dir)))
    rng = np.random.default_rng(seed)
    train = one_token_each(model, [FIRST_SCENE + i for i in range(n_train)], rng)
    test = one_token_each(model, [S.split_seed("val", i) for i in range(n_test)], rng)
    majority = float(torch.bincount(test[2]).max()) / n_test
    return {"projected": probe_accuracy(train[0], train[2], test[0], test[2]),
            "tower": probe_accuracy(train[1], train[2], test[1], test[2]), "majority": majority}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="'local' (default), 'context' or a folder")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = measure(args.model, args.train, args.test)
    print(f"object count from one random visual token, {args.test} held-out scenes: "
          f"projector output {100 * out['projected']:.1f}%, tower output {100 * out['tower']:.1f}% "
          f"(most frequent count {100 * out['majority']:.1f}%)")


if __name__ == "__main__":
    main()
