"""`tokensieve calibrate` on a tiny LLaVA saved with a real (word-level, offline) processor."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

import tokensieve as ts
from tokensieve.cli import main
from tiny import IMAGE_TOKEN, tiny_llava

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"


def word_processor() -> LlavaProcessor:
    named = {"<pad>": 0, "<unk>": 1, "<image>": IMAGE_TOKEN, "USER:": 2, "ASSISTANT:": 3, "what": 4, "is": 5,
             "in": 6, "the": 7, "image": 8, "?": 9}
    words = {f"w{i}": i for i in range(128) if i not in named.values()} | named  # one word per id
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=4, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    model = tiny_llava("sdpa")
    model.save_pretrained(folder / "model")
    word_processor().save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder, model


def test_calibrate_command_writes_selectors_for_that_model(saved, capsys):
    folder, model = saved
    out = folder / "sel.safetensors"
    status = main(["calibrate", str(folder / "model"), "--images", str(folder), "--prompt", PROMPT,
                   "--out", str(out), "--rank", "4", "--steps", "5", "--start-layer", "0"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "top-k overlap" in printed and f"wrote {out}" in printed
    assert len([line for line in printed.splitlines() if line.strip()[:1].isdigit()]) == 4  # one line per layer
    selectors = ts.Selectors.load(out)
    assert selectors.identity["model_type"] == "llava" and selectors.identity["num_layers"] == 4
    assert all(s is not None and s.query.a.shape[1] == 4 for s in selectors.layers)
    assert all(set(f) == {"before", "after"} for f in selectors.fidelity)
    with ts.compress(model, ts.ALVTS(ratio=0.5, selectors=str(out), start_layer=0)):
        pass
    with pytest.raises(ts.SelectorMismatchError):
        ts.compress(tiny_llava("sdpa", seed=3), ts.ALVTS(ratio=0.5, selectors=str(out), start_layer=0))


def test_calibrate_command_rejects_missing_images(saved, capsys):
    folder, _ = saved
    status = main(["calibrate", str(folder / "model"), "--images", str(folder / "nothing.png"),
                   "--out", str(folder / "x.safetensors")])
    assert status == 2
    assert "no such image file" in capsys.readouterr().err
