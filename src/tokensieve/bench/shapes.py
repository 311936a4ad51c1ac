"""Models of real shapes built from configs with random weights, and a prompt for each.

Widths, heads and vision towers are the real ones; the number of decoder (and vision) layers and the
dtype are selectable so a shape fits on a CPU; the vocabulary is cut to `VOCAB` rows (only the last
position's logits are computed, so this changes no measured cost that matters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flops import Widths, decoder_layer_flops

VOCAB = 1024
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, PAD = 1000, 1001, 1002, 1003, 0


@dataclass(frozen=True)
class Shape:
    """A preset: the language model's widths and full depth, the vision tower, the input image."""

    name: str
    text_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    description: str


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", 32, 4096, 32, 32, 11008, 24, 1024, 16, 4096,
                          "CLIP ViT-L/14 at 336 px (576 tokens), MLP projector, Vicuna-7B"),
    "llava-next-7b": Shape("llava-next-7b", 32, 4096, 32, 32, 11008, 24, 1024, 16, 4096,
                           "LLaVA-NeXT AnyRes: 672x672 image, 5 crops of 576 (2880 tokens before packing)"),
    "tiny-llava": Shape("tiny-llava", 4, 64, 4, 2, 128, 2, 32, 2, 64,
                        "a tiny LLaVA-1.5 structure for tests (576 tokens, small widths)"),
    "tiny-qwen2.5-vl": Shape("tiny-qwen2.5-vl", 4, 64, 4, 2, 128, 2, 32, 2, 64,
                             "a tiny Qwen2.5-VL structure for tests (windowed ViT, 2x2 merger, M-RoPE)"),
    "qwen2.5-vl-7b": Shape("qwen2.5-vl-7b", 28, 3584, 28, 4, 18944, 32, 1280, 16, 3420,
                           "Qwen2.5-VL-7B: windowed ViT, 2x2 merger, Qwen2-7B language model"),
    "video-llava-7b": Shape("video-llava-7b", 32, 4096, 32, 32, 11008, 24, 1024, 16, 4096,
                            "Video-LLaVA-7B: 8 frames of CLIP ViT-L/14 at 224 px (256 patches + CLS each: 2056 "
                            "tokens, 2048 budgeted), Vicuna-7B"),
    "qwen2.5-vl-7b-video": Shape("qwen2.5-vl-7b-video", 28, 3584, 28, 4, 18944, 32, 1280, 16, 3420,
                                 "Qwen2.5-VL-7B on a 16-frame clip: 8 frame groups of 256 tokens (2048) at 448 px"),
}
VIDEO_FRAMES = {"video-llava-7b": 8, "qwen2.5-vl-7b-video": 16}  # input frames of the video presets


@dataclass
class Built:
    """A model, one prompt's inputs, and what the FLOPs accounting needs.

    Attributes:
        vision_flops: analytic FLOPs of the vision tower and projector for this input.
        visual_tokens: placeholder tokens of the image (or video) in the prompt.
        budget_tokens: the tokens a budget is measured against: the image's, or one video frame's.
    """

    model: torch.nn.Module
    inputs: dict
    vision_flops: int
    visual_tokens: int
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.budget_tokens is None:
            self.budget_tokens = self.visual_tokens


def _text_config(shape: Shape, layers: int, cls):
    return cls(
        vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=8192,
        pad_token_id=PAD, tie_word_embeddings=False,
    )


def vit_flops(tokens: int, hidden: int, intermediate: int, layers: int, window: int | None = None) -> int:
    """A ViT's matmul FLOPs: projections, attention over `window` tokens (None: all), a 2-matrix MLP."""
    keys = tokens if window is None else min(window, tokens)
    per_layer = 2 * tokens * hidden * 4 * hidden + 2 * 2 * tokens * keys * hidden + 2 * 2 * tokens * hidden * intermediate
    return layers * per_layer


def _prompt(visual: int, before: int = 5, after: int = 30, token: int = IMAGE_TOKEN, start=None, end=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, 900, (before + after,), generator=generator).tolist()
    wrap = ([start] if start is not None else []), ([end] if end is not None else [])
    return torch.tensor([text[:before] + wrap[0] + [token] * visual + wrap[1] + text[before:]])


