"""Argument types shared by the benchmark scripts (a module, not a script: `cli.py bench list` skips names
starting with an underscore)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from memorycore.errors import InputError
from memorycore.files import check_writable


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type for a number > 0 (NaN is refused too): a 0 or a negative count fails at parse time, with
    argparse's one line and exit code 2, instead of being swallowed by an ``or`` default or failing mid-run."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def open_fraction(text: str) -> float:
    """An argparse type for a number strictly between 0 and 1 (a rate such as the memory's forgetting)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def writable_path(text: str) -> Path:
    """An argparse type for an output file: refused at parse time if it could not be written (a folder, under a
    file, read-only), so that a long run does not fail at its end."""
    try:
        check_writable(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return Path(text)


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads; default the estimators' rule (:func:`memorycore.devices.resolve_threads`)."""
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch CPU threads (default: memorycore's rule, 1: README, CPU threads)")


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU threads for the whole script by the estimators' rule (``--threads`` overrides it)."""
    import torch

    from memorycore.devices import resolve_threads

    torch.set_num_threads(resolve_threads(threads))
    return torch.get_num_threads()


def comma_list(kind: type, allowed: tuple | None = None, what: str = "value") -> Callable[[str], list]:
    """An argparse type for ``a,b,c``: positive numbers of ``kind`` (int, float) or, with ``allowed``, names from it."""
    def parse(text: str) -> list:
        items = text.split(",")
        if allowed is not None:
            unknown = [item for item in items if item not in allowed]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown)}; pick from {', '.join(allowed)}")
            return items
        try:
            values = [kind(item) for item in items]
        except ValueError:
            values = []
        if not values or not all(value > 0 for value in values):
            raise argparse.ArgumentTypeError(f"takes positive numbers separated by commas, got {text!r}")
        return values

    parse.__name__ = "list"
    return parse
