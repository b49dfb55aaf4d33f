"""Many series that start and end on different dates (long-format data): each series is windowed on its own rows,
nothing is invented where a series does not exist, and each is forecast after its own last value.

The wide frame of such data holds NaN outside each series (:func:`forecast.data.outside_series`). A window of the
channel-independent network is a window of one series, so a training window counts for the series whose values fill
it and for no other (:func:`masked_loss`); the NaN of the others are zeroed before the network sees them, which
keeps them out of every gradient.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pandas as pd
import torch

from forecast.data import future_index, wide_to_long
from memorycore.errors import InputError


def is_ragged(wide: pd.DataFrame) -> bool:
    """Whether some series of ``wide`` are absent (NaN) on some rows."""
    return bool(wide.isna().to_numpy().any())


def skip_short_series(wide: pd.DataFrame, min_values: int, why: str) -> pd.DataFrame:
    """``wide`` without the series that hold fewer than ``min_values`` values, with a warning naming how many were
    skipped (``why`` says what the count is); InputError when none is left."""
    counts = wide.notna().sum()
    short = counts[counts < min_values]
    if short.empty:
        return wide
    if len(short) == wide.shape[1]:
        raise InputError(f"every series has fewer than {why} = {min_values} values (the longest has "
                         f"{int(counts.max())}); use longer series or a smaller --lookback / --horizon")
    names = ", ".join(map(str, short.index[:5])) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
    warnings.warn(f"{len(short)} of {wide.shape[1]} series have fewer than {why} = {min_values} values and were "
                  f"skipped: {names}", stacklevel=2)
    return wide.drop(columns=short.index)


def masked_loss(criterion: Callable, model, windows: torch.Tensor, targets: torch.Tensor,
                phase: list) -> torch.Tensor:
    """``criterion`` over the (window, channel) pairs whose input and target are all values, of a batch
    ``[b, time, channels]`` in which absent series are NaN."""
    valid = torch.isfinite(windows).all(dim=1) & torch.isfinite(targets).all(dim=1)  # [b, channels]
    prediction = model(torch.nan_to_num(windows), *phase).float()
    if not valid.any():
        return prediction.sum() * 0.0  # no series fills a window of this batch
    chosen = prediction.transpose(1, 2)[valid]
    return criterion(chosen, targets.float().transpose(1, 2)[valid])


def last_rows(wide: pd.DataFrame, lookback: int) -> pd.DataFrame:
    """The rows holding every series' last ``lookback`` values: what ``predict()`` forecasts from."""
    ends = [wide[column].last_valid_index() for column in wide.columns]
    first = min(wide.index.get_loc(end) for end in ends) - lookback + 1
    return wide.iloc[max(first, 0):].copy()


def forecast_each_series(model, history: pd.DataFrame, steps: int,
                         quantiles: list[float] | None = None) -> pd.DataFrame:
    """Long-format forecasts of each series of ``history`` from its own last ``lookback`` values, for the ``steps``
    timestamps after its own last one (``unique_id, ds, y`` and ``y_q<level>``); a series with fewer than
    ``lookback`` values is skipped with a warning.

    ``model``: a fitted channel-independent MemoryForecaster. Series ending on the same row are forecast together
    (their window is one row range; the NaN of the other series are zeroed and their forecasts dropped).
    """
    history = skip_short_series(history, model.lookback, "lookback")
    ends = pd.Series({column: history.index.get_loc(history[column].last_valid_index())
                      for column in history.columns})
    frames = []
    for end, columns in ends.groupby(ends).groups.items():
        rows = history.iloc[end - model.lookback + 1:end + 1]
        window = np.nan_to_num(model.scaler_.transform(rows.to_numpy()))
        phase = model.phases_at(rows.index[:1])
        scaled = model.forecast_scaled(window[None], steps, phases=phase)[0]
        index = future_index(rows.index, steps)
        picked = [model.columns_.index(column) for column in columns]
        forecast = pd.DataFrame(model.to_units(scaled)[:, picked], index=index, columns=list(columns))
        long = wide_to_long(forecast.rename_axis(history.index.name))
        if quantiles is not None:
            for level, offset in zip(quantiles, model.residual_quantiles(quantiles, steps)):
                bound = pd.DataFrame(model.to_units(scaled + offset)[:, picked], index=index, columns=list(columns))
                long[f"y_q{float(level):g}"] = wide_to_long(bound)["y"].to_numpy()
        frames.append(long)
    return pd.concat(frames).sort_values(["unique_id", "ds"], kind="stable").reset_index(drop=True)


def long_forecast_to_wide(forecast: pd.DataFrame) -> pd.DataFrame:
    """:func:`forecast_each_series`' long frame as a wide one (the columns, then ``<column>_q<level>``), NaN where a
    series has no forecast: the layout ``predict`` gives for wide data and ``forecast.plots`` draws."""
    values = [name for name in forecast.columns if name == "y" or name.startswith("y_q")]
    table = forecast.pivot(index="ds", columns="unique_id", values=values)
    wide = pd.concat([table[name].add_suffix(name[1:]) for name in values], axis=1)
    wide.columns.name = None
    return wide
