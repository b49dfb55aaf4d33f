"""Dirty values: known missing-value sentinels (-9999) and values beyond a robust bound, found per channel, reported
with their column, count and first timestamp, then kept, treated as missing (and filled) or refused.

The bound is ``median +- MAD_LIMIT * 1.4826 * MAD`` of the channel's training rows (sentinels left out), so one
glitch cannot move it. ``MAD_LIMIT`` was chosen on ETTh1, ETTm1, Weather and Electricity (docs/forecasting.md,
"Dirty data: the bound"): their largest legitimate value lies 27 MADs from its median in the validation splits and
41 in the training splits (Weather's solar radiation, both), a sentinel thousands. A channel whose MAD is 0 (mostly one value, such as rain) is checked for sentinels
only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from memorycore.errors import InputError

#: Values that stand for "missing" in meteorological and hydrological files rather than for a measurement.
SENTINELS = (-9999.0, -99999.0, -999.0)
MAD_LIMIT = 50.0
OUTLIER_ACTIONS = ("keep", "missing", "error")
_MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation is 1.4826 MADs


@dataclass(frozen=True)
class OutlierBounds:
    """Per-channel bounds ``[low, high]`` outside which a value is an outlier (infinite: no bound)."""

    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, limit: float = MAD_LIMIT) -> "OutlierBounds":
        """Bounds from training rows ``values [time, channels]`` (NaN and sentinels ignored)."""
        values = np.where(is_sentinel(values), np.nan, np.asarray(values, dtype=np.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN channel: no bound
            median = np.nanmedian(values, axis=0)
            spread = _MAD_TO_SIGMA * np.nanmedian(np.abs(values - median), axis=0)
        usable = np.isfinite(spread) & (spread > 0)
        half = np.where(usable, limit * np.where(usable, spread, 0), np.inf)
        return cls(np.where(usable, median - half, -np.inf), np.where(usable, median + half, np.inf))

    def to_dict(self) -> dict:
        """JSON-ready: None for no bound."""
        return {side: [None if np.isinf(v) else float(v) for v in getattr(self, side)] for side in ("low", "high")}

    @classmethod
    def from_dict(cls, state: dict) -> "OutlierBounds":
        low = [-np.inf if v is None else v for v in state["low"]]
        high = [np.inf if v is None else v for v in state["high"]]
        return cls(np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64))


def is_sentinel(values: np.ndarray) -> np.ndarray:
    """Where ``values`` hold one of :data:`SENTINELS`."""
    return np.isin(np.asarray(values, dtype=np.float64), SENTINELS)


def find_outliers(wide: pd.DataFrame, bounds: OutlierBounds) -> np.ndarray:
    """Boolean mask ``[time, channels]`` of the sentinels and of the values outside ``bounds`` (NaN are not
    outliers: they are missing already)."""
    values = wide.to_numpy(dtype=np.float64)
    if values.shape[1] != len(bounds.low):
        raise InputError(f"outlier bounds for {len(bounds.low)} channels, data with {values.shape[1]}")
    with np.errstate(invalid="ignore"):
        return is_sentinel(values) | (values < bounds.low) | (values > bounds.high)


def describe_outliers(wide: pd.DataFrame, mask: np.ndarray, most: int = 5) -> str:
    """``column: count value(s) from first timestamp (first value)`` for each column with outliers, on one line."""
    parts = []
    for j in np.flatnonzero(mask.any(axis=0)):
        first = int(np.argmax(mask[:, j]))
        parts.append(f"{wide.columns[j]}: {int(mask[:, j].sum())} value(s) from {wide.index[first]} "
                     f"({wide.iat[first, j]:g})")
    more = f"; and {len(parts) - most} more columns" if len(parts) > most else ""
    return "; ".join(parts[:most]) + more


def handle_outliers(wide: pd.DataFrame, bounds: OutlierBounds, action: str = "missing") -> pd.DataFrame:
    """Report the outliers of ``wide`` as a warning and apply ``action``: "keep" them, treat them as "missing"
    (filled linearly in time from their neighbours, other values untouched) or raise an "error".

    Examples
    --------
    >>> wide = pd.DataFrame({"wv": [1.0, 2.0, -9999.0, 4.0]}, index=pd.date_range("2020", periods=4, freq="h"))
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     handle_outliers(wide, OutlierBounds.fit(wide.to_numpy()))["wv"].tolist()
    [1.0, 2.0, 3.0, 4.0]
    """
    if action not in OUTLIER_ACTIONS:
        raise InputError(f"unknown outlier action {action!r}; use one of: {', '.join(OUTLIER_ACTIONS)}")
    mask = find_outliers(wide, bounds)
    if not mask.any():
        return wide
    found = (f"outliers (a missing-value code such as -9999, or over {MAD_LIMIT:g} median absolute deviations from "
             f"the channel's training median): {describe_outliers(wide, mask)}")
    if action == "error":
        raise InputError(f"{found}; clean them, or pass --outliers missing (fill them) or keep")
    if action == "keep":
        warnings.warn(f"{found}; kept as values (--outliers keep)", stacklevel=2)
        return wide
    left = np.isfinite(wide.to_numpy()) & ~mask
    if (mask.any(axis=0) & ~left.any(axis=0)).any():
        raise InputError(f"{found}; a column holds no other value to fill them from: clean it or drop it")
    warnings.warn(f"{found}; treated as missing and filled linearly in time (--outliers keep|error to change)",
                  stacklevel=2)
    filled = wide.mask(mask).interpolate(method="linear", limit_direction="both")
    return wide.where(~mask, filled)
