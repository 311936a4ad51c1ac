"""Tiny VLMs built from configs (random weights, no download) for the tests."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 100
PAD_TOKEN = 0
VOCAB = 128


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=PAD_TOKEN, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 48, patch: int = 4) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-shaped: CLIP tower (12x12 = 144 tokens at the defaults), MLP projector, 4-layer Llama."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=tiny_llama_config(), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def llava_inputs(model, prompts: list[tuple[int, int]], seed: int = 0) -> dict:
    """A left-padded batch: each prompt is (text tokens before the image, text tokens after it).

    Returns input_ids, attention_mask, pixel_values for one image per prompt.
    """
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    rows = []
    for before, after in prompts:
        text = torch.randint(1, IMAGE_TOKEN, (before + after,), generator=generator)
        rows.append(torch.cat([text[:before], torch.full((n,), IMAGE_TOKEN), text[before:]]))
    input_ids, attention_mask = left_pad(rows)
    pixel_values = torch.randn(len(rows), 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> left-padded input_ids (B, S) and attention_mask (B, S)."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.as_tensor(row)
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


def row_inputs(batch: dict, i: int) -> dict:
    """Row i of a left-padded one-image-per-row LLaVA batch, without its padding."""
    start = int((batch["attention_mask"][i] == 0).sum())
    return {
        "input_ids": batch["input_ids"][i : i + 1, start:],
        "attention_mask": batch["attention_mask"][i : i + 1, start:],
        "pixel_values": batch["pixel_values"][i : i + 1],
    }
