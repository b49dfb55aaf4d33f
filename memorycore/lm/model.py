"""The language-model network: token embedding, a Titans backbone and an output head tied to the embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memorycore.errors import InputError
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
