"""Multivariate forecasting with neural memory (Simba-style), on the Time-Series-Library protocol.

Examples
--------
>>> from forecast import MemoryForecaster                          # doctest: +SKIP
>>> model = MemoryForecaster(horizon=96).fit("ETTh1.csv")           # doctest: +SKIP
>>> model.evaluate("ETTh1.csv")                                     # doctest: +SKIP
{'mse': ..., 'mae': ..., 'windows': 2785}
>>> model.predict()                                                 # doctest: +SKIP
"""

from forecast.baseline import RidgeBaseline, ridge_benchmark
from forecast.data import (KNOWN_DATASETS, StandardScaler, WindowDataset, long_to_wide, prepare_protocol,
                           read_series, split_borders, wide_to_long)
from forecast.estimator import MemoryForecaster
from forecast.model import ForecastNetConfig, MemoryForecastNet

__all__ = [
    "MemoryForecaster", "MemoryForecastNet", "ForecastNetConfig", "RidgeBaseline", "ridge_benchmark",
    "read_series", "long_to_wide", "wide_to_long", "split_borders", "prepare_protocol", "StandardScaler",
    "WindowDataset", "KNOWN_DATASETS",
]
