"""The DNA classification network: base and k-mer embeddings, a convolution + max-pool stem, NeuralMemory blocks,
pooling, a head.

Shapes (einops legend): b batch, t time (bases, or stem positions after the stem), d model width, k classes.

Sequences arrive right-padded with token 0. Every operation keeps padding harmless: the memory is causal, so the
padding after a sequence never reaches its real positions; the backward direction and the reverse-complement strand
reverse each sequence *within its own length*, so padding stays at the end there too; k-mers that would reach into
the padding embed to zero; pooling averages real positions only. A prediction therefore does not depend on what else
is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genomics.data import ALPHABET, PAD, VOCAB_SIZE
from memorycore import NeuralMemory
from memorycore.blocks import MemoryBlock
from memorycore.config import config_from_params
from memorycore.errors import InputError

# Token complement, as in genomics.data: pad->pad, A<->T, C<->G, N->N.
_COMPLEMENT = (PAD, 4, 3, 2, 1, 5)
_N_TOKEN = ALPHABET.index("N") + 1


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


def memory_block(dim: int, *, heads: int, memory_depth: int, chunk_size: int, memory_lr: float,
                 memory_momentum: float | None, bidirectional: bool, dropout: float) -> MemoryBlock:
    """NeuralMemory (one or both directions), then a feed-forward layer, each pre-norm and residual."""
    memory = dict(heads=heads, depth=memory_depth, chunk_size=chunk_size, max_lr=memory_lr,
                  max_momentum=memory_momentum)
    forward_memory = NeuralMemory(dim, **memory)
    backward_memory = NeuralMemory(dim, **memory) if bidirectional else None
    mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
    return MemoryBlock(dim, forward_memory, mlp, backward_memory=backward_memory, dropout=dropout)


def upgrade_state_dict(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights saved before the blocks moved to :class:`memorycore.blocks.MemoryBlock` (memorycore 0.3.0), under
    this version's names: ``forward_memory`` -> ``memory``, ``mlp`` -> ``mixer``."""
    renames = ((".forward_memory.", ".memory."), (".mlp_norm.", ".mixer_norm."), (".mlp.", ".mixer."))
    upgraded = {}
    for key, value in tensors.items():
        if key.startswith("blocks."):
            for old, new in renames:
                key = key.replace(old, new)
        upgraded[key] = value
    return upgraded


class KmerEmbedding(nn.Module):
    """Sum of embeddings of the overlapping k-mers that start at each base, one table per k: ``[b, t, d]``.

    A k-mer holding an N gets its own "unknown" vector; positions whose k-mer would run past the sequence's end
    embed to zero. Mean-pooled, these vectors are a learned projection of the sequence's k-mer counts, the feature
    set of the classic k-mer baselines.
    """

    def __init__(self, sizes: tuple[int, ...], dim: int) -> None:
        super().__init__()
        if any(not 1 <= k <= 8 for k in sizes):
            raise InputError(f"k-mer sizes must be between 1 and 8, got {list(sizes)}")
        self.sizes = tuple(sizes)
        # Row 4**k: a k-mer with an N; row 4**k + 1: no k-mer (padding), kept at zero.
        self.tables = nn.ModuleList(nn.Embedding(4**k + 2, dim, padding_idx=4**k + 1) for k in self.sizes)
        for table in self.tables:
            nn.init.normal_(table.weight, std=len(self.sizes) ** -0.5)
            table.weight.data[-1].zero_()

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        base = (tokens - 1).clamp(min=0)  # A C G T -> 0..3 (N and padding are handled by the masks below)
        unknown = (tokens == _N_TOKEN) | (tokens == PAD)
        time = tokens.shape[1]
        out = 0
        # padded on the right so that every offset's slice is `time` wide, even past the end of a short batch
        longest = max(self.sizes, default=1) - 1
        base, unknown = F.pad(base, (0, longest)), F.pad(unknown, (0, longest), value=True)
        for k, table in zip(self.sizes, self.tables):
            code = torch.zeros_like(tokens)
            has_unknown = torch.zeros_like(unknown[:, :time])
            for offset in range(k):
                code = code * 4 + base[:, offset:offset + time]
                has_unknown = has_unknown | unknown[:, offset:offset + time]
            code = code.masked_fill(has_unknown, 4**k)
            inside = torch.arange(time, device=tokens.device)[None, :] + k <= lengths[:, None]
            out = out + table(code.masked_fill(~inside, 4**k + 1))
        return out


@dataclass(frozen=True)
class DNANetConfig:
    """Everything needed to build a :class:`DNANetwork`; :class:`genomics.DNAClassifier` makes it from its parameters
    (see there for what each means and its default)."""

    num_classes: int
    dim: int
    blocks: int
    heads: int
    memory_depth: int
    chunk_size: int
    memory_lr: float  # NeuralMemory's max_lr
    memory_momentum: float | None  # NeuralMemory's max_momentum
    stem_kernel: int
    stem_stride: int
    bidirectional: bool
    reverse_complement: bool
    dropout: float
    kmer_sizes: tuple[int, ...]

    @classmethod
    def from_params(cls, params: dict, *, num_classes: int) -> "DNANetConfig":
        """The network of a DNAClassifier with parameters ``params`` (its ``get_params()``) for ``num_classes``."""
        return config_from_params(cls, params, num_classes=num_classes, kmer_sizes=tuple(params["kmer_sizes"]))


