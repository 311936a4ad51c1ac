"""`tokensieve demo`: ApET on a LLaVA-1.5-shaped model, in seconds on a CPU, with no download.

The model is built from configs with random weights (the trained small VLM comes later), so its
answers mean nothing; what the demo shows is real: which visual tokens each stage keeps, how many
tokens each decoder layer processes, and the prefill time against the full model and against a
`Replay` of the same kept tokens (ApET's scoring overhead), all measured side by side in one run.
"""
from __future__ import annotations

import importlib.util
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .api import compress
from .methods.apet import ApET
from .methods.replay import Replay
from .viz import kept_overlay_rows

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL = ("<pad>", "<s>", "<image>", "\n")
WORDS = (
    "USER", ":", "What", "is", "in", "the", "image", "?", "ASSISTANT", "a", "an", "red", "green",
    "blue", "yellow", "white", "house", "tree", "sun", "sky", "grass", "bird", "flower", "ball",
    "cloud", "door", "window", "and", "with", "on", "near", "small", "big", "there", "two", "three", ".",
)
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
DEFAULT_BUDGETS = (192, 128, 64)
DEFAULT_OUT = "out/demo_kept_tokens.png"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo model. Defaults: 336 px / patch 14 = 24 x 24 = 576 visual tokens."""

    image_size: int = 336
    patch: int = 14
    vision_layers: int = 4
    vision_width: int = 128
    text_layers: int = 8
    text_width: int = 256
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side


# ---------------------------------------------------------------------------- vocabulary and inputs
class WordVocab:
    """A word-level id mapping for the demo prompt (no tokenizer download): one id per entry of SPECIAL + WORDS."""

    def __init__(self) -> None:
        self.words = SPECIAL + WORDS
        self.ids = {word: i for i, word in enumerate(self.words)}

    @property
    def image_id(self) -> int:
        return self.ids["<image>"]

    @property
    def pad_id(self) -> int:
        return self.ids["<pad>"]

    def encode(self, text: str, image_tokens: int) -> torch.Tensor:
        """(S,) long ids of `<s> text`, with `<image>` expanded to image_tokens placeholders."""
        ids = [self.ids["<s>"]]
        for piece in re.findall(r"<image>|\n|\w+|[^\w\s]", text):
            if piece not in self.ids:
                raise ValueError(f"the demo vocabulary has no word {piece!r}")
            ids.extend([self.image_id] * image_tokens if piece == "<image>" else [self.ids[piece]])
        return torch.tensor(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] if 0 <= i < len(self.words) else f"<{i}>" for i in ids)


def scene_image(size: int = 336) -> Image.Image:
    """A deterministic synthetic scene: sky, grass, sun, house, tree, and a few small objects."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    s = size / 336

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    for y in range(size):  # sky gradient, then grass
        t = y / size
        colour = (int(120 + 80 * t), int(180 + 50 * t), 250) if t < 0.62 else (70, int(150 - 40 * (t - 0.62)), 60)
        draw.line([(0, y), (size, y)], fill=colour)
    draw.ellipse(box(250, 28, 306, 84), fill=(255, 214, 40))  # sun
    draw.ellipse(box(40, 40, 110, 70), fill=(245, 245, 250))  # cloud
    draw.rectangle(box(60, 150, 170, 240), fill=(200, 40, 40))  # house
    draw.polygon([(50 * s, 150 * s), (115 * s, 100 * s), (180 * s, 150 * s)], fill=(110, 50, 30))  # roof
    draw.rectangle(box(100, 195, 128, 240), fill=(90, 60, 30))  # door
    draw.rectangle(box(135, 165, 158, 185), fill=(180, 220, 250))  # window
    draw.rectangle(box(235, 170, 250, 240), fill=(100, 70, 40))  # trunk
    draw.ellipse(box(205, 115, 280, 185), fill=(30, 120, 40))  # crown
    for x, y, colour in ((40, 280, (255, 255, 255)), (190, 300, (250, 120, 200)), (290, 275, (255, 230, 0))):
        draw.ellipse(box(x, y, x + 10, y + 10), fill=colour)  # flowers
    draw.ellipse(box(140, 262, 162, 284), fill=(30, 70, 220))  # ball
    draw.line([(180 * s, 60 * s), (188 * s, 66 * s), (196 * s, 60 * s)], fill=(30, 30, 30), width=max(1, int(2 * s)))  # bird
    return image


def pixel_values(image: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) float32: resized, scaled to [0, 1], normalised with the CLIP mean/std."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return ((pixels - mean) / std)[None]


