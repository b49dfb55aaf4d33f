"""``MemoryBlock``: the pre-norm residual block around a memory layer that the applications stack."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class MemoryBlock(nn.Module):
    """``x + dropout(memory(LN(x)))``, then ``x + dropout(mixer(LN(x)))`` when a mixer is given.

    ``memory`` is any sequence layer with the library's contract, ``y, state = memory(x, state)`` (NeuralMemory,
    RAMNet); the block carries its state the same way. ``mixer`` maps ``[batch, time, dim]`` to the same shape (a
    feed-forward layer, an FFT mixer). With ``backward_memory`` the block also reads the sequence backwards with
    that second memory and adds its read to the forward one; that read needs the whole sequence, so only the
    forward memory's state is carried.

    Examples
    --------
    >>> import torch
    >>> from memorycore import NeuralMemory
    >>> block = MemoryBlock(32, NeuralMemory(32, heads=2, chunk_size=8), mixer=torch.nn.Linear(32, 32))
    >>> y, state = block(torch.randn(2, 16, 32))
    >>> y.shape
    torch.Size([2, 16, 32])
    """

    def __init__(self, dim: int, memory: nn.Module, mixer: nn.Module | None = None, *,
                 backward_memory: nn.Module | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        # the attribute order is the parameters' order (what the optimiser and checkpoints see): keep it
        self.memory_norm = nn.LayerNorm(dim)
        self.memory = memory
        self.backward_memory = backward_memory
        self.mixer_norm = nn.LayerNorm(dim) if mixer is not None else None
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, state: Any = None, *, backward_index: Tensor | None = None) -> tuple[Tensor, Any]:
        """``(y [batch, time, dim], state)``.

        ``backward_index [batch, time]`` orders each row for the backward memory (for right-padded rows: reversed
        within each row's length, padding left in place); default: the whole row reversed.
        """
        h = self.memory_norm(x)
        read, state = self.memory(h, state)
        if self.backward_memory is not None:
            if backward_index is None:
                backward_index = torch.arange(x.shape[1] - 1, -1, -1, device=x.device).expand(x.shape[:2])
            index = backward_index[..., None].expand_as(h)
            backward_read, _ = self.backward_memory(h.gather(1, index))
            read = read + backward_read.gather(1, index)
        x = x + self.dropout(read)
        if self.mixer is not None:
            x = x + self.dropout(self.mixer(self.mixer_norm(x)))
        return x, state
