"""Train the second small VLM, whose visual tokens carry the scene's context.

    python -m tokensieve.smallvlm.train_context --out DIR --work WORK --seed 1 --steps-a 300 --batch-a 8 \
        --steps-b 250 --lr-b 8e-4 --kind-weights count=2,color=1,exists=1,quadrant=1,small=1 --threads 1 [--resume]

The shipped second model (src/tokensieve/smallvlm/checkpoint_context) was made in three parts.
Part 1: the command above with `--steps-b 600 --warmup-b 100 --pause-b-at 23` (stage A, then 23
stage-B steps of a longer schedule, then shortened to fit the time at hand); part 2: the command above
with `--resume` (`--out M16 --work out/context-train --final-n 500`), a 16-layer model (about 35
minutes niced on 2 shared CPU cores); part 3 deepens M16's decoder to 20 layers and continues stage B
on new scenes, half of its images showing the decoder only part of their visual tokens
(`--partial-share`, see `partial_views`):

    python -m tokensieve.smallvlm.train_context --out DIR --work WORK --init-from M16 --seed 2 \
        --new-vision-layers 0 --layers 20 --steps-a 0 --steps-b 450 --lr-b 4e-4 --warmup-b 25 \
        --kind-weights count=2,color=1,exists=1,quadrant=1,small=1 --partial-share 0.5 --eval-every 1000 \
        --final-n 500 --threads 1

It ran with `--steps-b 900 --eval-every 15` up to the state saved at step 181, then with `--steps-b
600` and `--resume` up to the state saved at step 359, then to the end with the command above and
`--resume` (the schedule shortened twice to fit the time at hand, as in part 1). Its training.json
records the three parts (part 3's `grown_from` holds M16's record).

It starts from the first small VLM (tokensieve/smallvlm/checkpoint, `--init-from`) and grows it:
- the vision tower gets `--new-vision-layers` more layers (2: five in all) and the decoder is deepened
  to `--layers` (16) by appending layers; each new layer starts as the identity (its attention output
  and MLP down projection zeroed), so the grown model first answers exactly as the first one does;
- stage A (context): the first tower layers stay frozen and the new ones learn on dense targets, each patch its own (colour, shape, quadrant, size, centre: the first model's), and
  now also the scene's global facts from every patch: how many objects, how many of each colour and
  of each shape, and which of the 18 colour-shape pairs are present. So any one visual token tells
  something of the whole scene, as a CLIP token does; where objects are and which one is the
  smallest stay local facts;
- stage B: tower frozen; projector and decoder on several questions per image with the first model's
  stage-B terms (answer, '?' attention to the question words and to the evidence, patch names);
  with `--partial-share`, that share of the images shows the decoder only some of their visual
  tokens (`partial_views`), so it learns to answer from the context the tokens in view carry rather
  than by enumerating every object patch against the whole image (before part 3, keeping every
  object patch and dropping only background cut counting from 88.5% to 73%).

Every step's data is a pure function of (seed, stage, step), so a run interrupted at any point
continues with `--resume` from the last state saved in `--work` (every `--save-every` minutes) and
gives the same weights as an uninterrupted run, up to floating-point order. The end writes the fp16
model, its training.json and its calibrated ALVTS selectors to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import CHECKPOINT
from . import model as M
from . import scenes as S
from .calibrate import calibrate
from .train import (EVIDENCE_LAYERS, QUESTION_LAYERS, LayerInputs, dense_loss, evaluate, fmt, item_seed,
                    kind_weights, log, lr_at, qa_batch, question_step, HEADS)

PAIRS = [(c, s) for c in S.COLOR_NAMES for s in S.SHAPES]
FACTS = ([("objects", 7)] + [(f"{c} objects", 4) for c in S.COLOR_NAMES]
         + [(S.PLURAL[s], 7) for s in S.SHAPES] + [(f"{c} {s}", 2) for c, s in PAIRS])
STATE = "state.pt"


def scene_facts(scene: S.Scene) -> np.ndarray:
    """(len(FACTS),) int64: object count, count per colour, count per shape, presence of each pair."""
    colors = [o.color for o in scene.objects]
    shapes = [o.shape for o in scene.objects]
    present = {(o.color, o.shape) for o in scene.objects}
    return np.array([len(scene.objects)] + [colors.count(c) for c in S.COLOR_NAMES]
                    + [shapes.count(s) for s in S.SHAPES] + [int(p in present) for p in PAIRS], np.int64)


def context_batch(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> pixel values (B, 3, 192, 192), patch labels (B, 6, 576), scene facts (B, len(FACTS))."""
    items = [S.training_item(s, 0) for s in seeds]
    pix = M.pixels([item[0] for item in items])
    labels = torch.from_numpy(np.stack([item[2] for item in items])).flatten(2)
    facts = torch.from_numpy(np.stack([scene_facts(item[3]) for item in items]))
    return pix, labels, facts