def demo_inputs(config: DemoConfig, vocab: WordVocab, image: Image.Image) -> dict:
    """input_ids (1, S), attention_mask (1, S), pixel_values (1, 3, H, W) for PROMPT and `image`."""
    rows, cols = config.grid
    input_ids = vocab.encode(PROMPT, rows * cols)[None]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values(image, config.image_size),
    }


# ---------------------------------------------------------------------------- model
def build_model(config: DemoConfig, vocab: WordVocab):
    """A LLaVA-1.5-shaped model with random weights (seeded): CLIP tower, MLP projector, Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(config.seed)
    vision = CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers, num_attention_heads=max(1, config.vision_width // 32),
        image_size=config.image_size, patch_size=config.patch, projection_dim=config.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(vocab.words), hidden_size=config.text_width, intermediate_size=(config.text_width * 11) // 4,
        num_hidden_layers=config.text_layers, num_attention_heads=max(1, config.text_width // 64),
        max_position_embeddings=1024 + config.grid[0] * config.grid[1], pad_token_id=vocab.pad_id,
        bos_token_id=vocab.ids["<s>"], eos_token_id=vocab.ids["."], tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab.image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(llava).eval()
    model.set_attn_implementation("sdpa")
    return model


# ---------------------------------------------------------------------------- measurement
@dataclass
class Measured:
    """One configuration of the table: a method (None = full model) and its prefill times (s)."""

    name: str
    budget: int | None
    method: object | None
    times: list[float] = field(default_factory=list)
    tokens_per_layer: list[int] | None = None
    kept: dict[str, torch.Tensor] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def prefill(model, inputs: dict, method=None):
    """Time one prefill (a forward pass with a fresh cache). Returns (seconds, handle or None).

    The hooks are installed before the clock starts and removed after it stops; the removed
    handle still holds the stats of the pass.
    """
    handle = compress(model, method) if method is not None else None
    try:
        with torch.no_grad():
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - start
        return seconds, handle
    finally:
        if handle is not None:
            handle.remove()


def record(model, inputs: dict, entry: Measured) -> None:
    """One timed prefill of `entry`; the first one also fills its token counts."""
    seconds, handle = prefill(model, inputs, entry.method)
    entry.times.append(seconds)
    if handle is not None and entry.tokens_per_layer is None:
        stats = handle.stats
        entry.tokens_per_layer = stats.tokens_per_layer[0].tolist()
        entry.kept = stats.kept[0]


def build_entries(model, inputs: dict, budgets: Sequence[int], num_tokens: int, layers: int) -> list[Measured]:
    """Full model, then ApET and its Replay per budget (the replay recorded from an untimed ApET run)."""
    entries = [Measured("full", None, None, tokens_per_layer=[num_tokens] * layers)]
    for budget in budgets:
        apet = ApET(budget=budget)
        _, handle = prefill(model, inputs, apet)  # also the warm-up of this configuration
        entries.append(Measured("ApET", budget, apet))
        entries.append(Measured("Replay", budget, Replay.from_handle(handle)))
    return entries


def measure(model, inputs: dict, entries: list[Measured], repeats: int) -> None:
    """One warm-up each, then `repeats` rounds of every entry, interleaved; ApET/Replay order alternates."""
    for entry in entries:
        prefill(model, inputs, entry.method)
    for round_ in range(repeats):
        order = list(entries)
        if round_ % 2:
            for i in range(1, len(order) - 1, 2):  # swap each (ApET, Replay) pair
                order[i], order[i + 1] = order[i + 1], order[i]
        for entry in order:
            record(model, inputs, entry)


def overhead(apet: Measured, replay: Measured) -> float:
    """Median over rounds of ApET prefill / Replay prefill (rounds are paired in time)."""
    return statistics.median(a / r for a, r in zip(apet.times, replay.times))


# ---------------------------------------------------------------------------- report
def compact_counts(counts: Sequence[int]) -> str:
    """[288, 288, 96, 96] -> '288x2 96x2' (runs of equal counts)."""
    runs: list[list[int]] = []
    for count in counts:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return " ".join(f"{count}x{length}" for count, length in runs)


def table_rows(entries: list[Measured]) -> list[list[str]]:
    """Header plus one row per full/ApET entry (Replay shows up in the ApET row)."""
    header = ["method", "budget", "stage1", "stage2", "mean tok/layer", "tokens per layer",
              "prefill ms", "vs full", "replay ms", "ApET/replay"]
    full = entries[0]
    rows = [header]
    for i, entry in enumerate(entries):
        if entry.name == "Replay":
            continue
        kept = entry.kept or {}
        counts = entry.tokens_per_layer
        replay = entries[i + 1] if entry.name == "ApET" else None
        rows.append([
            entry.name,
            "-" if entry.budget is None else str(entry.budget),
            str(kept["stage1"].numel()) if "stage1" in kept else str(counts[0]),
            str(kept["stage2"].numel()) if "stage2" in kept else "-",
            f"{sum(counts) / len(counts):.1f}",
            compact_counts(counts),
            f"{1000 * entry.median:.1f}",
            f"{entry.median / full.median:.2f}",
            "-" if replay is None else f"{1000 * replay.median:.1f}",
            "-" if replay is None else f"{overhead(entry, replay):.3f}",
        ])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def greedy_answer(model, inputs: dict, vocab: WordVocab, method=None, steps: int = 6) -> str:
    """The first `steps` greedily generated words, under `method` if given."""
    handle = compress(model, method) if method is not None else None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
    return vocab.decode(out[0, inputs["input_ids"].shape[1]:].tolist())


def echo_answers(model, inputs: dict, vocab: WordVocab, budget: int, steps: int, echo: Callable[[str], None]) -> None:
    """Print the greedy answers of the full model and of ApET at `budget` (generate under compression)."""
    labels = ["full model", f"ApET {budget}"]
    answers = [greedy_answer(model, inputs, vocab, None, steps), greedy_answer(model, inputs, vocab, ApET(budget=budget), steps)]
    width = max(len(label) for label in labels)
    echo("")
    for label, answer in zip(labels, answers):
        echo(f"answer, {label + ':':<{width + 1}} {answer!r}")
    echo("(random weights: the answers only show that generation runs under compression)")


# ---------------------------------------------------------------------------- the demo
def check_budgets(budgets: Sequence[int], config: DemoConfig) -> None:
    """ValueError, before any model is built, for a budget ApET cannot meet on the demo's image
    (or when matplotlib, needed for the picture, is missing)."""
    if not budgets:
        raise ValueError("give at least one budget, e.g. --budgets 192 128 64")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the demo draws its picture with matplotlib: pip install matplotlib (or tokensieve[dev])")
    rows, cols = config.grid
    for budget in budgets:
        ApET(budget=budget).schedule(config.text_layers, {}).check_item(rows * cols)
@dataclass
class DemoResult:
    entries: list[Measured]
    table: str
    overheads: dict[int, float]
    path: Path


def run_demo(
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    repeats: int = 9,
    out: str | Path = DEFAULT_OUT,
    config: DemoConfig = DemoConfig(),
    answer_steps: int = 6,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Build the model, measure full vs ApET vs Replay prefill, print the table, write the picture."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    check_budgets(budgets, config)
    vocab = WordVocab()
    rows, cols = config.grid
    echo(
        f"tokensieve demo: LLaVA-1.5-shaped model built from configs, RANDOM WEIGHTS (seed {config.seed}): "
        f"CLIP tower {config.vision_layers} layers x {config.vision_width}, {config.image_size} px / patch "
        f"{config.patch} = {rows}x{cols} = {rows * cols} visual tokens; Llama {config.text_layers} layers x "
        f"{config.text_width}; fp32, {torch.get_num_threads()} CPU threads."
    )
    echo("The weights are random (the trained small VLM comes later), so its answers are not meaningful;\n"
         "the token counts, kept tokens and relative timings are real.")
    model = build_model(config, vocab)
    image = scene_image(config.image_size)
    inputs = demo_inputs(config, vocab, image)
    echo(f"prompt: {PROMPT!r} ({inputs['input_ids'].shape[1]} tokens with the image placeholders)")
    entries = build_entries(model, inputs, budgets, rows * cols, config.text_layers)
    measure(model, inputs, entries, repeats)
    table = format_table(table_rows(entries))
    overheads = {e.budget: overhead(e, entries[i + 1]) for i, e in enumerate(entries) if e.name == "ApET"}
    echo("")
    echo(table)
    echo(
        f"\nprefill = one forward over the prompt (vision tower + language model), median of {repeats} "
        "interleaved repeats after a warm-up;\nvs full = prefill / full-model prefill; replay = the same model "
        "fed only the tokens ApET kept, with no scoring;\nApET/replay = ApET's scoring overhead (median of paired "
        "ratios). On a CPU compare these ratios, not absolute times."
    )
    if answer_steps > 0:
        echo_answers(model, inputs, vocab, budgets[-1], answer_steps, echo)
    path = kept_overlay_rows(
        image, config.grid,
        [(f"ApET, budget {e.budget}", e.kept) for e in entries if e.name == "ApET"],
        out,
        title="Visual tokens ApET kept (LLaVA-1.5-shaped model, random weights; dimmed = dropped)",
    )
    echo(f"\nwrote {path}: the image with the tokens each stage dropped dimmed and the kept ones outlined")
    return DemoResult(entries, table, overheads, path)
