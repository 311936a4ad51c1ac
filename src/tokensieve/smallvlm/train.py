"""Train the small VLM: stage A dense supervision of the vision tower, stage B projector + decoder.

    python -m tokensieve.smallvlm.train --out DIR --seed 0 --steps-a 3500 --steps-b 4000  # 1: from scratch
    python -m tokensieve.smallvlm.train --init-from DIR --out DIR2 --steps-b 1200 --lr-b 5e-4 \
        --kind-weights count=3,color=1,exists=1,quadrant=1,small=1 --threads 1   # 2: counting
    python -m tokensieve.smallvlm.train --init-from DIR2 --out DIR3 --steps-b 1200 --lr-b 4e-4 --evidence-weight 2 \
        --kind-weights count=4,color=1,exists=1,quadrant=1,small=1 --threads 1   # 3: counting

DIR3 is the shipped checkpoint, src/tokensieve/smallvlm/checkpoint (bench/vlm/checkpoint when it was
trained); its training.json records the three runs (run 1 loaded a tower saved by a stage-A-only run,
`--only-a`, with the same seed and steps: the same stage A).

Stage A: every patch predicts (linear heads on the tower's last hidden state) the colour and shape of
the object under it (or background), that object's quadrant and size, and whether it holds the
object's centre: hundreds of targets per image instead of one answer.
Stage B: tower frozen; projector + Llama decoder on several questions per image: the answer token's
cross-entropy plus two attention terms on head 0 of the '?' token: in layers 0-1 it reads the
question's words, in layers 2-3 it looks at the patches that answer the question (for counts: the
matching objects' centres and the <s> token, whose share then tells the count; for a 'no': the <s>
token alone); and each object patch's own output names its colour, shape and quadrant, so the
words the answer needs are already what the visual tokens carry.
Runs 2 and 3 continue stage B from the previous weights on scenes run 1 did not see (the same ones in
both, asked other questions) with three, then four times as many counting questions, the last with
the evidence term doubled (counting by colour was the weakest kind: counting was 76% on val after
run 1, 87% after run 2, 91% after run 3).
Every run ends by calibrating ALVTS selectors for its weights (tokensieve/smallvlm/calibrate.py).
Steps come from the time budget (printed) unless fixed with --steps-a/--steps-b, which reproduces a
run. Saves fp16 weights + tokenizer + processor to DIR at each evaluation and at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M
from . import scenes as S
from .calibrate import calibrate
from ..attention import queries_keys

HEADS = [("color", 1 + len(S.COLOR_NAMES)), ("shape", 1 + len(S.SHAPES)), ("quadrant", 4), ("size", 3),
         ("anchor", 2)]  # one linear head per row of the patch labels (owner excluded)
QUESTION_LAYERS = (0, 1)  # decoder layers whose head 0 is taught to read the question's words from '?'
EVIDENCE_LAYERS = (2, 3)  # decoder layers whose head 0 is taught to look at the evidence


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def item_seed(run_seed: int, stage: int, index: int) -> int:
    """Training scene seed: disjoint per run seed and stage, inside the train split."""
    seed = run_seed * 100_000_000 + stage * 50_000_000 + index
    assert S.SPLITS["train"][0] <= seed < S.SPLITS["train"][1]
    return seed


def progress(step: int, total: int | None, elapsed: float, budget: float) -> float:
    """Fraction of a stage done: by steps when a step count is fixed, else by wall time."""
    return step / total if total else elapsed / budget


def lr_at(done: float, peak: float, warmup: float = 0.05) -> float:
    """done in [0, 1]: linear warmup over the first `warmup` fraction, then cosine to 5% of peak."""
    if done < warmup:
        return peak * max(done, 0.002) / warmup
    t = min(1.0, (done - warmup) / (1 - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ---------------------------------------------------------------- stage A

def vision_features(model, pix: torch.Tensor) -> torch.Tensor:
    """pix (B, 3, 192, 192) -> patch features (B, 576, Dv) exactly as the projector sees them."""
    out = model.model.vision_tower(pix, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def dense_batch(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> pixel values (B, 3, 192, 192), labels (B, 6, 576)."""
    items = [S.training_item(s, 0) for s in seeds]
    pix = M.pixels([item[0] for item in items])
    labels = torch.from_numpy(np.stack([item[2] for item in items])).flatten(2)
    return pix, labels


