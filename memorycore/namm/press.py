"""Presses: score every cached token per layer and head, keep some.

A press is applied with ``with press(model): ...``. Inside the block, every :class:`SlidingWindowAttention` of the model
computes its attention eagerly and hands the press its cache and the attention the new queries paid to each entry; the
press folds that attention into per-entry statistics (``cache.extras``) at every call, and evicts every ``interval``
tokens: when the new tokens reach a multiple of ``interval`` (at absolute positions, so a sequence fed in pieces is
pressed as when fed at once; a long prompt fed in one call is pressed once, at its end). The newest token is always
kept. For Hugging Face models the press applies through :func:`memorycore.namm.generate` / :class:`HFSession`.

Shapes: b batch, g kv heads, t new tokens, c cached entries.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from memorycore.attention import KVCache, SlidingWindowAttention
from memorycore.errors import InputError

DEFAULT_INTERVAL = 512
H2O_ATTENTION = "h2o_attention"
ARRIVAL = "arrival"


@dataclass
class LayerStats:
    """What a press did to one layer: valid entries per batch element and kv head ``[b, g]`` before and after its
    last eviction, and how many evictions it ran."""

    before: Tensor
    after: Tensor
    applications: int = 1


class Press(ABC):
    """Base class: observe attention at every call, evict every ``interval`` tokens.

    Subclasses implement :meth:`keep` (and :meth:`observe` when they accumulate statistics).

    Attributes
    ----------
    stats : dict of str to LayerStats
        Per layer (by module name), the tokens per head before and after the last eviction; reset on entering
        ``with press(model)``.
    """

    def __init__(self, *, interval: int = DEFAULT_INTERVAL) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise InputError(f"interval must be a positive integer (tokens between evictions), got {interval!r}")
        self.interval = interval
        self.stats: dict[str, LayerStats] = {}

    def observe(self, cache: KVCache, attention: Tensor, query_end: int) -> KVCache:
        """The cache with this press's per-entry statistics updated by ``attention [b, g, t, c]``."""
        return cache

    @abstractmethod
    def keep(self, cache: KVCache, query_end: int, full_length: int) -> Tensor:
        """Which entries ``[b, g, c]`` to keep; ``full_length`` is what the layer would hold without a press."""

    def compress(self, name: str, cache: KVCache, attention: Tensor, window: int | None = None) -> KVCache:
        """Observe ``attention`` and, when the new tokens reach a multiple of ``interval``, evict.

        Parameters
        ----------
        name : str
            The layer's name in :attr:`stats`.
        cache : KVCache
            The layer's cache with the new tokens appended (any order of entries; the positions say which is newer).
        attention : Tensor [b, g, t, c]
            What each new query paid to each entry.
        window : int, optional
            The layer's window: the most entries it would hold without a press.
        """
        query_end = int(cache.positions[cache.valid].max()) + 1
        cache = count_arrivals(cache, query_end - attention.shape[2])
        cache = self.observe(cache, attention, query_end)
        if query_end // self.interval <= (query_end - attention.shape[2]) // self.interval:
            return cache
        # what the layer would hold without a press: every entry it was given (MAC gives two per token and starts
        # afresh each segment), or its window's worth
        full_length = int(cache.extras[ARRIVAL].max()) + 1
        full_length = full_length if window is None else min(window, full_length)
        keep = (self.keep(cache, query_end, full_length) | newest(cache)) & cache.valid
        self._record(name, cache.lengths, keep.sum(-1))
        return cache.keep(keep)

    def __call__(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """``with press(model): ...`` applies the press to every attention cache of ``model`` (a module, or a fitted
        estimator holding one as ``network_``, as :class:`memorycore.lm.MemoryLM`)."""
        return self._applied(model)

    @contextmanager
    def _applied(self, model: nn.Module) -> Iterator[nn.Module]:
        if not isinstance(model, nn.Module) and isinstance(getattr(model, "network_", None), nn.Module):
            with self._applied(model.network_):  # a fitted estimator (MemoryLM): its network
                yield model
            return
        if _is_hugging_face(model):  # HFSession reads the mark and presses the cache it owns
            guard = model.register_forward_pre_hook(_outside_session)
            try:
                with _marked(model, self):
                    yield model
            finally:
                guard.remove()
            return
        layers = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, SlidingWindowAttention)]
        if not layers:
            raise InputError(f"{type(model).__name__} has no attention cache to press (no SlidingWindowAttention "
                             "inside); use an attention model (variants attention, swa, mac, mag, mal) or a Hugging "
                             "Face causal LM")
        if any(module.cache_hook is not None for _, module in layers):
            raise InputError("another press is already applied to this model; leave its `with` block first")
        with _marked(model, self):  # the mark tells model_logits to feed a prompt in pieces of `interval`
            for name, module in layers:
                module.cache_hook = self._hook(name or "attention")
            try:
                yield model
            finally:
                for _, module in layers:
                    module.cache_hook = None

    def _hook(self, name: str):
        def hook(layer: SlidingWindowAttention, cache: KVCache, attention: Tensor) -> KVCache:
            return self.compress(name, cache, attention, layer.window)
        return hook

    def _record(self, name: str, before: Tensor, after: Tensor) -> None:
        previous = self.stats.get(name)
        count = 1 if previous is None else previous.applications + 1
        self.stats[name] = LayerStats(before.cpu(), after.cpu(), count)

    def kept_fraction(self) -> float:
        """Entries kept over entries held before the last eviction, over all layers and heads (1.0 before any)."""
        before = sum(int(s.before.sum()) for s in self.stats.values())
        after = sum(int(s.after.sum()) for s in self.stats.values())
        return after / before if before else 1.0


