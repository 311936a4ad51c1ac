"""The `tokensieve` lmms-eval model: a LLaVA-family checkpoint, compressed by a method of the registry.

    python -m lmms_eval --model tokensieve \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=apet,budget=64,dtype=float16 \
        --tasks pope --batch_size 8 --output_path out/

It builds on lmms-eval's own `llava_hf` wrapper (`LlavaHf`): the same prompts (the tokenizer's chat
template, or the Vicuna template `llava_hf` falls back to) and its tokenizer helpers, so `method=none`
gives that wrapper's numbers. It replaces what does not fit: loading (any process count, on CPU too,
sharding requests by rank), `generate_until` (batches above one with left padding, `until` applied,
and errors raised instead of turned into empty answers) and `loglikelihood` (the same convention, but
the context measured with its images, which transformers 5 requires, and the continuation's rows found
by their input positions in a compressed output).
Every call runs inside `tokensieve.compress(model, method)`; see `recording` for what each run writes
to `stats_file`.
"""
from __future__ import annotations

import os
from typing import Any

import PIL.Image
import torch
from accelerate import Accelerator
from loguru import logger
from lmms_eval import utils
from lmms_eval.api.model import lmms
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE, LlavaHf
from transformers import AutoModelForImageTextToText, AutoProcessor

import tokensieve as ts

from . import settings as S
from .recording import Recorder, write_report


