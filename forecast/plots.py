"""Plots of history and forecast, one panel per channel, and of backtest errors against the cutoff (matplotlib,
written atomically)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memorycore.errors import InputError
from memorycore.files import pyplot, save_figure


def plot_forecast(history: pd.DataFrame, forecast: pd.DataFrame, path: str | Path, *,
                  title: str | None = None) -> Path:
    """Draw the last rows of ``history`` and the ``forecast`` after them, one panel per column, into a PNG file.

    Parameters
    ----------
    history, forecast : DataFrame
        Wide frames indexed by time with the same columns; ``forecast`` may also hold ``<column>_q0.1`` and
        ``<column>_q0.9`` (``MemoryForecaster.predict(quantiles=[0.1, 0.9])``), drawn as a shaded 80% interval.
    path : path-like
        Output image (the format follows the suffix, e.g. ``.png``, ``.pdf``); written atomically.
    title : str, optional

    Returns
    -------
    Path
    """
    plt, path = pyplot(), Path(path)
    image_format = _image_format(path)
    columns = list(history.columns)
    figure, axes = plt.subplots(len(columns), 1, figsize=(10, 1.8 * len(columns) + 0.8), sharex=True, squeeze=False)
    for axis, column in zip(axes[:, 0], columns):
        axis.plot(history.index, history[column], color="tab:blue", linewidth=1, label="history")
        joined = pd.concat([history[column].iloc[-1:], forecast[column]])  # connect the forecast to the last value
        axis.plot(joined.index, joined.values, color="tab:orange", linewidth=1.2, label="forecast")
        if f"{column}_q0.1" in forecast and f"{column}_q0.9" in forecast:
            axis.fill_between(forecast.index, forecast[f"{column}_q0.1"], forecast[f"{column}_q0.9"],
                              color="tab:orange", alpha=0.2, linewidth=0, label="80% interval")
        axis.axvline(history.index[-1], color="grey", linewidth=0.6, linestyle="--")
        axis.set_ylabel(str(column), rotation=0, ha="right", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0, 0].legend(loc="upper left", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110, image_format=image_format)


def plot_backtest(errors: pd.DataFrame, path: str | Path, *, metric: str = "MASE", title: str | None = None) -> Path:
    """Draw ``metric`` against the cutoff, one line per series (at most 10) and their mean, into an image.

    ``errors``: :func:`forecast.backtest.backtest_metrics`' table, indexed by ``(cutoff, unique_id)``.
    """
    plt, path = pyplot(), Path(path)
    image_format = _image_format(path)
    table = errors[metric].unstack("unique_id")
    figure, axis = plt.subplots(figsize=(9, 3.6))
    for series in table.columns[:10]:
        axis.plot(table.index, table[series], marker="o", markersize=3, linewidth=0.8, alpha=0.6, label=str(series))
    axis.plot(table.index, table.mean(axis=1), color="black", marker="o", linewidth=1.8, label="mean")
    if metric == "MASE":
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")  # the seasonal naive forecast
    axis.set_xlabel("cutoff")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7, ncol=min(6, len(table.columns) + 1), loc="best")
    axis.tick_params(labelsize=7)
    if title:
        axis.set_title(title, fontsize=10)
    figure.autofmt_xdate()
    figure.tight_layout()
    return save_figure(figure, path, dpi=110, image_format=image_format)


def _image_format(path: Path) -> str:
    """The image format a path's suffix names; InputError when matplotlib cannot write it."""
    plt = pyplot()
    image_format = path.suffix.lstrip(".").lower() or "png"
    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if image_format not in supported:
        raise InputError(f"cannot write a .{image_format} image; use one of: "
                         f"{', '.join('.' + name for name in sorted(supported))}")
    return image_format
