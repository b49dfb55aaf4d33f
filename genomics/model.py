"""The DNA classification network: base embedding, a convolution + max-pool stem, NeuralMemory blocks, pooling, a head.

Shapes (einops legend): b batch, t time (bases, or stem positions after the stem), d model width, k classes.

Sequences arrive right-padded with token 0. Every operation keeps padding harmless: the memory is causal, so the
padding after a sequence never reaches its real positions; the backward direction and the reverse-complement strand
reverse each sequence *within its own length*, so padding stays at the end there too; pooling averages real positions
only. A prediction therefore does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genomics.data import PAD, VOCAB_SIZE
from memorycore import NeuralMemory

# Token complement, as in genomics.data: pad->pad, A<->T, C<->G, N->N.
_COMPLEMENT = (PAD, 4, 3, 2, 1, 5)


def reverse_index(lengths: Tensor, time: int) -> Tensor:
    """Index ``[b, t]`` that reverses each row within its length and leaves the padding in place (an involution)."""
    positions = torch.arange(time, device=lengths.device).expand(len(lengths), time)
    lengths = lengths[:, None]
    return torch.where(positions < lengths, lengths - 1 - positions, positions)


def reverse_complement_batch(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Reverse complement of right-padded token rows ``[b, t]`` (padding stays at the end)."""
    complement = torch.tensor(_COMPLEMENT, dtype=tokens.dtype, device=tokens.device)
    return complement[tokens.gather(1, reverse_index(lengths, tokens.shape[1]))]


def padding_mask(lengths: Tensor, time: int) -> Tensor:
    """``[b, t]`` True on real positions."""
    return torch.arange(time, device=lengths.device)[None, :] < lengths[:, None]


class MemoryBlock(nn.Module):
    """Pre-norm residual block: NeuralMemory (one or both directions), then a feed-forward layer."""

    def __init__(self, dim: int, *, heads: int, memory_depth: int, chunk_size: int, memory_lr: float,
                 bidirectional: bool, dropout: float) -> None:
        super().__init__()
        memory = dict(heads=heads, depth=memory_depth, chunk_size=chunk_size, max_lr=memory_lr)
        self.memory_norm = nn.LayerNorm(dim)
        self.forward_memory = NeuralMemory(dim, **memory)
        self.backward_memory = NeuralMemory(dim, **memory) if bidirectional else None
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, backward_index: Tensor) -> Tensor:
        h = self.memory_norm(x)
        y, _ = self.forward_memory(h)
        if self.backward_memory is not None:
            index = backward_index[..., None].expand_as(h)
            y_backward, _ = self.backward_memory(h.gather(1, index))
            y = y + y_backward.gather(1, index)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class DNANetwork(nn.Module):
    """Token ids ``[b, t]`` and lengths ``[b]`` -> class logits ``[b, k]``.

    Parameters
    ----------
    num_classes : int
    dim : int
        Model width.
    blocks : int
        Number of memory blocks.
    heads, memory_depth, chunk_size : int
        NeuralMemory settings (``memory_depth`` is the depth of each head's memory MLP).
    memory_lr : float
        Upper bound of the memory's inner learning rate theta (NeuralMemory's ``max_lr``). A depth-2 memory whose
        inner step reaches ~0.03-0.06 can diverge within one sequence (weights beyond 1e18, then NaN gradients), so
        the default keeps theta at or below 0.02.
    stem_kernel, stem_stride : int
        The stem is a convolution ``stem_kernel`` bases wide at every base (a motif detector that does not care
        where the motif sits), then a max-pool over ``stem_stride`` bases that shortens what the memory must read.
    bidirectional : bool
        Each block also reads the sequence backwards with a second memory.
    reverse_complement : bool
        Also read the reverse-complement strand with the same weights and average the pooled features of both
        strands, so a sequence and its reverse complement get the same prediction.
    dropout : float
    """

    def __init__(self, num_classes: int, *, dim: int = 64, blocks: int = 2, heads: int = 4, memory_depth: int = 2,
                 chunk_size: int = 16, memory_lr: float = 0.02, stem_kernel: int = 12, stem_stride: int = 4,
                 bidirectional: bool = True, reverse_complement: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        if stem_kernel < 1 or stem_stride < 1:
            raise ValueError(f"stem_kernel and stem_stride must be >= 1, got {stem_kernel} and {stem_stride}")
        self.stem_kernel, self.stem_stride, self.reverse_complement = stem_kernel, stem_stride, reverse_complement
        self.embedding = nn.Embedding(VOCAB_SIZE, dim, padding_idx=PAD)
        self.stem = nn.Conv1d(dim, dim, stem_kernel)
        self.blocks = nn.ModuleList(
            MemoryBlock(dim, heads=heads, memory_depth=memory_depth, chunk_size=chunk_size, memory_lr=memory_lr,
                        bidirectional=bidirectional, dropout=dropout)
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Class logits ``[b, k]`` of right-padded ``tokens [b, t]`` with ``lengths [b]`` real bases each."""
        features = self.features(tokens, lengths)
        if self.reverse_complement:
            features = 0.5 * (features + self.features(reverse_complement_batch(tokens, lengths), lengths))
        return self.head(features)

    def stem_features(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Convolution at every base, then max over windows of ``stem_stride`` real bases: ``[b, ceil(t / s), d]``."""
        left = (self.stem_kernel - 1) // 2
        x = self.stem(F.pad(x.transpose(1, 2), (left, self.stem_kernel - 1 - left))).transpose(1, 2)
        x = F.gelu(x).masked_fill(~padding_mask(lengths, x.shape[1])[..., None], float("-inf"))
        pooled = F.max_pool1d(x.transpose(1, 2), self.stem_stride, ceil_mode=True).transpose(1, 2)
        stem_lengths = torch.div(lengths + self.stem_stride - 1, self.stem_stride, rounding_mode="floor")
        # Windows made only of padding pooled to -inf; zero them so they stay finite (they are masked later anyway).
        return pooled.masked_fill(~padding_mask(stem_lengths, pooled.shape[1])[..., None], 0.0), stem_lengths

    def features(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Pooled sequence representation ``[b, 2 d]``: mean and max over the real positions."""
        x = self.embedding(tokens)  # [b, t, d]; padding embeds to zero
        x, stem_lengths = self.stem_features(x, lengths)
        backward_index = reverse_index(stem_lengths, x.shape[1])
        for block in self.blocks:
            x = block(x, backward_index)
        x = self.norm(x)
        mask = padding_mask(stem_lengths, x.shape[1])[..., None]
        mean = (x * mask).sum(1) / stem_lengths.clamp(min=1)[:, None].to(x.dtype)
        maximum = x.masked_fill(~mask, float("-inf")).amax(1)
        return torch.cat([mean, maximum], dim=-1)