def _construct(cls, config, device: str) -> torch.nn.Module:
    """cls(config) with its weights initialised on `device` (a 7B model initialises in seconds on a GPU)."""
    with torch.device(device):
        return cls(config)


def build_llava(shape: Shape, layers: int, vision_layers: int, device: str = "cpu") -> Built:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(shape, layers, LlamaConfig),
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, projector_hidden_act="gelu")
    model = _construct(LlavaForConditionalGeneration, config, device)
    ids = _prompt(576)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 336, 336)}
    vision_flops = vit_flops(577, shape.vision_hidden, shape.vision_intermediate, vision_layers - 1)
    projector = 2 * 576 * (shape.vision_hidden * shape.hidden + shape.hidden * shape.hidden)
    return Built(model, inputs, vision_flops + projector, 576)


def build_video_llava(shape: Shape, layers: int, vision_layers: int, device: str = "cpu") -> Built:
    """Video-LLaVA with one video of VIDEO_FRAMES frames; the language model receives each frame's 256
    patches and its CLS token."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=224, patch_size=14, projection_dim=768)
    config = VideoLlavaConfig(vision_config=vision, text_config=_text_config(shape, layers, LlamaConfig),
                              image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, vision_feature_layer=-2,
                              projector_hidden_act="gelu")
    model = _construct(VideoLlavaForConditionalGeneration, config, device)
    frames = VIDEO_FRAMES[shape.name]
    visual = frames * 257
    ids = _prompt(visual, token=VIDEO_TOKEN)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values_videos": torch.randn(1, frames, 3, 224, 224)}
    vision_flops = frames * vit_flops(257, shape.vision_hidden, shape.vision_intermediate, vision_layers - 1)
    projector = 2 * visual * (shape.vision_hidden * shape.hidden + shape.hidden * shape.hidden)
    return Built(model, inputs, vision_flops + projector, visual, budget_tokens=256)


def build_llava_next(shape: Shape, layers: int, vision_layers: int, device: str = "cpu") -> Built:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from ..models.llava_next import packed_layout

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaNextConfig(vision_config=vision, text_config=_text_config(shape, layers, LlamaConfig),
                             image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, image_grid_pinpoints=pinpoints)
    model = _construct(LlavaNextForConditionalGeneration, config, device)
    layout = packed_layout(24, 5, (672, 672), pinpoints, 336)
    visual = layout.newline.numel()
    ids = _prompt(visual)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 5, 3, 336, 336),
              "image_sizes": torch.tensor([[672, 672]])}
    vision_flops = 5 * vit_flops(577, shape.vision_hidden, shape.vision_intermediate, vision_layers - 1)
    projector = 2 * 5 * 576 * (shape.vision_hidden * shape.hidden + shape.hidden * shape.hidden)
    return Built(model, inputs, vision_flops + projector, visual)


def mrope_sections(head_dim: int) -> list[int]:
    """Temporal, height and width shares of the rotary frequencies: Qwen2.5-VL's [16, 24, 24] for
    128-wide heads, in the same proportions for narrower ones."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def build_qwen25(shape: Shape, layers: int, vision_layers: int, resolution: int = 448, device: str = "cpu") -> Built:
    """Qwen2.5-VL with one image, or one video of VIDEO_FRAMES frames (frame groups of 2) for the video preset."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    side = resolution // 14
    merged = (side // 2) ** 2
    groups = VIDEO_FRAMES.get(shape.name, 0) // 2  # temporal_patch_size 2: two frames per group
    full_blocks = [i for i in (7, 15, 23, 31) if i < vision_layers] or [vision_layers - 1]
    vision = dict(depth=vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                  num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=full_blocks, in_channels=3)
    text = dict(vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=8192,
                rope_scaling={"type": "mrope", "mrope_section": mrope_sections(shape.hidden // shape.heads)},
                pad_token_id=PAD, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                              video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = _construct(Qwen2_5_VLForConditionalGeneration, config, device)
    frames = max(1, groups)
    token = VIDEO_TOKEN if groups else IMAGE_TOKEN
    ids = _prompt(merged * frames, token=token, start=VISION_START, end=VISION_END)
    pixels, grid = ("pixel_values_videos", "video_grid_thw") if groups else ("pixel_values", "image_grid_thw")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int(),
              pixels: torch.randn(frames * side * side, 3 * 2 * 14 * 14), grid: torch.tensor([[frames, side, side]])}
    patches = side * side  # the ViT attends within one frame group (its windows and full-attention blocks)
    windowed = len([i for i in range(vision_layers) if i not in full_blocks])
    vision_flops = (vit_flops(patches, shape.vision_hidden, shape.vision_intermediate, windowed, window=64)
                    + vit_flops(patches, shape.vision_hidden, shape.vision_intermediate, vision_layers - windowed))
    merger = 2 * merged * (4 * shape.vision_hidden) ** 2 + 2 * merged * 4 * shape.vision_hidden * shape.hidden
    return Built(model, inputs, frames * (vision_flops + merger), merged * frames, budget_tokens=merged)


def build(name: str, layers: int | None, vision_layers: int | None, dtype: torch.dtype, attn: str = "sdpa",
          resolution: int = 448, seed: int = 0, device: str = "cpu", tied_layers: bool = False) -> tuple[Shape, Built]:
    """A preset model with random weights (seeded), in eval mode, in `dtype`, its weights made on `device`
    (the inputs stay on the CPU). `tied_layers`: every decoder layer shares the first one's weights (see
    `tie_decoder_layers`)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[name]
    layers = shape.text_layers if layers is None else layers
    vision_layers = shape.vision_layers if vision_layers is None else vision_layers
    if not 1 <= layers <= shape.text_layers or not 2 <= vision_layers <= shape.vision_layers:
        raise ValueError(f"{name}: layers must be in [1, {shape.text_layers}] and vision layers in [2, {shape.vision_layers}]")
    torch.manual_seed(seed)
    builder = {"llava-1.5-7b": build_llava, "tiny-llava": build_llava, "llava-next-7b": build_llava_next,
               "video-llava-7b": build_video_llava}.get(name)
    made = 1 if tied_layers else layers
    built = (builder(shape, made, vision_layers, device) if builder
             else build_qwen25(shape, made, vision_layers, resolution, device))
    built.model = built.model.to(dtype).eval()
    if tied_layers:
        tie_decoder_layers(built.model, layers)
    built.model.set_attn_implementation(attn)
    for key in [k for k in built.inputs if k.startswith("pixel_values")]:
        built.inputs[key] = built.inputs[key].to(dtype)
    return shape, built


