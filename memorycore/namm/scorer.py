"""NAMM's scorer (Cetin et al., 2024): backward attention over a head's cached tokens, then an MLP, one score each.

Shapes: b batch, g kv heads, c cached entries, w feature width, n hidden width.

Each entry's features (:mod:`memorycore.namm.features`) are projected to queries, keys and values of one attention head
(hidden 32) in which an entry attends to itself and the entries newer than it (the "backward" mask: what came after a
token tells whether it is still useful), added to the entry's own value, then a residual ReLU MLP gives one score. :class:`NAMMPress` keeps an entry iff
its score is >= 0. Every parameter starts at 0, so the untrained scorer keeps everything; the same parameters serve
every layer and head. Heads holding different numbers of entries are padded (invalid entries) and masked.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from memorycore.attention import KVCache
from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.errors import CheckpointError, InputError
from memorycore.namm.features import SpectrogramFeatures, check_features
from memorycore.namm.press import DEFAULT_INTERVAL, Press, kept_entries, newest, resolve_budget, top_per_head

CLASS_NAME = "NAMMScorer"


class BAMScorer(nn.Module):
    """Backward-attention memory scorer: features ``[b, g, c, w]`` -> scores ``[b, g, c]``.

    Parameters
    ----------
    hidden : int, default 32
        Width of the attention head and the MLP.
    features : SpectrogramFeatures, optional
        The feature settings (NAMM's by default); they fix the input width.

    Examples
    --------
    >>> scorer = BAMScorer()
    >>> scorer.vector().shape          # what CMA-ES evolves
    torch.Size([3585])
    """

    def __init__(self, hidden: int = 32, features: SpectrogramFeatures | None = None) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise InputError(f"hidden must be a positive integer, got {hidden!r}")
        self.features = features or SpectrogramFeatures()
        check_features(self.features)
        self.hidden = hidden
        self.budget: float | None = None  # the budget it was evolved to rank entries for (None: it decides the size)
        self.qkv = nn.Linear(self.features.width, 3 * hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        for parameter in self.parameters():
            nn.init.zeros_(parameter)

    # entries whose attention rows are computed at once: the [rows, entries] scores of a 4096-entry head stay 16 MB
    row_block = 1024

    def forward(self, features: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """Scores of entries at ``positions [b, g, c]``; ``valid`` masks the padding."""
        q, k, v = self.qkv(features).chunk(3, dim=-1)
        rows = [self._attend(q[..., start:start + self.row_block, :], k, v, positions, valid, start)
                for start in range(0, q.shape[-2], self.row_block)]
        # the entry's own value as a residual: attention alone would give an entry and the older entries that all
        # attend to the same newer one the same output
        h = v + torch.cat(rows, dim=-2)
        h = h + torch.relu(self.mlp(h))
        return self.out(h).squeeze(-1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor, start: int) -> Tensor:
        """Backward attention of the entries ``start .. start + rows`` over all entries."""
        # entry i reads entry j iff j is a valid entry no older than i, and itself always (padding rows stay finite)
        own = positions[..., start:start + q.shape[-2], None]
        allowed = (positions[..., None, :] >= own) & valid[..., None, :]
        index = torch.arange(start, start + q.shape[-2], device=q.device)
        allowed = allowed | (index[:, None] == torch.arange(k.shape[-2], device=q.device))
        logits = (q @ k.transpose(-1, -2) / math.sqrt(self.hidden)).masked_fill(~allowed, -math.inf)
        return torch.softmax(logits, dim=-1) @ v

    def score(self, cache: KVCache, query_end: int) -> Tensor:
        """Scores ``[b, g, c]`` of a cache's entries from the features its press accumulated."""
        features = self.features.of(cache, query_end).to(self.qkv.weight.dtype)
        return self(features, cache.positions, cache.valid)

    def vector(self) -> Tensor:
        """All parameters as one flat float64 vector (CMA-ES's search space)."""
        return parameters_to_vector(self.parameters()).detach().double()

    def load_vector(self, vector) -> "BAMScorer":
        """Set every parameter from a flat vector (a tensor or numpy array); returns self."""
        vector = torch.as_tensor(vector, dtype=self.qkv.weight.dtype).flatten()
        if vector.numel() != self.num_parameters:
            raise InputError(f"the vector has {vector.numel()} values; this scorer has {self.num_parameters} "
                             "parameters (another hidden width or feature setting?)")
        with torch.no_grad():
            vector_to_parameters(vector.to(self.qkv.weight.device), self.parameters())
        return self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config(self) -> dict:
        return {"hidden": self.hidden, "features": asdict(self.features)}

    def save(self, path: str | os.PathLike, **metadata) -> Path:
        """Write the scorer to a ``.safetensors`` file with its settings (and ``metadata``) as JSON."""
        budget = {} if self.budget is None else {"budget": self.budget}
        return save_checkpoint(path, self.state_dict(), {"class": CLASS_NAME, **self.config(), **budget, **metadata})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BAMScorer":
        """Read a scorer written by :meth:`save` (or :func:`fit_namm`)."""
        tensors, config = load_checkpoint(path, CLASS_NAME)
        try:
            scorer = cls(config["hidden"], SpectrogramFeatures(**config["features"]))
            scorer.load_state_dict(tensors)
            scorer.budget = None if config.get("budget") is None else float(config["budget"])
        except (KeyError, TypeError, RuntimeError, InputError) as error:
            raise CheckpointError(f"{path} is not a usable NAMM scorer ({str(error).splitlines()[0][:200]})") from None
        return scorer


class NAMMPress(Press):
    """Evolved eviction: keep an entry iff the scorer gives it a score >= 0 (the newest entry always).

    Parameters
    ----------
    scorer : BAMScorer or path, optional
        The scorer, or a file written by :meth:`BAMScorer.save`; default: an untrained one (keeps everything).
    budget : float in (0, 1], optional
        Keep instead the ``budget`` share of the entries the scorer ranks highest (as :class:`BudgetPress`), to
        compare with H2O and L2 at the same cache size; default: the budget the scorer was evolved for
        (``fit_namm(budget=)``), else the scorer decides the size (NAMM).
    interval : int, default 512
        Tokens between evictions (the features are updated at every call in between).

    Examples
    --------
    >>> press = NAMMPress("namm.safetensors")               # doctest: +SKIP
    >>> with press(model):                                  # doctest: +SKIP
    ...     y, state = model(x)
    >>> press.stats                                         # doctest: +SKIP
    """

    def __init__(self, scorer: BAMScorer | str | os.PathLike | None = None, *, budget: float | None = None,
                 interval: int = DEFAULT_INTERVAL) -> None:
        super().__init__(interval=interval)
        self.budget = None if budget is None else resolve_budget(budget, None)
        if scorer is None:
            scorer = BAMScorer()
        elif isinstance(scorer, (str, os.PathLike)):
            scorer = BAMScorer.load(scorer)
        elif not isinstance(scorer, BAMScorer):
            raise InputError(f"scorer must be a BAMScorer or the path of a saved one, got {type(scorer).__name__}")
        self.scorer = scorer
        if self.budget is None and scorer.budget is not None:
            self.budget = resolve_budget(scorer.budget, None)

    def observe(self, cache: KVCache, attention: Tensor, query_end: int) -> KVCache:
        return self.scorer.features.observe(cache, attention, query_end)

    @torch.no_grad()
    def keep(self, cache: KVCache, query_end: int, full_length: int) -> Tensor:
        self.scorer.to(cache.keys.device)  # no-op once it is there
        score = self.scorer.score(cache, query_end)
        if self.budget is None:
            return score >= 0
        return top_per_head(score.masked_fill(newest(cache), math.inf), cache.valid,
                            kept_entries(self.budget, full_length))