def dense_loss(head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """feats (B, 576, Dv), labels (B, 6, 576) -> summed loss, per-head accuracies on the object patches."""
    logits = head(feats.float())
    loss, acc, start = 0.0, {}, 0
    obj = labels[:, 0] > 0
    for k, (name, n) in enumerate(HEADS):
        lg = logits[..., start:start + n]
        start += n
        y = labels[:, k]
        w = torch.ones(n)
        if name in ("color", "shape"):
            w[0] = 0.3
        elif name == "anchor":
            w[1] = 8.0
        scale = 2.0 if name == "shape" else 1.0  # the slowest to learn: it needs the patch's surroundings
        loss = loss + scale * F.cross_entropy(lg.reshape(-1, n), y.reshape(-1), weight=w, ignore_index=-1)
        pred = lg.argmax(-1)
        sel = obj if name != "anchor" else y == 1
        acc[name] = (pred[sel] == y[sel]).float().mean().item()
    acc["bg"] = (logits[..., 0:HEADS[0][1]].argmax(-1)[~obj] == 0).float().mean().item()
    return loss, acc


def stage_a(model, args) -> torch.nn.Linear:
    """Dense supervision of the vision tower; returns the trained head."""
    torch.manual_seed(args.seed)
    dv = model.config.vision_config.hidden_size
    head = torch.nn.Linear(dv, sum(n for _, n in HEADS))
    params = list(model.model.vision_tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a, weight_decay=0.01)
    model.train()
    total = args.steps_a
    t0 = time.time()
    step = 0
    budget = args.minutes * 60 * args.frac_a
    while True:
        done = progress(step, total, time.time() - t0, budget)
        if done >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(done, args.lr_a, warmup=50 / max(1, total or 1000))
        pix, labels = dense_batch([item_seed(args.seed, 0, step * args.batch_a + i) for i in range(args.batch_a)])
        feats = vision_features(model, pix)
        loss, acc = dense_loss(head, feats, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"A step {step} ({done:.2f}) loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        step += 1
    log(f"stage A done: {step} steps in {time.time() - t0:.0f} s (reproduce with --steps-a {step})")
    args.steps_a_done = step
    return head


# ---------------------------------------------------------------- stage B

def qa_batch(tokenizer, seeds: list[int], n_questions: int, n_image: int,
             kind_weights: dict[str, float] | None = None) -> dict:
    """Several questions per image: <s> <image>*576 q1 ? a1 q2 ? a2 ... (right padded).

    -> input_ids (B, T), attention_mask (B, T), pixel_values (B, 3, 192, 192),
       answer_pos (N, 2) = (row, position of the '?' before the answer), answer_ids (N,),
       evidence (N, T) float: the target attention of the '?' token (sums to 1 per question),
       words (N, T) float: uniform over the question's words before its '?',
       patch_words (B, 576, 3) long: the colour, shape and quadrant words of each patch (-1: background).
    """
    image_id = tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN)
    rows, pos, ans, images, targets, spans, patch_words = [], [], [], [], [], [], []
    for r, s in enumerate(seeds):
        img, questions, labels, scene = S.training_item(s, n_questions, kind_weights)
        images.append(img)
        patch_words.append(words_of_patches(tokenizer, labels))
        ids = [tokenizer.bos_token_id] + [image_id] * n_image
        for q in questions:
            first = len(ids)
            ids += tokenizer.convert_tokens_to_ids(q.text.split())
            pos.append((r, len(ids) - 1))
            spans.append((first, len(ids) - 1))
            targets.append(evidence_target(S.evidence_patches(scene, labels, q), q.anchors))
            a_id = tokenizer.convert_tokens_to_ids(q.answer)
            ans.append(a_id)
            ids.append(a_id)
        rows.append(ids)
    T = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        mask[r, :len(ids)] = 1
    evidence, words = torch.zeros(len(targets), T), torch.zeros(len(targets), T)
    for n, (t, (first, last)) in enumerate(zip(targets, spans)):
        evidence[n, :len(t)] = t
        words[n, first:last] = 1.0 / (last - first)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=M.pixels(images),
                answer_pos=torch.tensor(pos), answer_ids=torch.tensor(ans), evidence=evidence, words=words,
                patch_words=torch.stack(patch_words))


