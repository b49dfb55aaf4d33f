"""Causal sliding-window attention with an explicit, prunable KV cache and persistent memory.

Shapes (einops legend): b batch, h query heads, g kv heads, t new tokens, c cached entries, d head dim.

The state of an attention layer is its :class:`KVCache`: keys (already rotated), values, the absolute position of every
entry and a validity mask, per batch element and kv head. Entries are kept in time order, and each head may hold a
different number of them (padding at the end is marked invalid), so a press (memorycore.namm) can evict tokens per
layer and head. ``extras`` carries per-entry statistics a press accumulates (e.g. H2O's attention sums); they follow
every append and eviction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memorycore.errors import InputError
from memorycore.validation import check_positive

# queries per scaled_dot_product_attention call when a long sequence is computed without a cache: the mask of one
# block is [block, block + window - 1], never [time, time]
QUERY_BLOCK = 512


@dataclass(frozen=True)
class KVCache:
    """The keys and values one attention layer keeps, per batch element and kv head.

    Attributes
    ----------
    keys, values : Tensor [batch, kv_heads, capacity, head_dim]
        Keys are stored after the rotary embedding of their position.
    positions : Tensor [batch, kv_heads, capacity] (int64)
        Absolute position of each entry in its sequence.
    valid : Tensor [batch, kv_heads, capacity] (bool)
        Which entries hold a token; a head's valid entries come first, in time order.
    extras : dict of str to Tensor [batch, kv_heads, capacity, ...]
        Per-entry statistics kept by presses; appended entries get zeros.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    valid: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, *, device=None, dtype=None) -> "KVCache":
        """A cache holding nothing."""
        kv = torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype)
        positions = torch.zeros(batch, kv_heads, 0, dtype=torch.long, device=device)
        return cls(kv, kv.clone(), positions, positions.bool())

    @property
    def capacity(self) -> int:
        """Entries per head, valid or not."""
        return self.keys.shape[2]

    @property
    def lengths(self) -> Tensor:
        """Valid entries per batch element and head, ``[batch, kv_heads]``."""
        return self.valid.sum(-1)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> "KVCache":
        """The cache with ``keys`` / ``values`` ``[b, g, t, d]`` at ``positions`` ``[t]`` added after the last entry."""
        batch, heads, time, _ = keys.shape
        new_positions = positions.view(1, 1, time).expand(batch, heads, time)
        extras = {name: torch.cat([value, value.new_zeros(batch, heads, time, *value.shape[3:])], dim=2)
                  for name, value in self.extras.items()}
        cache = KVCache(torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2),
                        torch.cat([self.positions, new_positions], 2),
                        torch.cat([self.valid, self.valid.new_ones(batch, heads, time)], 2), extras)
        # new entries must follow every head's valid ones: compact when some head holds padding
        return cache if bool(self.valid.all()) else cache.keep(cache.valid)

    def keep(self, mask: Tensor) -> "KVCache":
        """The cache without the entries where ``mask`` ``[b, g, capacity]`` is False, compacted per head."""
        kept = mask & self.valid
        if bool(kept.all()):
            return self
        # a stable sort moves each head's kept entries to the front in time order
        order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)
        capacity = int(kept.sum(-1).max()) if kept.numel() else 0
        order = order[..., :capacity]

        def gather(t: Tensor) -> Tensor:
            index = order.view(*order.shape, *([1] * (t.ndim - 3))).expand(*order.shape, *t.shape[3:])
            return t.gather(2, index)

        return KVCache(gather(self.keys), gather(self.values), gather(self.positions), gather(kept),
                       {name: gather(value) for name, value in self.extras.items()})

    def with_extras(self, **extras: Tensor) -> "KVCache":
        """The same cache with per-entry statistics set (or replaced)."""
        return replace(self, extras={**self.extras, **extras})

    def detach(self) -> "KVCache":
        return KVCache(self.keys.detach(), self.values.detach(), self.positions, self.valid,
                       {name: value.detach() for name, value in self.extras.items()})


class AttentionState(NamedTuple):
    """State of :class:`SlidingWindowAttention`: its cache and the position of the next token."""

    cache: KVCache
    position: int

    def detach(self) -> "AttentionState":
        return AttentionState(self.cache.detach(), self.position)


