"""``MemoryForecaster``: a scikit-learn-style estimator around :class:`~forecast.model.MemoryForecastNet`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from forecast.data import (ProtocolData, StandardScaler, dataset_name, future_index, is_long_format,
                           prepare_protocol, read_series, resolve_protocol, wide_to_long)
from forecast.model import CHANNEL_MODES, EMBEDDINGS, ForecastNetConfig, MemoryForecastNet
from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.devices import resolve_device
from memorycore.errors import CheckpointError, InputError
from memorycore.training import TrainingHistory, fit_model, predict_batches

CHECKPOINT_CLASS = "MemoryForecaster"
_HISTORY_KEY = "__last_window__"  # tensor name of the stored lookback window in checkpoints


def _mse_loss(model, batch) -> torch.Tensor:
    windows, targets = batch
    return torch.nn.functional.mse_loss(model(windows).float(), targets.float())


class MemoryForecaster(BaseEstimator):
    """Multivariate forecaster: a Simba-style network whose sequence mixer is Titans neural memory.

    Follows the Time-Series-Library protocol (see :mod:`forecast.data`): the model trains on the training split,
    early-stops on the validation split and :meth:`evaluate` scores every window of the test split on the scaled values.

    Parameters
    ----------
    lookback : int, default 96
        Past steps the model reads.
    horizon : int, default 96
        Future steps it forecasts in one shot.
    d_model : int, default 32
        Token width.
    n_blocks : int, default 1
        Number of memory + EinFFT blocks.
    heads : int, default 2
        Memory heads per block.
    memory_depth : int, default 2
        Layers of each memory MLP (1 = linear memory).
    memory_expansion : int, default 2
        Hidden width of each memory MLP as a multiple of its head width.
    chunk_size : int, default 8
        Chunk of the neural memory's parallel update, in tokens (lookback 96 gives 12 patch tokens: chunks of 8 + 4).
    embedding : {"patch", "token"}, default "patch"
        Patches of ``patch_len`` steps every ``stride`` steps, or one token per time step.
    patch_len, stride : int, default 16, 8
    channels : {"independent", "mixing"}, default "independent"
        One sequence per channel with shared weights, or one sequence holding all channels.
    dropout : float, default 0.3
    epochs : int, default 3
        Passes over the training windows (early stopping on validation may end sooner).
    batch_size : int, default 32
    lr : float, default 3e-3
    patience : int, default 3
        Epochs without a better validation loss before stopping.
    max_steps_per_epoch : int, optional
        Cap on optimiser steps per epoch: each epoch then sees a random subset of the windows (None: every window).
        The defaults are sized for a few minutes on 2 CPU cores; on a GPU raise the width and the blocks.
    protocol : {"auto", "etth", "ettm", "ratio"}, default "auto"
        The split; "auto" picks it from the file name (ETTh*/ETTm* borders, else 70/10/20).
    random_state : int, default 0
    device : str, default "auto"
    verbose : bool, default True
        Show a progress bar on stderr.

    Attributes
    ----------
    network_ : MemoryForecastNet
    scaler_ : StandardScaler
        Fit on the training split only.
    columns_ : list of str
    n_features_in_ : int
    protocol_ : str
    history_ : TrainingHistory
    last_window_ : DataFrame
        The last ``lookback`` rows seen by ``fit``: what ``predict()`` without data forecasts from.
    input_format_ : {"wide", "long"}

    Examples
    --------
    >>> model = MemoryForecaster(horizon=24, epochs=1, verbose=False)  # doctest: +SKIP
    >>> model.fit("datasets/ETTh1/ETTh1.csv.gz").predict().shape       # doctest: +SKIP
    (24, 7)
    """

    def __init__(self, *, lookback: int = 96, horizon: int = 96, d_model: int = 32, n_blocks: int = 1,
                 heads: int = 2, memory_depth: int = 2, memory_expansion: int = 2,
                 chunk_size: int = 8, embedding: str = "patch",
                 patch_len: int = 16, stride: int = 8, channels: str = "independent", dropout: float = 0.3,
                 epochs: int = 3, batch_size: int = 32, lr: float = 3e-3, patience: int = 3,
                 max_steps_per_epoch: int | None = None, protocol: str = "auto", random_state: int = 0,
                 device: str = "auto", verbose: bool = True) -> None:
        self.lookback = lookback
        self.horizon = horizon
        self.d_model = d_model
        self.n_blocks = n_blocks
        self.heads = heads
        self.memory_depth = memory_depth
        self.memory_expansion = memory_expansion
        self.chunk_size = chunk_size
        self.embedding = embedding
        self.patch_len = patch_len
        self.stride = stride
        self.channels = channels
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.max_steps_per_epoch = max_steps_per_epoch
        self.protocol = protocol
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, data: str | Path | pd.DataFrame, y=None, *, date_column: str | None = None,
            target: str | list[str] | None = None, fill: str | None = None,
            allow_irregular: bool = False) -> "MemoryForecaster":
        """Train on the protocol's training split with early stopping on its validation split.

        Parameters
        ----------
        data : path or DataFrame
            Wide (date column + numeric columns) or long (unique_id, ds, y); see :func:`forecast.data.read_series`.
        y : ignored
        date_column, target, fill, allow_irregular
            Passed to :func:`forecast.data.read_series`; reused by ``predict`` and ``evaluate``.

        Returns
        -------
        self
        """
        self._check_params()
        read_options = {"date_column": date_column, "target": target, "fill": fill, "allow_irregular": allow_irregular}
        wide = read_series(data, **read_options)
        self.protocol_ = resolve_protocol(self.protocol, dataset_name(data))
        prepared = prepare_protocol(wide, self.lookback, self.horizon, self.protocol_)

        torch.manual_seed(self.random_state)
        self.network_ = MemoryForecastNet(self._network_config(wide.shape[1]))
        self.history_ = fit_model(
            self.network_, _mse_loss, prepared.windows("train", self.lookback, self.horizon),
            prepared.windows("val", self.lookback, self.horizon), epochs=self.epochs, batch_size=self.batch_size,
            lr=self.lr, patience=self.patience, device=self.device, random_state=self.random_state,
            verbose=self.verbose, description="forecast fit", max_steps_per_epoch=self.max_steps_per_epoch)
        self.network_.to("cpu")
        self.scaler_ = prepared.scaler
        self.columns_ = [str(c) for c in wide.columns]
        self.n_features_in_ = len(self.columns_)
        self.input_format_ = "long" if isinstance(data, pd.DataFrame) and is_long_format(data) else "wide"
        self.read_options_ = {k: v for k, v in read_options.items() if k != "target"}
        self.last_window_ = wide.iloc[-self.lookback:].copy()
        return self

    def _check_params(self) -> None:
        for name in ("lookback", "horizon", "d_model", "n_blocks", "heads", "memory_depth", "memory_expansion",
                     "chunk_size",
                     "patch_len", "stride", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (("embedding", EMBEDDINGS), ("channels", CHANNEL_MODES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.d_model % self.heads:
            raise InputError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

    def _network_config(self, n_channels: int) -> ForecastNetConfig:
        return ForecastNetConfig(
            n_channels=n_channels, lookback=self.lookback, horizon=self.horizon, d_model=self.d_model,
            n_blocks=self.n_blocks, heads=self.heads, memory_depth=self.memory_depth,
            memory_expansion=self.memory_expansion, chunk_size=self.chunk_size,
            embedding=self.embedding, patch_len=self.patch_len, stride=self.stride, channels=self.channels,
            dropout=self.dropout)

    # --------------------------------------------------------------------------------------------- predicting
    def predict(self, data: str | Path | pd.DataFrame | None = None, h: int | None = None) -> pd.DataFrame:
        """Forecast the ``h`` steps after the end of ``data`` (default: after the data seen by ``fit``).

        Parameters
        ----------
        data : path or DataFrame, optional
            A series with the fitted columns and at least ``lookback`` rows; its last ``lookback`` rows are used.
        h : int, optional
            Steps to forecast; default ``horizon``. Longer horizons are rolled out by feeding forecasts back.

        Returns
        -------
        DataFrame
            Wide input: indexed by the future timestamps, one column per fitted column. Long input: the long format
            (``unique_id, ds, y``) with the forecasts in ``y``.
        """
        check_is_fitted(self, "network_")
        steps = self.horizon if h is None else h
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"h must be a positive integer, got {h!r}")
        history = self.last_window_ if data is None else self.read_like_fit(data)
        if len(history) < self.lookback:
            raise InputError(f"the series has {len(history)} rows but the model needs lookback = {self.lookback}")
        window = self.scaler_.transform(history.to_numpy()[-self.lookback:])
        scaled = self.forecast_scaled(window[None], steps)[0]
        forecast = pd.DataFrame(self.scaler_.inverse_transform(scaled), columns=self.columns_,
                                index=future_index(history.index, steps))
        long_input = self.input_format_ == "long" if data is None else (
            isinstance(data, pd.DataFrame) and is_long_format(data))
        return wide_to_long(forecast) if long_input else forecast

    def read_like_fit(self, data: str | Path | pd.DataFrame) -> pd.DataFrame:
        """Read ``data`` with the options ``fit`` used and keep the fitted columns, in the fitted order."""
        wide = read_series(data, **self.read_options_)
        missing = [c for c in self.columns_ if c not in wide.columns]
        if missing:
            raise InputError(f"the data lacks the fitted column(s) {', '.join(missing)}; "
                             f"the model was trained on: {', '.join(self.columns_)}")
        return wide[self.columns_]

    def forecast_scaled(self, windows: np.ndarray, steps: int | None = None, batch_size: int = 256) -> np.ndarray:
        """Forecasts ``[n, steps, channels]`` from scaled windows ``[n, lookback, channels]`` (the protocol's scale).

        ``steps`` defaults to ``horizon``; more steps are rolled out by feeding the forecasts back as input.
        """
        check_is_fitted(self, "network_")

        def one_shot(batch: np.ndarray) -> np.ndarray:
            data = torch.utils.data.TensorDataset(torch.as_tensor(batch, dtype=torch.float32))
            return self._predict_dataset(data, lambda b: self.network_(b[0]), batch_size)

        return _roll_out(one_shot, np.asarray(windows, dtype=np.float64), steps or self.horizon, self.horizon)

    def forecast_series_scaled(self, series: np.ndarray, channel_index: np.ndarray, steps: int | None = None,
                               batch_size: int = 256) -> np.ndarray:
        """Forecasts ``[n, steps]`` from scaled single-channel windows ``[n, lookback]``; row i belongs to channel
        ``channel_index[i]``. Channel-independent models only (a mixing model needs all channels)."""
        check_is_fitted(self, "network_")
        if self.channels != "independent":
            raise InputError("single-channel forecasts need a model trained with channels='independent'")
        index = torch.as_tensor(np.asarray(channel_index), dtype=torch.long)

        def one_shot(batch: np.ndarray) -> np.ndarray:
            data = torch.utils.data.TensorDataset(torch.as_tensor(batch[..., 0], dtype=torch.float32), index)
            forecast = self._predict_dataset(data, lambda b: self.network_.forecast_series(b[0], b[1]), batch_size)
            return forecast[..., None]

        windows = np.asarray(series, dtype=np.float64)[..., None]
        return _roll_out(one_shot, windows, steps or self.horizon, self.horizon)[..., 0]

    def _predict_dataset(self, data, fn, batch_size: int = 256) -> np.ndarray:
        device = resolve_device(self.device)
        self.network_.to(device).eval()
        try:
            return predict_batches(fn, data, batch_size=batch_size, device=device).numpy().astype(np.float64)
        finally:
            self.network_.to("cpu")

    # --------------------------------------------------------------------------------------------- evaluating
    def evaluate(self, data: str | Path | pd.DataFrame, *, protocol: str | None = None) -> dict[str, float]:
        """MSE and MAE on every window of the protocol's test split, on the scaled values (as published tables).

        The split is the one ``fit`` used (or ``protocol``); the scaler is the fitted one (fit on the training rows).

        Returns
        -------
        dict
            ``{"mse": ..., "mae": ..., "windows": n_test_windows}``
        """
        check_is_fitted(self, "network_")
        prepared = self.prepare(data, protocol=protocol)
        test = prepared.windows("test", self.lookback, self.horizon)
        predictions = self._predict_dataset(test, lambda batch: self.network_(batch[0]))
        targets = test.values[self.lookback:].numpy().astype(np.float64)
        error = _window_errors(predictions, targets)
        return {"mse": float(np.square(error).mean()), "mae": float(np.abs(error).mean()), "windows": len(test)}

    def prepare(self, data: str | Path | pd.DataFrame, *, protocol: str | None = None) -> ProtocolData:
        """Read ``data`` like ``fit`` did and cut it by the protocol, scaled with the fitted scaler."""
        check_is_fitted(self, "network_")
        wide = self.read_like_fit(data)
        chosen = self.protocol_ if protocol is None else resolve_protocol(protocol, dataset_name(data))
        prepared = prepare_protocol(wide, self.lookback, self.horizon, chosen)
        scaled = self.scaler_.transform(wide.to_numpy())
        split = prepared.split
        return ProtocolData(split, self.scaler_, *(scaled[slice(*getattr(split, p))] for p in ("train", "val", "test")))

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, path: str | Path) -> Path:
        """Write the model to one ``.safetensors`` file (weights + JSON config in its metadata; no pickle)."""
        check_is_fitted(self, "network_")
        tensors = {f"network.{k}": v for k, v in self.network_.state_dict().items()}
        tensors[_HISTORY_KEY] = torch.as_tensor(self.last_window_.to_numpy(), dtype=torch.float64)
        config = {
            "class": CHECKPOINT_CLASS,
            "params": self.get_params(),
            "network": self.network_.config.to_dict(),
            "scaler": self.scaler_.to_dict(),
            "columns": self.columns_,
            "protocol": self.protocol_,
            "input_format": self.input_format_,
            "read_options": self.read_options_,
            "last_window_index": [t.isoformat() for t in self.last_window_.index],
            "last_window_index_name": self.last_window_.index.name,
            "history": {"train_loss": self.history_.train_loss, "val_loss": self.history_.val_loss,
                        "best_epoch": self.history_.best_epoch, "seconds": self.history_.seconds},
        }
        return save_checkpoint(path, tensors, config)

    @classmethod
    def load(cls, path: str | Path) -> "MemoryForecaster":
        """Read a model written by :meth:`save`.

        Raises :class:`memorycore.CheckpointError` on a missing, foreign or corrupt file.
        """
        tensors, config = load_checkpoint(path, CHECKPOINT_CLASS)
        try:
            model = cls(**config["params"])
            network = MemoryForecastNet(ForecastNetConfig(**config["network"]))
            network.load_state_dict({k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")})
            index = pd.DatetimeIndex(pd.to_datetime(config["last_window_index"]),
                                     name=config["last_window_index_name"])
            last_window = pd.DataFrame(tensors[_HISTORY_KEY].numpy(), index=index, columns=config["columns"])
            history = TrainingHistory(**config["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} is a MemoryForecaster file but its contents are corrupt "
                                  f"({str(error).splitlines()[0][:200]})") from None
        network.eval()
        model.network_, model.scaler_ = network, StandardScaler.from_dict(config["scaler"])
        model.columns_, model.n_features_in_ = list(config["columns"]), len(config["columns"])
        model.protocol_, model.input_format_ = config["protocol"], config["input_format"]
        model.read_options_, model.last_window_, model.history_ = config["read_options"], last_window, history
        return model


def _window_errors(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Errors of forecasts ``[n, horizon, c]`` against the stride-1 targets ``targets[i : i + horizon]`` of a split."""
    horizon = predictions.shape[1]
    view = np.lib.stride_tricks.sliding_window_view(targets, horizon, axis=0)  # [n, c, horizon]
    return predictions - view.transpose(0, 2, 1)[: len(predictions)]


def _roll_out(one_shot, windows: np.ndarray, steps: int, horizon: int) -> np.ndarray:
    """Call ``one_shot([n, lookback, c]) -> [n, horizon, c]`` until ``steps`` values are forecast, each time sliding
    the window over the forecasts so far."""
    lookback = windows.shape[1]
    outputs = []
    for _ in range(math.ceil(steps / horizon)):
        forecast = one_shot(windows)
        outputs.append(forecast)
        windows = np.concatenate([windows, forecast], axis=1)[:, -lookback:]
    return np.concatenate(outputs, axis=1)[:, :steps]