def words_of_patches(tokenizer, labels: np.ndarray) -> torch.Tensor:
    """labels (6, 24, 24) -> (576, 3) long: ids of each object patch's colour, shape and quadrant words, -1 elsewhere."""
    vocab = [[tokenizer.convert_tokens_to_ids(w) for w in names]
             for names in (S.COLOR_NAMES, S.SHAPES, S.QUADRANTS)]
    color, shape, quadrant = (torch.from_numpy(labels[i].reshape(-1)) for i in (0, 1, 2))
    out = torch.full((color.numel(), 3), -1, dtype=torch.long)
    obj = color > 0
    out[obj, 0] = torch.tensor(vocab[0])[color[obj] - 1]
    out[obj, 1] = torch.tensor(vocab[1])[shape[obj] - 1]
    out[obj, 2] = torch.tensor(vocab[2])[quadrant[obj]]
    return out


def patch_word_loss(logits: torch.Tensor, patch_words: torch.Tensor) -> torch.Tensor:
    """Each object patch's output (logits (B, 576, V) at the visual positions) names its colour, shape and
    quadrant: cross-entropy with a target spread evenly over the three words, mean over object patches."""
    obj = patch_words[..., 0] >= 0
    if not obj.any():  # no object patch in view
        return logits.sum() * 0.0
    logp = logits[obj].float().log_softmax(-1)  # (P, V)
    return -logp.gather(1, patch_words[obj]).mean()


def evidence_target(patches: np.ndarray, with_sink: bool) -> torch.Tensor:
    """Uniform attention over the evidence patches (sequence position 1 + patch), plus <s> (position 0)
    for counts; <s> alone when there is no evidence. -> (1 + max position,) float, sums to 1."""
    positions = [1 + int(p) for p in patches] + ([0] if with_sink or len(patches) == 0 else [])
    t = torch.zeros(max(positions) + 1)
    t[positions] = 1.0 / len(positions)
    return t


