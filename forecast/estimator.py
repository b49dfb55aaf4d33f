"""``MemoryForecaster``: a scikit-learn-style estimator around :class:`~forecast.model.MemoryForecastNet`."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import Subset

from forecast.baseline import ALPHAS
from forecast.data import (MissingColumnsError, ProtocolData, StandardScaler, WindowDataset, cycle_phases,
                           dataset_name, default_cycle_length, future_index, is_long_format, prepare_protocol,
                           read_series, resolve_protocol, step_nanoseconds, wide_to_long)
from forecast.model import CHANNEL_MODES, CYCLE_AMPLITUDES, EMBEDDINGS, ForecastNetConfig, MemoryForecastNet
from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.devices import resolve_device
from memorycore.errors import CheckpointError, InputError
from memorycore.training import (TrainingHistory, check_hyperparameters, evaluate_loss, fit_model,
                                 ordered_batches, predict_batches, resolve_seed, seeded)

CHECKPOINT_CLASS = "MemoryForecaster"
_HISTORY_KEY = "__last_window__"  # tensor name of the stored lookback window in checkpoints
_QUANTILES_KEY = "__residual_quantiles__"  # tensor name of the calibrated residual quantiles in checkpoints
# Levels at which fit stores the quantiles of the validation residuals (per horizon step and channel); predict
# interpolates between them, so any level in [0.01, 0.99] can be asked for.
QUANTILE_LEVELS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99)
CALIBRATION_WINDOWS = 1000  # validation windows (evenly spaced) whose residuals calibrate the quantiles
LOSSES = ("mse", "mae", "huber")
INITS = ("closed_form", "random")
_TRAINING_LOSSES = {"mse": torch.nn.functional.mse_loss, "mae": torch.nn.functional.l1_loss,
                    "huber": torch.nn.functional.huber_loss}


def _loss_function(name: str):
    """``loss(model, batch)``: the chosen loss while training, MSE in eval mode, so that early stopping and the
    kept weights follow the validation MSE whatever the training loss."""
    def loss(model, batch) -> torch.Tensor:
        windows, targets, *phase = batch
        criterion = _TRAINING_LOSSES[name] if model.training else torch.nn.functional.mse_loss
        return criterion(model(windows, *phase).float(), targets.float())
    return loss


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
    linear_path : bool, default True
        Add a lookback -> horizon linear map (shared by the channels) on the RevIN-normalised window beside the
        memory backbone, whose head starts at zero: the backbone learns a residual on a linear forecast (RLinear).
    cycle_length : int or "auto", default "auto"
        Length of the learned periodic component (CycleNet): a ``[cycle_length, channels]`` table indexed by the
        timestamp's phase, subtracted from the input and added back to the forecast. "auto": one day of steps for
        sub-daily data (24 hourly, 96 for 15 minutes, 144 for 10 minutes), 7 for daily data, none otherwise;
        0 turns it off.
    cycle_amplitude : {"auto", "window", "fixed"}, default "auto"
        "window" scales the cycle by its least-squares amplitude in each input window (clipped to [0, 2]), so a
        cycle weaker than in the training months (winter against summer) is removed and forecast at its current
        strength; "fixed" uses the table as it is (CycleNet). "auto" (with the closed-form start) builds both starts
        and keeps the one with the lower validation MSE; without it, "window".
    init : {"closed_form", "random"}, default "closed_form"
        "closed_form" starts the cycle at the per-phase means of the training rows and the linear path at the ridge
        solution on the cycle-removed training windows (its penalty picked on validation), so training starts
        from the best linear forecaster; "random" keeps PyTorch's initialisation (cycle at zero).
    loss : {"mse", "mae", "huber"}, default "mse"
        Training loss. Early stopping and the kept weights always follow the validation MSE.
    weight_decay : float, default 0.01
        AdamW decay of the weight matrices.
    epochs : int, default 5
        Passes over the training windows (early stopping on validation may end sooner).
    batch_size : int, default 32
    lr : float, default 1e-4
        Peak learning rate. Small because training refines the closed-form start; chosen over 3e-4 and 3e-3 by the
        validation MSE averaged over the four ETTh1 horizons (3e-3 made every epoch worse than the start).
    patience : int or None, default 3
        Epochs without a better validation loss before stopping (None: never stop early).
    max_steps_per_epoch : int, optional
        Cap on optimiser steps per epoch: each epoch then sees a random subset of the windows (None or 0: every
        window).
        The defaults are sized for a few minutes on 2 CPU cores; on a GPU raise the width and the blocks.
    protocol : {"auto", "etth", "ettm", "ratio"}, default "auto"
        The split; "auto" picks it from the file name (ETTh*/ETTm* borders, else 70/10/20).
    random_state : int or None, default 0
        Seeds weight init, dropout and the batch order (None: a fresh seed each fit).
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
    cycle_length_ : int
        The cycle length used (0: none).
    step_ns_ : int
        The time step of the training index in nanoseconds (what phases are counted in).
    start_val_loss_ : float
        Validation MSE of the network before training (the closed-form start with ``init="closed_form"``).
    history_ : TrainingHistory
        ``best_epoch`` is -1 when no epoch beat the closed-form start on validation (its weights are then kept).
    last_window_ : DataFrame
        The last ``lookback`` rows seen by ``fit``: what ``predict()`` without data forecasts from.
    input_format_ : {"wide", "long"}
    residual_quantiles_ : ndarray [len(QUANTILE_LEVELS), horizon, n_features_in_]
        Quantiles of the forecast residuals (truth - forecast, on the scaled values) over up to CALIBRATION_WINDOWS
        validation windows, per horizon step and channel: what ``predict(quantiles=...)`` adds to the forecast.

    Examples
    --------
    >>> model = MemoryForecaster(horizon=24, epochs=1, verbose=False)  # doctest: +SKIP
    >>> model.fit("datasets/ETTh1/ETTh1.csv.gz").predict().shape       # doctest: +SKIP
    (24, 7)
    >>> model.predict(quantiles=[0.1, 0.9]).columns[-2:].tolist()      # doctest: +SKIP
    ['OT_q0.1', 'OT_q0.9']
    """

    def __init__(self, *, lookback: int = 96, horizon: int = 96, d_model: int = 32, n_blocks: int = 1,
                 heads: int = 2, memory_depth: int = 2, memory_expansion: int = 2,
                 chunk_size: int = 8, embedding: str = "patch",
                 patch_len: int = 16, stride: int = 8, channels: str = "independent", dropout: float = 0.3,
                 linear_path: bool = True, cycle_length: int | str = "auto", cycle_amplitude: str = "auto",
                 init: str = "closed_form",
                 loss: str = "mse", weight_decay: float = 0.01, epochs: int = 5, batch_size: int = 32,
                 lr: float = 1e-4, patience: int = 3,
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
        self.linear_path = linear_path
        self.cycle_length = cycle_length
        self.cycle_amplitude = cycle_amplitude
        self.init = init
        self.loss = loss
        self.weight_decay = weight_decay
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

        self.step_ns_ = step_nanoseconds(wide.index)
        self.cycle_length_ = self._resolve_cycle_length()
        phases = self._split_phases(wide.index, prepared)

        seed, device = resolve_seed(self.random_state), resolve_device(self.device)
        with seeded(seed, device):
            self.network_ = MemoryForecastNet(self._network_config(wide.shape[1]))
            if self.init == "closed_form":
                self._closed_form_start(prepared, phases)
            train, val = (WindowDataset(getattr(prepared, part), self.lookback, self.horizon, phases[part])
                          for part in ("train", "val"))
            start_state = copy.deepcopy(self.network_.state_dict())
            start_loss = evaluate_loss(self.network_.to(device), _loss_function(self.loss), val, device=device)
            self.history_ = fit_model(
                self.network_, _loss_function(self.loss), train, val, epochs=self.epochs,
                batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, patience=self.patience,
                device=device, random_state=seed, verbose=self.verbose, description="forecast fit",
                max_steps_per_epoch=self.max_steps_per_epoch)
        self.start_val_loss_ = start_loss
        if start_loss <= min(self.history_.val_loss, default=math.inf):  # training never beat its start
            self.network_.load_state_dict(start_state)
            self.history_.best_epoch = -1
        self.network_.to("cpu").eval()
        self.scaler_ = prepared.scaler
        self.columns_ = [str(c) for c in wide.columns]
        self.n_features_in_ = len(self.columns_)
        self.input_format_ = "long" if is_long_format(data) else "wide"
        self.read_options_ = {k: v for k, v in read_options.items() if k != "target"}
        self.last_window_ = wide.iloc[-self.lookback:].copy()
        residuals = -self._split_errors(prepared.val, phases["val"], max_windows=CALIBRATION_WINDOWS)
        self.residual_quantiles_ = np.quantile(residuals, QUANTILE_LEVELS, axis=0).astype(np.float32)
        return self

    def _closed_form_start(self, prepared: ProtocolData, phases: dict) -> None:
        """The closed-form start; with ``cycle_amplitude="auto"`` the amplitude whose start has the lower validation
        MSE (both are computed in closed form: no training is spent on the choice)."""
        config = self.network_.config
        if self.cycle_amplitude != "auto" or not config.cycle_length:
            _closed_form_init(self.network_, prepared, phases, self.lookback, self.horizon)
            return
        scores = {}
        for amplitude in CYCLE_AMPLITUDES:
            config.cycle_amplitude = amplitude
            scores[amplitude] = _closed_form_init(self.network_, prepared, phases, self.lookback, self.horizon)
        config.cycle_amplitude = min(scores, key=scores.get)
        _closed_form_init(self.network_, prepared, phases, self.lookback, self.horizon)

    def _resolve_cycle_length(self) -> int:
        if self.cycle_length == "auto":
            return default_cycle_length(self.step_ns_)
        if self.cycle_length and not self.step_ns_:
            raise InputError(f"cycle_length={self.cycle_length} needs a fixed time step (hours, minutes, days); "
                             "this index has none (e.g. months): pass cycle_length=0 (--cycle-length 0)")
        return int(self.cycle_length)

    def _split_phases(self, index: pd.DatetimeIndex, prepared: ProtocolData) -> dict[str, np.ndarray | None]:
        """Cycle phase of every row of each split (None per split when there is no cycle)."""
        if not self.cycle_length_:
            return {part: None for part in ("train", "val", "test")}
        phases = cycle_phases(index, self.cycle_length_, self.step_ns_)
        return {part: phases[slice(*getattr(prepared.split, part))] for part in ("train", "val", "test")}

    def phases_at(self, timestamps: pd.DatetimeIndex) -> np.ndarray | None:
        """Cycle phases of ``timestamps`` (None when the model has no cycle)."""
        check_is_fitted(self, "network_")
        if not self.cycle_length_:
            return None
        return cycle_phases(pd.DatetimeIndex(timestamps), self.cycle_length_, self.step_ns_)

    def _check_params(self) -> None:
        check_hyperparameters(lr=self.lr, weight_decay=self.weight_decay, dropout=self.dropout, **{
            name: getattr(self, name) for name in ("lookback", "horizon", "d_model", "n_blocks", "heads",
                                                   "memory_depth", "memory_expansion", "chunk_size", "patch_len",
                                                   "stride", "epochs", "batch_size")})
        for name, allowed in (("embedding", EMBEDDINGS), ("channels", CHANNEL_MODES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name, allowed in (("init", INITS), ("loss", LOSSES), ("cycle_amplitude", ("auto", *CYCLE_AMPLITUDES))):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not (self.cycle_length == "auto" or (isinstance(self.cycle_length, (int, np.integer))
                                                and not isinstance(self.cycle_length, bool)
                                                and self.cycle_length >= 0)):
            raise InputError(f"cycle_length must be 'auto' or an integer >= 0 (0: no cycle), "
                             f"got {self.cycle_length!r}")
        if self.d_model % self.heads:
            raise InputError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        for name, unset in (("max_steps_per_epoch", (None, 0)), ("patience", (None,))):  # no cap; never stop early
            if getattr(self, name) not in unset:
                check_hyperparameters(**{name: getattr(self, name)})

    def _network_config(self, n_channels: int) -> ForecastNetConfig:
        return ForecastNetConfig(
            n_channels=n_channels, lookback=self.lookback, horizon=self.horizon, d_model=self.d_model,
            n_blocks=self.n_blocks, heads=self.heads, memory_depth=self.memory_depth,
            memory_expansion=self.memory_expansion, chunk_size=self.chunk_size,
            embedding=self.embedding, patch_len=self.patch_len, stride=self.stride, channels=self.channels,
            dropout=self.dropout, linear_path=bool(self.linear_path), cycle_length=self.cycle_length_,
            cycle_amplitude="window" if self.cycle_amplitude == "auto" else self.cycle_amplitude)

    # --------------------------------------------------------------------------------------------- predicting
    def predict(self, data: str | Path | pd.DataFrame | None = None, h: int | None = None, *,
                quantiles: list[float] | None = None) -> pd.DataFrame:
        """Forecast the ``h`` steps after the end of ``data`` (default: after the data seen by ``fit``).

        Parameters
        ----------
        data : path or DataFrame, optional
            A series with the fitted columns and at least ``lookback`` rows; its last ``lookback`` rows are used.
        h : int, optional
            Steps to forecast; default ``horizon``. Longer horizons are rolled out by feeding forecasts back.
        quantiles : list of float, optional
            Levels in [0.01, 0.99] (e.g. ``[0.1, 0.9]`` for an 80% interval) to add beside the point forecast: the
            forecast plus that quantile of the validation residuals at the same horizon step and channel (split
            conformal calibration; the validation split also chose the epoch, so intervals can be slightly narrow).
            Needs ``h <= horizon``.

        Returns
        -------
        DataFrame
            Wide input: indexed by the future timestamps, one column per fitted column, then ``<column>_q<level>``
            per level. Long input: the long format (``unique_id, ds, y``) with the forecasts in ``y`` and the
            quantiles in ``y_q<level>``.
        """
        check_is_fitted(self, "network_")
        steps = self.horizon if h is None else h
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"the forecast horizon (h, --horizon) must be a positive integer, got {h!r}")
        history = self.last_window_ if data is None else self.read_like_fit(data)
        if len(history) < self.lookback:
            raise InputError(f"the series has {len(history)} rows but the model needs lookback = {self.lookback}")
        index = future_index(history.index, steps)  # first: it refuses dates pandas cannot hold before any work
        window = self.scaler_.transform(history.to_numpy()[-self.lookback:])
        phase = self.phases_at(history.index[-self.lookback:][:1])
        scaled = self.forecast_scaled(window[None], steps, phases=phase)[0]
        if not np.isfinite(scaled).all():
            raise InputError(f"the forecast is not finite (NaN/inf): the input window's values (as large as "
                             f"{np.abs(history.to_numpy()[-self.lookback:]).max():.3g}) are far outside what the model "
                             "was fitted on; check the data")
        forecast = pd.DataFrame(self.scaler_.inverse_transform(scaled), columns=self.columns_, index=index)
        bounds = {}  # level -> the forecast plus that residual quantile
        if quantiles is not None:
            offsets = self.residual_quantiles(quantiles, steps)
            bounds = {float(level): pd.DataFrame(self.scaler_.inverse_transform(scaled + offset),
                                                 columns=self.columns_, index=index)
                      for level, offset in zip(quantiles, offsets)}
        if (self.input_format_ == "long") if data is None else is_long_format(data):
            return wide_to_long(forecast).assign(**{f"y_q{level:g}": wide_to_long(bound)["y"].to_numpy()
                                                    for level, bound in bounds.items()})
        return pd.concat([forecast] + [bound.add_suffix(f"_q{level:g}") for level, bound in bounds.items()], axis=1)

    def residual_quantiles(self, quantiles, steps: int | None = None) -> np.ndarray:
        """Quantiles ``[len(quantiles), steps, channels]`` of the validation residuals on the scaled values, at
        levels in [0.01, 0.99] interpolated linearly between the stored QUANTILE_LEVELS; ``steps`` (default
        ``horizon``) may not exceed ``horizon``. Raises InputError naming what is wrong."""
        check_is_fitted(self, "network_")
        try:
            levels = np.array([float(level) for level in quantiles])
        except (TypeError, ValueError):
            raise InputError(f"quantiles must be numbers in [0.01, 0.99], got {quantiles!r}") from None
        if not len(levels) or not ((levels >= QUANTILE_LEVELS[0]) & (levels <= QUANTILE_LEVELS[-1])).all():  # NaN
            raise InputError(f"quantile levels must lie in [0.01, 0.99] (e.g. 0.1,0.9), got {quantiles!r}")
        steps = self.horizon if steps is None else steps
        if steps > self.horizon:
            raise InputError(f"quantiles are calibrated for up to horizon = {self.horizon} steps, not {steps}: "
                             "ask for fewer steps or no quantiles")
        if getattr(self, "residual_quantiles_", None) is None:
            raise InputError("this model has no calibrated quantiles (its file predates them): refit it")
        stored = np.asarray(QUANTILE_LEVELS)
        upper = np.clip(np.searchsorted(stored, levels), 1, len(stored) - 1)
        weight = ((levels - stored[upper - 1]) / (stored[upper] - stored[upper - 1]))[:, None, None]
        table = self.residual_quantiles_[:, :steps].astype(np.float64)
        return (1 - weight) * table[upper - 1] + weight * table[upper]

    def read_like_fit(self, data: str | Path | pd.DataFrame) -> pd.DataFrame:
        """Read ``data`` with the options ``fit`` used and keep the fitted columns, in the fitted order (other
        columns, numeric or not, are ignored)."""
        try:
            wide = read_series(data, target=self.columns_, **self.read_options_)
        except MissingColumnsError as error:
            raise InputError(f"the data lacks the fitted column(s) {', '.join(map(str, error.columns))}; "
                             f"the model was trained on: {', '.join(self.columns_)}") from None
        self.check_time_step(step_nanoseconds(wide.index))
        return wide

    def check_time_step(self, step_ns: int) -> None:
        """Raise InputError when data at a step of ``step_ns`` nanoseconds (0: no fixed length) cannot be forecast
        by this model: its cycle and its dynamics were learnt at another step."""
        check_is_fitted(self, "network_")
        if self.step_ns_ and step_ns and step_ns != self.step_ns_ and not self.read_options_.get("allow_irregular"):
            raise InputError(f"the data's time step is {pd.Timedelta(step_ns)} but the model was fitted on steps of "
                             f"{pd.Timedelta(self.step_ns_)}; resample the data to the model's step, or fit a model "
                             "on it")

    def forecast_scaled(self, windows: np.ndarray, steps: int | None = None, batch_size: int = 256,
                        phases: np.ndarray | None = None) -> np.ndarray:
        """Forecasts ``[n, steps, channels]`` from scaled windows ``[n, lookback, channels]`` (the protocol's scale).

        ``steps`` defaults to ``horizon``; more steps are rolled out by feeding the forecasts back as input.
        ``phases [n]``: the cycle phase of each window's first step (see :meth:`phases_at`); needed when the model
        has a cycle.
        """
        check_is_fitted(self, "network_")

        def one_shot(batch: np.ndarray, phase: torch.Tensor | None) -> np.ndarray:
            data = _tensor_dataset(torch.as_tensor(batch, dtype=torch.float32), phase)
            return self._predict_dataset(data, lambda b: self.network_(*b), batch_size)

        return _roll_out(one_shot, np.asarray(windows, dtype=np.float64), steps or self.horizon, self.horizon,
                         self._check_phases(phases, len(windows)))

    def forecast_series_scaled(self, series: np.ndarray, channel_index: np.ndarray, steps: int | None = None,
                               batch_size: int = 256, phases: np.ndarray | None = None) -> np.ndarray:
        """Forecasts ``[n, steps]`` from scaled single-channel windows ``[n, lookback]``; row i belongs to channel
        ``channel_index[i]`` and starts at cycle phase ``phases[i]`` (needed when the model has a cycle).
        Channel-independent models only (a mixing model needs all channels)."""
        check_is_fitted(self, "network_")
        if self.channels != "independent":
            raise InputError("single-channel forecasts need a model trained with channels='independent'")
        index = torch.as_tensor(np.asarray(channel_index), dtype=torch.long)

        def one_shot(batch: np.ndarray, phase: torch.Tensor | None) -> np.ndarray:
            data = _tensor_dataset(torch.as_tensor(batch[..., 0], dtype=torch.float32), phase, index)
            forecast = self._predict_dataset(
                data, lambda b: self.network_.forecast_series(b[0], b[-1], b[1] if len(b) == 3 else None),
                batch_size)
            return forecast[..., None]

        windows = np.asarray(series, dtype=np.float64)[..., None]
        return _roll_out(one_shot, windows, steps or self.horizon, self.horizon,
                         self._check_phases(phases, len(windows)))[..., 0]

    def _check_phases(self, phases: np.ndarray | None, rows: int) -> torch.Tensor | None:
        if not self.cycle_length_:
            return None
        if phases is None:
            raise InputError(f"this model has a cycle of {self.cycle_length_} steps: pass phases= (the phase of each "
                             "window's first step, from phases_at(timestamps))")
        phases = torch.as_tensor(np.asarray(phases), dtype=torch.long).reshape(-1)
        if len(phases) != rows:
            raise InputError(f"got {len(phases)} phases for {rows} windows")
        return phases

    def _predict_dataset(self, data, fn, batch_size: int = 256) -> np.ndarray:
        device = resolve_device(self.device)
        self.network_.to(device).eval()
        try:
            return predict_batches(fn, data, batch_size=batch_size, device=device).numpy().astype(np.float64)
        finally:
            self.network_.to("cpu")

    # --------------------------------------------------------------------------------------------- evaluating
    def evaluate(self, data: str | Path | pd.DataFrame, *, protocol: str | None = None,
                 interval: float | None = 0.8) -> dict[str, float]:
        """MSE and MAE on every window of the protocol's test split, on the scaled values (as published tables).

        The split is the one ``fit`` used (or ``protocol``); the scaler is the fitted one (fit on the training rows).

        Parameters
        ----------
        data : path or DataFrame
        protocol : str, optional
        interval : float or None, default 0.8
            Also report how often the test values fall inside this central interval of the calibrated quantiles
            (0.8: between the 0.1 and 0.9 quantiles); ideally about ``interval``. Skipped when None or when the
            model has no calibrated quantiles.

        Returns
        -------
        dict
            ``{"mse": ..., "mae": ..., "windows": n_test_windows}`` and ``"interval_coverage"`` when measured.
        """
        check_is_fitted(self, "network_")
        wide = self.read_like_fit(data)
        chosen = self.protocol_ if protocol is None else resolve_protocol(protocol, dataset_name(data))
        prepared = self._scaled_splits(wide, chosen)
        error = self._split_errors(prepared.test, self._split_phases(wide.index, prepared)["test"])
        scores = {"mse": float(np.square(error).mean()), "mae": float(np.abs(error).mean()), "windows": len(error)}
        if interval is not None and getattr(self, "residual_quantiles_", None) is not None:
            low, high = self.residual_quantiles([(1 - interval) / 2, (1 + interval) / 2])
            scores["interval_coverage"] = float(((error <= -low) & (error >= -high)).mean())  # low <= -error <= high
        return scores

    def _split_errors(self, values: np.ndarray, phases: np.ndarray | None,
                      max_windows: int | None = None) -> np.ndarray:
        """Errors (forecast - truth) ``[n, horizon, c]`` of the stride-1 windows of a scaled split: every window,
        or at most ``max_windows`` evenly spaced ones."""
        windows = WindowDataset(values, self.lookback, self.horizon, phases)
        future = windows.values[self.lookback:].numpy().astype(np.float64)
        targets = np.lib.stride_tricks.sliding_window_view(future, self.horizon, axis=0)  # a view: [n, c, horizon]
        if max_windows is not None and len(windows) > max_windows:
            chosen = np.unique(np.linspace(0, len(windows) - 1, max_windows).round().astype(int))
            windows, targets = Subset(windows, chosen.tolist()), targets[chosen]
        predictions = self._predict_dataset(windows, lambda batch: self.network_(batch[0], *batch[2:]))
        return predictions - targets[:len(predictions)].transpose(0, 2, 1)

    def prepare(self, data: str | Path | pd.DataFrame, *, protocol: str | None = None) -> ProtocolData:
        """Read ``data`` like ``fit`` did and cut it by the protocol, scaled with the fitted scaler."""
        check_is_fitted(self, "network_")
        chosen = self.protocol_ if protocol is None else resolve_protocol(protocol, dataset_name(data))
        return self._scaled_splits(self.read_like_fit(data), chosen)

    def _scaled_splits(self, wide: pd.DataFrame, protocol: str) -> ProtocolData:
        """The protocol's splits of data already read like ``fit``, scaled with the fitted scaler."""
        prepared = prepare_protocol(wide, self.lookback, self.horizon, protocol)
        scaled = self.scaler_.transform(wide.to_numpy())
        split = prepared.split
        return ProtocolData(split, self.scaler_, *(scaled[slice(*getattr(split, p))] for p in ("train", "val", "test")))

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, path: str | Path) -> Path:
        """Write the model to one ``.safetensors`` file (weights + JSON config in its metadata; no pickle)."""
        check_is_fitted(self, "network_")
        tensors = {f"network.{k}": v for k, v in self.network_.state_dict().items()}
        tensors[_HISTORY_KEY] = torch.as_tensor(self.last_window_.to_numpy(), dtype=torch.float64)
        if getattr(self, "residual_quantiles_", None) is not None:
            tensors[_QUANTILES_KEY] = torch.as_tensor(self.residual_quantiles_)
        config = {
            "class": CHECKPOINT_CLASS,
            "params": self.get_params(),
            "network": self.network_.config.to_dict(),
            "scaler": self.scaler_.to_dict(),
            "columns": self.columns_,
            "protocol": self.protocol_,
            "cycle_length": self.cycle_length_,
            "step_ns": self.step_ns_,
            "start_val_loss": self.start_val_loss_,
            "quantile_levels": list(QUANTILE_LEVELS),
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
            quantiles = tensors.get(_QUANTILES_KEY)  # files written before the calibration have none
            if quantiles is not None and tuple(config["quantile_levels"]) != QUANTILE_LEVELS:
                raise ValueError("its quantile levels differ from this version's")
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} is a MemoryForecaster file but its contents are corrupt "
                                  f"({str(error).splitlines()[0][:200]})") from None
        network.eval()
        model.network_, model.scaler_ = network, StandardScaler.from_dict(config["scaler"])
        model.columns_, model.n_features_in_ = list(config["columns"]), len(config["columns"])
        model.protocol_, model.input_format_ = config["protocol"], config["input_format"]
        # files written before the cycle existed have none
        model.cycle_length_, model.step_ns_ = config.get("cycle_length", 0), config.get("step_ns", 0)
        model.start_val_loss_ = config.get("start_val_loss", math.nan)
        model.read_options_, model.last_window_, model.history_ = config["read_options"], last_window, history
        model.residual_quantiles_ = None if quantiles is None else quantiles.numpy()
        return model


