"""The forecaster's closed-form start: the cycle at the per-phase training means, the linear path at the ridge
solution, so that training starts from the best linear forecaster (docs/forecasting.md has the measurements)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch

from forecast.baseline import ALPHAS
from forecast.data import ProtocolData, WindowDataset
from forecast.model import CYCLE_AMPLITUDES, MemoryForecastNet
from memorycore.training import ordered_batches


def closed_form_start(network: MemoryForecastNet, prepared: ProtocolData, phases: dict,
                      cycle_amplitude: str = "auto") -> None:
    """Set ``network``'s cycle and linear path in closed form (:func:`closed_form_init`). With ``cycle_amplitude=
    "auto"`` and a cycle, both amplitudes are started and the one whose start has the lower validation MSE is kept
    in ``network.config`` (no training is spent on the choice)."""
    if cycle_amplitude != "auto" or not network.config.cycle_length:
        closed_form_init(network, prepared, phases)
        return
    scores = {}
    for amplitude in CYCLE_AMPLITUDES:
        network.config = dataclasses.replace(network.config, cycle_amplitude=amplitude)
        scores[amplitude] = closed_form_init(network, prepared, phases)
    network.config = dataclasses.replace(network.config, cycle_amplitude=min(scores, key=scores.get))
    closed_form_init(network, prepared, phases)


def closed_form_init(network: MemoryForecastNet, prepared: ProtocolData, phases: dict) -> float:
    """Start the cycle at the per-phase means of the training rows (centred per channel) and the linear path at the
    ridge solution on the cycle-removed, mean-centred training windows, its penalty picked on validation.

    RevIN's affine starts at the identity and the backbone's head at zero, so the network then forecasts exactly
    ``cycle + ridge`` (ridge on mean-centred windows equals it on standardised ones: both are scale-equivariant).
    ``phases`` maps each split's name to the cycle phase of its rows (None without a cycle). Returns the validation
    MSE of that forecast (NaN without a linear path).
    """
    lookback = network.config.lookback
    if network.cycle is not None:
        train, train_phases = prepared.train, phases["train"]
        mean = np.nanmean if np.isnan(train).any() else np.mean  # NaN: where ragged series do not exist
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a phase no value of a series falls on: 0 below
            table = np.stack([mean(train[train_phases == p], axis=0) if (train_phases == p).any()
                              else np.zeros(train.shape[1]) for p in range(network.config.cycle_length)])
        table = np.nan_to_num(table)
        network.cycle.data.copy_(torch.as_tensor(table - table.mean(axis=0), dtype=torch.float32))
    if network.linear is None:
        return math.nan
    gram, cross, _, _ = _residual_moments(network, prepared.train, phases["train"])
    val_moments = _residual_moments(network, prepared.val, phases["val"])
    solutions = [np.linalg.solve(gram + alpha * np.eye(lookback), cross) for alpha in ALPHAS]
    best = min(solutions, key=lambda weights: _squared_error(weights, *val_moments))
    network.linear.weight.data.copy_(torch.as_tensor(best.T, dtype=torch.float32))
    network.linear.bias.data.zero_()
    return _squared_error(best, *val_moments)


@torch.no_grad()
def _residual_moments(network: MemoryForecastNet, values: np.ndarray, phases: np.ndarray | None,
                      batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, float, int]:
    """``X'X``, ``X'Y``, ``sum(Y^2)`` and the element count of ``Y`` over every window of every channel, where X are
    the cycle-removed, mean-centred inputs and Y the cycle-removed targets minus the same mean: all a ridge fit and
    its validation error need (float64)."""
    lookback, horizon = network.config.lookback, network.config.horizon
    gram, cross, target_square, count = np.zeros((lookback, lookback)), np.zeros((lookback, horizon)), 0.0, 0
    windows = WindowDataset(values, lookback, horizon, phases)
    for x, y, *phase in ordered_batches(windows, batch_size):
        x, y = x.double(), y.double()
        input_cycle, output_cycle = network.cycle_parts(x, phase[0] if phase else None)
        x, y = x - input_cycle, y - output_cycle
        level = x.mean(dim=1, keepdim=True)
        inputs = (x - level).transpose(1, 2).reshape(-1, lookback).numpy()
        targets = (y - level).transpose(1, 2).reshape(-1, horizon).numpy()
        if np.isnan(inputs).any() or np.isnan(targets).any():  # windows of ragged series where they do not exist
            whole = np.isfinite(inputs).all(axis=1) & np.isfinite(targets).all(axis=1)
            inputs, targets = inputs[whole], targets[whole]
        gram += inputs.T @ inputs
        cross += inputs.T @ targets
        target_square += float(np.square(targets).sum())
        count += targets.size
    return gram, cross, target_square, count


def _squared_error(weights: np.ndarray, gram: np.ndarray, cross: np.ndarray, target_square: float,
                   count: int) -> float:
    """Mean squared error of ``X @ weights`` against Y from the moments: (W'GW - 2 W'C + Y'Y) / n."""
    return (np.sum(weights * (gram @ weights)) - 2 * np.sum(weights * cross) + target_square) / count
