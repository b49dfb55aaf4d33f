"""The language-model network: token embedding, a Titans backbone and an output head tied to the embedding."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from memorycore.errors import InputError, TrainingError
from memorycore.titans import TitansConfig, TitansModel, TitansState


class TitansLM(nn.Module):
    """``tokens [batch, time] -> (logits [batch, time, vocab], TitansState)``; carry the state to decode.

    Parameters
    ----------
    vocab_size : int
    config : TitansConfig
        The backbone (:class:`memorycore.titans.TitansModel`).

    Examples
    --------
    >>> lm = TitansLM(256, TitansConfig(dim=64, depth=2, variant="mag", window=32))
    >>> logits, state = lm(torch.randint(0, 256, (1, 50)))
    >>> next_logits, state = lm(logits[:, -1:].argmax(-1), state)   # one more token, from the carried state
    """

    def __init__(self, vocab_size: int, config: TitansConfig) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise InputError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        self.vocab_size, self.config = vocab_size, config
        self.embedding = nn.Embedding(vocab_size, config.dim)
        self.backbone = TitansModel.from_config(config)
        nn.init.normal_(self.embedding.weight, std=1 / math.sqrt(config.dim))

    def forward(self, tokens: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        if tokens.ndim != 2:
            raise InputError(f"expected token ids of shape [batch, time], got {list(tokens.shape)}")
        hidden, state = self.backbone(self.embedding(tokens), state)
        return hidden @ self.embedding.weight.T, state  # the head shares the embedding's weights

    @torch.inference_mode()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield ``max_new_tokens`` sampled token ids after ``prompt [1, time]``, one at a time.

        The prompt is read once; every new token is one step from the carried state (a memory variant's time and
        memory per token stay constant; full attention's grow with its cache). Under a KV-cache press
        (``with press(model)``, :mod:`memorycore.namm`) the prompt is read in pieces of the press's interval, so that
        the press acts along it and the cache stays within its budget.
        """
        press = getattr(self, "_memorycore_press", None)
        state = None
        for piece in prompt.split(prompt.shape[1] if press is None else press.interval, dim=1):
            logits, state = self(piece, state)
        for index in range(max_new_tokens):
            if not torch.isfinite(logits[:, -1]).all():
                raise TrainingError(f"the logits became NaN or inf before generated token {index + 1}: the model's "
                                    "state diverged (e.g. a memory read far past the length it was trained on)")
            token = sample(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            yield int(token)
            if index + 1 < max_new_tokens:
                logits, state = self(token.view(1, 1), state)


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``logits [batch, vocab]``: the most likely at temperature 0, else drawn from the
    softmax at ``temperature`` restricted to the ``top_k`` most likely and to the smallest set whose probability
    reaches ``top_p`` (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(-1)
        outside = probabilities.cumsum(-1) - probabilities >= top_p  # the most likely token always stays
        logits = logits.scatter(-1, order, ordered.masked_fill(outside, -math.inf))
    probabilities = logits.softmax(-1)
    return torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