def facts_loss(head: torch.nn.Linear, feats: torch.Tensor, facts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """feats (B, 576, Dv), facts (B, F): every patch predicts every fact; -> mean cross-entropy over the
    facts, and the share of (patch, fact) pairs predicted right."""
    logits = head(feats.float())
    loss, right, start = 0.0, 0.0, 0
    for k, (_, n) in enumerate(FACTS):
        lg = logits[..., start:start + n]
        start += n
        y = facts[:, k, None].expand(-1, lg.shape[1])
        loss = loss + F.cross_entropy(lg.reshape(-1, n), y.reshape(-1))
        right += (lg.argmax(-1) == y).float().mean().item()
    return loss / len(FACTS), right / len(FACTS)


def partial_views(b: dict, rng: np.random.Generator, share: float, fewest: int, most: int) -> dict:
    """Hides visual tokens from the decoder in about `share` of the batch's images (attention mask 0
    there; positions unchanged, as the runtime keeps them), so it learns to answer from the context
    the remaining tokens carry.

    Each such image keeps k tokens, k log-uniform in [fewest, most], chosen as the top k of
    t * (patch holds an object) + u, with t ~ U(0, 1) once per image and u ~ U(0, 1) per patch: t = 0
    is a uniform random subset (the Random baseline), t = 1 keeps the object patches first (the
    GroundTruth reference, without its centres-first order), and the subsets in between span the
    selections a method makes. The question is not consulted. The image's questions drop their
    evidence target (the answer must come from what is in view) and hidden patches are not named.
    b: a `qa_batch`, changed in place and returned; adds b["kept"] (B,) visual tokens in view.
    """
    objects = (b["patch_words"][..., 0] >= 0).numpy()  # (B, N)
    n_image = objects.shape[1]
    kept = torch.full((objects.shape[0],), n_image)
    for row in range(objects.shape[0]):
        if rng.random() >= share:
            continue
        k = int(round(np.exp(rng.uniform(np.log(fewest), np.log(most)))))
        score = rng.random() * objects[row] + rng.random(n_image)
        hidden = np.argsort(-score, kind="stable")[k:]
        b["attention_mask"][row, 1 + hidden] = 0
        b["patch_words"][row, hidden] = -1
        b["evidence"][b["answer_pos"][:, 0] == row] = 0.0
        kept[row] = k
    b["kept"] = kept
    return b


# ---------------------------------------------------------------- growing the first model

def grow(first, sizes: M.Sizes, seed: int):
    """A model of `sizes` holding the first model's weights; the extra layers start as the identity."""
    model = M.build_model(sizes, seed)
    missing, unexpected = model.load_state_dict(first.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"the first model has weights the grown one lacks: {unexpected[:4]}")
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers[first.config.vision_config.num_hidden_layers:]:
            layer.self_attn.out_proj.weight.zero_(), layer.self_attn.out_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_(), layer.mlp.fc2.bias.zero_()
        for layer in model.model.language_model.layers[first.config.text_config.num_hidden_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@torch.no_grad()
def check_same_answers(first, grown, processor, n: int = 8) -> float:
    """Max |logit difference| between the first and the grown model on n validation questions (ValueError
    above 1e-3: the grown model must start as the first one)."""
    samples = S.split_samples("val", n)
    batch = processor(images=[s.image for s in samples], text=[M.prompt(s.question) for s in samples],
                      return_tensors="pt", padding=True)
    diff = (first.eval()(**batch).logits - grown.eval()(**batch).logits).abs().max().item()
    if diff > 1e-3:
        raise ValueError(f"the grown model does not start as the first one (max logit difference {diff:.2e})")
    return diff


# ---------------------------------------------------------------- state

def save_state(work: Path, **state) -> None:
    """Atomically writes the training state (stage, step, weights, optimiser, head) to work/state.pt."""
    tmp = work / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, work / STATE)


def load_state(work: Path) -> dict | None:
    path = work / STATE
    return torch.load(path, weights_only=False) if path.is_file() else None


# ---------------------------------------------------------------- stages

def stage_a(model, args, work: Path, state: dict | None) -> None:
    """Dense local + global targets on every patch; only the new tower layers (and the heads) learn."""
    tower = model.model.vision_tower
    dv = model.config.vision_config.hidden_size
    torch.manual_seed(args.seed)
    local = torch.nn.Linear(dv, sum(n for _, n in HEADS))
    facts = torch.nn.Linear(dv, sum(n for _, n in FACTS))
    tower.requires_grad_(False)
    new_layers = tower.encoder.layers[args.first_vision_layers:]
    new_layers.requires_grad_(True)
    params = list(new_layers.parameters()) + list(local.parameters()) + list(facts.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_a, weight_decay=0.01)
    step = 0
    if state is not None and state["stage"] == "a":
        local.load_state_dict(state["local"]), facts.load_state_dict(state["facts"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed stage A at step {step}")
    model.train()
    last_save = time.time()
    while step < args.steps_a:
        for g in opt.param_groups:
            g["lr"] = lr_at(step / args.steps_a, args.lr_a, warmup=50 / args.steps_a)
        pix, labels, truth = context_batch([item_seed(args.seed, 0, step * args.batch_a + i) for i in range(args.batch_a)])
        feats = tower(pix, output_hidden_states=True).hidden_states[-1][:, 1:]
        own, acc = dense_loss(local, feats, labels)
        scene, right = facts_loss(facts, feats, truth)
        loss = own + args.facts_weight * scene
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"A step {step} own {own.item():.3f} facts {scene.item():.3f} facts-right {right:.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        step += 1
        finished = step == args.steps_a
        if time.time() - last_save > args.save_every * 60 or finished:
            save_state(work, stage="b" if finished else "a", step=0 if finished else step,
                       model=model.state_dict(), local=local.state_dict(), facts=facts.state_dict(),
                       opt=None if finished else opt.state_dict())
            last_save = time.time()
    log(f"stage A done: {args.steps_a} steps")


PARTS = {"b": dict(scenes=1, done="done"), "c": dict(scenes=2, done="done_c")}  # stage B and its continuation


def stage_b(model, processor, args, work: Path, state: dict | None, part: str = "b") -> bool:
    """Projector + decoder on several questions per image, tower frozen; evaluates and saves periodically.
    part "c" is a continuation after stage B (--steps-c, --lr-c) on scenes stage B did not see, with a
    fresh optimiser and schedule. Returns False when it stopped at --pause-b-at (state saved), True
    when the part is done."""
    total, peak = (args.steps_b, args.lr_b) if part == "b" else (args.steps_c, args.lr_c)
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    step = 0
    if state is not None and state["stage"] == part and state.get("opt") is not None:
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed stage {part.upper()} at step {step}")
    watch = LayerInputs(model.model.language_model.layers, QUESTION_LAYERS + EVIDENCE_LAYERS)
    tok, n_image = processor.tokenizer, model.config.image_seq_length
    last_save = last_eval = time.time()
    try:
        while step < total:
            for g in opt.param_groups:
                g["lr"] = lr_at(step / total, peak, warmup=args.warmup_b / total)
            model.train()
            b = qa_batch(tok, [item_seed(args.seed, PARTS[part]["scenes"], step * args.batch_b + i) for i in range(args.batch_b)],
                         args.questions, n_image, args.kind_weights)
            views = np.random.default_rng((args.seed, PARTS[part]["scenes"], step))
            partial_views(b, views, args.partial_share, args.partial_fewest, args.partial_most)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           pixel_values=b["pixel_values"]).logits
            report = question_step(model, logits, watch.seen, b, n_image, args, opt, params)
            if step % 25 == 0:
                log(f"{part.upper()} step {step} {report} lr {opt.param_groups[0]['lr']:.2e} "
                    f"tokens in view {b['kept'].tolist()}")
            step += 1
            if time.time() - last_save > args.save_every * 60 or step == args.pause_b_at:
                save_state(work, stage=part, step=step, model=model.state_dict(), opt=opt.state_dict())
                last_save = time.time()
            if part == "b" and step == args.pause_b_at:
                log(f"paused at stage-B step {step}: continue with --resume")
                return False
            if time.time() - last_eval > args.eval_every * 60:
                log(f"val ({args.eval_n}) {fmt(evaluate(model, processor, 'val', args.eval_n))}")
                M.save(model, processor, str(work / "latest"))
                last_eval = time.time()
    finally:
        watch.remove()
    save_state(work, stage=PARTS[part]["done"], step=step, model=model.state_dict())
    log(f"stage {part.upper()} done: {total} steps")
    return True


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where the finished fp16 model goes")
    p.add_argument("--work", required=True, help="training state (resumable), intermediate models")
    p.add_argument("--init-from", default=str(CHECKPOINT), help="the first small VLM (default: the shipped one)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--new-vision-layers", type=int, default=2)
    p.add_argument("--layers", type=int, default=16, help="decoder layers of the grown model")
    p.add_argument("--steps-a", type=int, default=600)
    p.add_argument("--steps-b", type=int, default=1200)
    p.add_argument("--batch-a", type=int, default=16)
    p.add_argument("--batch-b", type=int, default=4)
    p.add_argument("--questions", type=int, default=10, help="questions per image in stage B")
    p.add_argument("--lr-a", type=float, default=2e-3)
    p.add_argument("--lr-b", type=float, default=6e-4)
    p.add_argument("--warmup-b", type=int, default=25, help="stage-B (and C) steps of linear learning-rate warmup")
    p.add_argument("--steps-c", type=int, default=0, help="stage-B continuation steps on new scenes (0: none)")
    p.add_argument("--lr-c", type=float, default=4e-4)
    p.add_argument("--partial-share", type=float, default=0.0,
                   help="share of stage-B images whose decoder sees only some visual tokens (see partial_views)")
    p.add_argument("--partial-fewest", type=int, default=32, help="fewest visual tokens such an image keeps")
    p.add_argument("--partial-most", type=int, default=192, help="most visual tokens such an image keeps")
    p.add_argument("--facts-weight", type=float, default=1.0, help="weight of the scene-facts term in stage A")
    p.add_argument("--kind-weights", type=kind_weights, default=None,
                   help="question kinds drawn in proportion, e.g. 'count=2,color=1' (default: uniform)")
    p.add_argument("--evidence-weight", type=float, default=2.0)
    p.add_argument("--names-weight", type=float, default=0.5)
    p.add_argument("--save-every", type=float, default=4.0, help="minutes between saved training states")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between validation runs in stage B")
    p.add_argument("--eval-n", type=int, default=250)
    p.add_argument("--final-n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from --work's saved state")
    p.add_argument("--pause-b-at", type=int, default=None,
                   help="save the state and stop after this many stage-B steps (a run in two parts, with --resume)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    first, processor = M.load(args.init_from)
    args.first_vision_layers = first.config.vision_config.num_hidden_layers
    sizes = M.Sizes(v_layers=args.first_vision_layers + args.new_vision_layers, t_layers=args.layers)
    model = grow(first, sizes, args.seed)
    state = load_state(work) if args.resume else None
    if args.resume and state is None:
        raise ValueError(f"--resume: no {STATE} in {work}; start without --resume")
    if state is None:
        log(f"grown model {sum(x.numel() for x in model.parameters()) / 1e6:.2f} M params starts as the first "
            f"(max logit difference {check_same_answers(first, model, processor):.1e}); args {vars(args)}")
    else:
        model.load_state_dict(state["model"])
        log(f"resuming from {work / STATE}: stage {state['stage']}, step {state['step']}")
    del first
    if state is None or state["stage"] == "a":
        stage_a(model, args, work, state)
        state = None
    if (state is None or state["stage"] == "b") and not stage_b(model, processor, args, work, state):
        return
    if args.steps_c and (state is None or state["stage"] in ("b", "done", "c")):
        stage_b(model, processor, args, work, state if state is not None and state["stage"] == "c" else None, "c")
    M.save(model, processor, args.out)
    acc = evaluate(model, processor, "val", args.final_n)
    log(f"final val ({args.final_n}) {fmt(acc)}")
    record = {"args": {k: v for k, v in vars(args).items()}, "minutes_this_process": (time.time() - start) / 60,
              "val": acc}
    earlier = Path(args.init_from) / "training.json"
    if earlier.is_file():
        record["grown_from"] = json.loads(earlier.read_text())
    (Path(args.out) / "training.json").write_text(json.dumps(record, indent=1))
    calibrate(args.out)
    log(f"saved to {args.out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