class TokenSieve(LlavaHf):
    """lmms-eval model `tokensieve`.

    Model arguments: pretrained (checkpoint folder or hub id), method (a registry name, or `none`
    for the uncompressed model), the method's fields (budget=64 or ratio=0.111 -- the fraction of
    visual tokens KEPT, as a mean per decoder layer; selectors=PATH, layer=16, start_layer=0, ...),
    dtype (default auto), attn_implementation (sdpa or eager, default sdpa), device_map, device,
    batch_size (default 1), chat_template, use_cache, stats_file (JSON written after every call).
    """

    def __init__(self, pretrained: str, method: str = S.UNCOMPRESSED, dtype: str = "auto",
                 attn_implementation: str = "sdpa", device_map: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, chat_template: str | None = None,
                 use_cache: bool = True, stats_file: str | None = None, trust_remote_code: bool = False,
                 **method_fields: Any) -> None:
        lmms.__init__(self)
        self.settings = S.resolve(pretrained, method, method_fields)  # ValueError before any weights
        if attn_implementation not in ts.api.SUPPORTED_ATTENTION:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; use "
                             f"{' or '.join(ts.api.SUPPORTED_ATTENTION)}")
        self.batch_size_per_gpu = check_batch_size(batch_size)
        torch_dtype = dtype_of(dtype)
        self.accelerator = Accelerator()
        # lmms-eval sets rank and world size again from the launcher's environment (torchrun on CPU too)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = torch.device(device or default_device(self.accelerator))
        self._model = AutoModelForImageTextToText.from_pretrained(
            self.settings.pretrained, dtype=torch_dtype, attn_implementation=attn_implementation,
            device_map=device_map or self._device, trust_remote_code=trust_remote_code).eval()
        self._image_processor = AutoProcessor.from_pretrained(self.settings.pretrained,
                                                              trust_remote_code=trust_remote_code)
        self._image_processor.tokenizer.padding_side = "left"
        self._tokenizer = self._image_processor.tokenizer
        self._config = self._model.config
        self.pretrained, self.chat_template, self.use_cache = self.settings.pretrained, chat_template, use_cache
        self.max_frames_num = 0
        self.stats_file = stats_file
        self.recorder = Recorder()
        if self.settings.method is not None:
            ts.compress(self._model, self.settings.method).remove()  # the method fits this model: checked now
        logger.info(f"tokensieve: {self.settings.label} on {self.settings.pretrained}, {self._device}, "
                    f"batch size {self.batch_size_per_gpu}")

    @property
    def model(self):
        return self._model

    def generate_until(self, requests) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        for task, indices in by_task(requests).items():
            self.recorder.task = task
            with self._compressed() as handle, self.recorder.watching(self.model, handle):
                for index, text in zip(indices, self._generate([requests[i] for i in indices])):
                    answers[index] = text
        self._write_stats()
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results: list = [None] * len(requests)
        for task, indices in by_task(requests).items():
            self.recorder.task = task
            with self._compressed() as handle, self.recorder.watching(self.model, handle):
                for index in indices:
                    results[index] = self._loglikelihood(handle, *requests[index].args)
        self._write_stats()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the tokensieve lmms-eval model has no multi-round generation; a later turn on a "
                                  "compressed cache is tokensieve's own API (docs/using-handles.md)")

    @torch.inference_mode()
    def _loglikelihood(self, handle, context, target, doc_to_visual, doc_id, task, split) -> tuple[float, bool]:
        """As lmms-eval's llava_hf (its convention: the continuation's mean loss, and whether greedy decoding
        gives it), with the context's length counted with its images, which transformers 5 requires. A
        compressed output has fewer rows than the input: the continuation's rows are found by their input
        positions (`handle.stats.positions`)."""
        doc = self.task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        images = self.flatten([doc_to_visual(doc)])
        context = self.with_placeholders(context, len(images))
        messages = [{"role": "user", "content": context}, {"role": "assistant", "content": continuation}]
        template = self.chat_template or self.tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
        prompt = self.tokenizer.apply_chat_template(messages[:1], chat_template=template, tokenize=False,
                                                    add_generation_prompt=True)
        whole = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        inputs = self._image_processor(images=images or None, text=[whole], return_tensors="pt")
        inputs = inputs.to(self._device, self.model.dtype)
        start = self._image_processor(images=images or None, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        ids = inputs["input_ids"][0]
        logits = self.model(**inputs).logits[0]  # (S_out, V)
        positions = handle.stats.positions[0] if handle is not None else torch.arange(len(ids), device=ids.device)
        rows = torch.stack([(positions == p).nonzero()[0, 0] for p in range(start - 1, len(ids) - 1)])
        predicted, wanted = logits[rows].float(), ids[start:]
        loss = torch.nn.functional.cross_entropy(predicted, wanted)
        return float(loss), bool((predicted.argmax(-1) == wanted).all())

    def _compressed(self):
        """The method's handle as a with block, or a block that does nothing for the uncompressed model."""
        if self.settings.method is None:
            return _Uncompressed()
        return ts.compress(self.model, self.settings.method)

    def _generate(self, requests) -> list[str]:
        """One task's requests in batches of batch_size, grouped by generation arguments; answers in order."""
        collator = utils.Collator([r.args for r in requests], lambda args: (-len(self.tok_encode(args[0])), args[0]),
                                  grouping=True)
        answers = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            answers += self._generate_batch(chunk)
        return collator.get_original(answers)

    @torch.inference_mode()
    def _generate_batch(self, chunk) -> list[str]:
        contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        visuals = [self.flatten([to_visual(self.task_dict[task][split][doc])])
                   for to_visual, doc, task, split in zip(doc_to_visual, doc_ids, tasks, splits)]
        images = [image for per_doc in visuals for image in per_doc]
        if any(not isinstance(image, PIL.Image.Image) for image in images):
            raise ValueError("the tokensieve lmms-eval model takes image tasks; this task gives "
                             f"{type(next(i for i in images if not isinstance(i, PIL.Image.Image))).__name__} visuals")
        texts = [self.prompt(context, len(per_doc)) for context, per_doc in zip(contexts, visuals)]
        inputs = self._image_processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device, self.model.dtype)
        options = generation_options(dict(all_kwargs[0]), self.tok_decode(self.eot_token_id))
        output = self.model.generate(**inputs, **options["generate"], use_cache=self.use_cache,
                                     pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        decoded = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at(text, options["until"]) for text in decoded]

    @staticmethod
    def with_placeholders(context: str, images: int) -> str:
        """As lmms-eval's llava_hf: one image placeholder per image before the text, unless it has them."""
        if images and DEFAULT_IMAGE_TOKEN not in context:
            return " ".join([DEFAULT_IMAGE_TOKEN] * images) + "\n" + context
        return context

    def prompt(self, context: str, images: int) -> str:
        """As lmms-eval's llava_hf: the image placeholders, then the chat template (given, the tokenizer's
        own, or Vicuna's)."""
        context = self.with_placeholders(context, images)
        template = self.chat_template or self.tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template([{"role": "user", "content": context}], chat_template=template,
                                                  tokenize=False, add_generation_prompt=True)

    def _write_stats(self) -> None:
        report = self.recorder.report(self.settings, self._config.get_text_config().num_hidden_layers)
        for task, summary in report["tasks"].items():
            logger.info(f"tokensieve {self.settings.method_name} on {task}: {summary}")
        if self.stats_file and self._rank == 0:
            write_report(report, self.stats_file)


class _Uncompressed:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def by_task(requests) -> dict[str, list[int]]:
    """Request indices per task name, in order."""
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.args[4], []).append(index)
    return groups


def generation_options(kwargs: dict, end_of_text: str) -> dict:
    """A task's generation arguments -> {"generate": generate's keyword arguments, "until": stop strings}."""
    until = kwargs.pop("until", [end_of_text])
    until = [until] if isinstance(until, str) else list(until)
    temperature = kwargs.get("temperature", 0) or 0
    sample = temperature > 0
    return {"until": until, "generate": {"do_sample": sample, "temperature": temperature if sample else None,
                                         "top_p": kwargs.get("top_p") if sample else None,
                                         "num_beams": kwargs.get("num_beams", 1),
                                         "max_new_tokens": kwargs.get("max_new_tokens", 1024)}}


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first stop string it contains."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def check_batch_size(batch_size: int | str) -> int:
    if str(batch_size).startswith("auto") or not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def default_device(accelerator: Accelerator) -> str:
    """This process's GPU when there are GPUs (accelerate launch or torchrun), else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
    return f"cuda:{local}" if torch.cuda.is_available() else "cpu"


def dtype_of(name: str):
    if name == "auto":
        return "auto"
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16")
    return value
