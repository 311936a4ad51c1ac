"""Bad arguments of `tokensieve demo` and `tokensieve bench`: one line on stderr, exit status 2, before any work.

(`tokensieve calibrate`'s are in test_cli_calibrate.py, beside its saved tiny model.)
"""
from __future__ import annotations

import os

import pytest
import torch

from tokensieve import cli
from tokensieve.bench import accuracy, demo, speed
from cli_refusal import refusal


@pytest.fixture
def no_work(monkeypatch):
    """Each command's work (and the thread setting before it) fails the test if a refused command reaches it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work")

    monkeypatch.setattr(speed, "run_speed", refuse)
    monkeypatch.setattr(accuracy, "run_accuracy", refuse)
    monkeypatch.setattr(demo, "run_demo", refuse)
    monkeypatch.setattr(torch, "set_num_threads", refuse)


def test_bench_speed_refuses_an_unknown_device(no_work, capsys):
    line = refusal(["bench", "speed", "--device", "tpu"], capsys)
    assert line.startswith("tokensieve bench speed: error: argument --device: unknown device 'tpu'")
    assert "cpu, cuda, cuda:N" in line


def test_bench_speed_says_cuda_is_not_available(no_work, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refusal(["bench", "speed", "--device", "cuda"], capsys)
    assert "cuda is not available" in line and "--device cpu" in line


def test_bench_speed_refuses_a_gpu_the_machine_does_not_have(no_work, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = refusal(["bench", "speed", "--device", "cuda:3"], capsys)
    assert "cuda:3 does not exist" in line and "1 GPU" in line


def test_bench_speed_runs_flash_attention_only_where_its_kernels_run(no_work, monkeypatch, capsys):
    """A CPU device, float32 and a machine without flash-attn are each refused with the fix."""
    line = refusal(["bench", "speed", "--attn", "flash_attention_2", "--device", "cpu"], capsys)
    assert "CUDA device only" in line and "--device cuda" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = refusal(["bench", "speed", "--attn", "flash_attention_2", "--device", "cuda"], capsys)
    assert "--dtype bfloat16" in line
    line = refusal(["bench", "speed", "--attn", "flash_attention_2", "--device", "cuda", "--dtype", "bfloat16"], capsys)
    assert "flash-attn package" in line and "--attn sdpa" in line  # this machine has no flash-attn
    line = refusal(["bench", "speed", "--attn", "flex_attention"], capsys)
    assert "invalid choice" in line and "flash_attention_2" in line


def test_bench_speed_refuses_a_resolution_qwen_cannot_split_into_patches(no_work, capsys):
    line = refusal(["bench", "speed", "--shape", "tiny-qwen2.5-vl", "--resolution", "462"], capsys)
    assert "--resolution" in line and "multiple of 28" in line and "462" in line


def test_bench_speed_refuses_a_plot_under_a_file(no_work, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = refusal(["bench", "speed", "--plot", str(blocker / "plots" / "speed.png")], capsys)
    assert "--plot" in line and f"{blocker} is a file, not a folder" in line


def test_bench_speed_refuses_json_that_is_a_folder(no_work, tmp_path, capsys):
    line = refusal(["bench", "speed", "--json", str(tmp_path)], capsys)
    assert "--json" in line and f"{tmp_path} is a folder" in line


def test_bench_speed_writes_json_into_a_folder_it_creates(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(speed, "run_speed", lambda *args, **kwargs: ([], []))
    monkeypatch.setattr(speed, "markdown_table", lambda records: "")
    monkeypatch.setattr(speed, "plot", lambda records, path: path)
    records = tmp_path / "new" / "records.json"
    assert cli.main(["bench", "speed", "--plot", str(tmp_path / "speed.png"), "--json", str(records)]) == 0
    assert records.read_text() == "[]"


def test_bench_accuracy_refuses_budgets_above_an_images_tokens(no_work, capsys):
    line = refusal(["bench", "accuracy", "--budgets", "64", "1000"], capsys)
    assert line.startswith("tokensieve bench accuracy: error: budgets [1000]") and "576" in line


def test_bench_accuracy_refuses_json_under_a_file(no_work, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = refusal(["bench", "accuracy", "--json", str(blocker / "records.json")], capsys)
    assert "--json" in line and "is a file, not a folder" in line


@pytest.mark.parametrize("command", [["demo"], ["bench", "accuracy"]], ids=["demo", "accuracy"])
def test_threads_above_the_cpu_count_are_refused(no_work, capsys, command):
    too_many = (os.cpu_count() or 1) + 1
    line = refusal([*command, "--threads", str(too_many)], capsys)
    assert "--threads" in line and f"at most {too_many - 1}" in line


@pytest.mark.parametrize("command", [["demo"], ["bench", "accuracy"]], ids=["demo", "accuracy"])
def test_threads_that_are_not_a_number_are_refused(no_work, capsys, command):
    line = refusal([*command, "--threads", "many"], capsys)
    assert "--threads: expected a positive integer, got 'many'" in line


def test_demo_refuses_an_out_path_under_a_file(no_work, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = refusal(["demo", "--out", str(blocker / "kept.png")], capsys)
    assert line.startswith("tokensieve demo: error: argument --out") and "is a file, not a folder" in line


def test_a_missing_subcommand_is_one_line(capsys):
    line = refusal(["bench"], capsys)
    assert line.startswith("tokensieve bench: error:") and "--help" in line
