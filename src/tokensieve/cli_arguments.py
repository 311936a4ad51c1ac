"""Argument types of the `tokensieve` command: each checks one value as argparse parses it and raises
`Invalid` with what is wrong and how to fix it, so a bad argument fails before any work, in one line."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

Invalid = argparse.ArgumentTypeError  # what a `type` function raises: argparse prefixes the argument's name


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


def one_line(text: str) -> str:
    return " ".join(text.split())


def integer(text: str, kind: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Invalid(f"expected {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text, "a positive integer")
    if value < 1:
        raise Invalid(f"expected a positive integer, got {text}")
    return value


def layer_index(text: str) -> int:
    value = integer(text, "a decoder layer index (an integer >= 0)")
    if value < 0:
        raise Invalid(f"expected a decoder layer index (an integer >= 0), got {text}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Invalid(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise Invalid(f"expected a number above 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:
        raise Invalid(f"expected a fraction of the visual tokens in (0, 1], e.g. 0.111 (64 of 576), got {text}")
    return value


def threads(text: str) -> int:
    value = positive_int(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise Invalid(f"{value} threads is more than this machine's {cpus} CPUs; give at most {cpus}")
    return value


def resolution(text: str) -> int:
    value = positive_int(text)
    if value % 28:
        raise Invalid(f"expected a multiple of 28 pixels (14-pixel patches merged 2x2), got {value}; "
                      f"e.g. {max(28, round(value / 28) * 28)}")
    return value


def device(text: str) -> str:
    """cpu, cuda, cuda:N or mps, refused unless this machine has it."""
    import torch

    has_mps = hasattr(torch.backends, "mps")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", text)
    if text == "cpu":
        return text
    if text == "mps" and has_mps:
        if not torch.backends.mps.is_available():
            raise Invalid("mps is not available on this machine; use --device cpu")
        return text
    if cuda is None:
        raise Invalid(f"unknown device {text!r}; use cpu, cuda, cuda:N" + (" or mps" if has_mps else ""))
    if not torch.cuda.is_available():
        raise Invalid(f"cuda is not available on this machine (torch {torch.__version__} sees no GPU); "
                      "use --device cpu")
    count = torch.cuda.device_count()
    if cuda.group(1) is not None and int(cuda.group(1)) >= count:
        raise Invalid(f"{text} does not exist: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return text


def file_in_existing_folder(text: str) -> str:
    """A file to write whose folder must already exist (its writer creates no folders)."""
    path = not_a_folder(text)
    if not path.parent.exists():
        raise Invalid(f"folder {path.parent} does not exist; create it (mkdir -p {path.parent}) or write elsewhere")
    check_writable_folder(path.parent, path)
    return text


def creatable_file(text: str) -> str:
    """A file to write; the folders missing on its way are created when it is written."""
    path = not_a_folder(text)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    check_writable_folder(folder, path)
    return text


def not_a_folder(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise Invalid(f"{text} is a folder; give a file path, e.g. {path / 'out'}")
    return path


def check_writable_folder(folder: Path, path: Path) -> None:
    if not folder.is_dir():
        raise Invalid(f"{folder} is a file, not a folder, so {path} cannot be written; write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Invalid(f"folder {folder} is not writable; write elsewhere or change its permissions")