def tie_decoder_layers(model: torch.nn.Module, layers: int) -> None:
    """Deepen a one-layer language model to `layers` decoder layers that all share layer 0's weights.

    Each added layer is a module of its own (its own index, so its own KV-cache slot) whose parameters
    are layer 0's tensors: the compute of `layers` layers in the memory of one. A layer's weights (about
    800 MB for a 7B shape in float32) are far larger than any CPU cache, so each layer reads them from
    memory as distinct weights would; the time per layer is the same, and the weights are random in
    either case.
    """
    from ..models import family_for

    text = model.config.get_text_config()
    stack = family_for(model).parts(model).layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[0]] * layers
    text.num_hidden_layers = layers
    first = stack[0]
    for index in range(1, layers):
        with torch.device("meta"):
            layer = type(first)(text, index)
        for name, parameter in first.named_parameters():
            owner, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(owner), leaf, parameter)
        stack.append(layer)


def full_prefill_flops(shape: Shape, built: Built, layers: int) -> int:
    """Uncompressed prefill FLOPs: vision tower + projector + every decoder layer on the whole prompt."""
    widths = Widths(shape.hidden, shape.heads, shape.kv_heads, shape.hidden // shape.heads, shape.intermediate)
    rows = built.inputs["input_ids"].shape[1]
    return built.vision_flops + layers * decoder_layer_flops(widths, rows)
