"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models built from configs, and inputs built without a processor.

Patches are 2x2 pixels (x 2 temporal x 3 channels = 24 values), merged 2x2, so an image grid of
(1, h, w) patches gives h * w / 4 placeholder tokens: (1, 16, 16) -> 64, (1, 16, 20) -> 80.
"""
from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

PAD_TOKEN = 0
IMAGE_TOKEN = 100
VIDEO_TOKEN = 101
VISION_START = 102
VISION_END = 103
VOCAB = 128
PATCH = 2
MERGE = 2
TEMPORAL_PATCH = 2
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEXT_LAYERS = {"qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 6}
DEEPSTACK_INDEXES = (0, 1)


def _text_config(model_type: str, layers: int) -> dict:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD_TOKEN,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if model_type == "qwen3_vl":
        values.update(head_dim=16, rope_parameters={**values["rope_parameters"], "mrope_interleaved": True})
    else:
        values.update(bos_token_id=None, eos_token_id=None)
    return values


def _vision_config(model_type: str) -> dict:
    shared = dict(depth=2, num_heads=2, in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL_PATCH)
    if model_type == "qwen2_vl":
        return dict(shared, embed_dim=32, hidden_size=64, mlp_ratio=2)
    if model_type == "qwen2_5_vl":
        return dict(shared, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                    fullatt_block_indexes=[1])
    return dict(shared, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                deepstack_visual_indexes=list(DEEPSTACK_INDEXES))


CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def tiny_qwen(model_type: str, attn: str = "sdpa", seed: int = 0, text_layers: int | None = None, **text_overrides):
    """A randomly initialised tiny model of this model_type (eval mode, `attn` attention everywhere)."""
    torch.manual_seed(seed)
    config_class, model_class = CLASSES[model_type]
    text = _text_config(model_type, text_layers or TEXT_LAYERS[model_type])
    text.update(text_overrides)
    config = config_class(
        text_config=text, vision_config=_vision_config(model_type), image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    config._attn_implementation = attn
    model = model_class(config).eval()
    model.set_attn_implementation(attn)
    return model


def placeholders(grid: tuple[int, int, int]) -> int:
    """Merged tokens of a (t, h, w) patch grid."""
    t, h, w = grid
    return t * (h // MERGE) * (w // MERGE)


def _pixels(grids: list[tuple[int, int, int]], generator: torch.Generator) -> torch.Tensor:
    """(sum t*h*w, 3 * temporal * patch * patch) flattened patches, as the image processor lays them out."""
    count = sum(t * h * w for t, h, w in grids)
    return torch.randn(count, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator)


def _vision_run(token: int, count: int) -> list[int]:
    return [VISION_START] + [token] * count + [VISION_END]


def _video_run(model_type: str, grid: tuple[int, int, int], generator: torch.Generator) -> list[int]:
    """Qwen2/2.5-VL: one run of all frames; Qwen3-VL: a 2-token timestamp before each frame's run."""
    t, h, w = grid
    if model_type != "qwen3_vl":
        return _vision_run(VIDEO_TOKEN, placeholders(grid))
    tokens: list[int] = []
    for _ in range(t):
        tokens += torch.randint(1, IMAGE_TOKEN, (2,), generator=generator).tolist()
        tokens += _vision_run(VIDEO_TOKEN, placeholders((1, h, w)))
    return tokens


def _left_pad(rows: list[list[int]]) -> dict:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    types = (input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types}


def build_inputs(model_type: str, prompts: list[list], seed: int = 0) -> dict:
    """A left-padded batch. Each prompt is a list of parts: an int (that many random text tokens),
    ("image", (h, w)) or ("video", (t, h, w)) in patch units.

    Returns input_ids, attention_mask, mm_token_type_ids and, when present, pixel_values +
    image_grid_thw and pixel_values_videos + video_grid_thw (items in batch-row order).
    """
    generator = torch.Generator().manual_seed(seed)
    rows, grids = [], {"image": [], "video": []}
    for parts in prompts:
        tokens: list[int] = []
        for part in parts:
            if isinstance(part, int):
                tokens += torch.randint(1, IMAGE_TOKEN, (part,), generator=generator).tolist()
            elif part[0] == "image":
                grids["image"].append((1, *part[1]))
                tokens += _vision_run(IMAGE_TOKEN, placeholders(grids["image"][-1]))
            else:
                grids["video"].append(tuple(part[1]))
                tokens += _video_run(model_type, grids["video"][-1], generator)
        rows.append(tokens)
    inputs = _left_pad(rows)
    for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[modality]:
            inputs[pixels] = _pixels(grids[modality], generator)
            inputs[f"{modality}_grid_thw"] = torch.tensor(grids[modality])
    return inputs


def qwen_inputs(model_type: str, prompts: list[tuple[int, tuple[int, int], int]], seed: int = 0) -> dict:
    """One image per prompt: (text tokens before, (h, w) patch grid, text tokens after)."""
    return build_inputs(model_type, [[before, ("image", grid), after] for before, grid, after in prompts], seed)


def row(inputs: dict, index: int, modality: str = "image") -> dict:
    """Prompt `index` of a batch with one image (or one video) per prompt alone, without its padding."""
    pixels, grid = ("pixel_values", "image_grid_thw") if modality == "image" else ("pixel_values_videos", "video_grid_thw")
    keep = inputs["attention_mask"][index].bool()
    patches = inputs[grid].prod(-1)
    start = int(patches[:index].sum())
    return {
        "input_ids": inputs["input_ids"][index : index + 1, keep],
        "attention_mask": inputs["attention_mask"][index : index + 1, keep],
        "mm_token_type_ids": inputs["mm_token_type_ids"][index : index + 1, keep],
        pixels: inputs[pixels][start : start + int(patches[index])],
        grid: inputs[grid][index : index + 1],
    }
