"""Forecast metrics in the data's units: the usual point metrics, MASE against the seasonal naive forecast, and the
weighted quantile loss / CRPS of quantile forecasts.

scikit-learn's and GluonTS's implementations are used where they exist (MAE, MSE, RMSE, pinball loss; MAPE, sMAPE,
MASE and the quantile loss as GluonTS's evaluator computes them), so that figures compare with those libraries'.
A metric that is undefined on the data (MAPE with a zero truth, MASE with a constant past) is NaN, not a huge number.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, mean_pinball_loss, mean_squared_error, root_mean_squared_error

from memorycore.errors import InputError

with warnings.catch_warnings():  # its note that orjson is not installed would reach every CLI user as a warning
    warnings.filterwarnings("ignore", "Using `json`-module", UserWarning)
    from gluonts.evaluation import metrics as gluonts_metrics

POINT_METRICS = ("MAE", "MSE", "RMSE", "MAPE", "sMAPE", "MASE")
QUANTILE_METRICS = ("CRPS", "wQL")
#: Levels of the quantile forecasts CRPS and wQL are computed from (GluonTS's default evaluation quantiles).
CRPS_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def seasonal_error(insample: np.ndarray, season: int = 1) -> float:
    """Mean absolute error of the seasonal naive forecast (``y[t - season]``) on the past values ``insample``: the
    denominator of MASE (GluonTS's ``calculate_seasonal_error``; a season longer than the past falls back to 1)."""
    past = np.asarray(insample, dtype=np.float64).ravel()
    if len(past) < 2:
        return np.nan
    return float(gluonts_metrics.calculate_seasonal_error(past, seasonality=max(1, int(season))))


def point_metrics(truth: np.ndarray, forecast: np.ndarray, *, insample: np.ndarray | None = None,
                  season: int = 1) -> dict[str, float]:
    """MAE, MSE, RMSE, MAPE, sMAPE and MASE of one series' ``forecast`` against ``truth`` (any equal shapes, in the
    data's units).

    MAPE is NaN when a truth is 0; sMAPE (GluonTS's: 2 |y - f| / (|y| + |f|), from 0 to 2) counts a term with
    y = f = 0 as no error; MASE divides the MAE by :func:`seasonal_error` of ``insample`` (NaN without it or when
    that error is 0).

    Examples
    --------
    >>> scores = point_metrics(np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0]), insample=np.array([0.0, 1.0]))
    >>> scores["MAE"], scores["MSE"], round(scores["MAPE"], 4), scores["MASE"]
    (1.0, 1.6666666666666667, 0.5, 1.0)
    """
    truth, forecast = _same_shape(truth, forecast)
    scores = {"MAE": float(mean_absolute_error(truth, forecast)), "MSE": float(mean_squared_error(truth, forecast)),
              "RMSE": float(root_mean_squared_error(truth, forecast))}
    scores["MAPE"] = float(gluonts_metrics.mape(truth, forecast)) if np.all(truth != 0) else np.nan
    defined = (np.abs(truth) + np.abs(forecast)) > 0
    scores["sMAPE"] = (float(gluonts_metrics.smape(truth[defined], forecast[defined]) * defined.mean())
                       if defined.any() else 0.0)
    scale = np.nan if insample is None else seasonal_error(insample, season)
    scores["MASE"] = float(gluonts_metrics.mase(truth, forecast, scale)) if scale > 0 else np.nan
    return scores


def quantile_metrics(truth: np.ndarray, quantile_forecasts: Mapping[float, np.ndarray]) -> dict[str, float]:
    """CRPS and weighted quantile loss of quantile forecasts ``{level: forecast}`` against ``truth``.

    ``CRPS``: the mean over the levels of twice the pinball loss (scikit-learn's ``mean_pinball_loss``), the
    quantile approximation of the continuous ranked probability score, in the data's units. ``wQL``: the mean over
    the levels of GluonTS's quantile loss divided by ``sum |y|`` (GluonTS's ``mean_wQuantileLoss``; NaN when every
    truth is 0).

    Examples
    --------
    >>> scores = quantile_metrics(np.array([0.0, 4.0]), {0.5: np.array([1.0, 2.0])})
    >>> scores["CRPS"], scores["wQL"]
    (1.5, 0.75)
    """
    if not quantile_forecasts:
        raise InputError("quantile_metrics needs at least one quantile forecast")
    crps, losses = [], []
    for level, forecast in quantile_forecasts.items():
        values, forecast = _same_shape(truth, forecast)
        crps.append(2 * mean_pinball_loss(values, forecast, alpha=float(level)))
        losses.append(gluonts_metrics.quantile_loss(values, forecast, float(level)))
    total = np.abs(np.asarray(truth, dtype=np.float64)).sum()
    return {"CRPS": float(np.mean(crps)), "wQL": float(np.mean(losses) / total) if total > 0 else np.nan}


def channel_metrics(truth: np.ndarray, forecast: np.ndarray, columns: list[str], *,
                    insample: np.ndarray | None = None, season: int = 1,
                    quantile_forecasts: Mapping[float, np.ndarray] | None = None) -> pd.DataFrame:
    """Metrics per channel (rows) of ``forecast`` against ``truth`` ``[..., channels]`` in the data's units:
    :data:`POINT_METRICS`, and :data:`QUANTILE_METRICS` when ``quantile_forecasts {level: [..., channels]}`` are
    given. ``insample [time, channels]``: each channel's past for MASE. NaN values (where a ragged series does not
    exist) are left out; a channel without any value has no row."""
    truth, forecast = np.asarray(truth, dtype=np.float64), np.asarray(forecast, dtype=np.float64)
    if truth.shape[-1] != len(columns):
        raise InputError(f"got {truth.shape[-1]} channels of values for {len(columns)} column names")
    rows = {}
    for j, column in enumerate(columns):
        present = np.isfinite(truth[..., j]) & np.isfinite(forecast[..., j])  # NaN: a ragged series' absence
        if not present.any():
            continue
        past = None if insample is None else np.asarray(insample)[:, j]
        past = None if past is None else past[np.isfinite(past)]
        rows[column] = point_metrics(truth[..., j][present], forecast[..., j][present], insample=past, season=season)
        if quantile_forecasts:
            rows[column] |= quantile_metrics(truth[..., j][present],
                                             {q: f[..., j][present] for q, f in quantile_forecasts.items()})
    return pd.DataFrame.from_dict(rows, orient="index")


def _same_shape(truth, forecast) -> tuple[np.ndarray, np.ndarray]:
    truth, forecast = np.asarray(truth, dtype=np.float64), np.asarray(forecast, dtype=np.float64)
    if truth.shape != forecast.shape:
        raise InputError(f"the forecast's shape {forecast.shape} differs from the truth's {truth.shape}")
    if not truth.size:
        raise InputError("no values to score")
    return truth.ravel(), forecast.ravel()
