"""Prompts of the tokensieve lmms-eval model, per family, as lmms-eval's own wrappers build them.

- LLaVA families (lmms-eval's `llava_hf`): one `<image>` or `<video>` placeholder per visual before the
  question unless it has placeholders, then the chat template (given, the tokenizer's, or Vicuna's).
- Qwen-VL (lmms-eval's Qwen wrappers): a system message, then a user message whose content lists the
  images and videos before the question (with `<image>` removed), through the processor's chat template.
"""
from __future__ import annotations

from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, VICUNA_CHAT_TEMPLATE

from .media import Video, images_in, videos_in

QWEN_SYSTEM_PROMPT = "You are a helpful assistant."  # lmms-eval's Qwen wrappers' default


def with_placeholders(context: str, visuals: list) -> str:
    """As llava_hf: a placeholder per visual (an image's or a video's) before the text, unless it has them."""
    if visuals and DEFAULT_IMAGE_TOKEN not in context and DEFAULT_VIDEO_TOKEN not in context:
        marks = [DEFAULT_VIDEO_TOKEN if isinstance(v, Video) else DEFAULT_IMAGE_TOKEN for v in visuals]
        return " ".join(marks) + "\n" + context
    return context


def llava_text(tokenizer, chat_template: str | None, messages: list[dict], generation_prompt: bool = True) -> str:
    template = chat_template or tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def qwen_conversation(context: str, visuals: list, system_prompt: str) -> list[dict]:
    parts = [{"type": "video" if isinstance(v, Video) else "image"} for v in visuals]
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": parts + [{"type": "text", "text": context.replace(DEFAULT_IMAGE_TOKEN, "")}]}]


def model_inputs(processor, qwen: bool, contexts: list[str], visuals: list[list], chat_template: str | None,
                 system_prompt: str):
    """The processor's left-padded batch for these documents: contexts (one per document) and their visuals
    (PIL images and `Video`s, in order)."""
    if qwen:
        conversations = [qwen_conversation(c, v, system_prompt) for c, v in zip(contexts, visuals)]
        texts = processor.apply_chat_template(conversations, chat_template=chat_template, tokenize=False,
                                              add_generation_prompt=True)
    else:
        texts = [llava_text(processor.tokenizer, chat_template, [{"role": "user", "content": with_placeholders(c, v)}])
                 for c, v in zip(contexts, visuals)]
    images = [image for per_doc in visuals for image in images_in(per_doc)]
    videos = [video for per_doc in visuals for video in videos_in(per_doc)]
    extra = {"video_metadata": [v.metadata for v in videos]} if videos and qwen else {}
    return processor(text=texts, images=images or None, videos=[v.frames for v in videos] or None, padding=True,
                     return_tensors="pt", **extra)
