"""The one place that knows how transformers names the KV cache.

transformers 5.24 renamed the `past_key_values` argument of models, layers and `create_causal_mask`
to `cache` (the old name is accepted with a warning until 5.40); 5.23 knows only `past_key_values`.
Hooks read whichever name the call used; calls we make use the name the installed version expects.
It is also where masks are built: with the padding known on the host, transformers is not left to
read it back from the device. Under FlashAttention (`runs_flash`) the same calls give a 2-D padding mask
or None, which is what its kernels take.
"""
from __future__ import annotations

import inspect
from typing import Any

from transformers.masking_utils import create_causal_mask

_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
CACHE_ARGUMENT = "cache" if "cache" in _MASK_PARAMETERS else "past_key_values"


def cache_in(kwargs: dict) -> Any:
    """The KV cache a hooked call was given under either name, or None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def runs_flash(config) -> bool:
    """Whether this (text) config runs a FlashAttention implementation ("flash_attention_2" or "_3")."""
    return str(getattr(config, "_attn_implementation", "")).startswith("flash_attention")


def without_packing_hint(kwargs: dict) -> dict:
    """A decoder layer's kwargs without `position_ids`, when its rotary tables are already given.

    Under FlashAttention transformers reads the position ids of a batch of one as a packed batch whenever
    they are not one increasing run: kept tokens keep their original positions, so the gaps would be read
    as sequence boundaries (with a cache, the chunk would then attend to the wrong keys, without an error).
    The layer itself needs only `position_embeddings`; the position ids reach nothing but that check.
    """
    if kwargs.get("position_ids") is None or kwargs.get("position_embeddings") is None:
        return kwargs
    return {name: value for name, value in kwargs.items() if name != "position_ids"}


def causal_mask(config, hidden, attention_mask, cache, layer_idx: int, padded: bool | None = None):
    """`create_causal_mask` with the cache passed under the installed version's name.

    padded: whether `attention_mask` has a zero, when the caller knows it on the host. transformers
    otherwise reads the mask back to decide whether it may leave causal masking to the kernel, a
    device sync on every call; False passes no mask (the kernel's own causal mask), True builds it.
    """
    if padded is False:
        attention_mask = None
    extra = {CACHE_ARGUMENT: cache}
    if "allow_is_causal_skip" in _MASK_PARAMETERS:  # a version without it reads the mask back as before
        extra["allow_is_causal_skip"] = padded is None
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask, layer_idx=layer_idx,
                              **extra)