class BudgetPress(Press):
    """A press that keeps the ``budget`` share of the tokens with the highest :meth:`score` per head.

    The budget is a share of what the layer would hold without a press (every entry it was given, or its window): at
    each eviction a head keeps ``ceil(budget * full_length)`` entries, so the cache stays at that share of the full
    cache rather than shrinking by ``budget`` at every eviction.
    Give ``budget`` (kept share, in (0, 1]) or ``compression_ratio`` (evicted share, in [0, 1), as kvpress).
    """

    def __init__(self, budget: float | None = None, *, compression_ratio: float | None = None,
                 interval: int = DEFAULT_INTERVAL) -> None:
        super().__init__(interval=interval)
        self.budget = resolve_budget(budget, compression_ratio)

    @abstractmethod
    def score(self, cache: KVCache, query_end: int) -> Tensor:
        """A score per entry ``[b, g, c]``; higher is kept first."""

    def keep(self, cache: KVCache, query_end: int, full_length: int) -> Tensor:
        score = self.score(cache, query_end).masked_fill(newest(cache), math.inf)  # within the budget
        return top_per_head(score, cache.valid, self.kept(full_length))

    def kept(self, full_length: int) -> int:
        """Entries a head keeps at an eviction."""
        return kept_entries(self.budget, full_length)


class H2OPress(BudgetPress):
    """Heavy hitters (Zhang et al., 2023): the tokens with the most attention received so far, plus the newest.

    Parameters
    ----------
    budget, compression_ratio : float
        Kept share in (0, 1], or evicted share in [0, 1): see :class:`BudgetPress`.
    recent : float, default 0.5
        Share of the kept entries reserved for the newest tokens (H2O splits its budget evenly); the rest go to the
        heavy hitters among the older ones.
    interval : int, default 512
        Tokens between evictions.
    """

    def __init__(self, budget: float | None = None, *, compression_ratio: float | None = None, recent: float = 0.5,
                 interval: int = DEFAULT_INTERVAL) -> None:
        super().__init__(budget, compression_ratio=compression_ratio, interval=interval)
        if isinstance(recent, bool) or not isinstance(recent, (int, float)) or not 0 <= recent <= 1:
            raise InputError(f"recent must be a share of the kept tokens in [0, 1], got {recent!r}")
        self.recent = float(recent)

    def observe(self, cache: KVCache, attention: Tensor, query_end: int) -> KVCache:
        received = attention.float().sum(2)
        total = cache.extras.get(H2O_ATTENTION)
        return cache.with_extras(**{H2O_ATTENTION: received if total is None else total + received})

    def score(self, cache: KVCache, query_end: int) -> Tensor:
        """The attention each entry has received so far."""
        return cache.extras[H2O_ATTENTION].float()

    def keep(self, cache: KVCache, query_end: int, full_length: int) -> Tensor:
        kept = self.kept(full_length)
        # the `recent` newest entries of each head (the newest at least) outrank every heavy hitter
        recent = max(1, math.floor(self.recent * kept))
        age_rank = rank_per_head(cache.positions.float(), cache.valid)
        score = self.score(cache, query_end).masked_fill(age_rank < recent, math.inf)
        return top_per_head(score, cache.valid, kept)