def _roll_out(one_shot, windows: np.ndarray, steps: int, horizon: int,
              phases: torch.Tensor | None = None) -> np.ndarray:
    """Call ``one_shot([n, lookback, c], phases) -> [n, horizon, c]`` until ``steps`` values are forecast, each time
    sliding the window (and its starting phase) over the forecasts so far."""
    lookback = windows.shape[1]
    outputs = []
    for _ in range(math.ceil(steps / horizon)):
        forecast = one_shot(windows, phases)
        outputs.append(forecast)
        windows = np.concatenate([windows, forecast], axis=1)[:, -lookback:]
        phases = None if phases is None else phases + horizon
    return np.concatenate(outputs, axis=1)[:, :steps]


def _tensor_dataset(windows: torch.Tensor, phases: torch.Tensor | None, *more: torch.Tensor):
    tensors = (windows,) if phases is None else (windows, phases)
    return torch.utils.data.TensorDataset(*tensors, *more)


def _closed_form_init(network: MemoryForecastNet, prepared: ProtocolData, phases: dict, lookback: int,
                      horizon: int) -> float:
    """Start the cycle at the per-phase means of the training rows (centred per channel) and the linear path at the
    ridge solution on the cycle-removed, mean-centred training windows, its penalty picked on validation.

    RevIN's affine starts at the identity and the backbone's head at zero, so the network then forecasts exactly
    ``cycle + ridge`` (ridge on mean-centred windows equals it on standardised ones: both are scale-equivariant).
    Returns the validation MSE of that forecast (NaN without a linear path).
    """
    if network.cycle is not None:
        train, train_phases = prepared.train, phases["train"]
        table = np.stack([train[train_phases == p].mean(axis=0) if (train_phases == p).any()
                          else np.zeros(train.shape[1]) for p in range(network.config.cycle_length)])
        network.cycle.data.copy_(torch.as_tensor(table - table.mean(axis=0), dtype=torch.float32))
    if network.linear is None:
        return math.nan
    gram, cross, _, _ = _residual_moments(network, prepared.train, phases["train"], lookback, horizon)
    val_moments = _residual_moments(network, prepared.val, phases["val"], lookback, horizon)
    solutions = [np.linalg.solve(gram + alpha * np.eye(lookback), cross) for alpha in ALPHAS]
    best = min(solutions, key=lambda weights: _squared_error(weights, *val_moments))
    network.linear.weight.data.copy_(torch.as_tensor(best.T, dtype=torch.float32))
    network.linear.bias.data.zero_()
    return _squared_error(best, *val_moments)