# A press hook sees a layer's cache after new tokens were appended, and the attention ``[b, g, t, capacity]`` the new
# queries paid to each entry (averaged over the query heads of a kv head); it returns the cache to keep.
CacheHook = Callable[["SlidingWindowAttention", KVCache, Tensor], KVCache]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) on the last dimension, rotating pairs ``(x_i, x_{i + d/2})``."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise InputError(f"rotary embeddings need an even head width, got {head_dim}; pick heads so that "
                             "dim / heads is even, or rope=False")
        self.register_buffer("inverse_frequency", base ** (-torch.arange(0, head_dim, 2).double() / head_dim),
                             persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x [..., t, d]`` by ``positions [t]``."""
        angles = positions.to(torch.float64)[:, None] * self.inverse_frequency.to(positions.device)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class SlidingWindowAttention(nn.Module):
    """Causal local attention: a token attends to itself and the ``window - 1`` tokens before it.

    The last keys and values travel in the state (an :class:`AttentionState`), so feeding a sequence in pieces gives
    the same output as one call for any split, and decoding one token costs O(window). ``window=None`` is full causal
    attention, whose cache grows with the sequence. ``persistent_tokens`` learned key/value pairs (Titans Eq. 19) are
    seen by every query, outside the window and never evicted; they carry no position, so their scores do not depend
    on where a query stands. Long inputs are computed in blocks of queries with ``scaled_dot_product_attention``.

    Parameters
    ----------
    dim : int
        Model width.
    heads : int
        Query heads; ``dim`` must be divisible by ``heads``.
    window : int or None
        Tokens a query sees, itself included; None for full causal attention.
    kv_heads : int, optional
        Key/value heads (grouped-query attention); must divide ``heads``. Default ``heads``.
    rope : bool, default True
        Rotary position embeddings on queries and keys.
    persistent_tokens : int, default 0
        Learned, input-independent key/value pairs visible to every query.

    Examples
    --------
    >>> attention = SlidingWindowAttention(64, heads=4, window=16)
    >>> y, state = attention(torch.randn(2, 40, 64))
    >>> y_next, state = attention(torch.randn(2, 1, 64), state)   # one more token, O(window)
    """

    def __init__(self, dim: int, *, heads: int, window: int | None, kv_heads: int | None = None,
                 rope: bool = True, persistent_tokens: int = 0) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        check_positive(dim=dim, heads=heads, kv_heads=kv_heads)
        if window is not None:
            check_positive(window=window)
        if not isinstance(persistent_tokens, int) or persistent_tokens < 0:
            raise InputError(f"persistent_tokens must be an integer >= 0, got {persistent_tokens!r}")
        if dim % heads:
            raise InputError(f"dim={dim} is not divisible by heads={heads}; pick heads that divide dim")
        if heads % kv_heads:
            raise InputError(f"kv_heads={kv_heads} must divide heads={heads}")
        self.dim, self.heads, self.kv_heads, self.window = dim, heads, kv_heads, window
        self.head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim) if rope else None
        self.persistent = (nn.Parameter(torch.randn(2, kv_heads, persistent_tokens, self.head_dim) * 0.02)
                           if persistent_tokens else None)
        self.cache_hook: CacheHook | None = None  # set by a press (memorycore.namm) while it applies

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> AttentionState:
        """An empty cache at position 0."""
        weight = self.to_kv.weight
        cache = KVCache.empty(batch_size, self.kv_heads, self.head_dim, device=device or weight.device,
                              dtype=weight.dtype)
        return AttentionState(cache, 0)

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        """Attend causally over the cached tokens and ``x [batch, time, dim]``; return y and the new state."""
        q, k, v, state = self.project(x, state)
        y, state = self.attend(q, k, v, state)
        return self.to_out(y), state

    def project(self, x: Tensor, state: AttentionState | None) -> tuple[Tensor, Tensor, Tensor, AttentionState]:
        """Queries ``[b, h, t, d]``, keys and values ``[b, g, t, d]`` of ``x``, rotated to their positions."""
        self._check_input(x, state)
        batch, time, _ = x.shape
        state = state or self.initial_state(batch, x.device)
        q = self.to_q(x).view(batch, time, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(x).view(batch, time, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v, state

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: AttentionState,
               key_positions: Tensor | None = None) -> tuple[Tensor, AttentionState]:
        """Attention of the new queries over the cache and the new keys; returns ``[b, t, dim]`` before ``to_out``.

        ``key_positions`` (default: the queries' positions) lets a caller add keys that are not queries, as
        :class:`memorycore.titans.MemoryAsContext` adds its retrieved memory tokens.
        """
        batch, _, time, _ = q.shape
        query_positions = torch.arange(state.position, state.position + time, device=q.device)
        own_positions = key_positions is None  # keys in time order, one per query: blocks can slice them
        key_positions = query_positions if key_positions is None else key_positions
        q_plain = q
        if self.rotary is not None:
            q, k = self.rotary(q, query_positions), self.rotary(k, key_positions)
        cache = state.cache.append(k, v, key_positions)
        if self.cache_hook is not None:  # a press needs the attention weights
            y, weights = self._dense(q, q_plain, cache, query_positions, need_weights=True)
            cache = self.cache_hook(self, cache, weights)
        elif time > QUERY_BLOCK and own_positions and _consecutive(cache):
            y = self._blocked(q, q_plain, cache, query_positions)
        else:
            y, _ = self._dense(q, q_plain, cache, query_positions)
        if self.window is not None:  # keep what the next token can still see
            cache = cache.keep(cache.positions > state.position + time - self.window)
        y = y.transpose(1, 2).reshape(batch, time, self.dim)
        return y, AttentionState(cache, state.position + time)

    def _blocked(self, q: Tensor, q_plain: Tensor, cache: KVCache, query_positions: Tensor) -> Tensor:
        """Blocks of queries, each over the keys its window reaches; the cache holds consecutive positions."""
        outputs, first_cached = [], int(cache.positions[0, 0, 0])
        for start in range(0, q.shape[2], QUERY_BLOCK):
            end = min(start + QUERY_BLOCK, q.shape[2])
            last_key = int(query_positions[end - 1]) + 1 - first_cached
            first_key = 0 if self.window is None else max(0, int(query_positions[start]) - self.window + 1
                                                          - first_cached)
            block = KVCache(*(t[:, :, first_key:last_key] for t in
                              (cache.keys, cache.values, cache.positions, cache.valid)))
            y, _ = self._dense(q[:, :, start:end], q_plain[:, :, start:end], block, query_positions[start:end])
            outputs.append(y)
        return torch.cat(outputs, dim=2)

    def _dense(self, q: Tensor, q_plain: Tensor, cache: KVCache, query_positions: Tensor,
               need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """One attention call of queries ``[b, h, t, d]`` over ``cache`` (and the persistent tokens)."""
        groups = self.heads // self.kv_heads
        distance = query_positions[:, None] - cache.positions[:, :, None, :]  # [b, g, t, c]
        allowed = cache.valid[:, :, None, :] & (distance >= 0)
        if self.window is not None:
            allowed = allowed & (distance < self.window)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        keys, values = cache.keys, cache.values
        if self.persistent is not None:
            persistent_keys, persistent_values = self.persistent.to(q.dtype).unsqueeze(1).expand(
                -1, q.shape[0], -1, -1, -1)
            # persistent keys have no position: score them against the unrotated queries (q_plain), as a bias
            # correcting the rotated query's score, so scaled_dot_product_attention still takes one key set
            shift = (q_plain - q) @ _repeat(persistent_keys, groups).transpose(-1, -2) / math.sqrt(self.head_dim)
            keys = torch.cat([persistent_keys, keys], dim=2)
            values = torch.cat([persistent_values, values], dim=2)
            bias = torch.cat([shift, _repeat(bias, groups)], dim=-1)
        else:
            bias = _repeat(bias, groups)
        keys, values = _repeat(keys, groups), _repeat(values, groups)
        if not need_weights:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias), None
        weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim) + bias, dim=-1)
        cached = weights[..., weights.shape[-1] - cache.capacity:]  # the persistent tokens are never pressed
        cached = cached.view(q.shape[0], self.kv_heads, groups, *cached.shape[2:]).mean(2)
        return weights @ values, cached

    def _check_input(self, x: Tensor, state: AttentionState | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise InputError(f"expected input of shape [batch, time, {self.dim}], got {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InputError(f"the input is empty (batch {x.shape[0]}, time {x.shape[1]}); pass at least one token")
        if state is None:
            return
        cache = getattr(state, "cache", None)
        if (not isinstance(state, AttentionState) or cache.keys.shape[0] != x.shape[0]
                or cache.keys.shape[1] != self.kv_heads or cache.keys.shape[3] != self.head_dim):
            raise InputError(f"state does not fit this attention layer and batch: expected a cache of "
                             f"[{x.shape[0]}, {self.kv_heads}, *, {self.head_dim}]; pass the state this layer "
                             "returned for the same batch, or None")

    def extra_repr(self) -> str:
        persistent = 0 if self.persistent is None else self.persistent.shape[2]
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, window={self.window}, "
                f"rope={self.rotary is not None}, persistent_tokens={persistent}")


def _consecutive(cache: KVCache) -> bool:
    """Whether every head holds the same run of consecutive positions (no press has evicted any of them)."""
    positions = cache.positions
    return bool(cache.valid.all()) and bool((positions == positions[:1, :1]).all()) and (
        int(positions[0, 0, -1] - positions[0, 0, 0]) == cache.capacity - 1)


def _repeat(x: Tensor, groups: int) -> Tensor:
    """Repeat kv heads ``[b, g, ...]`` for the query heads that share them."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
