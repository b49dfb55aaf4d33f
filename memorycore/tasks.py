"""Long-context retrieval tasks on integer token ids: passkey retrieval and needle-in-a-haystack (RULER's S-NIAH
and MK-NIAH rules), for tests, benchmarks and evolving KV-cache presses. No tokenizer is needed.

A sequence is a haystack of filler tokens with needles ``NEEDLE key v_1 ... v_n`` at chosen depths, and ends with the
question ``QUERY key ANSWER v_1 ... v_n`` about one of them. The answer tokens are part of the input (teacher
forcing), and ``labels`` hold each answer token at the position that must predict it (the one before it, as a
language model's targets), ``IGNORE_INDEX`` elsewhere. Passkey retrieval is the single needle with one fixed key.

Token layout for a vocabulary of V: 0 is unused, 1 ``NEEDLE``, 2 ``QUERY``, 3 ``ANSWER``; keys come from
``[4, 4 + K)`` with ``K = (V / 2 - 4) / 4``, filler from ``[4 + K, V / 2)`` and answer values from ``[V / 2, V)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memorycore.errors import InputError
from memorycore.mqar import IGNORE_INDEX, _generator

NEEDLE, QUERY, ANSWER = 1, 2, 3
FIRST_KEY = 4
MIN_VOCAB = 32


def token_ranges(vocab_size: int) -> dict[str, tuple[int, int]]:
    """The ``[low, high)`` token ranges of keys, filler and values for a vocabulary of ``vocab_size``."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise InputError(f"vocab_size must be an integer >= {MIN_VOCAB}, got {vocab_size!r}")
    half = vocab_size // 2
    keys = (half - FIRST_KEY) // 4
    return {"keys": (FIRST_KEY, FIRST_KEY + keys), "filler": (FIRST_KEY + keys, half), "values": (half, vocab_size)}


