"""`tokensieve calibrate` on a tiny LLaVA saved with a real (word-level, offline) processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

import tokensieve as ts
import tokensieve.calibrate as calibrate_module
from tokensieve.cli import main
from tiny import IMAGE_TOKEN, tiny_llava
from cli_refusal import refusal

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


# Bad arguments: one line on stderr, exit status 2, before any work (nothing loaded, fitted or written).


@pytest.fixture
def no_loading(monkeypatch):
    """The model loader fails the test if a refused command reaches it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(calibrate_module, "load_model_and_samples", refuse)


def calibrate_argv(folder, out, *extra: str) -> list[str]:
    return ["calibrate", str(folder / "model"), "--images", str(folder / "img0.png"), "--prompt", PROMPT,
            "--out", str(out), *extra]


def test_calibrate_refuses_a_start_layer_past_the_model_before_loading(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    out = tmp_path / "sel.safetensors"
    line = refusal(calibrate_argv(folder, out, "--start-layer", "99"), capsys)
    assert line.startswith("tokensieve calibrate: error: start layer 99")
    assert "4 decoder layers" in line and "0 to 3" in line
    assert not out.exists()


def test_calibrate_refuses_a_negative_start_layer(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    line = refusal(calibrate_argv(folder, tmp_path / "sel.safetensors", "--start-layer", "-1"), capsys)
    assert "--start-layer" in line and "layer index" in line and "-1" in line


def test_calibrate_refuses_an_out_folder_that_does_not_exist_before_loading(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    missing = tmp_path / "missing"
    line = refusal(calibrate_argv(folder, missing / "sel.safetensors"), capsys)
    assert f"folder {missing} does not exist" in line and "create it" in line
    assert not missing.exists()


def test_calibrate_refuses_an_out_path_that_is_a_folder(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    line = refusal(calibrate_argv(folder, tmp_path), capsys)
    assert f"{tmp_path} is a folder" in line


def test_calibrate_names_a_file_that_is_not_an_image_before_loading(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    out = tmp_path / "sel.safetensors"
    line = refusal(["calibrate", str(folder / "model"), "--images", str(folder / "img0.png"), str(notes),
                    "--out", str(out)], capsys)
    assert f"{notes} is not a readable image" in line
    assert not out.exists()


def test_calibrate_refuses_a_rank_above_the_model_width_before_loading(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    line = refusal(calibrate_argv(folder, tmp_path / "sel.safetensors", "--rank", "65"), capsys)
    assert "rank 65" in line and "hidden size 64" in line


@pytest.mark.parametrize("ratio", ["2", "0", "-0.5", "half"])
def test_calibrate_refuses_a_ratio_outside_0_1(saved, no_loading, tmp_path, capsys, ratio):
    folder, _ = saved
    line = refusal(calibrate_argv(folder, tmp_path / "sel.safetensors", "--ratio", ratio), capsys)
    assert "--ratio" in line and ratio in line


@pytest.mark.parametrize("lr", ["0", "-0.001"])
def test_calibrate_refuses_a_learning_rate_that_is_not_positive(saved, no_loading, tmp_path, capsys, lr):
    folder, _ = saved
    line = refusal(calibrate_argv(folder, tmp_path / "sel.safetensors", "--lr", lr), capsys)
    assert "--lr" in line and "above 0" in line


def test_calibrate_refuses_a_folder_without_a_saved_model(saved, no_loading, tmp_path, capsys):
    folder, _ = saved
    line = refusal(["calibrate", str(tmp_path), "--images", str(folder / "img0.png"),
                    "--out", str(tmp_path / "sel.safetensors")], capsys)
    assert "no config.json" in line and "save_pretrained" in line


def test_calibrate_refuses_a_prompt_without_the_placeholder_before_loading_weights(saved, monkeypatch, tmp_path,
                                                                                   capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", refuse)
    folder, _ = saved
    out = tmp_path / "sel.safetensors"
    line = refusal(["calibrate", str(folder / "model"), "--images", str(folder / "img0.png"), "--prompt",
                    "what is in the image ?", "--out", str(out)], capsys)
    assert "image placeholder" in line and "img0.png" in line
    assert not out.exists()


def test_calibrate_argparse_errors_are_one_line(saved, capsys):
    folder, _ = saved
    line = refusal(["calibrate", str(folder / "model")], capsys)
    assert "--images" in line and "--out" in line and "required" in line
    line = refusal(calibrate_argv(folder, folder / "x.safetensors", "--dtype", "float64"), capsys)
    assert "float64" in line and "bfloat16" in line


def test_calibrate_checks_the_start_layer_after_loading_when_the_config_is_unreadable(saved, monkeypatch, tmp_path,
                                                                                      capsys):
    monkeypatch.setattr(calibrate_module, "decoder_size", lambda model_dir: None)
    monkeypatch.setattr(calibrate_module, "collect_layer_inputs", lambda *a: pytest.fail("fitting started"))
    folder, _ = saved
    out = tmp_path / "sel.safetensors"
    assert main(calibrate_argv(folder, out, "--start-layer", "4")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loader's progress bar
    assert last.startswith("tokensieve calibrate: error: start layer 4") and "0 to 3" in last
    assert not out.exists()


def test_calibrate_alvts_refuses_settings_that_do_not_fit_the_model(saved):
    _, model = saved
    with pytest.raises(ValueError, match="start layer 4 is out of range"):
        ts.calibrate_alvts(model, [], start_layer=4, progress=False)
    with pytest.raises(ValueError, match="hidden size 64"):
        ts.calibrate_alvts(model, [], rank=65, progress=False)


def test_calibrate_loads_the_model_in_the_dtype_asked(saved, monkeypatch, tmp_path, capsys):
    loaded = []
    load = calibrate_module.load_model_and_samples

    def spy(*args, **kwargs):
        model, samples = load(*args, **kwargs)
        loaded.append(model.dtype)
        return model, samples

    monkeypatch.setattr(calibrate_module, "load_model_and_samples", spy)
    folder, _ = saved
    out = tmp_path / "sel.safetensors"
    assert main(calibrate_argv(folder, out, "--dtype", "bfloat16", "--rank", "4", "--steps", "1",
                               "--start-layer", "3")) == 0
    assert loaded == [torch.bfloat16]
    assert "(bfloat16)" in capsys.readouterr().out
    assert ts.Selectors.load(out).layers[3] is not None
