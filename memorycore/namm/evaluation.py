"""Presses side by side on a task: held-out score, the share of the cache each keeps, tokens/s.

What ``lm namm evaluate`` prints and bench/namm.py measures. Tasks by name (:func:`make_task`) for a token model of
``vocab_size`` ids; :func:`compare_presses` runs every press on the same examples, fed in pieces of the press
interval (the full cache too, so that tokens/s compare like with like).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from memorycore.attention import KVCache, SlidingWindowAttention
from memorycore.errors import InputError
from memorycore.namm.evolution import NAMMTask
from memorycore.namm.press import Press
from memorycore.namm.tasks import AnswerTask, LossTask, feed_tokens, model_device

TASKS = ("passkey", "needle", "mk-niah", "mqar", "lm-loss")
MK_NIAH_NEEDLES = 4


def make_task(name: str, *, seq_len: int, vocab_size: int, tokens: Tensor | None = None) -> NAMMTask:
    """The task ``name`` over sequences of ``seq_len`` tokens for a model of ``vocab_size`` ids.

    ``passkey``, ``needle`` and ``mk-niah`` (4 needles, one asked for) are :mod:`memorycore.tasks`' generators,
    ``mqar`` is :func:`memorycore.mqar.mqar_batch` with ``seq_len / 8`` pairs (it needs ``vocab_size > seq_len``),
    ``lm-loss`` windows of ``tokens`` (a tokenised text). A task the vocabulary cannot hold raises an InputError.
    """
    from memorycore.mqar import mqar_batch
    from memorycore.tasks import needle_batch, passkey_batch, token_ranges

    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; pick one of {', '.join(TASKS)}")
    if name == "lm-loss":
        if tokens is None:
            raise InputError("the lm-loss task needs a text to score (--data): windows of it are read under the press")
        return LossTask(torch.as_tensor(tokens, dtype=torch.long), seq_len)
    if name == "mqar":
        if vocab_size <= seq_len:
            raise InputError(f"mqar needs a vocabulary larger than the sequence: the model has {vocab_size} ids and "
                             f"the sequences {seq_len} tokens; use a shorter --seq-len or another task")
        pairs = min(max(1, seq_len // 8), vocab_size // 2 - 1)
        make_batch = partial(mqar_batch, seq_len=seq_len, num_pairs=pairs, vocab_size=vocab_size)
    else:
        token_ranges(vocab_size)  # a vocabulary too small for needles, keys and values: an InputError
        if name == "passkey":
            make_batch = partial(passkey_batch, seq_len=seq_len, vocab_size=vocab_size)
        else:
            needles = MK_NIAH_NEEDLES if name == "mk-niah" else 1
            make_batch = partial(needle_batch, seq_len=seq_len, vocab_size=vocab_size, num_needles=needles)
    make_batch(1, random_state=0)  # settings the generator refuses (too short a sequence, ...) fail here
    return AnswerTask(make_batch)


def check_pressable(model: nn.Module, what: str = "the model") -> None:
    """An InputError unless ``model`` holds an attention cache a press can act on."""
    if not any(isinstance(module, SlidingWindowAttention) for module in model.modules()):
        raise InputError(f"{what} has no attention cache to press (no attention layer: variants lmm and ramnet); "
                         "use a model of variant attention, swa, mac, mag or mal")


@dataclass
class PressResult:
    """One press on one task: mean score, the largest cache it held between pieces (entries per example, and their
    share of the full cache's) and tokens per second reading the examples (and decoding after one of them)."""

    name: str
    score: float
    cache_entries: float
    kept: float
    tokens_per_second: float
    decode_tokens_per_second: float | None = None


def compare_presses(model: nn.Module, task: NAMMTask, presses: dict[str, Press | None], *, interval: int,
                    examples: int = 32, batch_size: int = 8, seed: int = 0,
                    decode_tokens: int = 0) -> list[PressResult]:
    """Score ``model`` on the same ``examples`` of ``task`` under each press (None: the full cache).

    Every press reads the examples in pieces of ``interval`` tokens (the full cache too). ``cache_entries`` is the
    largest cache held between pieces (summed over layers, heads and the batch; the cache at the end for attention,
    MAC emptying its own at every segment's end), per example; ``kept`` is its share of the full cache's. With ``decode_tokens``, each press
    also decodes that many tokens greedily after the first example's sequence, one at a time (tokens/s of decoding).
    """
    if not (dataclasses.is_dataclass(task) and hasattr(task, "logits")):
        raise InputError(f"compare_presses runs tasks that read the model through a `logits` field (AnswerTask, "
                         f"LossTask), got {type(task).__name__}")
    generator = torch.Generator().manual_seed(seed)
    batches = [task.sample(min(batch_size, examples - start), generator) for start in range(0, examples, batch_size)]
    training = model.training
    model.eval()
    results = []
    try:
        for name, press in presses.items():
            reader = _Reader(interval)
            measured = dataclasses.replace(task, logits=reader)
            scores, began = [], time.perf_counter()
            with torch.no_grad(), _applied(press, model):
                for batch in batches:
                    scores.append(torch.as_tensor(measured.score(model, batch), dtype=torch.float64).flatten())
                seconds = time.perf_counter() - began
                decode = _decode_speed(model, batches[0], interval, decode_tokens) if decode_tokens else None
            results.append(PressResult(name, float(torch.cat(scores).mean()), reader.entries / examples, math.nan,
                                       reader.tokens / seconds, decode))
    finally:
        model.train(training)
    full = next((r.cache_entries for r in results if presses[r.name] is None), None)
    full = full if full is not None else _full_entries(model, task, batches, interval)
    for result in results:
        result.kept = result.cache_entries / full if full else math.nan
    return results


def cache_entries(state: Any) -> int:
    """Valid entries of every KV cache inside a model's state (summed over layers, batch and heads)."""
    if isinstance(state, KVCache):
        return int(state.valid.sum())
    if isinstance(state, (tuple, list)):
        return sum(cache_entries(part) for part in state)
    return 0


class _Reader:
    """A task's ``logits``: feeds the model in pieces of ``interval``, counting tokens and the largest cache held
    between pieces (the cache at the end for attention; MAC empties its cache at every segment's end)."""

    def __init__(self, interval: int) -> None:
        self.interval, self.tokens, self.entries = interval, 0, 0

    def __call__(self, model: nn.Module, inputs: Tensor) -> Tensor:
        sizes = []
        logits, _ = feed_tokens(model, inputs.to(model_device(model)), self.interval,
                                lambda state: sizes.append(cache_entries(state)))
        self.tokens += inputs.numel()
        self.entries += max(sizes)
        return logits


def _applied(press: Press | None, model: nn.Module):
    from contextlib import nullcontext

    return nullcontext() if press is None else press(model)


def _full_entries(model: nn.Module, task: NAMMTask, batches: list, interval: int) -> int:
    reader = _Reader(interval)
    with torch.no_grad():
        for batch in batches:
            dataclasses.replace(task, logits=reader).score(model, batch)
    return reader.entries / sum(len(_inputs(batch)) for batch in batches)


def _inputs(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _decode_speed(model: nn.Module, batch, interval: int, tokens: int) -> float:
    """Greedy decoding after the first sequence of ``batch``, tokens per second."""
    prompt = _inputs(batch)[:1].to(model_device(model))
    logits, state = feed_tokens(model, prompt, interval)
    began = time.perf_counter()
    for _ in range(tokens):
        logits, state = model(logits[:, -1:].argmax(-1), state)
    return tokens / (time.perf_counter() - began)