def needle_batch(
    num_examples: int,
    seq_len: int,
    *,
    num_needles: int = 1,
    value_len: int = 4,
    vocab_size: int = 256,
    depth: float | None = None,
    filler: str = "random",
    fixed_key: bool = False,
    random_state: int | torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw needle-in-a-haystack sequences.

    Parameters
    ----------
    num_examples : int
    seq_len : int
        Tokens per sequence, question and answer included.
    num_needles : int, default 1
        Needles per sequence with distinct keys; one is asked for, the others are distractors (MK-NIAH when > 1).
    value_len : int, default 4
        Tokens of each needle's value.
    vocab_size : int, default 256
    depth : float in [0, 1], optional
        Where the asked needle sits in the haystack (0 first, 1 last). Default: spread evenly over the examples.
        Distractors sit at random depths.
    filler : {"random", "repeat"}
        The haystack: random filler tokens, or one random phrase of 16 filler tokens repeated (passkey's style).
    fixed_key : bool, default False
        Every needle of every example uses the first key (passkey retrieval; needs ``num_needles=1``).
    random_state : int, torch.Generator or None

    Returns
    -------
    inputs : Tensor [num_examples, seq_len] int64
    labels : Tensor [num_examples, seq_len] int64
        Each answer token at the position before it; ``IGNORE_INDEX`` (-100) elsewhere.

    Examples
    --------
    >>> inputs, labels = needle_batch(4, 128, random_state=0)
    >>> int((labels != -100).sum(1)[0])   # the value's four tokens
    4
    """
    ranges = token_ranges(vocab_size)
    needle_len, question_len = 2 + value_len, 3 + value_len
    _check(num_examples, seq_len, num_needles, value_len, depth, filler, fixed_key, needle_len, question_len)
    key_low, key_high = ranges["keys"]
    if num_needles > key_high - key_low:
        raise InputError(f"{num_needles} needles need as many distinct keys; vocab_size={vocab_size} has "
                         f"{key_high - key_low}: use fewer needles or a larger vocabulary")
    generator = _generator(random_state)
    haystack_len = seq_len - question_len
    inputs = _haystack(num_examples, haystack_len, ranges["filler"], filler, generator)

    if fixed_key:
        keys = torch.full((num_examples, 1), key_low)
    else:
        keys = torch.rand(num_examples, key_high - key_low, generator=generator).topk(num_needles, -1).indices
        keys = keys + key_low
    low, high = ranges["values"]
    values = torch.randint(low, high, (num_examples, num_needles, value_len), generator=generator)
    starts = _needle_starts(num_examples, haystack_len, num_needles, needle_len, depth, generator)
    for needle in range(num_needles):
        span = starts[:, needle, None] + torch.arange(needle_len)
        content = torch.cat([torch.full((num_examples, 1), NEEDLE), keys[:, needle, None], values[:, needle]], 1)
        inputs.scatter_(1, span, content)

    question = torch.cat([torch.full((num_examples, 1), QUERY), keys[:, :1], torch.full((num_examples, 1), ANSWER),
                          values[:, 0]], dim=1)  # needle 0 is the one asked for
    inputs = torch.cat([inputs, question], dim=1)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, seq_len - value_len - 1:seq_len - 1] = values[:, 0]
    return inputs, labels


def passkey_batch(num_examples: int, seq_len: int, *, value_len: int = 5, vocab_size: int = 256,
                  depth: float | None = None, random_state: int | torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Passkey retrieval: a repeated filler phrase, one pass key somewhere in it, then the question.

    The same as :func:`needle_batch` with one needle, a fixed key and a repeated haystack.
    """
    return needle_batch(num_examples, seq_len, value_len=value_len, vocab_size=vocab_size, depth=depth,
                        filler="repeat", fixed_key=True, random_state=random_state)


def answer_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of sequences whose every answer token is the argmax of ``logits [n, seq_len, vocab]``."""
    mask = labels != IGNORE_INDEX
    if not bool(mask.any()):
        raise InputError("labels hold no answer position (all are -100); nothing to score")
    correct = (logits.argmax(-1) == labels) | ~mask
    return float(correct.all(dim=1)[mask.any(dim=1)].float().mean())


def _haystack(num_examples: int, length: int, filler_range: tuple[int, int], filler: str,
              generator: torch.Generator) -> Tensor:
    low, high = filler_range
    if filler == "random":
        return torch.randint(low, high, (num_examples, length), generator=generator)
    phrase = torch.randint(low, high, (num_examples, 16), generator=generator)
    return phrase.repeat(1, length // 16 + 1)[:, :length].clone()


def _needle_starts(num_examples: int, haystack_len: int, num_needles: int, needle_len: int,
                   depth: float | None, generator: torch.Generator) -> Tensor:
    """Non-overlapping needle starts [n, num_needles]: the first at ``depth``, the others in random free places."""
    slots = haystack_len // needle_len  # needles sit on a grid of needle_len, so they never overlap
    if depth is None:
        depths = torch.linspace(0, 1, num_examples) if num_examples > 1 else torch.full((1,), 0.5)
    else:
        depths = torch.full((num_examples,), float(depth))
    asked = (depths * (slots - 1)).round().long()
    scores = torch.rand(num_examples, slots, generator=generator)
    scores[torch.arange(num_examples), asked] = -1.0  # the asked needle's slot is taken
    others = scores.topk(num_needles - 1, dim=-1).indices if num_needles > 1 else asked[:, None][:, :0]
    return torch.cat([asked[:, None], others], dim=1) * needle_len


def _check(num_examples: int, seq_len: int, num_needles: int, value_len: int, depth: float | None, filler: str,
           fixed_key: bool, needle_len: int, question_len: int) -> None:
    for name, value in (("num_examples", num_examples), ("seq_len", seq_len), ("num_needles", num_needles),
                        ("value_len", value_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if seq_len - question_len < num_needles * needle_len:
        raise InputError(f"seq_len={seq_len} is too short for {num_needles} needle(s) of {needle_len} tokens and a "
                         f"question of {question_len}; use seq_len >= {num_needles * needle_len + question_len}")
    if depth is not None and not 0 <= depth <= 1:
        raise InputError(f"depth must be in [0, 1] (0: first, 1: last), got {depth!r}")
    if filler not in ("random", "repeat"):
        raise InputError(f"filler must be 'random' or 'repeat', got {filler!r}")
    if fixed_key and num_needles > 1:
        raise InputError("fixed_key needs num_needles=1: distractors with the same key make the answer ambiguous")


__all__ = ["needle_batch", "passkey_batch", "answer_accuracy", "token_ranges", "NEEDLE", "QUERY", "ANSWER"]
