"""Tokenizers of the language models: bytes (256 ids) or a byte-level BPE trained on the training text.

Both map any bytes to ids and back exactly (invalid UTF-8 included), so a model reads any file in any language.
Text is decoded to ``str`` only at the edge, with an incremental UTF-8 decoder that holds back a multi-byte
character until its last byte arrives (what streaming generation needs).
"""

from __future__ import annotations

import codecs
import json
from typing import Iterable

import numpy as np

from memorycore.errors import InputError

TOKENIZERS = ("byte", "bpe")


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (space -> 'Ġ', newline -> 'Ċ'), so that a
    BPE over ``str`` works on bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


_ALPHABET = _byte_alphabet()
_TO_CHAR = {b: c for b, c in enumerate(_ALPHABET)}
_TO_BYTE = {c: b for b, c in enumerate(_ALPHABET)}
# pieces a merge may not cross: a word with its leading space and punctuation, runs of spaces, runs of newlines
_PRETOKENIZE = "Ġ?[^ĠĊ]+|Ġ+|Ċ+"


def as_bytes(text: str | bytes) -> bytes:
    """``text`` as UTF-8 bytes (bytes pass through)."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if isinstance(text, str):
        return text.encode("utf-8", errors="surrogateescape")
    raise InputError(f"expected text (str or bytes), got {type(text).__name__}")


class ByteTokenizer:
    """One id per byte: 256 ids, nothing to train.

    ``seen`` marks the bytes of the training text: a prompt holding another byte is refused by generation (the
    model never learnt an embedding for it).
    """

    kind = "byte"

    def __init__(self, seen: Iterable[int] | None = None) -> None:
        self.seen = np.zeros(256, dtype=bool) if seen is None else np.asarray(list(seen), dtype=bool)

    @property
    def vocab_size(self) -> int:
        return 256

    @classmethod
    def train(cls, data: bytes, vocab_size: int | None = None) -> "ByteTokenizer":
        tokenizer = cls()
        tokenizer.seen[np.unique(np.frombuffer(data, dtype=np.uint8))] = True
        return tokenizer

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.frombuffer(as_bytes(text), dtype=np.uint8).astype(np.int64)

    def token_bytes(self) -> list[bytes]:
        """The bytes of every id, in id order."""
        return [bytes([b]) for b in range(256)]

    def decode(self, ids: Iterable[int]) -> bytes:
        return bytes(int(i) for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seen": np.flatnonzero(self.seen).tolist()}


class BPETokenizer(ByteTokenizer):
    """A byte-level BPE (the ``tokenizers`` library) trained on the training text; ``vocab_size`` ids, the 256 bytes
    among them, so any bytes still encode. Serialised as its JSON, which the model file carries."""

    kind = "bpe"

    def __init__(self, tokenizer, seen: Iterable[int] | None = None) -> None:
        super().__init__(seen)
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        table = [b""] * len(vocab)
        for piece, index in vocab.items():
            table[index] = bytes(_TO_BYTE[c] for c in piece)
        self._bytes = table

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @classmethod
    def train(cls, data: bytes, vocab_size: int | None = 512) -> "BPETokenizer":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise InputError(f"a BPE vocabulary needs more than the 256 bytes: vocab_size must be >= 257, "
                             f"got {vocab_size!r}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=_ALPHABET, show_progress=False,
                                      special_tokens=[])
        tokenizer.train_from_iterator(_mapped_lines(data), trainer)
        return cls(tokenizer, ByteTokenizer.train(data).seen)

    def encode(self, text: str | bytes) -> np.ndarray:
        lines = _mapped_lines(as_bytes(text))
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(lines)]
        return np.fromiter((i for row in ids for i in row), dtype=np.int64)

    def token_bytes(self) -> list[bytes]:
        return list(self._bytes)

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._bytes[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "tokenizer": json.loads(self.tokenizer.to_str())}


def _mapped_lines(data: bytes) -> list[str]:
    """``data`` in the byte alphabet, cut after each newline (pieces never cross a newline, so nothing is lost by
    encoding lines independently; batches of lines encode in parallel)."""
    text = "".join(map(_TO_CHAR.__getitem__, data))
    lines = text.split("Ċ")
    return [line + "Ċ" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def make_tokenizer(kind: str, data: bytes, vocab_size: int) -> ByteTokenizer:
    """A tokenizer of ``kind`` ("byte" or "bpe") trained on ``data``."""
    return {"byte": ByteTokenizer, "bpe": BPETokenizer}[kind].train(data, vocab_size)


def tokenizer_from_dict(config: dict) -> ByteTokenizer:
    """The tokenizer :meth:`ByteTokenizer.to_dict` described."""
    if config["kind"] == "byte":
        return ByteTokenizer(_mask(config["seen"]))
    if config["kind"] == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(json.dumps(config["tokenizer"])), _mask(config["seen"]))
    raise ValueError(f"unknown tokenizer kind {config['kind']!r}")


def _mask(seen: list[int]) -> np.ndarray:
    mask = np.zeros(256, dtype=bool)
    mask[np.asarray(seen, dtype=np.int64)] = True
    return mask


class TextStream:
    """Decodes token ids to text as they come, holding back an incomplete UTF-8 character until it is complete
    (an invalid byte becomes U+FFFD)."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self.table = tokenizer.token_bytes()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.table[token])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
