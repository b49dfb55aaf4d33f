"""Forecast intervals by split conformal calibration: quantiles of the validation residuals per horizon step and
channel, stored at fixed levels and interpolated between them (docs/forecasting.md: coverage measured)."""

from __future__ import annotations

import warnings

import numpy as np

from memorycore.errors import InputError

# Levels at which fit stores the quantiles of the validation residuals; any level in [0.01, 0.99] can be asked for.
QUANTILE_LEVELS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99)
CALIBRATION_WINDOWS = 1000  # validation windows (evenly spaced) whose residuals calibrate the quantiles


def calibrate(residuals: np.ndarray) -> np.ndarray:
    """The stored table ``[len(QUANTILE_LEVELS), horizon, channels]`` of residuals ``[n, horizon, channels]``
    (truth - forecast). NaN residuals (ragged series where they do not exist) are left out; a channel with none at
    a step takes the quantiles of all channels' residuals there."""
    if not np.isnan(residuals).any():
        return np.quantile(residuals, QUANTILE_LEVELS, axis=0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: filled below
        table = np.nanquantile(residuals, QUANTILE_LEVELS, axis=0)
        pooled = np.nanquantile(residuals.transpose(0, 2, 1).reshape(-1, residuals.shape[1]), QUANTILE_LEVELS, axis=0)
    return np.where(np.isnan(table), pooled[..., None], table).astype(np.float32)


def interpolate_quantiles(table: np.ndarray | None, quantiles, steps: int, horizon: int) -> np.ndarray:
    """Quantiles ``[len(quantiles), steps, channels]`` at levels in [0.01, 0.99], interpolated linearly between the
    rows of ``table`` (from :func:`calibrate`; None: a model saved before calibration). Raises InputError naming
    what is wrong."""
    try:
        levels = np.array([float(level) for level in quantiles])
    except (TypeError, ValueError):
        raise InputError(f"quantiles must be numbers in [0.01, 0.99], got {quantiles!r}") from None
    if not len(levels) or not ((levels >= QUANTILE_LEVELS[0]) & (levels <= QUANTILE_LEVELS[-1])).all():  # NaN
        raise InputError(f"quantile levels must lie in [0.01, 0.99] (e.g. 0.1,0.9), got {quantiles!r}")
    if steps > horizon:
        raise InputError(f"quantiles are calibrated for up to horizon = {horizon} steps, not {steps}: "
                         "ask for fewer steps or no quantiles")
    if table is None:
        raise InputError("this model has no calibrated quantiles (its file predates them): refit it")
    stored = np.asarray(QUANTILE_LEVELS)
    upper = np.clip(np.searchsorted(stored, levels), 1, len(stored) - 1)
    weight = ((levels - stored[upper - 1]) / (stored[upper] - stored[upper - 1]))[:, None, None]
    table = table[:, :steps].astype(np.float64)
    return (1 - weight) * table[upper - 1] + weight * table[upper]


def coverage(errors: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """Share of the truths inside the interval: ``errors`` (forecast - truth) ``[n, horizon, channels]``, the
    residual quantiles ``low``, ``high`` ``[horizon, channels]`` (low <= truth - forecast <= high)."""
    inside = (errors <= -low) & (errors >= -high)
    return float(inside[np.isfinite(errors)].mean())  # NaN: ragged series where they do not exist