@torch.no_grad()
def _residual_moments(network: MemoryForecastNet, values: np.ndarray, phases: np.ndarray | None, lookback: int,
                      horizon: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, float, int]:
    """``X'X``, ``X'Y``, ``sum(Y^2)`` and the element count of ``Y`` over every window of every channel, where X are
    the cycle-removed, mean-centred inputs and Y the cycle-removed targets minus the same mean: all a ridge fit and
    its validation error need (float64)."""
    gram, cross, target_square, count = np.zeros((lookback, lookback)), np.zeros((lookback, horizon)), 0.0, 0
    windows = WindowDataset(values, lookback, horizon, phases)
    for x, y, *phase in ordered_batches(windows, batch_size):
        x, y = x.double(), y.double()
        input_cycle, output_cycle = network.cycle_parts(x, phase[0] if phase else None)
        x, y = x - input_cycle, y - output_cycle
        level = x.mean(dim=1, keepdim=True)
        inputs = (x - level).transpose(1, 2).reshape(-1, lookback).numpy()
        targets = (y - level).transpose(1, 2).reshape(-1, horizon).numpy()
        gram += inputs.T @ inputs
        cross += inputs.T @ targets
        target_square += float(np.square(targets).sum())
        count += targets.size
    return gram, cross, target_square, count


def _squared_error(weights: np.ndarray, gram: np.ndarray, cross: np.ndarray, target_square: float,
                   count: int) -> float:
    """Mean squared error of ``X @ weights`` against Y from the moments: (W'GW - 2 W'C + Y'Y) / n."""
    return (np.sum(weights * (gram @ weights)) - 2 * np.sum(weights * cross) + target_square) / count
