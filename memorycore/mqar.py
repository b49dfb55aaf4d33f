"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023): the synthetic recall task for memory layers.

A sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from [1, V/2), values from [V/2, V),
distinct within a sequence); afterwards every key appears once more, at an even offset after the pairs, and the model
must predict its value at that position. Gaps follow p(i) ~ a i^(a-1) (a = 0.01), so most queries come soon after the
pairs and a few far away. Labels are -100 (ignored) everywhere but at the queries; the other positions hold random
tokens (or 0). The metric is the accuracy over the labelled positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memorycore.errors import InputError

IGNORE_INDEX = -100
#: The Zoology training mixture, (sequence length, key-value pairs).
ZOOLOGY_TRAIN_MIXTURE: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
#: The 7 Zoology test settings, 1000 sequences each.
ZOOLOGY_TEST_SETTINGS: tuple[tuple[int, int], ...] = (
    (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256),
)


def _generator(random_state: int | torch.Generator | None) -> torch.Generator:
    if isinstance(random_state, torch.Generator):
        return random_state
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(2**62, ()).item()) if random_state is None else int(random_state))
    return generator


def _check_setting(seq_len: int, num_pairs: int, vocab_size: int, num_examples: int) -> None:
    if num_examples < 1 or num_pairs < 1:
        raise InputError(f"num_examples and num_pairs must be >= 1, got {num_examples} and {num_pairs}")
    if seq_len % 2:
        raise InputError(f"seq_len must be even (queries sit at even offsets), got {seq_len}")
    if 4 * num_pairs > seq_len:
        raise InputError(f"seq_len={seq_len} is too short for {num_pairs} pairs and their queries; "
                         f"use seq_len >= {4 * num_pairs} or fewer pairs")
    if vocab_size <= seq_len:
        raise InputError(f"vocab_size={vocab_size} must be larger than seq_len={seq_len}")


def _distinct_tokens(num_examples: int, low: int, high: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct tokens from [low, high) per example (the indices of the largest uniform draws)."""
    scores = torch.rand(num_examples, high - low, generator=generator)
    return scores.topk(count, dim=-1).indices + low


def mqar_batch(
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    *,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_filler: bool = True,
    random_state: int | torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw MQAR sequences.

    Parameters
    ----------
    num_examples : int
        Sequences to draw.
    seq_len : int
        L, even, with ``4 * num_pairs <= L < vocab_size``.
    num_pairs : int
        N, key-value pairs per sequence (each one is queried once).
    vocab_size : int, default 8192
        V; keys come from [1, V/2) and values from [V/2, V).
    power_a : float, default 0.01
        a in p(gap = i) ~ a i^(a - 1); small a spreads the queries over the whole sequence.
    random_filler : bool, default True
        Fill the positions between queries with random tokens (Zoology's default) instead of 0.
    random_state : int, torch.Generator or None
        Seed or generator; the same seed gives the same sequences.

    Returns
    -------
    inputs : Tensor [num_examples, seq_len] int64
    labels : Tensor [num_examples, seq_len] int64
        The value at each query position, ``IGNORE_INDEX`` (-100) elsewhere.

    Examples
    --------
    >>> inputs, labels = mqar_batch(2, 64, 4, random_state=0)
    >>> inputs.shape, int((labels != -100).sum())
    (torch.Size([2, 64]), 8)
    """
    _check_setting(seq_len, num_pairs, vocab_size, num_examples)
    if not power_a > 0:
        raise InputError(f"power_a must be > 0, got {power_a}")
    generator = _generator(random_state)
    half = vocab_size // 2
    keys = _distinct_tokens(num_examples, 1, half, num_pairs, generator)
    values = _distinct_tokens(num_examples, half, vocab_size, num_pairs, generator)
    context = 2 * num_pairs

    # Query offsets: num_pairs distinct gaps from p(i) ~ a i^(a-1), i = 1..space, sampled without replacement by
    # the Gumbel top-k trick (equal in law to drawing one by one and renormalising).
    space = (seq_len - context) // 2
    steps = torch.arange(1, space + 1, dtype=torch.float64)
    log_p = (power_a - 1) * torch.log(steps)
    uniform = torch.rand(num_examples, space, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    gaps = (log_p - torch.log(-torch.log(uniform))).topk(num_pairs, dim=-1).indices  # 0-based gap i - 1
    query_positions = context + 2 * gaps

    if random_filler:
        inputs = torch.randint(vocab_size, (num_examples, seq_len), generator=generator)
    else:
        inputs = torch.zeros(num_examples, seq_len, dtype=torch.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, query_positions, keys)
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.int64)
    labels.scatter_(1, query_positions, values)
    return inputs, labels


def mqar_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Accuracy of ``logits [..., seq_len, vocab]`` over the labelled positions of ``labels [..., seq_len]``."""
    mask = labels != IGNORE_INDEX
    if not bool(mask.any()):
        raise InputError("labels hold no query position (all are -100); nothing to score")
    return float((logits.argmax(-1)[mask] == labels[mask]).float().mean())


__all__ = ["mqar_batch", "mqar_accuracy", "ZOOLOGY_TRAIN_MIXTURE", "ZOOLOGY_TEST_SETTINGS", "IGNORE_INDEX"]
