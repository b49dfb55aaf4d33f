"""GluonTS adapter: run gluonts' evaluation tools (``evaluate_model``, ``Evaluator``, ``make_evaluation_predictions``)
on a fitted :class:`~forecast.estimator.MemoryForecaster`.

Each GluonTS item is one channel: a univariate ``target`` whose ``item_id`` names a fitted column (a model fit on one
column accepts any id). Forecasts are :class:`QuantileForecast`: the point forecast as ``mean`` and, per quantile
level, the point forecast plus that quantile of the model's validation residuals at the same step and channel (see
``MemoryForecaster.predict(quantiles=...)``), so gluonts' quantile losses and coverage measure real intervals. Past
the model's horizon (rolled-out forecasts) and for models without calibrated quantiles the forecast is a
:class:`SampleForecast` with a single sample (every quantile is then the point forecast).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from gluonts.dataset.common import ListDataset
from gluonts.model.forecast import Forecast, QuantileForecast, SampleForecast
from gluonts.model.predictor import RepresentablePredictor
from sklearn.utils.validation import check_is_fitted

from forecast.estimator import MemoryForecaster
from memorycore.errors import InputError
from memorycore.training import check_hyperparameters

DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class MemoryPredictor(RepresentablePredictor):
    """A GluonTS predictor backed by a fitted channel-independent :class:`MemoryForecaster`.

    Parameters
    ----------
    forecaster : MemoryForecaster
        Fitted with ``channels="independent"``.
    prediction_length : int, optional
        Default: the forecaster's horizon; longer lengths are rolled out.
    batch_size : int, default 256
        Items forecast together.
    quantiles : sequence of float, default 0.1, 0.2, ..., 0.9
        Levels of the QuantileForecast (the levels gluonts' Evaluator scores by default); None for point forecasts.

    Examples
    --------
    >>> from gluonts.evaluation import make_evaluation_predictions, Evaluator  # doctest: +SKIP
    >>> forecasts, series = make_evaluation_predictions(to_gluonts(wide), MemoryPredictor(model))  # doctest: +SKIP
    >>> aggregate, per_item = Evaluator()(series, forecasts)  # doctest: +SKIP
    """

    def __init__(self, forecaster: MemoryForecaster, prediction_length: int | None = None,
                 batch_size: int = 256, quantiles: Sequence[float] | None = DEFAULT_QUANTILES) -> None:
        check_is_fitted(forecaster, "network_")
        if forecaster.channels != "independent":
            raise InputError("the GluonTS adapter forecasts one channel per item: fit with channels='independent'")
        if prediction_length is not None:
            check_hyperparameters(prediction_length=prediction_length)
        super().__init__(prediction_length=prediction_length or forecaster.horizon)
        self.forecaster = forecaster
        self.batch_size = batch_size
        calibrated = getattr(forecaster, "residual_quantiles_", None) is not None
        self.quantiles = (list(quantiles) if quantiles and calibrated and self.prediction_length <= forecaster.horizon
                          else None)
        # [levels, steps, channels] on the scaled values; a clear error on bad levels now rather than mid-evaluation
        self._offsets = (forecaster.residual_quantiles(self.quantiles, self.prediction_length) if self.quantiles
                         else None)

    def predict(self, dataset: Iterable[dict], **kwargs) -> Iterator[Forecast]:
        batch: list[dict] = []
        for item in dataset:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._forecast_batch(batch)
                batch = []
        if batch:
            yield from self._forecast_batch(batch)

    def predict_item(self, item: dict) -> Forecast:
        return next(iter(self._forecast_batch([item])))

    def _forecast_batch(self, items: list[dict]) -> list[Forecast]:
        model, lookback = self.forecaster, self.forecaster.lookback
        for item in items:
            model.check_time_step(_step_nanoseconds(item))
        channels = np.array([self._channel_of(item) for item in items])
        windows = np.stack([self._last_window(item, lookback) for item in items])
        mean, scale = model.scaler_.mean[channels, None], model.scaler_.scale[channels, None]
        phases = model.phases_at(pd.DatetimeIndex([_window_start(item, lookback) for item in items]))
        scaled = model.forecast_series_scaled((windows - mean) / scale, channels, self.prediction_length,
                                              phases=phases)
        forecasts = scaled * scale + mean
        if self.quantiles is None:
            return [SampleForecast(samples=forecast[None].astype(np.float32), start_date=_forecast_start(item),
                                   item_id=item.get("item_id"))
                    for item, forecast in zip(items, forecasts)]
        # per item [levels, steps]: the residual quantiles of its channel, on its scale
        bounds = forecasts[None] + self._offsets[:, :, channels].transpose(0, 2, 1) * scale[None]
        keys = [str(level) for level in self.quantiles] + ["mean"]
        return [QuantileForecast(np.concatenate([bounds[:, i], forecasts[i][None]]).astype(np.float32),
                                 start_date=_forecast_start(item), forecast_keys=keys, item_id=item.get("item_id"))
                for i, item in enumerate(items)]

    def _channel_of(self, item: dict) -> int:
        columns = self.forecaster.columns_
        item_id = item.get("item_id")
        if item_id is not None and str(item_id) in columns:
            return columns.index(str(item_id))
        if len(columns) == 1:
            return 0
        raise InputError(f"item_id {item_id!r} is not a fitted column; the model knows: {', '.join(columns)}")

    @staticmethod
    def _last_window(item: dict, lookback: int) -> np.ndarray:
        target = np.asarray(item["target"], dtype=np.float64)
        if target.ndim != 1:
            raise InputError(f"expected a univariate target per item, got shape {target.shape}; "
                             "split multivariate series into one item per channel (see to_gluonts)")
        if len(target) < lookback:
            raise InputError(f"item {item.get('item_id')!r} has {len(target)} values, fewer than lookback = {lookback}")
        window = target[-lookback:]
        if not np.isfinite(window).all():
            raise InputError(f"item {item.get('item_id')!r} has NaN/inf in its last {lookback} values")
        return window


def _window_start(item: dict, lookback: int) -> pd.Timestamp:
    """Timestamp of the first value of the item's last ``lookback`` values (where its cycle phase is read)."""
    start = item["start"] + (len(item["target"]) - lookback)
    return start.to_timestamp() if isinstance(start, pd.Period) else pd.Timestamp(start)


def _step_nanoseconds(item: dict) -> int:
    """The item's time step (its start's frequency) in nanoseconds; 0 when it has no fixed length (months)."""
    start = item["start"]
    if not isinstance(start, pd.Period):
        return 0  # a bare timestamp says nothing about the step
    try:
        return int(pd.Timedelta(start.freq).value)
    except (ValueError, TypeError):
        return 0


def _forecast_start(item: dict) -> pd.Period:
    start = item["start"]
    return start + len(item["target"])


def to_gluonts(wide: pd.DataFrame, freq: str | None = None) -> ListDataset:
    """One univariate GluonTS item per column of a wide DataFrame (``item_id`` = column name).

    Parameters
    ----------
    wide : DataFrame
        As returned by :func:`forecast.data.read_series` (a regular ``DatetimeIndex``).
    freq : str, optional
        Pandas frequency; inferred from the index by default.
    """
    freq = freq or pd.infer_freq(wide.index)
    if freq is None:
        raise InputError("cannot infer the frequency of the index; pass freq= (e.g. 'h')")
    return ListDataset([{"start": wide.index[0], "target": wide[column].to_numpy(dtype=np.float32),
                         "item_id": str(column)} for column in wide.columns], freq=freq)
