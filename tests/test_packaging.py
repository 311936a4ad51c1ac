"""The built wheel holds everything `tokensieve demo` and `tokensieve bench accuracy` need.

The project's pyproject, README and src/ are copied to a temporary folder (the checkout gets no
build/ or egg-info), a wheel is built there offline with the venv's setuptools, and unpacked into
another folder. Commands then run with that folder first on PYTHONPATH and a third, empty one as the
working directory: nothing of the checkout is importable unless the wheel carries it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ("checkpoint", "checkpoint_context")  # the first small VLM, the second
CHECKPOINT_FILES = ("alvts_selectors.safetensors", "chat_template.jinja", "config.json", "generation_config.json",
                    "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "training.json")
MODULES = ("tokensieve/bench/accuracy.py", "tokensieve/bench/demo.py", "tokensieve/bench/speed.py",
           "tokensieve/smallvlm/__init__.py", "tokensieve/smallvlm/model.py", "tokensieve/smallvlm/scenes.py",
           "tokensieve/smallvlm/ground_truth.py", "tokensieve/smallvlm/calibrate.py", "tokensieve/viz.py",
           "tokensieve/integrations/lmms_eval/model.py", "tokensieve/integrations/lmms_eval/evaluate.py",
           "tokensieve/integrations/lmms_eval/tasks/tokensieve_scenes/tokensieve_scenes.yaml",
           "tokensieve/integrations/lmms_eval/tasks/tokensieve_scenes/utils.py",
           "tokensieve/integrations/lmms_eval/tasks/tokensieve_scenes/questions.jsonl")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of pyproject.toml, README.md and src/."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "-w", str(dist), str(source)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = dist.glob("tokensieve-*.whl")
    return path


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def run_outside_the_checkout(site: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS` in an empty folder with only the unpacked wheel added to the import path."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_carries_the_benchmarks_and_the_small_vlms_checkpoint_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for module in MODULES:
            assert module in names, module
        for folder in CHECKPOINTS:
            for name in CHECKPOINT_FILES:
                packaged = f"tokensieve/smallvlm/{folder}/{name}"
                assert packaged in names, packaged
                on_disk = ROOT / "src" / "tokensieve" / "smallvlm" / folder / name
                assert digest(archive.read(packaged)) == digest(on_disk.read_bytes()), packaged
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
        entry_points = archive.read(metadata.replace("METADATA", "entry_points.txt")).decode()
    assert not any(name.startswith("bench/") for name in names)
    assert any(line.split()[1].startswith("matplotlib") for line in requires), requires
    assert "tokensieve = tokensieve.cli:main" in entry_points
    assert "[lmms_eval.models]\ntokensieve = tokensieve.integrations.lmms_eval:manifests" in entry_points
    assert any("lmms-eval" in line and 'extra == "lmms-eval"' in line for line in requires), requires


def test_bench_accuracy_runs_from_the_unpacked_wheel_alone(unpacked, tmp_path):
    where = run_outside_the_checkout(unpacked, tmp_path, "-c", "import tokensieve, tokensieve.bench.accuracy as A; "
                                     "print(tokensieve.__file__); print(A.CHECKPOINT)")
    assert where.returncode == 0, where.stderr
    package, checkpoint = where.stdout.split()
    inside = unpacked.resolve()
    assert all(Path(p).resolve().is_relative_to(inside) for p in (package, checkpoint)), where.stdout
    records = tmp_path / "records.json"
    done = run_outside_the_checkout(unpacked, tmp_path, "-m", "tokensieve.cli", "bench", "accuracy", "--limit", "10",
                                    "--budgets", "64", "--methods", "ApET", "--threads", "1", "--json", str(records),
                                    "--plot", str(tmp_path / "accuracy.png"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ApET | 64 |" in done.stdout
    assert [r["method"] for r in json.loads(records.read_text())] == ["full", "ApET"]
