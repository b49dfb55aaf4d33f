"""Tasks :func:`memorycore.namm.fit_namm` evolves a scorer on: retrieval answers and language-model loss.

Both run a token model through :func:`model_logits`, which feeds the prompt in pieces of the enclosing press's
``interval`` (so the press acts along it, as NAMM): a Hugging Face causal LM through :class:`HFSession`, our models
as ``model(tokens, state) -> (logits, state)`` with the state carried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memorycore.errors import InputError
from memorycore.namm.hf import HFSession
from memorycore.namm.press import _is_hugging_face

IGNORE_INDEX = -100
Batch = tuple[Tensor, Tensor]


@torch.no_grad()
def model_logits(model: nn.Module, inputs: Tensor) -> Tensor:
    """Logits ``[b, t, vocab]`` of a token model on ``inputs [b, t]``, with the press of an enclosing ``with`` block.

    Under a press, our models (``model(tokens, state) -> (logits, state)``, as :class:`memorycore.lm.model.TitansLM`)
    are fed in pieces of the press's interval with their state carried, so that the press acts along the prompt.
    """
    if _is_hugging_face(model):
        return HFSession(model).forward(inputs.to(model.device))
    inputs = inputs.to(model_device(model))  # tasks draw their examples on the CPU
    press = getattr(model, "_memorycore_press", None)
    if press is None:
        return _logits(model(inputs))
    return feed_tokens(model, inputs, press.interval)[0]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def feed_tokens(model: nn.Module, inputs: Tensor, piece: int,
                on_state: Callable[[Any], None] | None = None) -> tuple[Tensor, Any]:
    """``(logits [b, t, vocab], state)`` of one of our token models (``model(tokens, state) -> (logits, state)``)
    fed ``inputs [b, t]`` in pieces of ``piece`` tokens with its state carried (``on_state`` sees it after each)."""
    state, pieces = None, []
    for chunk in inputs.split(piece, dim=1):
        logits, state = model(chunk, state)
        pieces.append(logits)
        if on_state is not None:
            on_state(state)
    return torch.cat(pieces, dim=1), state


def _logits(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else getattr(output, "logits", output)


@dataclass
class AnswerTask:
    """Teacher-forced retrieval: the share of each example's answer tokens the model predicts (its argmax).

    Parameters
    ----------
    make_batch : callable
        ``make_batch(num_examples, random_state=generator) -> (inputs, labels)``, labels holding each answer token at
        the position that predicts it and -100 elsewhere: :func:`memorycore.tasks.passkey_batch`,
        :func:`~memorycore.tasks.needle_batch` or :func:`memorycore.mqar.mqar_batch` with their settings bound.
    logits : callable, default :func:`model_logits`

    Examples
    --------
    >>> from memorycore.tasks import passkey_batch
    >>> task = AnswerTask(partial(passkey_batch, seq_len=2048, vocab_size=256))
    """

    make_batch: Callable[..., Batch]
    logits: Callable[[nn.Module, Tensor], Tensor] = model_logits

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self.make_batch(batch_size, random_state=generator)

    def score(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, labels = batch
        predicted = self.logits(model, inputs).argmax(-1).cpu()
        answers = labels != IGNORE_INDEX
        return ((predicted == labels) & answers).sum(1) / answers.sum(1).clamp_min(1)


def passkey_task(seq_len: int, **options) -> AnswerTask:
    """Passkey retrieval over ``seq_len`` tokens (options of :func:`memorycore.tasks.passkey_batch`)."""
    from memorycore.tasks import passkey_batch

    return AnswerTask(partial(passkey_batch, seq_len=seq_len, **options))


def needle_task(seq_len: int, **options) -> AnswerTask:
    """Needle in a haystack over ``seq_len`` tokens (options of :func:`memorycore.tasks.needle_batch`)."""
    from memorycore.tasks import needle_batch

    return AnswerTask(partial(needle_batch, seq_len=seq_len, **options))


@dataclass
class LossTask:
    """Language modelling on a long text: windows of ``seq_len`` tokens at random offsets; an example's score is
    ``exp(-mean loss)`` over its last ``scored`` tokens (1 / perplexity: higher is better, and the ratio to the full
    cache's score is a ratio of perplexities).

    Parameters
    ----------
    tokens : Tensor [n] int64
        The text, tokenised.
    seq_len : int
        Tokens per window.
    scored : int, optional
        Tokens at each window's end whose loss counts (default the second half: where the cache is long).
    logits : callable, default :func:`model_logits`
    """

    tokens: Tensor
    seq_len: int
    scored: int | None = None
    logits: Callable[[nn.Module, Tensor], Tensor] = model_logits

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or len(self.tokens) <= self.seq_len:
            raise InputError(f"the text needs more than seq_len={self.seq_len} tokens in one dimension, got "
                             f"{list(self.tokens.shape)}; use a longer text or a shorter seq_len")
        self.scored = self.scored or self.seq_len // 2
        if not 1 <= self.scored < self.seq_len:
            raise InputError(f"scored must be in [1, seq_len), got {self.scored}")

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (batch_size,), generator=generator)
        return torch.stack([self.tokens[start:start + self.seq_len + 1] for start in starts.tolist()])

    def score(self, model: nn.Module, batch: Tensor) -> Tensor:
        logits = self.logits(model, batch[:, :-1])[:, -self.scored:].float().cpu()
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, -self.scored:], reduction="none").mean(1)
        return torch.exp(-loss.clamp_max(math.log(1e30)))
