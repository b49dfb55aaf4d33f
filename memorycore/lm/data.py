"""Text for the language models: reading files or strings, refusing what is not text, cutting token windows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from memorycore.errors import InputError

TextData = str | bytes | os.PathLike | Sequence[str | os.PathLike]
_SNIFF = 1 << 16  # bytes inspected to tell text from binary


def read_text(data: TextData) -> bytes:
    """The bytes of ``data``: a ``str`` or ``bytes`` of text, a path, or a list of paths (concatenated in order).

    A ``str`` without a line break that names an existing file is read as that file's path (what a user passing
    ``"input.txt"`` means); any other ``str`` is the text itself. Pass a :class:`pathlib.Path` to be explicit.

    Raises
    ------
    InputError
        A missing, unreadable, empty or binary (non-text) file, or empty text.
    """
    if isinstance(data, (bytes, bytearray)):
        raw = bytes(data)
    elif isinstance(data, str) and not _names_file(data):
        raw = data.encode("utf-8", errors="surrogateescape")
    elif isinstance(data, (str, os.PathLike)):
        raw = _read_file(Path(data))
    elif isinstance(data, Sequence) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        raw = b"".join(_read_file(Path(p)) for p in data)
    else:
        raise InputError(f"expected text, a path or a list of paths, got {type(data).__name__}")
    if not raw:
        raise InputError("the text is empty")
    return raw


def _names_file(text: str) -> bool:
    if "\n" in text or "\0" in text or len(text) > 4096:
        return False
    try:
        return Path(text).is_file()
    except OSError:  # a name too long for the file system: text
        return False


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    if not raw:
        raise InputError(f"{path} is empty")
    if looks_binary(raw):
        raise InputError(f"{path} looks binary, not text (NUL bytes or mostly invalid UTF-8); give a text file")
    return raw


def looks_binary(raw: bytes) -> bool:
    """True when the start of ``raw`` holds a NUL byte or is more than 10% invalid UTF-8 (images, archives,
    model files). Text in any language, UTF-8 or a legacy 8-bit encoding, passes."""
    head = raw[:_SNIFF]
    if b"\0" in head:
        return True
    invalid = head.decode("utf-8", errors="replace").count("\ufffd")
    return invalid > 0.1 * len(head)


class RandomWindows(Dataset):
    """Every window of ``length + 1`` consecutive tokens (input and next-token target): item ``i`` starts at token
    ``i``, so shuffled batches are random contiguous windows (nanoGPT's ``get_batch``)."""

    def __init__(self, tokens: np.ndarray, length: int) -> None:
        self.tokens, self.length = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)), length

    def __len__(self) -> int:
        return max(0, len(self.tokens) - self.length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (self.tokens[index:index + self.length + 1],)


def tiled_windows(tokens: np.ndarray, length: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``length + 1`` tokens stepping by ``length`` (each token after the first is a target once), the
    full ones as ``[n, length + 1]`` and the shorter tail (possibly empty). ``limit`` keeps that many full windows
    spread evenly over the text (a cheaper validation during training)."""
    tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    full = max(0, (len(tokens) - 1) // length)
    starts = torch.arange(full) * length
    if limit is not None and full > limit:
        starts = starts[torch.linspace(0, full - 1, limit).round().long()]
    windows = tokens[starts[:, None] + torch.arange(length + 1)] if full else tokens.new_zeros(0, length + 1)
    return windows, tokens[full * length:]
