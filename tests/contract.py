"""The test contract every family and method must meet (listed in docs/testing.md), as reusable checks.

Each check compares the compressed model against an independent reference: the untouched model,
the same prompt alone, generation without a cache, or the method's schedule.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable

import torch

import tokensieve as ts


def forward_logits(model, inputs: dict) -> torch.Tensor:
    """Last-position logits (B, V) of one forward pass."""
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


def greedy(model, inputs: dict, steps: int = 5, use_cache: bool = True) -> torch.Tensor:
    """The `steps` new tokens of greedy generation, (B, steps)."""
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=use_cache)
    return out[:, length:]


def module_snapshot(model) -> dict[str, tuple]:
    """Per module: its attribute names and how many hooks of each kind it carries."""
    snapshot = {}
    for name, module in model.named_modules():
        hooks = tuple(
            len(getattr(module, attr))
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_backward_hooks")
        )
        snapshot[name] = (tuple(sorted(vars(module))), hooks)
    return snapshot


def check_keep_all(model, inputs: dict, method) -> None:
    """Keeping every token gives the untouched model's logits (the surgery path still runs)."""
    reference = forward_logits(model, inputs)
    with ts.compress(model, method) as handle:
        compressed = forward_logits(model, inputs)
    assert handle.stats is not None, "the runtime did not see the visual tokens"
    torch.testing.assert_close(compressed, reference, rtol=0, atol=1e-5)


def check_removal(model, inputs: dict, method, hooked_modules: Callable) -> None:
    """After remove() (also after an exception inside `with`) the model is as before.

    hooked_modules(model) names the modules the hooks must have been on; the check first proves
    they did carry hooks while compressed, so a removal test cannot pass by checking the wrong ones.
    """
    reference = forward_logits(model, inputs)  # first: transformers adds its own capture hooks on a first forward
    before = module_snapshot(model)
    handle = ts.compress(model, method)
    during = module_snapshot(model)
    for name in hooked_modules(model):
        assert during[name] != before[name], f"expected hooks on {name}"
    changed = forward_logits(model, inputs)
    assert not torch.allclose(changed, reference), "compression changed nothing; the removal check would be vacuous"
    handle.remove()
    assert module_snapshot(model) == before
    torch.testing.assert_close(forward_logits(model, inputs), reference, rtol=0, atol=0)
    try:
        with ts.compress(model, method):
            model(**{**inputs, "input_ids": inputs["input_ids"][:, :3]})  # placeholders cut: raises
    except (ValueError, RuntimeError, IndexError):
        pass
    else:
        raise AssertionError("a forward with cut placeholders should have raised")
    assert module_snapshot(model) == before
    torch.testing.assert_close(forward_logits(model, inputs), reference, rtol=0, atol=0)


def check_cache_generation(model, inputs: dict, method, steps: int = 5) -> torch.Tensor:
    """Generation with the KV cache equals generation without it, and its first token equals the
    compressed forward pass's argmax. Returns the tokens."""
    with ts.compress(model, method):
        first = forward_logits(model, inputs).argmax(-1)
        cached = greedy(model, inputs, steps, use_cache=True)
        uncached = greedy(model, inputs, steps, use_cache=False)
    assert torch.equal(cached[:, 0], first)
    assert torch.equal(cached, uncached), f"cached {cached.tolist()} != uncached {uncached.tolist()}"
    return cached


def check_batch_equals_rows(model, batch: dict, rows: list[dict], method, steps: int = 4) -> None:
    """A left-padded batch gives each prompt the logits and tokens it gets alone."""
    with ts.compress(model, method):
        batch_logits = forward_logits(model, batch)
        batch_tokens = greedy(model, batch, steps)
        for i, row in enumerate(rows):
            torch.testing.assert_close(batch_logits[i : i + 1], forward_logits(model, row), rtol=1e-4, atol=1e-4)
            assert torch.equal(batch_tokens[i : i + 1], greedy(model, row, steps))


