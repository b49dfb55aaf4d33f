r"""The Simba-style forecasting network with Titans neural memory in place of Mamba.

Shape legend: b batch, l lookback, h horizon, c channels, n tokens (patches or time steps), d model width.

    x [b, l, c] - cycle -> RevIN -> tokens [b', n, d] -> blocks -> flatten -> linear head -> [b, h, c]
                                 \-> linear path (lookback -> horizon) ------------------------/  + -> RevIN^-1 + cycle

Two parts sit around the Simba backbone because at lookback 96 they are what a linear model gets right and a deep
one has to relearn: a *linear path*, one lookback -> horizon map shared by the channels on the RevIN-normalised
window (RLinear); the backbone's head starts at zero, so training starts at the linear forecast and the memory
blocks learn a residual on it. And a learned *cycle*, a ``[cycle_length, channels]`` table indexed by the phase of
each step (hour of day for hourly data): it is subtracted from the input window and added back to the forecast
(CycleNet's residual cycle forecasting, Lin et al. 2024). Either can be switched off in the config.

Each block is ``x + NeuralMemory(LN(x))`` then ``x + EinFFT(LN(x))`` (SiMBA, Patro & Agneeswaran 2024, with the
Mamba sequence mixer swapped for neural memory as in Titans section 5.5). With ``channels="independent"`` every
channel is its own sequence (b' = b * c, weights shared, PatchTST-style); with ``channels="mixing"`` one sequence
carries all channels (b' = b, the embedding and the head see every channel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memorycore import NeuralMemory
from memorycore.blocks import MemoryBlock
from memorycore.config import config_from_params
from memorycore.errors import InputError

EMBEDDINGS = ("patch", "token")
CHANNEL_MODES = ("independent", "mixing")
CYCLE_AMPLITUDES = ("window", "fixed")


@dataclass(frozen=True)
class ForecastNetConfig:
    """Everything needed to rebuild a :class:`MemoryForecastNet` (stored as JSON in checkpoints).

    :class:`~forecast.estimator.MemoryForecaster` builds it from its parameters (see there for what each means and
    its default); ``cycle_length`` is then the resolved length (0: no cycle, else the forward pass needs the phase of
    each window's first step) and ``cycle_amplitude`` "window" or "fixed".
    """

    n_channels: int
    lookback: int
    horizon: int
    d_model: int
    n_blocks: int
    heads: int
    memory_depth: int
    memory_expansion: int
    chunk_size: int
    embedding: str
    patch_len: int
    stride: int
    channels: str
    dropout: float
    fft_blocks: int = 4  # EinFFT's channel blocks (d_model must be a multiple)
    linear_path: bool = False  # False/0/"fixed" so that checkpoints written before these parts existed still load
    cycle_length: int = 0
    cycle_amplitude: str = "fixed"
    context_length: int | str | None = None  # the memory reads the series before the origin (forecast/context.py)

    @classmethod
    def from_params(cls, params: dict, *, n_channels: int, cycle_length: int) -> "ForecastNetConfig":
        """The config of a MemoryForecaster with parameters ``params`` (its ``get_params()``) on ``n_channels``
        channels, with the cycle length resolved (an amplitude of "auto" starts as "window")."""
        amplitude = "window" if params["cycle_amplitude"] == "auto" else params["cycle_amplitude"]
        return config_from_params(cls, params, n_channels=n_channels, linear_path=bool(params["linear_path"]),
                                  cycle_length=cycle_length, cycle_amplitude=amplitude)

    def to_dict(self) -> dict:
        return asdict(self)


class RevIN(nn.Module):
    """Reversible instance normalisation: each window is standardised by its own mean and std, and the forecast is
    mapped back with the same statistics (Kim et al., 2022); a learned per-channel affine sits in between."""

    def __init__(self, n_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_channels))
        self.bias = nn.Parameter(torch.zeros(n_channels))

    def normalize(self, x: Tensor, channel_index: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Standardise ``x [batch, time, channels]`` per window; ``channel_index [batch]`` picks the affine of each
        row when ``x`` holds single channels (``[batch, time, 1]``) rather than all of them."""
        mean = x.mean(dim=1, keepdim=True)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps)
        weight, bias = self._affine(channel_index)
        return (x - mean) / std * weight + bias, (mean, std)

    def denormalize(self, y: Tensor, stats: tuple[Tensor, Tensor], channel_index: Tensor | None = None) -> Tensor:
        mean, std = stats
        weight, bias = self._affine(channel_index)
        return (y - bias) / (weight + self.eps * self.eps) * std + mean

    def _affine(self, channel_index: Tensor | None) -> tuple[Tensor, Tensor]:
        if channel_index is None:
            return self.weight, self.bias
        return self.weight[channel_index, None, None], self.bias[channel_index, None, None]


