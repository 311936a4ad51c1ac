"""`generate` under compression: one sequence per prompt, and a conversation continued on the
compressed cache, whose length no longer says how many tokens it stands for."""
from __future__ import annotations

from typing import Any

from .compat import cache_in


def cache_length(cache: Any, layer: int = 0) -> int:
    return 0 if cache is None else int(cache.get_seq_length(layer))


class _UncompressedLength:
    """A compressed cache seen by code that only asks its length: the uncompressed sequence's."""

    def __init__(self, length: int) -> None:
        self._length = length

    def get_seq_length(self, layer: int = 0) -> int:
        return self._length


class GenerationGuards:
    """Wrappers of the model's generation methods, on the instance; `session` holds the prefill's state."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def install(self, hooks, model) -> None:
        hooks.wrap_method(model, "generate", self.one_sequence_per_prompt)
        hooks.wrap_method(model, "prepare_inputs_for_generation", self.continuation_slicer)
        hooks.wrap_method(model, "_prepare_position_ids_for_generation", self.continuation_positions)

    def tokens_behind(self, cache: Any) -> int | None:
        """Tokens of the uncompressed sequence the compressed `cache` stands for (None: not this prefill's)."""
        state = self.session.sequence
        if state is None or cache_length(cache) != self.compressed_length():
            return None
        return state.original_length + state.decoded

    def compressed_length(self) -> int:
        """Rows the KV cache holds after this prefill and the tokens decoded since (its first layer's)."""
        session = self.session
        first = session.routes.get(0)
        prefill = first.selection.length if first is not None else session.sequence.level_of(0).length
        return prefill + session.sequence.decoded

    def one_sequence_per_prompt(self, original):
        """generate, refusing beam search and several sequences per prompt before anything runs: both
        repeat the prompt's rows after the images were encoded, which the compressed rows cannot follow."""

        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or self.session.model.generation_config
            for name in ("num_beams", "num_return_sequences"):
                value = kwargs.get(name, getattr(config, name, None))
                if value is not None and value > 1:
                    raise ValueError(
                        f"{name}={value} is not supported under tokensieve (the prompt's compressed rows would have to "
                        "be repeated per beam or sequence); use greedy or sampling with num_beams=1 and "
                        "num_return_sequences=1, or run one generate per sample"
                    )
            return original(*args, **kwargs)

        return generate

    def continuation_slicer(self, original):
        """generate slices the new tokens off the full conversation by the cache's length, which
        compression shortened: give it the count of new tokens measured on the uncompressed sequence."""

        def prepare(input_ids, next_sequence_length=None, **kwargs):
            if not kwargs.get("is_first_iteration") or next_sequence_length is None:  # decoding steps: nothing to fix
                return original(input_ids, next_sequence_length=next_sequence_length, **kwargs)
            cache = cache_in(kwargs)
            behind = self.tokens_behind(cache)
            if behind is not None:
                next_sequence_length -= behind - cache_length(cache)
                if next_sequence_length < 1:
                    raise ValueError(
                        f"the conversation passed holds {input_ids.shape[1]} tokens, no more than the {behind} this "
                        "compressed cache already holds; append the new turn's tokens to the previous output"
                    )
            return original(input_ids, next_sequence_length=next_sequence_length, **kwargs)

        return prepare

    def continuation_positions(self, original):
        """generate's position ids for a conversation continued on the compressed cache, derived as if the
        cache held the uncompressed conversation (Qwen-VL reads the cache's length to tell the cached
        tokens from new images, and would otherwise recompute the M-RoPE positions wrongly)."""

        def positions(inputs_tensor, model_kwargs):
            behind = self.tokens_behind(cache_in(model_kwargs))
            if behind is not None:
                model_kwargs = {**model_kwargs, "cache": _UncompressedLength(behind)}
                model_kwargs.pop("past_key_values", None)
            return original(inputs_tensor, model_kwargs)

        return positions
