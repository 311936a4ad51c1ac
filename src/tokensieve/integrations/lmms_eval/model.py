"""The `tokensieve` lmms-eval model: a LLaVA-family or Qwen-VL checkpoint, compressed by a method of the registry.

    python -m lmms_eval --model tokensieve \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=apet,budget=64,dtype=float16 \
        --tasks pope --batch_size 8 --output_path out/

It builds on lmms-eval's own `llava_hf` wrapper (`LlavaHf`): its prompts for the LLaVA families and its
tokenizer helpers, so `method=none` gives that wrapper's numbers; Qwen-VL checkpoints are prompted as
lmms-eval's Qwen wrappers prompt them (prompts.py). It replaces what does not fit: loading (any process
count, on CPU too, sharding requests by rank; processors that take videos built without torchvision,
processors.py), `generate_until` (batches above one with left padding, videos decoded into
`max_frames_num` frames, `until` applied, and errors raised instead of turned into empty answers) and
`loglikelihood` (the same convention, but the context measured with its images, which transformers 5
requires, and the continuation's rows found by their input positions in a compressed output).
Every call runs inside `tokensieve.compress(model, method)`; see `recording` for what each run writes
to `stats_file`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from loguru import logger
from lmms_eval import utils
from lmms_eval.api.model import lmms
from lmms_eval.models.simple.llava_hf import LlavaHf
from transformers import AutoModelForImageTextToText, AutoProcessor

import tokensieve as ts

from . import settings as S
from .media import load_visuals, videos_in
from .processors import load_processor
from .prompts import QWEN_SYSTEM_PROMPT, llava_text, model_inputs, with_placeholders
from .recording import Recorder, write_report


class TokenSieve(LlavaHf):
    """lmms-eval model `tokensieve`.

    Model arguments: pretrained (checkpoint folder or hub id), method (a registry name, or `none`
    for the uncompressed model), the method's fields (budget=64 or ratio=0.111 -- the fraction of
    visual tokens KEPT, as a mean per decoder layer; selectors=PATH, layer=16, start_layer=0, ...),
    dtype (default auto), attn_implementation (sdpa or eager, default sdpa), device_map, device,
    batch_size (default 1), chat_template, use_cache, max_frames_num (frames sampled from a video,
    default 8), min_pixels and max_pixels (Qwen-VL images), system_prompt (Qwen-VL), stats_file (JSON
    written after every call).
    """

    def __init__(self, pretrained: str, method: str = S.UNCOMPRESSED, dtype: str = "auto",
                 attn_implementation: str = "sdpa", device_map: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, chat_template: str | None = None,
                 use_cache: bool = True, max_frames_num: int = S.DEFAULT_FRAMES, min_pixels: int | None = None,
                 max_pixels: int | None = None, system_prompt: str = QWEN_SYSTEM_PROMPT, stats_file: str | None = None,
                 trust_remote_code: bool = False, **method_fields: Any) -> None:
        lmms.__init__(self)
        self.settings = S.resolve(pretrained, method, method_fields)  # ValueError before any weights
        image_options = S.image_options(self.settings.model_type, max_frames_num, min_pixels, max_pixels)
        if attn_implementation not in ts.api.SUPPORTED_ATTENTION:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; use "
                             f"{' or '.join(ts.api.SUPPORTED_ATTENTION)}")
        self.batch_size_per_gpu = check_batch_size(batch_size)
        torch_dtype = dtype_of(dtype)
        self.accelerator = Accelerator()
        # lmms-eval sets rank and world size again from the launcher's environment (torchrun on CPU too)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = torch.device(device or default_device(self.accelerator))
        self._image_processor = self._load_processor(image_options, trust_remote_code)
        self._image_processor.tokenizer.padding_side = "left"
        self._model = AutoModelForImageTextToText.from_pretrained(
            self.settings.pretrained, dtype=torch_dtype, attn_implementation=attn_implementation,
            device_map=device_map or self._device, trust_remote_code=trust_remote_code).eval()
        self._tokenizer = self._image_processor.tokenizer
        self._config = self._model.config
        self.pretrained, self.chat_template, self.use_cache = self.settings.pretrained, chat_template, use_cache
        self.max_frames_num, self.system_prompt = max_frames_num, system_prompt
        self.qwen = self.settings.model_type in S.QWEN_MODEL_TYPES
        self.stats_file = stats_file
        self.recorder = Recorder()
        if self.settings.method is not None:
            ts.compress(self._model, self.settings.method).remove()  # the method fits this model: checked now
        logger.info(f"tokensieve: {self.settings.label} on {self.settings.pretrained}, {self._device}, "
                    f"batch size {self.batch_size_per_gpu}")

    @property
    def model(self):
        return self._model

    def _load_processor(self, image_options: dict, trust_remote_code: bool):
        """The checkpoint's processor; for model types that take videos, assembled without torchvision."""
        if self.settings.model_type in S.VIDEO_MODEL_TYPES:
            return load_processor(self.settings.pretrained, self.settings.model_type, image_options)
        return AutoProcessor.from_pretrained(self.settings.pretrained, trust_remote_code=trust_remote_code)

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
        if self.qwen:
            raise NotImplementedError("the tokensieve lmms-eval model scores continuations (loglikelihood) on the LLaVA "
                                      "families only, as lmms-eval's Qwen wrappers have no loglikelihood")
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
        images = load_visuals(self.flatten([doc_to_visual(doc)]), self.max_frames_num)
        if videos_in(images):
            raise ValueError("the tokensieve lmms-eval model scores continuations (loglikelihood) of image documents "
                             "only; this task gives videos")
        messages = [{"role": "user", "content": with_placeholders(context, images)},
                    {"role": "assistant", "content": continuation}]
        prompt = llava_text(self.tokenizer, self.chat_template, messages[:1])
        whole = llava_text(self.tokenizer, self.chat_template, messages, generation_prompt=False)
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
        """One batch of requests: their visuals read (videos decoded), then one `generate` per group of documents
        whose videos the model can stack (all of a batch on Qwen-VL); answers in the chunk's order."""
        contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        visuals = [load_visuals(self.flatten([to_visual(self.task_dict[task][split][doc])]), self.max_frames_num)
                   for to_visual, doc, task, split in zip(doc_to_visual, doc_ids, tasks, splits)]
        self._check_videos(visuals)
        options = generation_options(dict(all_kwargs[0]), self.tok_decode(self.eot_token_id))
        if self.qwen:  # as lmms-eval's Qwen wrappers: a blank line does not end a Qwen answer
            options["until"] = [stop for stop in options["until"] if stop != "\n\n"]
        answers: list[str] = [""] * len(chunk)
        for group in self._stackable(visuals):
            inputs = model_inputs(self._image_processor, self.qwen, [contexts[i] for i in group],
                                  [visuals[i] for i in group], self.chat_template, self.system_prompt)
            for index, answer in zip(group, self._answer(inputs.to(self._device, self.model.dtype), options)):
                answers[index] = answer
        return answers

    def _answer(self, inputs, options: dict) -> list[str]:
        output = self.model.generate(**inputs, **options["generate"], use_cache=self.use_cache,
                                     pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        decoded = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at(text, options["until"]) for text in decoded]

    def _check_videos(self, visuals: list[list]) -> None:
        if self.settings.model_type not in S.VIDEO_MODEL_TYPES and any(videos_in(v) for v in visuals):
            raise ValueError(f"this task gives videos, and {self.settings.model_type} checkpoints take images only; "
                             f"the model types that take videos: {', '.join(S.VIDEO_MODEL_TYPES)}")

    def _stackable(self, visuals: list[list]) -> list[list[int]]:
        """Indices of documents that can share one `generate`: all of them on Qwen-VL (videos are flattened
        patches), else those whose videos have the same frame count (the LLaVA families take one
        (V, F, 3, H, W) tensor); ValueError for a document whose own videos differ in frame count there."""
        if self.qwen:
            return [list(range(len(visuals)))]
        groups: dict[tuple, list[int]] = {}
        for index, per_doc in enumerate(visuals):
            counts = tuple(sorted({len(v.frames) for v in videos_in(per_doc)}))
            if len(counts) > 1:
                raise ValueError(f"a document holds videos of {list(counts)} frames; {self.settings.model_type} "
                                 "takes the videos of one prompt as one tensor: give its videos one frame count")
            groups.setdefault(counts, []).append(index)
        return list(groups.values())

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