def check_schedule_counts(model, inputs: dict, method, budget_tokens: list[int]) -> ts.CompressionHandle:
    """Visual tokens each decoder layer processed, per batch row, equal the schedule's."""
    with ts.compress(model, method) as handle:
        forward_logits(model, inputs)
    expected = torch.tensor([handle.schedule.tokens_per_layer(n) for n in budget_tokens])
    assert torch.equal(handle.stats.tokens_per_layer, expected), (handle.stats.tokens_per_layer, expected)
    return handle


def check_attention_implementations(make_model: Callable, inputs: dict, method, steps: int = 4,
                                    implementations: tuple[str, str] = ("sdpa", "eager")) -> None:
    """Two attention implementations (SDPA and eager by default) give the same kept tokens, logits
    (within 1e-4) and generated tokens."""
    results = []
    for attn in implementations:
        model = make_model(attn)
        with ts.compress(model, method) as handle:
            logits = forward_logits(model, inputs)
            tokens = greedy(model, inputs, steps)
        results.append((logits, tokens, handle.stats.kept))
    (l1, t1, k1), (l2, t2, k2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    assert torch.equal(t1, t2)
    for a, b in zip(k1, k2):
        assert a.keys() == b.keys() and all(torch.equal(a[s], b[s]) for s in a)


def check_save_load_roundtrip(model, inputs: dict, method, directory) -> None:
    """A wrapped-then-removed model saves and loads back unchanged."""
    reference = forward_logits(model, inputs)
    with ts.compress(model, method):
        forward_logits(model, inputs)
    model.save_pretrained(directory)
    loaded = type(model).from_pretrained(directory, attn_implementation=model.config._attn_implementation).eval()
    torch.testing.assert_close(forward_logits(loaded, inputs), reference, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------- the paths users take
@dataclasses.dataclass(eq=False)
class Held:
    """`method` with its first prefill's selection held: every later prefill keeps exactly what the
    first one kept (inner stages return their first plans; ALVTS's routing is held by the handle).

    The reference for methods whose selection reads the prompt: a longer prompt (the generated tokens,
    a second turn) recomputed without a cache, with the first prefill's choice held.
    """

    method: object
    plans: dict = dataclasses.field(default_factory=dict)
    calls: int = 0

    def __getattr__(self, name):
        if name == "resolve_selectors":  # only where the held method has it (ALVTS)
            return getattr(self.method, name)
        raise AttributeError(name)

    def schedule(self, num_layers: int, model_type: str = "", **context):
        inner = self.method.schedule(num_layers, model_type, **context)
        stages = tuple(dataclasses.replace(stage, plan=self._held(stage)) for stage in inner.stages)
        return dataclasses.replace(inner, stages=stages)

    def _held(self, stage):
        def plan(ctx, requests):
            self.calls += 1
            sizes = [(r.row, r.positions.numel(), r.keep) for r in requests]
            if stage.name not in self.plans:
                self.plans[stage.name] = (stage.plan(ctx, requests), sizes)
            plans, recorded = self.plans[stage.name]
            assert sizes == recorded, (sizes, recorded)
            return plans
        return plan

    @contextlib.contextmanager
    def compressed(self, model):
        with ts.compress(model, self) as handle:
            handle.hold_selection()
            yield handle


def check_cached_equals_held(model, inputs: dict, method, steps: int = 4) -> None:
    """Cached generation equals a recomputation without cache holding the prefill's selection; the
    first token is the compressed forward's argmax; the held run kept what the method kept."""
    with ts.compress(model, method) as handle:
        first = forward_logits(model, inputs).argmax(-1)
        kept = handle.stats.kept
        cached = greedy(model, inputs, steps)
    held = Held(method)
    with held.compressed(model) as held_handle:
        uncached = greedy(model, inputs, steps, use_cache=False)
    assert held.calls == steps * len(handle.schedule.stages)  # every step recomputed the prompt
    for a, b in zip(kept, held_handle.stats.kept):
        assert a.keys() == b.keys() and all(torch.equal(a[s], b[s]) for s in a)
    assert torch.equal(cached[:, 0], first)
    assert torch.equal(cached, uncached), (cached, uncached)


def _generate(model, inputs: dict, steps: int, **extra):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, **extra)


def next_turn(inputs: dict, sequences: torch.Tensor, new_tokens: torch.Tensor) -> dict:
    """The whole conversation so far plus a new turn: input_ids (B, S + g + t) and its mask; Qwen's
    token types grow with zeros (text)."""
    batch = sequences.shape[0]
    ids = torch.cat([sequences, new_tokens.expand(batch, -1)], 1)
    grown = ids.shape[1] - inputs["attention_mask"].shape[1]
    out = {"input_ids": ids,
           "attention_mask": torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, grown)], 1)}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros(batch, grown)], 1)
    return out