class EinFFT(nn.Module):
    """SiMBA's channel mixer: FFT over tokens and channel blocks, a block-diagonal complex two-layer MLP with ReLU on
    the real and imaginary parts, soft-shrinkage (sparsity), inverse FFT, real part."""

    def __init__(self, dim: int, blocks: int = 4, expansion: int = 1, sparsity: float = 0.01) -> None:
        super().__init__()
        if dim % blocks:
            raise InputError(f"EinFFT mixes channels in {blocks} blocks: the model width {dim} (d_model) must be a "
                             f"multiple of {blocks}")
        self.blocks, self.block_size, self.sparsity = blocks, dim // blocks, sparsity
        hidden = self.block_size * expansion
        scale = 0.02
        # index 0 holds the real part, 1 the imaginary part of each complex weight
        self.w1 = nn.Parameter(scale * torch.randn(2, blocks, self.block_size, hidden))
        self.b1 = nn.Parameter(scale * torch.randn(2, blocks, hidden))
        self.w2 = nn.Parameter(scale * torch.randn(2, blocks, hidden, self.block_size))
        self.b2 = nn.Parameter(scale * torch.randn(2, blocks, self.block_size))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        spectrum = torch.fft.fft2(x.float().view(batch, tokens, self.blocks, self.block_size), dim=(1, 2), norm="ortho")
        real, imag = spectrum.real, spectrum.imag
        real, imag = self._complex_linear(real, imag, self.w1, self.b1)
        real, imag = F.relu(real), F.relu(imag)
        real, imag = self._complex_linear(real, imag, self.w2, self.b2)
        spectrum = torch.complex(F.softshrink(real, self.sparsity), F.softshrink(imag, self.sparsity))
        out = torch.fft.ifft2(spectrum, dim=(1, 2), norm="ortho").real
        return out.reshape(batch, tokens, dim).to(x.dtype)

    @staticmethod
    def _complex_linear(real: Tensor, imag: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        # (a + ib)(W + iV) = (aW - bV) + i(aV + bW), applied per channel block
        new_real = torch.einsum("bnki,kio->bnko", real, weight[0]) - torch.einsum("bnki,kio->bnko", imag, weight[1])
        new_imag = torch.einsum("bnki,kio->bnko", real, weight[1]) + torch.einsum("bnki,kio->bnko", imag, weight[0])
        return new_real + bias[0], new_imag + bias[1]


def memory_block(config: ForecastNetConfig) -> MemoryBlock:
    """``x + NeuralMemory(LN(x))`` then ``x + EinFFT(LN(x))``."""
    memory = NeuralMemory(config.d_model, heads=config.heads, depth=config.memory_depth,
                          expansion=config.memory_expansion, chunk_size=config.chunk_size)
    return MemoryBlock(config.d_model, memory, EinFFT(config.d_model, blocks=config.fft_blocks),
                       dropout=config.dropout)


class MemoryForecastNet(nn.Module):
    """Map lookback windows ``[batch, lookback, channels]`` to forecasts ``[batch, horizon, channels]``.

    Parameters
    ----------
    config : ForecastNetConfig

    Examples
    --------
    >>> import torch
    >>> from forecast import MemoryForecaster
    >>> params = MemoryForecaster(lookback=96, horizon=24).get_params()
    >>> net = MemoryForecastNet(ForecastNetConfig.from_params(params, n_channels=3, cycle_length=0))
    >>> net(torch.randn(2, 96, 3)).shape
    torch.Size([2, 24, 3])
    """

    def __init__(self, config: ForecastNetConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        c = config
        self.independent = c.channels == "independent"
        per_token = c.patch_len if c.embedding == "patch" else 1
        in_features = per_token if self.independent else per_token * c.n_channels
        self.n_tokens = _token_count(c)
        self.revin = RevIN(c.n_channels)
        self.embed = nn.Linear(in_features, c.d_model)
        self.position = nn.Parameter(0.02 * torch.randn(self.n_tokens, c.d_model))
        self.blocks = nn.ModuleList(memory_block(c) for _ in range(c.n_blocks))
        self.final_norm = nn.LayerNorm(c.d_model)
        out_channels = 1 if self.independent else c.n_channels
        self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(c.dropout),
                                  nn.Linear(self.n_tokens * c.d_model, c.horizon * out_channels))
        self.linear = nn.Linear(c.lookback, c.horizon) if c.linear_path else None
        if c.linear_path:  # the backbone starts as a zero residual on the linear forecast
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        self.cycle = nn.Parameter(torch.zeros(c.cycle_length, c.n_channels)) if c.cycle_length else None

    def forward(self, x: Tensor, phase: Tensor | None = None, memory_state: list | None = None) -> Tensor:
        """Forecasts ``[batch, horizon, channels]`` of windows ``x [batch, lookback, channels]``.

        ``phase [batch]`` (integers) is the cycle phase of each window's first step; needed when ``cycle_length``
        > 0, ignored otherwise. ``memory_state``: one state per block, the memories after reading the series
        before each window (:mod:`forecast.context`), for ``batch * channels`` rows (window-major) or ``batch`` rows
        when mixing; None: the learned initial memory.
        """
        batch, lookback, channels = x.shape
        if lookback != self.config.lookback or channels != self.config.n_channels:
            raise ValueError(f"expected windows [batch, {self.config.lookback}, {self.config.n_channels}], "
                             f"got {list(x.shape)}")
        if self.independent:
            series = x.transpose(1, 2).reshape(batch * channels, lookback)
            channel_index = torch.arange(channels, device=x.device).repeat(batch)
            series_phase = None if phase is None else phase.repeat_interleave(channels)
            out = self.forecast_series(series, channel_index, series_phase, memory_state)
            return out.view(batch, channels, -1).transpose(1, 2)
        input_cycle, output_cycle = self.cycle_parts(x, phase)
        x, stats = self.revin.normalize(x - input_cycle)
        out = self._encode_and_project(x, memory_state).view(batch, -1, channels) + self._linear_forecast(x)
        return self.revin.denormalize(out, stats) + output_cycle

    def forecast_series(self, series: Tensor, channel_index: Tensor, phase: Tensor | None = None,
                        memory_state: list | None = None) -> Tensor:
        """Channel-independent mode only: forecasts ``[n, horizon]`` of single series ``[n, lookback]``, row i being
        a window of channel ``channel_index[i]`` starting at cycle phase ``phase[i]`` (used for univariate data such
        as GluonTS items)."""
        if not self.independent:
            raise ValueError("forecast_series needs channels='independent': a mixing model needs every channel")
        input_cycle, output_cycle = self.cycle_parts(series, phase, channel_index)
        x, stats = self.revin.normalize((series - input_cycle).unsqueeze(-1), channel_index)
        out = self._encode_and_project(x, memory_state).unsqueeze(-1) + self._linear_forecast(x)
        return self.revin.denormalize(out, stats, channel_index).squeeze(-1) + output_cycle

    def _linear_forecast(self, x: Tensor) -> Tensor | float:
        """The linear path: [b', l, k] normalised windows -> [b', horizon, k], one map shared by the channels."""
        if self.linear is None:
            return 0.0
        return self.linear(x.transpose(1, 2)).transpose(1, 2)

    def cycle_parts(self, window: Tensor, phase: Tensor | None,
                    channel_index: Tensor | None = None) -> tuple[Tensor | float, Tensor | float]:
        """The cycle over the input ``window`` and over the horizon: ``[rows, lookback(, channels)]`` and
        ``[rows, horizon(, channels)]``; the channel axis is absent when ``channel_index`` picks one per row
        (``window [rows, lookback]``). Zeros (0.0) without a cycle."""
        if self.cycle is None:
            return 0.0, 0.0
        if phase is None:
            raise ValueError(f"this network has a cycle of length {self.config.cycle_length}: "
                             "pass the phase of each window's first step")
        c, rows = self.config, window.shape[0]
        steps = torch.arange(c.lookback + c.horizon, device=self.cycle.device)
        index = (phase.to(self.cycle.device).long().view(rows, 1) + steps) % c.cycle_length  # [rows, L + H]
        values = self.cycle[index] if channel_index is None else self.cycle[index, channel_index.view(rows, 1)]
        if c.cycle_amplitude == "window":
            values = values * _window_amplitude(window, values[:, :c.lookback])
        return values[:, :c.lookback], values[:, c.lookback:]

    def _encode_and_project(self, x: Tensor, memory_state: list | None = None) -> Tensor:
        """[b', l, k] normalised windows -> [b', horizon * out_channels]; ``memory_state``: each block's memory
        state before the window (None: the initial memory)."""
        tokens = self.embed(self._tokenize(x)) + self.position
        for block, state in zip(self.blocks, memory_state or [None] * len(self.blocks)):
            tokens, _ = block(tokens, state)
        return self.head(self.final_norm(tokens))

    def _tokenize(self, series: Tensor) -> Tensor:
        """[b', l, k] -> [b', n, features]: patches (end padded with the last step, as PatchTST) or single steps."""
        if self.config.embedding == "token":
            return series
        c = self.config
        padded = torch.cat([series, series[:, -1:].expand(-1, c.stride, -1)], dim=1)
        patches = padded.unfold(1, c.patch_len, c.stride)  # [b', n, k, patch_len]
        return patches.flatten(2)


def _window_amplitude(window: Tensor, cycle: Tensor, largest: float = 2.0) -> Tensor:
    """Least-squares scale of ``cycle`` in ``window`` (both ``[rows, time(, channels)]``, means removed), clipped to
    ``[0, largest]``: shape ``[rows, 1(, channels)]``. Without detrending, a flat or cycle-free window gives ~0."""
    centred_window = window - window.mean(dim=1, keepdim=True)
    centred_cycle = cycle - cycle.mean(dim=1, keepdim=True)
    fit = (centred_window * centred_cycle).sum(dim=1, keepdim=True)
    return (fit / (centred_cycle.square().sum(dim=1, keepdim=True) + 1e-6)).clamp(0.0, largest)


def _token_count(config: ForecastNetConfig) -> int:
    if config.embedding == "token":
        return config.lookback
    return (config.lookback + config.stride - config.patch_len) // config.stride + 1


def _check_config(config: ForecastNetConfig) -> None:
    if config.embedding not in EMBEDDINGS:
        raise InputError(f"embedding must be one of {EMBEDDINGS}, got {config.embedding!r}")
    if config.channels not in CHANNEL_MODES:
        raise InputError(f"channels must be one of {CHANNEL_MODES}, got {config.channels!r}")
    if config.embedding == "patch" and config.lookback + config.stride < config.patch_len:
        # the window is padded with `stride` copies of its last step, so one patch needs patch_len - stride steps
        raise InputError(f"lookback={config.lookback} is too short for patches of {config.patch_len} steps every "
                         f"{config.stride}: it must be at least {config.patch_len - config.stride}")
    if config.cycle_amplitude not in CYCLE_AMPLITUDES:
        raise InputError(f"cycle_amplitude must be one of {CYCLE_AMPLITUDES}, got {config.cycle_amplitude!r}")
    if config.cycle_length < 0:
        raise InputError(f"cycle_length must be >= 0 (0: no cycle), got {config.cycle_length}")