class DNANetwork(nn.Module):
    """Token ids ``[b, t]`` and lengths ``[b]`` -> class logits ``[b, k]``.

    The stem is a convolution ``stem_kernel`` bases wide at every base (a motif detector that does not care where the
    motif sits), then a max-pool over ``stem_stride`` bases that shortens what the memory must read; the embeddings
    of the overlapping k-mers (:class:`KmerEmbedding`) are averaged over each stem window and added to it, and their
    mean over the sequence also goes to the head. With ``reverse_complement`` both strands are read with the same
    weights and their pooled features averaged.
    """

    def __init__(self, config: DNANetConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.stem_kernel < 1 or c.stem_stride < 1:
            raise InputError(f"stem_kernel and stem_stride must be >= 1, got {c.stem_kernel} and {c.stem_stride}")
        dim = c.dim
        self.kmers = KmerEmbedding(c.kmer_sizes, dim) if c.kmer_sizes else None
        self.stem_kernel, self.stem_stride, self.reverse_complement = c.stem_kernel, c.stem_stride, c.reverse_complement
        self.embedding = nn.Embedding(VOCAB_SIZE, dim, padding_idx=PAD)
        self.stem = nn.Conv1d(dim, dim, c.stem_kernel)
        self.blocks = nn.ModuleList(
            memory_block(dim, heads=c.heads, memory_depth=c.memory_depth, chunk_size=c.chunk_size,
                         memory_lr=c.memory_lr, memory_momentum=c.memory_momentum, bidirectional=c.bidirectional,
                         dropout=c.dropout)
            for _ in range(c.blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear((3 if c.kmer_sizes else 2) * dim, c.num_classes)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Class logits ``[b, k]`` of right-padded ``tokens [b, t]`` with ``lengths [b]`` real bases each."""
        features = self.features(tokens, lengths)
        if self.reverse_complement:
            features = 0.5 * (features + self.features(reverse_complement_batch(tokens, lengths), lengths))
        return self.head(self.dropout(features))

    def stem_features(self, tokens: Tensor, lengths: Tensor, kmers: Tensor | None) -> tuple[Tensor, Tensor]:
        """Convolution at every base, then max over windows of ``stem_stride`` real bases: ``[b, ceil(t / s), d]``."""
        x = self.embedding(tokens)  # [b, t, d]; padding embeds to zero
        left = (self.stem_kernel - 1) // 2
        x = self.stem(F.pad(x.transpose(1, 2), (left, self.stem_kernel - 1 - left))).transpose(1, 2)
        x = F.gelu(x).masked_fill(~padding_mask(lengths, x.shape[1])[..., None], float("-inf"))
        pooled = F.max_pool1d(x.transpose(1, 2), self.stem_stride, ceil_mode=True).transpose(1, 2)
        if kmers is not None:
            # k-mer embeddings are averaged (not max-pooled) so that the mean over the sequence stays a k-mer profile;
            # zero-padding to whole windows keeps every divisor at stem_stride, whatever the batch's padding.
            kmers = F.pad(kmers.transpose(1, 2), (0, pooled.shape[1] * self.stem_stride - kmers.shape[1]))
            pooled = pooled + F.avg_pool1d(kmers, self.stem_stride).transpose(1, 2)
        stem_lengths = torch.div(lengths + self.stem_stride - 1, self.stem_stride, rounding_mode="floor")
        # Windows made only of padding pooled to -inf; zero them so they stay finite (they are masked later anyway).
        return pooled.masked_fill(~padding_mask(stem_lengths, pooled.shape[1])[..., None], 0.0), stem_lengths

    def features(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Pooled sequence representation ``[b, 2 d]`` (``[b, 3 d]`` with k-mers): mean and max over the real
        positions, and the mean k-mer embedding."""
        kmers = self.kmers(tokens, lengths) if self.kmers is not None else None
        x, stem_lengths = self.stem_features(tokens, lengths, kmers)
        x = self.dropout(x)
        backward_index = reverse_index(stem_lengths, x.shape[1])
        for block in self.blocks:
            x, _ = block(x, backward_index=backward_index)
        x = self.norm(x)
        mask = padding_mask(stem_lengths, x.shape[1])[..., None]
        mean = (x * mask).sum(1) / stem_lengths.clamp(min=1)[:, None].to(x.dtype)
        maximum = x.masked_fill(~mask, float("-inf")).amax(1)
        pooled = [mean, maximum]
        if kmers is not None:
            # The sequence's k-mer profile goes to the head directly as well: the k-mer-count features of the
            # classic baselines, on which the memory path only has to add what counts miss.
            positions = (lengths - min(self.kmers.sizes) + 1).clamp(min=1)[:, None].to(kmers.dtype)
            pooled.append(kmers.sum(1) / positions)
        return torch.cat(pooled, dim=-1)