def check_second_turn(model, inputs: dict, method, reads_prompt: bool, steps: int = 3, cache_name: str = "cache"):
    """A second turn continued on the compressed cache equals one prefill of the whole conversation
    (methods reading only visual tokens) or its recomputation with the first turn's selection held."""
    new_tokens = torch.tensor([[7, 8, 9]])
    with ts.compress(model, method):
        first = _generate(model, inputs, steps)
        turn = next_turn(inputs, first.sequences, new_tokens)  # as a processor gives it: Qwen's token types too
        continued = _generate(model, turn, steps, **{cache_name: first.past_key_values})
    visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if reads_prompt:
        held = Held(method)
        with held.compressed(model):
            assert torch.equal(_generate(model, inputs, steps).sequences, first.sequences)
            reference = _generate(model, {**turn, **visual}, steps)
    else:
        with ts.compress(model, method):
            reference = _generate(model, {**turn, **visual}, steps)
    torch.testing.assert_close(continued.logits[0].float(), reference.logits[0].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(continued.sequences, reference.sequences), (continued.sequences, reference.sequences)


def check_handle_reuse(model, inputs: dict, method) -> None:
    """A handle entered again installs itself again, with fresh stats; `active` tells the truth."""
    reference = forward_logits(model, inputs)
    handle = ts.compress(model, method)
    with handle:
        compressed = forward_logits(model, inputs)
        first_stats = handle.stats
    assert not handle.active
    torch.testing.assert_close(forward_logits(model, inputs), reference, rtol=0, atol=0)
    with handle:
        assert handle.active and handle.stats is None
        torch.testing.assert_close(forward_logits(model, inputs), compressed, rtol=0, atol=0)
        assert handle.stats is not first_stats
        assert torch.equal(handle.stats.tokens_per_layer, first_stats.tokens_per_layer)
    assert not handle.active
    handle.remove()  # removing twice is harmless
    torch.testing.assert_close(forward_logits(model, inputs), reference, rtol=0, atol=0)


def check_compress_twice(model, inputs: dict, method) -> None:
    """A second compress while one is installed raises, naming the first method, and installs nothing."""
    with ts.compress(model, method):
        snapshot = module_snapshot(model)
        compressed = forward_logits(model, inputs)
        try:
            ts.compress(model, method)
        except ValueError as error:
            assert type(method).__name__ in str(error) and "already compressed" in str(error)
        else:
            raise AssertionError("a second compress on the same model was accepted")
        assert module_snapshot(model) == snapshot
        torch.testing.assert_close(forward_logits(model, inputs), compressed, rtol=0, atol=0)


def check_copy(model, inputs: dict, method) -> None:
    """A deep copy made inside the block computes what the uncompressed model computes, inside the
    block and after it, and generates as the uncompressed model does; compressed on its own, it
    computes what the compressed original computes."""
    reference = forward_logits(model, inputs)
    tokens = greedy(model, inputs, 3)
    with ts.compress(model, method):
        copy_ = copy.deepcopy(model)
        torch.testing.assert_close(forward_logits(copy_, inputs), reference, rtol=0, atol=0)
    torch.testing.assert_close(forward_logits(copy_, inputs), reference, rtol=0, atol=0)
    assert torch.equal(greedy(copy_, inputs, 3), tokens)
    with ts.compress(model, method):
        compressed = forward_logits(model, inputs)
    with ts.compress(copy_, method):  # the copy can be compressed on its own
        torch.testing.assert_close(forward_logits(copy_, inputs), compressed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward_logits(copy_, inputs), reference, rtol=0, atol=0)
