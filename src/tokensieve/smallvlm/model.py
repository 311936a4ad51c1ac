"""The small LLaVA-1.5-architecture VLM, its word-level tokenizer and its processor.

CLIP-style vision tower (192 px, patch 8 -> 24x24 = 576 visual tokens + CLS), 2-layer GELU MLP
projector, Llama decoder (8 layers by default). Everything saves and loads with from_pretrained.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from . import scenes

IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the processor normalisation of LLaVA-1.5's CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIALS = ["[pad]", "[unk]", "<s>", "</s>", IMAGE_TOKEN]


@dataclass
class Sizes:
    """Widths and depths; the defaults are the shipped model (about 1.5 M parameters)."""
    image_size: int = scenes.IMAGE_SIZE
    patch: int = scenes.PATCH
    v_hidden: int = 96
    v_layers: int = 3
    v_heads: int = 4
    v_mlp: int = 256
    t_hidden: int = 96
    t_layers: int = 8
    t_heads: int = 4
    t_mlp: int = 256


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace split, ids 0-4 special ([pad] [unk] <s> </s> <image>), then words."""
    vocab = {w: i for i, w in enumerate(SPECIALS + scenes.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)  # so "<image><image>..." splits into single tokens
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[pad]", unk_token="[unk]",
                                   bos_token="<s>", eos_token="</s>", padding_side="left")


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None, image_size: int = scenes.IMAGE_SIZE,
                    patch: int = scenes.PATCH) -> LlavaProcessor:
    """LlavaProcessor(CLIPImageProcessorPil, tokenizer): expands <image> to (image_size/patch)^2 tokens."""
    tokenizer = tokenizer or build_tokenizer()
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size},
                               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def build_model(sizes: Sizes | None = None, seed: int = 0,
                tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaForConditionalGeneration:
    """A freshly initialised model (seeded). Vision features: last layer, CLS dropped."""
    s = sizes or Sizes()
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=s.v_hidden, intermediate_size=s.v_mlp, num_hidden_layers=s.v_layers,
                              num_attention_heads=s.v_heads, image_size=s.image_size, patch_size=s.patch,
                              projection_dim=s.v_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.t_hidden, intermediate_size=s.t_mlp,
                       num_hidden_layers=s.t_layers, num_attention_heads=s.t_heads,
                       num_key_value_heads=s.t_heads, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    n_tokens = (s.image_size // s.patch) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=n_tokens)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        table = grid_position_table(s.image_size // s.patch, s.v_hidden)
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(table)
    model.set_attn_implementation("sdpa")
    return model


def grid_position_table(grid: int, dim: int, scale: float = 0.3, longest: float = 64.0) -> torch.Tensor:
    """Initial vision position embeddings: 2-D sine/cosine of the patch's row and column.

    Neighbouring patches start with similar embeddings, so the tower learns to look at a patch's
    surroundings (what tells a circle's inside from a square's) far sooner than from a random table.
    Returns (1 + grid * grid, dim); row 0 (the CLS position) is zero.
    """
    per_axis = dim // 2
    freqs = longest ** (-torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2))
    coords = torch.arange(grid, dtype=torch.float64)
    angles = coords[:, None] * freqs[None]  # (grid, per_axis/2)
    axis = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (grid, per_axis)
    rows = axis[:, None, :].expand(grid, grid, per_axis)
    cols = axis[None, :, :].expand(grid, grid, per_axis)
    table = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    table[1:, : 2 * per_axis] = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * per_axis)
    return (scale * table).float()


def build_all(sizes: Sizes | None = None, seed: int = 0):
    """(model, tokenizer, processor) built from scratch."""
    s = sizes or Sizes()
    tok = build_tokenizer()
    return build_model(s, seed, tok), tok, build_processor(tok, s.image_size, s.patch)


def save(model, processor, out_dir: str, fp16: bool = True) -> None:
    """Writes model (fp16 weights by default), tokenizer and processor to out_dir."""
    if fp16:
        model = model.to(torch.float16)
    model.save_pretrained(out_dir)
    if fp16:
        model.to(torch.float32)
    processor.save_pretrained(out_dir)


def load(out_dir: str, dtype=torch.float32, attn_implementation: str | None = None):
    """(model in eval mode, processor) from a saved directory, offline (attention: transformers' default
    unless given, e.g. "eager" to read attention weights)."""
    model = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=dtype, attn_implementation=attn_implementation).eval()
    processor = LlavaProcessor.from_pretrained(out_dir)
    return model, processor


def prompt(question: str) -> str:
    """The text the model sees for one question; the answer is the next token after '?'."""
    return f"<s> {IMAGE_TOKEN} {question}"


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """Fast path equal to the processor's pixel_values for 192x192 images: float32 (B, 3, 192, 192)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def answer(model, processor, images: list[Image.Image], questions: list[str]) -> list[str]:
    """Greedy one-word answers: argmax of the logits after the last prompt token (left padding)."""
    batch = processor(images=images, text=[prompt(q) for q in questions], return_tensors="pt", padding=True)
    logits = model(**batch, logits_to_keep=1).logits[:, -1]
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
