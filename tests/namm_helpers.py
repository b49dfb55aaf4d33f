"""Small models and a toy task for the NAMM tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memorycore.attention import SlidingWindowAttention


class Stack(nn.Module):
    """A residual stack of attention layers mapping ``x [b, t, dim]`` to ``(y, states)``."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 4, kv_heads: int = 2, window: int | None = None,
                 rope: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SlidingWindowAttention(dim, heads=heads, kv_heads=kv_heads, window=window,
                                                           rope=rope) for _ in range(depth))

    def forward(self, x: Tensor, states: list | None = None) -> tuple[Tensor, list]:
        states = states or [None] * len(self.layers)
        new_states = []
        for layer, state in zip(self.layers, states):
            y, state = layer(x, state)
            x = x + y
            new_states.append(state)
        return x, new_states


def run_in_pieces(model: nn.Module, x: Tensor, piece: int) -> tuple[Tensor, list]:
    states, outputs = None, []
    for chunk in x.split(piece, dim=1):
        y, states = model(chunk, states)
        outputs.append(y)
    return torch.cat(outputs, dim=1), states


class PlantedTokenTask:
    """The answer is known: keep the one token every query attends to (planted between positions 16 and 24 of 64)
    and evict the rest. Score = (planted token still cached in every head) * (1 + evicted share of the cache)."""

    dim, length, piece = 8, 64, 16

    def model(self) -> nn.Module:
        layer = SlidingWindowAttention(self.dim, heads=2, window=None, rope=False)
        with torch.no_grad():
            for linear in (layer.to_q, layer.to_kv, layer.to_out):
                linear.weight.zero_()
            # every query points at direction 0 (feature 0 is a constant 1); only the planted token's key does
            layer.to_q.weight[0, 0] = layer.to_q.weight[4, 0] = 4.0
            layer.to_kv.weight[0, 1] = layer.to_kv.weight[4, 1] = 4.0
        return _Single(layer)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = 0.1 * torch.randn(batch_size, self.length, self.dim, generator=generator)
        x[..., 0] = 1.0
        planted = torch.randint(16, 24, (batch_size,), generator=generator)
        x[torch.arange(batch_size), planted, 1] = 3.0
        return x, planted

    def score(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, planted = batch
        _, states = run_in_pieces(model, x, self.piece)
        cache = states[0].cache
        kept = (cache.valid & (cache.positions == planted[:, None, None])).any(-1).all(-1)
        evicted = 1 - cache.lengths.float().mean(-1) / self.length
        return kept.float() * (1 + evicted)


class _Single(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, x: Tensor, states: list | None = None) -> tuple[Tensor, list]:
        y, state = self.layers[0](x, None if states is None else states[0])
        return y, [state]
