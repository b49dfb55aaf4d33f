"""NAMM's token features: the spectrogram of the attention each cached token receives, and its age.

Shapes: b batch, g kv heads, c cached entries, t new queries, f frames, k frequency bins (n_fft // 2 + 1).

For every cached entry, the attention paid to it by successive queries is a time series. Every ``hop`` queries (at
absolute positions, so that feeding a sequence in pieces gives the features of one call) a frame of the last ``n_fft``
values is windowed (periodic Hann) and its magnitude spectrum taken; the frames are averaged by an exponential moving
average, ``ema <- decay * ema + (1 - decay) * |STFT(frame)|``, starting from 0 when the entry enters the cache and
read divided by ``1 - decay ** frames`` (the frames that ended since the entry arrived), as Adam corrects its moments:
without it a token's features would grow over its first hundred frames whatever attention it draws, and stay some 100
times smaller than the recency embedding beside them. Queries before the start of the sequence, and before an entry
existed, count as zero attention (the zero padding of an STFT with ``center=False`` on a series padded by
``n_fft - hop`` zeros on the left).

The running state lives in the cache's per-entry ``extras`` (so it follows appends and evictions): the last ``n_fft``
attention values an entry received, its EMA and its count of frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from memorycore.attention import KVCache

HISTORY = "namm_history"
EMA = "namm_ema"
FRAMES = "namm_frames"


@dataclass(frozen=True)
class SpectrogramFeatures:
    """How attention histories become features (the defaults are NAMM's).

    Attributes
    ----------
    n_fft : int
        Queries per frame; ``n_fft // 2 + 1`` frequency bins.
    hop : int
        Queries between frames.
    decay : float
        EMA coefficient per frame.
    recency_dims : int
        Width of the sinusoidal embedding of an entry's age (even).
    """

    n_fft: int = 32
    hop: int = 16
    decay: float = 0.99
    recency_dims: int = 8

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def width(self) -> int:
        """Features per entry: the spectrum's bins and the recency embedding."""
        return self.bins + self.recency_dims

    def observe(self, cache: KVCache, attention: Tensor, query_end: int) -> KVCache:
        """The cache with each entry's history and EMA advanced by ``attention [b, g, t, c]`` of the queries at
        positions ``query_end - t .. query_end - 1``."""
        batch, heads, _, capacity = attention.shape
        history = cache.extras.get(HISTORY)
        if history is None:  # the first time this press sees the cache: no query was observed before
            history = attention.new_zeros(batch, heads, capacity, self.n_fft, dtype=torch.float32)
            ema = attention.new_zeros(batch, heads, capacity, self.bins, dtype=torch.float32)
            frames = attention.new_zeros(batch, heads, capacity, dtype=torch.float32)
        else:
            ema, frames = cache.extras[EMA], cache.extras[FRAMES]
        history, ema, frames = advance(history, ema, frames, cache.positions, attention.float(), query_end, self)
        return cache.with_extras(**{HISTORY: history, EMA: ema, FRAMES: frames})

    def of(self, cache: KVCache, query_end: int) -> Tensor:
        """Features ``[b, g, c, width]`` of every entry: its spectrum's EMA and its age's embedding."""
        ema = cache.extras.get(EMA)
        if ema is None:
            ema = cache.keys.new_zeros(*cache.positions.shape, self.bins, dtype=torch.float32)
        else:
            frames = cache.extras[FRAMES][..., None]
            correction = (1 - self.decay ** frames.double()).to(ema.dtype)
            ema = torch.where(frames > 0, ema / correction.clamp_min(1e-30), 0.0)
        age = (query_end - 1 - cache.positions).float()
        return torch.cat([ema.float(), recency_embedding(age, self.recency_dims)], dim=-1)


def advance(history: Tensor, ema: Tensor, frames: Tensor, positions: Tensor, attention: Tensor, query_end: int,
            features: SpectrogramFeatures) -> tuple[Tensor, Tensor, Tensor]:
    """Append the new queries' attention to each entry's series and fold every frame completed into the EMA.

    ``history [b, g, c, n_fft]`` holds the attention of the ``n_fft`` queries before the new ones (oldest first);
    a frame ends after each query whose position ``q`` has ``(q + 1) % hop == 0``; ``frames [b, g, c]`` counts the
    frames that ended at or after each entry's position.
    """
    time = attention.shape[2]
    query_start = query_end - time
    series = torch.cat([history, attention.transpose(-1, -2)], dim=-1)  # [b, g, c, n_fft + t]
    # window i (1 <= i <= t) covers columns i .. i + n_fft - 1 and ends at the query at position query_start + i - 1
    ends = torch.arange(1, time + 1)
    ends = ends[(query_start + ends) % features.hop == 0]
    if len(ends):
        windows = series.unfold(-1, features.n_fft, 1)[..., ends, :]  # [b, g, c, f, n_fft]
        magnitudes = frame_spectra(windows)
        weights = features.decay ** torch.arange(len(ends) - 1, -1, -1, dtype=torch.float64)
        weights = ((1 - features.decay) * weights).to(magnitudes.dtype)
        ema = features.decay ** len(ends) * ema + torch.einsum("bgcfk,f->bgck", magnitudes, weights)
        end_positions = (query_start + ends - 1).to(positions.device)
        frames = frames + (end_positions >= positions[..., None]).sum(-1)
    return series[..., -features.n_fft:].contiguous(), ema, frames


def frame_spectra(frames: Tensor) -> Tensor:
    """Magnitudes ``[..., n_fft // 2 + 1]`` of frames ``[..., n_fft]`` windowed by a periodic Hann window."""
    window = torch.hann_window(frames.shape[-1], periodic=True, dtype=frames.dtype, device=frames.device)
    return torch.fft.rfft(frames * window).abs()


def recency_embedding(age: Tensor, dims: int, base: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[..., dims]`` of ages (tokens since an entry, 0 for the newest), as Transformer
    position encodings: ``sin(age * w_i), cos(age * w_i)`` with ``w_i = base ** (-i / (dims / 2))``."""
    half = dims // 2
    frequencies = base ** (-torch.arange(half, dtype=torch.float64, device=age.device) / max(half, 1))
    angles = age.double()[..., None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(age.dtype) if half else age[..., :0]


def check_features(features: SpectrogramFeatures) -> None:
    """Raise InputError for settings the spectrogram cannot use."""
    from memorycore.errors import InputError

    if not (isinstance(features.n_fft, int) and features.n_fft >= 2 and features.n_fft % 2 == 0):
        raise InputError(f"n_fft must be an even integer >= 2, got {features.n_fft!r}")
    if not (isinstance(features.hop, int) and 1 <= features.hop <= features.n_fft):
        raise InputError(f"hop must be an integer in [1, n_fft={features.n_fft}], got {features.hop!r}")
    if not (isinstance(features.decay, float) and 0 <= features.decay < 1 and math.isfinite(features.decay)):
        raise InputError(f"decay must be a number in [0, 1), got {features.decay!r}")
    if not (isinstance(features.recency_dims, int) and features.recency_dims >= 0 and features.recency_dims % 2 == 0):
        raise InputError(f"recency_dims must be an even integer >= 0, got {features.recency_dims!r}")
