"""The ridge baseline of the forecasting benchmark: a linear map from the mean-centred lookback window to the horizon.

One map is shared by all channels (like RLinear without the learned affine): for a window x of length L with mean m,
the forecast is ``m + W (x - m)``. It trains in seconds on CPU and sets the bar a neural forecaster must clear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from forecast.data import ProtocolData

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class RidgeBaseline:
    """Shared-across-channels ridge regression on mean-centred windows.

    Examples
    --------
    >>> import numpy as np
    >>> series = np.sin(np.arange(600) / 5.0)[:, None]
    >>> model = RidgeBaseline.fit(series, lookback=48, horizon=12)
    >>> model.predict(series[-48:][None]).shape
    (1, 12, 1)
    """

    weights: np.ndarray  # [lookback, horizon]
    alpha: float

    @classmethod
    def fit(cls, train: np.ndarray, lookback: int, horizon: int, alpha: float = 1.0) -> "RidgeBaseline":
        """Fit on every stride-1 window of every channel of ``train`` [time, channels]."""
        return cls.fit_path(train, lookback, horizon, (alpha,))[0]

    @classmethod
    def fit_path(cls, train: np.ndarray, lookback: int, horizon: int,
                 alphas: tuple[float, ...]) -> list["RidgeBaseline"]:
        """One model per alpha; the normal equations are accumulated once and solved per alpha."""
        gram = np.zeros((lookback, lookback))
        cross = np.zeros((lookback, horizon))
        for channel in train.T:  # one channel at a time keeps memory at one channel's windows
            inputs, targets = _centred_windows(channel, lookback, horizon)
            gram += inputs.T @ inputs
            cross += inputs.T @ targets
        return [cls(np.linalg.solve(gram + alpha * np.eye(lookback), cross), alpha) for alpha in alphas]

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """Forecast ``[batch, horizon, channels]`` from lookback windows ``[batch, lookback, channels]``."""
        level = windows.mean(axis=1, keepdims=True)
        return np.einsum("blc,lh->bhc", windows - level, self.weights) + level


def _centred_windows(channel: np.ndarray, lookback: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    windows = sliding_window_view(channel, lookback + horizon)
    if np.isnan(channel).any():  # a ragged series: only the windows it fills
        windows = windows[np.isfinite(windows).all(axis=1)]
    level = windows[:, :lookback].mean(axis=1, keepdims=True)
    # contiguous copies: matmul on strided views falls back to a slow path
    return np.ascontiguousarray(windows[:, :lookback] - level), np.ascontiguousarray(windows[:, lookback:] - level)


def evaluate_windows(predict, values: np.ndarray, lookback: int, horizon: int,
                     batch_size: int = 4096) -> tuple[float, float]:
    """MSE and MAE of ``predict(windows) -> forecasts`` over every stride-1 window of ``values`` [time, channels]
    (NaN errors, of series absent on some rows, left out)."""
    windows = sliding_window_view(values, lookback + horizon, axis=0).transpose(0, 2, 1)  # [n, L + H, channels]
    squared = absolute = 0.0
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        error = predict(batch[:, :lookback]) - batch[:, lookback:]
        if np.isnan(error).any():  # windows of ragged series where they do not exist
            error = error[np.isfinite(error)]
        squared += float(np.square(error).sum())
        absolute += float(np.abs(error).sum())
        count += error.size
    return squared / count, absolute / count


def ridge_benchmark(data: ProtocolData, lookback: int, horizon: int,
                    alphas: tuple[float, ...] = ALPHAS) -> tuple[float, float, float]:
    """Fit the ridge baseline with the alpha that is best on validation; return (test MSE, test MAE, alpha)."""
    best = None
    for model in RidgeBaseline.fit_path(data.train, lookback, horizon, alphas):
        val_mse, _ = evaluate_windows(model.predict, data.val, lookback, horizon)
        if best is None or val_mse < best[0]:
            best = (val_mse, model)
    model = best[1]
    mse, mae = evaluate_windows(model.predict, data.test, lookback, horizon)
    return mse, mae, model.alpha
