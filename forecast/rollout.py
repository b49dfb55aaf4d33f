"""Forecasts of scaled windows by a fitted network, rolled out past its horizon by feeding forecasts back, and
their errors on a split."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from forecast.data import WindowDataset
from forecast.model import MemoryForecastNet
from memorycore.errors import InputError
from memorycore.training import predict_batches


def roll_out(one_shot: Callable[[np.ndarray, torch.Tensor | None], np.ndarray], windows: np.ndarray, steps: int,
             horizon: int, phases: torch.Tensor | None = None) -> np.ndarray:
    """Call ``one_shot([n, lookback, c], phases) -> [n, horizon, c]`` until ``steps`` values are forecast, each time
    sliding the window (and its starting phase) over the forecasts so far: ``[n, steps, c]``."""
    lookback = windows.shape[1]
    outputs = []
    for _ in range(math.ceil(steps / horizon)):
        forecast = one_shot(windows, phases)
        outputs.append(forecast)
        windows = np.concatenate([windows, forecast], axis=1)[:, -lookback:]
        phases = None if phases is None else phases + horizon
    return np.concatenate(outputs, axis=1)[:, :steps]


def run_network(network: MemoryForecastNet, data: Dataset, fn: Callable, device: torch.device,
                batch_size: int = 256) -> np.ndarray:
    """``fn(batch)`` over ``data`` with ``network`` moved to ``device`` for the call (and back to CPU), as float64."""
    network.to(device).eval()
    try:
        return predict_batches(fn, data, batch_size=batch_size, device=device).numpy().astype(np.float64)
    finally:
        network.to("cpu")


def forecast_windows(network: MemoryForecastNet, windows: np.ndarray, steps: int, *, device: torch.device,
                     phases: torch.Tensor | None = None, batch_size: int = 256) -> np.ndarray:
    """Forecasts ``[n, steps, channels]`` of scaled windows ``[n, lookback, channels]`` starting at cycle phases
    ``phases [n]`` (None without a cycle)."""
    def one_shot(batch: np.ndarray, phase: torch.Tensor | None) -> np.ndarray:
        data = _tensor_dataset(torch.as_tensor(batch, dtype=torch.float32), phase)
        return run_network(network, data, lambda b: network(*b), device, batch_size)

    return roll_out(one_shot, np.asarray(windows, dtype=np.float64), steps, network.config.horizon, phases)


def forecast_series(network: MemoryForecastNet, series: np.ndarray, channel_index: np.ndarray, steps: int, *,
                    device: torch.device, phases: torch.Tensor | None = None, batch_size: int = 256) -> np.ndarray:
    """Forecasts ``[n, steps]`` of scaled single-channel windows ``[n, lookback]``, row i of channel
    ``channel_index[i]`` (a channel-independent network: one GluonTS item per row)."""
    index = torch.as_tensor(np.asarray(channel_index), dtype=torch.long)

    def one_shot(batch: np.ndarray, phase: torch.Tensor | None) -> np.ndarray:
        data = _tensor_dataset(torch.as_tensor(batch[..., 0], dtype=torch.float32), phase, index)
        forecast = run_network(
            network, data, lambda b: network.forecast_series(b[0], b[-1], b[1] if len(b) == 3 else None), device,
            batch_size)
        return forecast[..., None]

    windows = np.asarray(series, dtype=np.float64)[..., None]
    return roll_out(one_shot, windows, steps, network.config.horizon, phases)[..., 0]


def window_errors(network: MemoryForecastNet, values: np.ndarray, phases: np.ndarray | None, *,
                  device: torch.device, max_windows: int | None = None) -> np.ndarray:
    """Errors (forecast - truth) ``[n, horizon, c]`` of the stride-1 windows of the scaled series ``values [t, c]``
    (rows at cycle phases ``phases [t]``): every window, or at most ``max_windows`` evenly spaced ones."""
    lookback, horizon = network.config.lookback, network.config.horizon
    windows = WindowDataset(values, lookback, horizon, phases)
    targets = window_targets(windows.values.numpy().astype(np.float64), lookback, horizon)
    if max_windows is not None and len(windows) > max_windows:
        chosen = np.unique(np.linspace(0, len(windows) - 1, max_windows).round().astype(int))
        windows, targets = Subset(windows, chosen.tolist()), targets[chosen]
    predictions = run_network(network, windows, lambda batch: network(batch[0], *batch[2:]), device)
    return predictions - targets[:len(predictions)]


def window_targets(values: np.ndarray, lookback: int, horizon: int) -> np.ndarray:
    """The targets ``[n, horizon, c]`` of the stride-1 windows of ``values [t, c]`` (a view, no copy)."""
    future = np.asarray(values)[lookback:]
    return np.lib.stride_tricks.sliding_window_view(future, horizon, axis=0).transpose(0, 2, 1)


def check_phases(phases: np.ndarray | None, rows: int, cycle_length: int) -> torch.Tensor | None:
    """``phases`` as a tensor of ``rows`` window-start phases for a model with a cycle of ``cycle_length`` steps
    (None without a cycle); InputError when they are missing or of another count."""
    if not cycle_length:
        return None
    if phases is None:
        raise InputError(f"this model has a cycle of {cycle_length} steps: pass phases= (the phase of each "
                         "window's first step, from phases_at(timestamps))")
    phases = torch.as_tensor(np.asarray(phases), dtype=torch.long).reshape(-1)
    if len(phases) != rows:
        raise InputError(f"got {len(phases)} phases for {rows} windows")
    return phases


def _tensor_dataset(windows: torch.Tensor, phases: torch.Tensor | None, *more: torch.Tensor) -> TensorDataset:
    tensors = (windows,) if phases is None else (windows, phases)
    return TensorDataset(*tensors, *more)
