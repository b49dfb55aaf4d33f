"""Backtesting as neuralforecast's ``cross_validation`` and darts' ``historical_forecasts``: forecasts from several
cutoffs near the end of a series, each from the rows up to its cutoff only, against the actual values after it.

The last window ends at the series' last row; each earlier cutoff lies ``step_size`` rows before the next. The model
is fitted on the rows up to the first cutoff (``refit=False``) or again on the rows up to every cutoff
(``refit=True``); the forecast of a cutoff reads the ``lookback`` rows that end at it. Nothing after a cutoff reaches
its forecast: not the training, not the scaler, not the outlier bounds, not the filling of missing values.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import clone

from forecast.data import read_series, wide_to_long
from forecast.metrics import channel_metrics
from forecast.outliers import OutlierBounds, handle_outliers
from forecast.ragged import is_ragged
from memorycore.errors import InputError

_READ_OPTIONS = ("date_column", "target", "fill", "allow_irregular")


def cutoff_rows(n_rows: int, h: int, n_windows: int, step_size: int) -> list[int]:
    """Row numbers of the cutoffs (the last row each forecast sees), oldest first, the last ``h`` rows before the
    end.

    Examples
    --------
    >>> cutoff_rows(100, h=10, n_windows=3, step_size=5)
    [79, 84, 89]
    """
    for name, value in (("h", h), ("n_windows", n_windows), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    last = n_rows - h - 1
    rows = [last - (n_windows - 1 - i) * step_size for i in range(n_windows)]
    if rows[0] < 0:
        raise InputError(f"{n_windows} windows {step_size} rows apart with h = {h} need more than {n_rows} rows: "
                         "ask for fewer windows or a smaller step")
    return rows


def cross_validation(model, data, n_windows: int = 1, step_size: int | None = None, refit: bool = False, *,
                     h: int | None = None, quantiles: list[float] | None = None, **fit_options) -> pd.DataFrame:
    """Forecasts of ``model``'s copies (:func:`sklearn.base.clone`: ``model`` itself is not changed) from
    ``n_windows`` cutoffs ``step_size`` rows apart (default ``h``), against the actuals.

    Parameters
    ----------
    model : MemoryForecaster
        Its parameters are used; fitted or not.
    data : path or DataFrame
        As for ``fit`` (wide or long).
    h : int, optional
        Steps forecast from each cutoff; default the model's horizon.
    quantiles : list of float, optional
        Levels whose calibrated quantiles are added as ``forecast_q<level>``.
    fit_options
        ``date_column, target, fill, allow_irregular, outliers, allow_negative`` as for ``fit``.

    Returns
    -------
    DataFrame
        Long format, one row per series, cutoff and step: ``unique_id, ds, cutoff, y, forecast`` and the quantile
        columns; ``y`` is the actual value after the model's outlier handling (a -9999 is not scored as a value).
    """
    unknown = set(fit_options) - set(_READ_OPTIONS) - {"outliers", "allow_negative"}
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(sorted(unknown))} for cross_validation")
    steps = model.horizon if h is None else h
    wide = read_series(data, **{k: v for k, v in fit_options.items() if k in _READ_OPTIONS})
    rows = cutoff_rows(len(wide), steps, n_windows, steps if step_size is None else step_size)
    fit_options = {k: v for k, v in fit_options.items() if k not in ("date_column", "target")}  # read already
    frames, fitted = [], None
    for row in rows:
        # ragged series (long data) stay long, so that a series absent before the cutoff stays absent
        past = wide_to_long(wide.iloc[:row + 1]).dropna(subset=["y"]) if is_ragged(wide) else wide.iloc[:row + 1]
        if fitted is None or refit:
            fitted = clone(model).fit(past, **fit_options)
        forecast = fitted.predict(past, h=steps, quantiles=quantiles)
        with warnings.catch_warnings():  # an actual that is an outlier is filled from the other actuals, silently:
            warnings.simplefilter("ignore")  # the windows' inputs report the outliers they hold
            actual = handle_outliers(wide.iloc[row + 1:row + 1 + steps][fitted.columns_], fitted.outlier_bounds_,
                                     fitted.outliers_)
        frames.append(_window_frame(forecast, actual, wide.index[row]))
    return pd.concat(frames).sort_values(["unique_id", "cutoff", "ds"], kind="stable").reset_index(drop=True)


def _window_frame(forecast: pd.DataFrame, actual: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """One window's forecasts (wide: the channels then ``<column>_q<level>``; or long: ``unique_id, ds, y,
    y_q<level>``) beside the actuals ``[h, channels]`` that exist, in the long format."""
    if "unique_id" in forecast.columns:
        long = forecast.rename(columns=lambda name: "forecast" + name[1:] if name.startswith("y") else name)
    else:
        columns = list(actual.columns)
        long = wide_to_long(forecast[columns]).rename(columns={"y": "forecast"})
        for name in forecast.columns[len(columns):]:  # <column>_q<level>
            level = name.rsplit("_q", 1)[1]
            quantile = forecast[[f"{c}_q{level}" for c in columns]].set_axis(columns, axis=1)
            long[f"forecast_q{level}"] = wide_to_long(quantile)["y"].to_numpy()
    truth = wide_to_long(actual).dropna(subset=["y"])  # a ragged series that has ended has no actual
    merged = truth.merge(long, on=["unique_id", "ds"], how="inner")
    merged.insert(2, "cutoff", cutoff)
    return merged


def backtest_metrics(frame: pd.DataFrame, history: pd.DataFrame | None = None, season: int = 1,
                     outliers: str = "missing") -> pd.DataFrame:
    """Metrics (:mod:`forecast.metrics`) per cutoff and series of a :func:`cross_validation` frame, in the data's
    units; with ``history`` (the wide series as read), MASE against the seasonal naive forecast on the rows up to
    each cutoff, its outliers handled as the models did (``outliers``: a -9999 would inflate the naive error); with
    quantile columns, CRPS and wQL from them.

    Returns
    -------
    DataFrame
        Indexed by ``(cutoff, unique_id)``, one column per metric.
    """
    levels = {float(c[len("forecast_q"):]): c for c in frame.columns if c.startswith("forecast_q")}
    if history is not None and outliers != "keep":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported when the models read the data
            history = history.loc[:, frame["unique_id"].unique()]
            bounds = OutlierBounds.fit(history.loc[:frame["cutoff"].min()].to_numpy())
            history = handle_outliers(history, bounds, "missing")
    tables = []
    for (cutoff, series), group in frame.groupby(["cutoff", "unique_id"], sort=True):
        past = None if history is None else history.loc[:cutoff, [series]].to_numpy()
        table = channel_metrics(group[["y"]].to_numpy(), group[["forecast"]].to_numpy(), [series], insample=past,
                                season=season,
                                quantile_forecasts={q: group[[c]].to_numpy() for q, c in levels.items()} or None)
        tables.append(table.set_axis(pd.MultiIndex.from_tuples([(cutoff, series)], names=["cutoff", "unique_id"])))
    return pd.concat(tables)