class LayerInputs:
    """Forward pre-hooks that keep each watched decoder layer's input and rotary tables."""

    def __init__(self, layers, indices):
        self.seen: dict[int, tuple] = {}
        self.handles = [layers[i].register_forward_pre_hook(self._keeper(i), with_kwargs=True) for i in indices]

    def _keeper(self, i):
        def keep(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.seen[i] = (hidden, kwargs["position_embeddings"])
        return keep

    def remove(self):
        for h in self.handles:
            h.remove()


def attention_loss(model, seen: dict, layers, answer_pos: torch.Tensor, target: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy between head 0's attention from each '?' and a target, mean over the given layers.

    answer_pos (N, 2) (row, position); target (N, T), zero beyond each question's position and on
    the positions attention_mask (B, T) hides (0: padding, or visual tokens the decoder does not see).
    """
    rows, positions = answer_pos[:, 0], answer_pos[:, 1]
    total = 0.0
    for i in layers:
        hidden, rotary = seen[i]
        q, k = queries_keys(model.model.language_model.layers[i], hidden, rotary)  # (B, H, T, d)
        logits = torch.einsum("nd,ntd->nt", q[rows, 0, positions], k[rows, 0]) * q.shape[-1] ** -0.5
        unseen = torch.arange(logits.shape[1])[None, :] > positions[:, None]
        if attention_mask is not None:
            unseen = unseen | (attention_mask[rows] == 0)
        logp = logits.masked_fill(unseen, float("-inf")).log_softmax(-1).masked_fill(unseen, 0.0)
        total = total + -(target * logp).sum(-1).mean()
    return total / len(layers)


def evaluate(model, processor, split: str = "val", n: int = 500, batch: int = 50) -> dict:
    """Exact-match accuracy on the first n samples of a split: {'all': acc, kind: acc, ...}."""
    model.eval()
    samples = S.split_samples(split, n)
    right: dict[str, list[bool]] = {k: [] for k in S.KINDS}
    for i in range(0, n, batch):
        chunk = samples[i:i + batch]
        preds = M.answer(model, processor, [s.image for s in chunk], [s.question for s in chunk])
        for s, p in zip(chunk, preds):
            right[s.kind].append(p == s.answer)
    out = {k: float(np.mean(v)) for k, v in right.items() if v}
    out["all"] = float(np.mean([x for v in right.values() for x in v]))
    return out


def fmt(acc: dict) -> str:
    return f"all {acc['all']:.3f} | " + " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "all")


@torch.no_grad()
def whiten_projector(model, seeds: list[int], eps: float = 1e-2) -> None:
    """Fold a whitening of the trained tower's features into the projector's first linear layer.

    The tower's last hidden state carries colour and shape in small directions next to a few very
    large ones (background vs object); a projector started on that scale loses most of them in its
    GELU (a linear probe read 48% of the colours after it, 99.9% before). With x' = (x - mu) W_w,
    W_w = (Sigma + eps I)^(-1/2) over the patches of `seeds`' images, linear_1(x') becomes an
    exactly equivalent linear layer on x: the architecture is unchanged.
    """
    feats = vision_features(model, dense_batch(seeds)[0]).flatten(0, 1).double()  # (N, Dv)
    mu = feats.mean(0)
    cov = torch.cov((feats - mu).T)
    vals, vecs = torch.linalg.eigh(cov + eps * cov.diagonal().mean() * torch.eye(len(mu), dtype=cov.dtype))
    whitening = vecs @ torch.diag(vals.rsqrt()) @ vecs.T  # (Dv, Dv), symmetric
    linear = model.model.multi_modal_projector.linear_1
    std = 1.0 / math.sqrt(linear.weight.shape[1])
    weight = torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std
    linear.weight.copy_((weight @ whitening).float())
    linear.bias.copy_((linear.bias.double() - weight @ whitening @ mu).float())


def stage_b(model, processor, args) -> dict:
    """Projector + decoder on the questions (tower frozen); evaluates and saves periodically."""
    torch.manual_seed(args.seed + 1)
    model.model.vision_tower.requires_grad_(False)
    if not args.init_from:
        whiten_projector(model, [item_seed(args.seed, 2, i) for i in range(32)])
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr_b, weight_decay=0.01)
    budget = args.deadline - time.time() - 90
    watch = LayerInputs(model.model.language_model.layers, QUESTION_LAYERS + EVIDENCE_LAYERS)
    try:
        step = train_questions(model, processor, args, opt, params, watch, budget)
    finally:
        watch.remove()
    return {"steps_a": args.steps_a_done, "steps_b": step}


def train_questions(model, processor, args, opt, params, watch, budget) -> int:
    """Stage B's loop; returns the number of steps taken."""
    tok = processor.tokenizer
    n_image = model.config.image_seq_length
    total = args.steps_b
    scene_stage = 3 if args.init_from else 1  # a continued run sees scenes the first run did not
    t0 = last_eval = time.time()
    step = 0
    while True:
        done = progress(step, total, time.time() - t0, budget)
        if done >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(done, args.lr_b, warmup=100 / max(1, total or 800))
        model.train()
        b = qa_batch(tok, [item_seed(args.seed, scene_stage, step * args.batch_b + i) for i in range(args.batch_b)],
                     args.questions, n_image, args.kind_weights)
        with autocast(args.bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           pixel_values=b["pixel_values"]).logits
        report = question_step(model, logits, watch.seen, b, n_image, args, opt, params)
        if step % 25 == 0:
            log(f"B step {step} ({done:.2f}) {report} lr {opt.param_groups[0]['lr']:.2e}")
        step += 1
        if time.time() - last_eval > args.eval_every * 60:
            acc = evaluate(model, processor, "val", args.eval_n)
            log(f"val ({args.eval_n}) {fmt(acc)}")
            M.save(model, processor, args.out)
            last_eval = time.time()
    log(f"stage B done: {step} steps in {time.time() - t0:.0f} s (reproduce with --steps-b {step})")
    return step


def question_step(model, logits: torch.Tensor, seen: dict, b: dict, n_image: int, args, opt, params) -> str:
    """One optimiser step of stage B on a batch `b` (from `qa_batch`) whose forward gave `logits`
    (B, S, V): the answer loss, plus the attention to the evidence and the question words and the
    patch names, weighted by args.evidence_weight / args.names_weight. Returns the losses as a log line."""
    sel = logits[b["answer_pos"][:, 0], b["answer_pos"][:, 1]].float()
    answer_loss = F.cross_entropy(sel, b["answer_ids"])
    name_loss = patch_word_loss(logits[:, 1:1 + n_image], b["patch_words"])
    look_loss = attention_loss(model, seen, EVIDENCE_LAYERS, b["answer_pos"], b["evidence"], b["attention_mask"])
    read_loss = attention_loss(model, seen, QUESTION_LAYERS, b["answer_pos"], b["words"], b["attention_mask"])
    loss = answer_loss + args.evidence_weight * (look_loss + read_loss) + args.names_weight * name_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    train_acc = (sel.argmax(-1) == b["answer_ids"]).float().mean().item()
    return (f"answer {answer_loss.item():.3f} evidence {look_loss.item():.3f} words {read_loss.item():.3f} "
            f"names {name_loss.item():.3f} train-acc {train_acc:.3f}")


def kind_weights(text: str) -> dict[str, float]:
    """'count=3,color=1' -> {'count': 3.0, 'color': 1.0}; kinds not named are not asked."""
    try:
        weights = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected kind=weight pairs separated by commas, got {text!r}") from None
    if set(weights) - set(S.KINDS):
        raise argparse.ArgumentTypeError(f"unknown kinds {sorted(set(weights) - set(S.KINDS))}; choose among {S.KINDS}")
    return weights


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-a", type=int, default=None)
    p.add_argument("--steps-b", type=int, default=None)
    p.add_argument("--frac-a", type=float, default=0.2, help="share of the time budget for stage A")
    p.add_argument("--batch-a", type=int, default=16)
    p.add_argument("--batch-b", type=int, default=8)
    p.add_argument("--questions", type=int, default=10, help="questions per image in stage B")
    p.add_argument("--lr-a", type=float, default=2e-3)
    p.add_argument("--lr-b", type=float, default=1.5e-3)
    p.add_argument("--tower-from", default=None, help="skip stage A: load the tower.pt an earlier run with the same seed and --steps-a saved")
    p.add_argument("--only-a", action="store_true", help="stop after stage A (experiments)")
    p.add_argument("--init-from", default=None,
                   help="continue stage B from a saved small VLM (no stage A, no projector whitening) on new scenes")
    p.add_argument("--kind-weights", type=kind_weights, default=None,
                   help="question kinds drawn in proportion, e.g. 'count=3,color=1' (default: uniform)")
    p.add_argument("--evidence-weight", type=float, default=1.0, help="weight of the evidence-attention term")
    p.add_argument("--names-weight", type=float, default=0.5,
                   help="weight of the term asking each object patch's output to name its colour, shape, quadrant")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast in stage B (measured: no faster than fp32 here; stage A fp32 is 3x faster)")
    p.add_argument("--eval-every", type=float, default=6.0, help="minutes between evaluations/saves")
    p.add_argument("--eval-n", type=int, default=250)
    p.add_argument("--final-n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; use 1 when another process shares 2 cores (4x faster then, measured)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    args.deadline = start + args.minutes * 60
    os.makedirs(args.out, exist_ok=True)
    model, tok, processor = M.build_all(seed=args.seed)
    log(f"model {sum(x.numel() for x in model.parameters()) / 1e6:.2f} M params; args {vars(args)}")
    if args.init_from:
        model, processor = M.load(args.init_from)
        args.steps_a_done = 0
    elif args.tower_from:
        model.model.vision_tower.load_state_dict(torch.load(args.tower_from))
        args.steps_a_done = args.steps_a  # the stage-A steps that made the loaded tower (recorded only)
    else:
        stage_a(model, args)
    if args.only_a:
        torch.save(model.model.vision_tower.state_dict(), os.path.join(args.out, "tower.pt"))
        return
    info = stage_b(model, processor, args)
    M.save(model, processor, args.out)
    acc = evaluate(model, processor, "val", args.final_n)
    log(f"final val ({args.final_n}) {fmt(acc)}")
    record = {"args": {k: v for k, v in vars(args).items() if k != "deadline"}, **info,
              "minutes": (time.time() - start) / 60, "val": acc}
    earlier = os.path.join(args.init_from or "", "training.json")
    if args.init_from and os.path.isfile(earlier):
        with open(earlier) as f:
            record["continued_from"] = json.load(f)  # the run that made the starting weights
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
    calibrate(args.out)
    log(f"saved to {args.out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