class L2NormPress(BudgetPress):
    """Keep the keys with the lowest L2 norm (Devoto et al., 2024: low-norm keys draw the most attention).

    Takes ``budget`` / ``compression_ratio`` and ``interval`` as :class:`BudgetPress`.
    """

    def score(self, cache: KVCache, query_end: int) -> Tensor:
        return -cache.keys.float().norm(dim=-1)


def resolve_budget(budget: float | None, compression_ratio: float | None) -> float:
    """The kept share from ``budget`` (kept, in (0, 1]) or ``compression_ratio`` (evicted, in [0, 1))."""
    if (budget is None) == (compression_ratio is None):
        raise InputError("give either budget (the share of the cache to keep, in (0, 1]) or compression_ratio "
                         "(the share to evict, in [0, 1)), not both and not neither")
    if compression_ratio is not None:
        if not _real(compression_ratio) or not 0 <= compression_ratio < 1:
            raise InputError(f"compression_ratio must be the share of the cache to evict, in [0, 1), got "
                             f"{compression_ratio!r}")
        return 1.0 - float(compression_ratio)
    if not _real(budget) or not 0 < budget <= 1:
        raise InputError(f"budget must be the share of the cache to keep, in (0, 1] (e.g. 0.25), got {budget!r}")
    return float(budget)


def kept_entries(budget: float, full_length: int) -> int:
    """Entries a head keeps at an eviction under ``budget``: ``ceil(budget * full_length)``, at least 1."""
    return max(1, math.ceil(budget * full_length - 1e-9))


def count_arrivals(cache: KVCache, query_start: int) -> KVCache:
    """The cache with each entry's arrival number (entries appended before it) in ``extras``; the entries at
    positions from ``query_start`` on are the new ones. A cache seen for the first time is numbered in entry order."""
    arrival = cache.extras.get(ARRIVAL)
    order = cache.valid.cumsum(-1) - 1
    if arrival is None:
        return cache.with_extras(**{ARRIVAL: order.masked_fill(~cache.valid, 0)})
    new = cache.valid & (cache.positions >= query_start)
    old = cache.valid & ~new
    before = arrival.masked_fill(~old, -1).max(-1, keepdim=True).values + 1  # the newest old entry is always kept
    numbered = before + (new.cumsum(-1) - 1)
    return cache.with_extras(**{ARRIVAL: torch.where(new, numbered, arrival)})


def newest(cache: KVCache) -> Tensor:
    """The entry with the highest position of each head ``[b, g, c]``."""
    positions = cache.positions.masked_fill(~cache.valid, -1)
    return cache.valid & (positions == positions.max(-1, keepdim=True).values)


def rank_per_head(score: Tensor, valid: Tensor) -> Tensor:
    """Each valid entry's rank ``[b, g, c]`` by descending score within its head (0 = highest; ties: earlier entry
    first); invalid entries rank last."""
    score = score.masked_fill(~valid, -math.inf)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return torch.argsort(order, dim=-1)


def top_per_head(score: Tensor, valid: Tensor, kept: int) -> Tensor:
    """The ``kept`` valid entries of highest score in each head ``[b, g, c]`` (all of them if fewer)."""
    return valid & (rank_per_head(score, valid) < kept)


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_hugging_face(model: nn.Module) -> bool:
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _outside_session(model: nn.Module, args: tuple) -> None:
    """Refuse a Hugging Face forward pass under a press that does not come from HFSession (the press would not act)."""
    if not getattr(model, "_memorycore_in_session", False):
        raise InputError("inside `with press(model)`, run a Hugging Face model through memorycore.namm.generate or "
                         "HFSession: transformers' own generate and forward would not press the cache (and generate "
                         "re-feeds tokens once a cache is pruned outside it)")


@contextmanager
def _marked(model: nn.Module, press: Press) -> Iterator[None]:
    """Mark a model as pressed (``model._memorycore_press``): :class:`HFSession` and :func:`model_logits` read it."""
    if getattr(model, "_memorycore_press", None) is not None:
        raise InputError("another press is already applied to this model; leave its `with` block first")
    press.stats = {}
    model._memorycore_press = press
    try:
        yield
    finally:
        model._memorycore_press = None
