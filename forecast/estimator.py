"""``MemoryForecaster``: a scikit-learn-style estimator around :class:`~forecast.model.MemoryForecastNet`.

The orchestrator only: the closed-form start, the rollout, the interval calibration and the file format live in
forecast/closed_form.py, rollout.py, intervals.py and checkpoint.py. Over 400 lines because two fifths of it are the
numpydoc of its 29 parameters and public methods.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from forecast.backtest import cross_validation
from forecast.checkpoint import load_forecaster, save_forecaster
from forecast.closed_form import closed_form_start
from forecast.context import (Geometry, carried_state, check_context_length, context_errors, context_roll_out,
                              refuse_context, training_data, whole_series)
from forecast.data import (MissingColumnsError, ProtocolData, WindowDataset, cycle_phases, dataset_name,
                           default_cycle_length, future_index, is_long_format, prepare_protocol, read_series,
                           resolve_protocol, split_borders, step_nanoseconds, wide_to_long)
from forecast.intervals import CALIBRATION_WINDOWS, calibrate, coverage, interpolate_quantiles
from forecast.outliers import OUTLIER_ACTIONS, OutlierBounds, handle_outliers
from forecast.model import CHANNEL_MODES, CYCLE_AMPLITUDES, EMBEDDINGS, ForecastNetConfig, MemoryForecastNet
from forecast.metrics import CRPS_LEVELS, channel_metrics
from forecast.ragged import forecast_each_series, is_ragged, last_rows, masked_loss, skip_short_series
from forecast.rollout import check_phases, forecast_series, forecast_windows, window_errors, window_targets
from memorycore.devices import resolve_device, uses_threads
from memorycore.errors import InputError
from memorycore.training import evaluate_loss, fit_model, resolve_seed, seeded
from memorycore.validation import NON_NEGATIVE_INT, POSITIVE_INT, TRAINING_CONSTRAINTS, Options, check_params

LOSSES = ("mse", "mae", "huber")
INITS = ("closed_form", "random")
_TRAINING_LOSSES = {"mse": torch.nn.functional.mse_loss, "mae": torch.nn.functional.l1_loss,
                    "huber": torch.nn.functional.huber_loss}


def loss_function(name: str):
    """``loss(model, batch)``: the chosen loss while training, MSE in eval mode, so that early stopping and the
    kept weights follow the validation MSE whatever the training loss."""
    def loss(model, batch) -> torch.Tensor:
        windows, targets, *phase = batch
        criterion = _TRAINING_LOSSES[name] if model.training else torch.nn.functional.mse_loss
        if not (torch.isfinite(windows).all() and torch.isfinite(targets).all()):  # ragged series
            return masked_loss(criterion, model, windows, targets, phase)
        return criterion(model(windows, *phase).float(), targets.float())
    return loss


class MemoryForecaster(BaseEstimator):
    """Multivariate forecaster: a Simba-style network whose sequence mixer is Titans neural memory.

    Follows the Time-Series-Library protocol (see :mod:`forecast.data`): the model trains on the training split,
    early-stops on the validation split and :meth:`evaluate` scores every window of the test split on the scaled values.
    The defaults are sized for a few minutes on 2 CPU cores; on a GPU raise the width and the blocks.

    Parameters
    ----------
    lookback : int, default 96
        Past steps the model reads.
    horizon : int, default 96
        Future steps it forecasts in one shot.
    context_length : int, "all" or None, default None
        Steps of the series before each forecast origin that the memory blocks read, streamed patch by patch with
        their carried state (:mod:`forecast.context`; the linear path and the cycle keep the lookback window);
        "all": the whole series from its first row, the memory learning at test time as the data arrives; None:
        the lookback window only.
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
        Tokens of the neural memory's parallel update.
    embedding : {"patch", "token"}, default "patch"
        Patches of ``patch_len`` steps every ``stride`` steps, or one token per time step.
    patch_len, stride : int, default 16, 8
    channels : {"independent", "mixing"}, default "independent"
        One sequence per channel with shared weights, or one sequence holding all channels.
    dropout : float, default 0.3
    linear_path : bool, default True
        A lookback -> horizon linear map beside the backbone, which then learns a residual on it (RLinear).
    cycle_length : int or "auto", default "auto"
        Steps of the learned periodic component (CycleNet); "auto": one day of steps for sub-daily data, 7 for daily
        data, none otherwise; 0: none.
    cycle_amplitude : {"auto", "window", "fixed"}, default "auto"
        "window" scales the cycle to its strength in each input window, "fixed" does not; "auto" keeps the one whose
        closed-form start scores better on validation ("window" without that start).
    init : {"closed_form", "random"}, default "closed_form"
        "closed_form" starts from the best linear forecaster (:func:`forecast.closed_form.closed_form_init`);
        "random" from PyTorch's initialisation.
    loss : {"mse", "mae", "huber"}, default "mse"
        Training loss. Early stopping and the kept weights always follow the validation MSE.
    weight_decay : float, default 0.01
        AdamW decay of the weight matrices.
    epochs : int, default 5
        Passes over the training windows (early stopping on validation may end sooner).
    batch_size : int, default 32
    lr : float, default 1e-4
        Peak learning rate; small because training refines the closed-form start (docs/forecasting.md, "Measured").
    patience : int or None, default 3
        Epochs without a better validation loss before stopping (None: never stop early).
    max_steps_per_epoch : int, optional
        Cap on optimiser steps per epoch, each then a random subset of the windows (None or 0: every window).
    protocol : {"auto", "etth", "ettm", "ratio"}, default "auto"
        The split; "auto" picks it from the file name (ETTh*/ETTm* borders, else 70/10/20).
    random_state : int or None, default 0
        Seeds weight init, dropout and the batch order (None: a fresh seed each fit).
    device : str, default "auto"
    n_threads : int or None, default None
        Torch CPU threads while fitting and forecasting (the caller's count is restored after); None: the rule of
        :func:`memorycore.devices.resolve_threads`, 1 (fastest for this model size: README, "CPU threads").
    verbose : bool, default True
        Show a progress bar on stderr (one line per epoch where stderr is not a terminal).

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
    context_state_ : list of NeuralMemoryState or None
        With ``context_length="all"``: the memory's state where ``last_window_`` starts (what ``predict()`` reads on
        from).
    last_window_ : DataFrame
        The last ``lookback`` rows seen by ``fit``: what ``predict()`` without data forecasts from.
    input_format_ : {"wide", "long"}
    residual_quantiles_ : ndarray [len(QUANTILE_LEVELS), horizon, n_features_in_]
        Quantiles of the validation residuals per horizon step and channel (:mod:`forecast.intervals`): what
        ``predict(quantiles=...)`` adds to the forecast.

    Examples
    --------
    >>> model = MemoryForecaster(horizon=24, epochs=1, verbose=False)  # doctest: +SKIP
    >>> model.fit("datasets/ETTh1/ETTh1.csv.gz").predict().shape       # doctest: +SKIP
    (24, 7)
    >>> model.predict(quantiles=[0.1, 0.9]).columns[-2:].tolist()      # doctest: +SKIP
    ['OT_q0.1', 'OT_q0.9']
    """

    def __init__(self, *, lookback: int = 96, horizon: int = 96, context_length: int | str | None = None,
                 d_model: int = 32, n_blocks: int = 1,
                 heads: int = 2, memory_depth: int = 2, memory_expansion: int = 2,
                 chunk_size: int = 8, embedding: str = "patch",
                 patch_len: int = 16, stride: int = 8, channels: str = "independent", dropout: float = 0.3,
                 linear_path: bool = True, cycle_length: int | str = "auto", cycle_amplitude: str = "auto",
                 init: str = "closed_form",
                 loss: str = "mse", weight_decay: float = 0.01, epochs: int = 5, batch_size: int = 32,
                 lr: float = 1e-4, patience: int = 3,
                 max_steps_per_epoch: int | None = None, protocol: str = "auto", random_state: int = 0,
                 device: str = "auto", n_threads: int | None = None, verbose: bool = True) -> None:
        self.lookback = lookback
        self.horizon = horizon
        self.context_length = context_length
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
        self.n_threads = n_threads
        self.verbose = verbose

    # ------------------------------------------------------------------------------------------------ fitting
    @uses_threads
    def fit(self, data: str | Path | pd.DataFrame, y=None, *, date_column: str | None = None,
            target: str | list[str] | None = None, fill: str | None = None,
            allow_irregular: bool = False, outliers: str = "missing", allow_negative: bool = False,
            checkpoint: str | Path | None = None,
            resume: bool = False) -> "MemoryForecaster":
        """Train on the protocol's training split with early stopping on its validation split.

        Parameters
        ----------
        data : path or DataFrame
            Wide (date column + numeric columns) or long (unique_id, ds, y); see :func:`forecast.data.read_series`.
        y : ignored
        date_column, target, fill, allow_irregular
            Passed to :func:`forecast.data.read_series`; reused by ``predict`` and ``evaluate``.
        outliers : {"missing", "keep", "error"}, default "missing"
            What to do with sentinels (-9999) and values beyond the robust bound of the training rows
            (:mod:`forecast.outliers`): fill them as missing, keep them, or raise; always reported. Reused by
            ``predict`` and ``evaluate``.
        allow_negative : bool, default False
            Without it, channels never negative in the training rows are clipped at 0 in forecasts and intervals.
        checkpoint, resume
            A training checkpoint to write, and whether to continue from it (:func:`memorycore.training.fit_model`).

        Returns
        -------
        self
        """
        self._check_params()
        if outliers not in OUTLIER_ACTIONS:
            raise InputError(f"unknown outlier action {outliers!r}; use one of: {', '.join(OUTLIER_ACTIONS)}")
        read_options = {"date_column": date_column, "target": target, "fill": fill, "allow_irregular": allow_irregular}
        wide = read_series(data, **read_options)
        self.protocol_ = resolve_protocol(self.protocol, dataset_name(data))
        if is_ragged(wide):  # long data whose series start and end on different dates
            if self.channels != "independent" or self.context_length is not None:
                raise InputError("series that start or end on different dates need channels='independent' (a "
                                 "mixing model reads every series on every row) and no context_length")
            wide = skip_short_series(wide, self.lookback + self.horizon, "lookback + horizon")
        train_rows = slice(*split_borders(len(wide), self.lookback, self.protocol_).train)
        self.outliers_, self.outlier_bounds_ = outliers, OutlierBounds.fit(wide.to_numpy()[train_rows])
        wide = handle_outliers(wide, self.outlier_bounds_, outliers)
        never_negative = ~(wide.to_numpy()[train_rows] < 0).any(axis=0) & (not allow_negative)  # NaN: absent
        self.floor_ = np.where(never_negative, 0.0, -np.inf)  # forecasts of these channels are clipped at 0
        prepared = prepare_protocol(wide, self.lookback, self.horizon, self.protocol_)

        self.step_ns_ = step_nanoseconds(wide.index)
        self.cycle_length_ = self._resolve_cycle_length()
        phases = self.split_phases(wide.index, prepared)

        seed, device = resolve_seed(self.random_state), resolve_device(self.device)
        with seeded(seed, device):
            self.network_ = MemoryForecastNet(ForecastNetConfig.from_params(self.get_params(), n_channels=wide.shape[1],
                                                                             cycle_length=self.cycle_length_))
            if self.init == "closed_form":
                closed_form_start(self.network_, prepared, phases, self.cycle_amplitude)
            train, val, loss = self._training_data(prepared, phases)
            start_state = copy.deepcopy(self.network_.state_dict())
            start_loss = evaluate_loss(self.network_.to(device), loss, val, device=device)
            self.history_ = fit_model(
                self.network_, loss, train, val, epochs=self.epochs,
                batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, patience=self.patience,
                device=device, random_state=seed, verbose=self.verbose, description="forecast fit",
                max_steps_per_epoch=self.max_steps_per_epoch, checkpoint=checkpoint, resume=resume)
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
        self.last_window_, self.context_state_ = self._carry(wide)
        if is_ragged(wide):
            self.last_window_ = last_rows(wide, self.lookback)  # every series' own last lookback values
        residuals = -self.part_errors(prepared, "val", phases, max_windows=CALIBRATION_WINDOWS)
        self.residual_quantiles_ = calibrate(residuals)
        return self

    def _training_data(self, prepared: ProtocolData, phases: dict) -> tuple:
        """``(train, val, loss)`` for fit_model: the lookback windows, or with a context the windows whose memory
        reads the series before them (:func:`forecast.context.training_data`)."""
        if self.context_length is None:
            train, val = (WindowDataset(getattr(prepared, part), self.lookback, self.horizon, phases[part])
                          for part in ("train", "val"))
            return train, val, loss_function(self.loss)
        return training_data(self.network_, whole_series(prepared), whole_series(prepared, phases), prepared.split,
                             _TRAINING_LOSSES[self.loss], torch.nn.functional.mse_loss)

    def _carry(self, wide: pd.DataFrame) -> tuple[pd.DataFrame, list | None]:
        """What predict() without data reads: the last rows (the lookback, or from where a context is re-read) and,
        with context_length="all", the memory's state at the first of them."""
        if self.context_length is None:
            return wide.iloc[-self.lookback:].copy(), None
        start = Geometry.of(self.network_).carry_start(len(wide), self.lookback)
        scaled = torch.as_tensor(self.scaler_.transform(wide.to_numpy()), dtype=torch.float32)
        with torch.no_grad():
            return wide.iloc[start:].copy(), carried_state(self.network_, scaled, start)

    def _resolve_cycle_length(self) -> int:
        if self.cycle_length == "auto":
            return default_cycle_length(self.step_ns_)
        if self.cycle_length and not self.step_ns_:
            raise InputError(f"cycle_length={self.cycle_length} needs a fixed time step (hours, minutes, days); "
                             "this index has none (e.g. months): pass cycle_length=0 (--cycle-length 0)")
        return int(self.cycle_length)

    def split_phases(self, index: pd.DatetimeIndex, prepared: ProtocolData) -> dict[str, np.ndarray | None]:
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

    _parameter_constraints = {
        **TRAINING_CONSTRAINTS,
        **{name: [POSITIVE_INT] for name in ("lookback", "horizon", "d_model", "n_blocks", "heads", "memory_depth",
                                              "memory_expansion", "chunk_size", "patch_len", "stride")},
        "embedding": [Options(*EMBEDDINGS)],
        "channels": [Options(*CHANNEL_MODES)],
        "init": [Options(*INITS)],
        "loss": [Options(*LOSSES)],
        "cycle_amplitude": [Options("auto", *CYCLE_AMPLITUDES)],
        "cycle_length": [Options("auto"), NON_NEGATIVE_INT],  # 0: no cycle
        "max_steps_per_epoch": [POSITIVE_INT, Options(0), None],  # None or 0: every window
        "n_threads": [POSITIVE_INT, None],
    }

    def _check_params(self) -> None:
        check_params(self.get_params(), self._parameter_constraints)
        check_context_length(self.context_length, self.lookback)
        if self.d_model % self.heads:
            raise InputError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

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
            Levels in [0.01, 0.99] (e.g. ``[0.1, 0.9]`` for an 80% interval) to add beside the point forecast, by
            split conformal calibration (:mod:`forecast.intervals`). Needs ``h <= horizon``.

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
        if is_ragged(history):  # each series from its own last values, after its own last timestamp
            return forecast_each_series(self, history, steps, quantiles)
        if len(history) < self.lookback:
            raise InputError(f"the series has {len(history)} rows but the model needs lookback = {self.lookback}")
        index = future_index(history.index, steps)  # first: it refuses dates pandas cannot hold before any work
        window = self.scaler_.transform(history.to_numpy()[-self.lookback:])
        phase = self.phases_at(history.index[-self.lookback:][:1])
        scaled = self.forecast_scaled(window[None], steps, phases=phase)[0] if self.context_length is None \
            else self._context_forecast(history, steps, carried=data is None)
        if not np.isfinite(scaled).all():
            raise InputError(f"the forecast is not finite (NaN/inf): the input window's values (as large as "
                             f"{np.abs(history.to_numpy()[-self.lookback:]).max():.3g}) are far outside what the model "
                             "was fitted on; check the data")
        forecast = pd.DataFrame(self.to_units(scaled), columns=self.columns_, index=index)
        bounds = {}  # level -> the forecast plus that residual quantile
        if quantiles is not None:
            offsets = self.residual_quantiles(quantiles, steps)
            bounds = {float(level): pd.DataFrame(self.to_units(scaled + offset), columns=self.columns_, index=index)
                      for level, offset in zip(quantiles, offsets)}
        if (self.input_format_ == "long") if data is None else is_long_format(data):
            return wide_to_long(forecast).assign(**{f"y_q{level:g}": wide_to_long(bound)["y"].to_numpy()
                                                    for level, bound in bounds.items()})
        return pd.concat([forecast] + [bound.add_suffix(f"_q{level:g}") for level, bound in bounds.items()], axis=1)

    def to_units(self, scaled: np.ndarray) -> np.ndarray:
        """Scaled forecasts ``[..., channels]`` in the data's units, clipped at 0 in the channels never negative in
        training (unless fit had ``allow_negative``)."""
        check_is_fitted(self, "network_")
        values = self.scaler_.inverse_transform(scaled)
        floor = getattr(self, "floor_", None)  # files written before the clipping have none
        return values if floor is None else np.maximum(values, floor)

    def residual_quantiles(self, quantiles, steps: int | None = None) -> np.ndarray:
        """Quantiles ``[len(quantiles), steps, channels]`` of the validation residuals on the scaled values, at
        levels in [0.01, 0.99] interpolated linearly between the stored QUANTILE_LEVELS; ``steps`` (default
        ``horizon``) may not exceed ``horizon``. Raises InputError naming what is wrong."""
        check_is_fitted(self, "network_")
        return interpolate_quantiles(getattr(self, "residual_quantiles_", None), quantiles,
                                     self.horizon if steps is None else steps, self.horizon)

    def read_like_fit(self, data: str | Path | pd.DataFrame) -> pd.DataFrame:
        """Read ``data`` with the options ``fit`` used and keep the fitted columns, in the fitted order (other
        columns, numeric or not, are ignored); its outliers are handled as in ``fit``."""
        try:
            wide = read_series(data, target=self.columns_, **self.read_options_)
        except MissingColumnsError as error:
            raise InputError(f"the data lacks the fitted column(s) {', '.join(map(str, error.columns))}; "
                             f"the model was trained on: {', '.join(self.columns_)}") from None
        self.check_time_step(step_nanoseconds(wide.index))
        if getattr(self, "outlier_bounds_", None) is None:  # a file written before the outlier handling
            return wide
        return handle_outliers(wide, self.outlier_bounds_, self.outliers_)

    def check_time_step(self, step_ns: int) -> None:
        """Raise InputError when data at a step of ``step_ns`` nanoseconds (0: no fixed length) cannot be forecast
        by this model: its cycle and its dynamics were learnt at another step."""
        check_is_fitted(self, "network_")
        if self.step_ns_ and step_ns and step_ns != self.step_ns_ and not self.read_options_.get("allow_irregular"):
            raise InputError(f"the data's time step is {pd.Timedelta(step_ns)} but the model was fitted on steps of "
                             f"{pd.Timedelta(self.step_ns_)}; resample the data to the model's step, or fit a model "
                             "on it")

    @uses_threads
    def forecast_scaled(self, windows: np.ndarray, steps: int | None = None, batch_size: int = 256,
                        phases: np.ndarray | None = None) -> np.ndarray:
        """Forecasts ``[n, steps, channels]`` from scaled windows ``[n, lookback, channels]`` (the protocol's scale).

        ``steps`` defaults to ``horizon``; more steps are rolled out by feeding the forecasts back as input.
        ``phases [n]``: the cycle phase of each window's first step (see :meth:`phases_at`); needed when the model
        has a cycle.
        """
        check_is_fitted(self, "network_")
        refuse_context(self.context_length)
        return forecast_windows(self.network_, windows, steps or self.horizon, device=resolve_device(self.device),
                                phases=check_phases(phases, len(windows), self.cycle_length_), batch_size=batch_size)

    @uses_threads
    def forecast_series_scaled(self, series: np.ndarray, channel_index: np.ndarray, steps: int | None = None,
                               batch_size: int = 256, phases: np.ndarray | None = None) -> np.ndarray:
        """Forecasts ``[n, steps]`` from scaled single-channel windows ``[n, lookback]``; row i belongs to channel
        ``channel_index[i]`` and starts at cycle phase ``phases[i]``. What the GluonTS adapter calls; a method
        because it checks the fitted state (channel mode, cycle) first."""
        check_is_fitted(self, "network_")
        refuse_context(self.context_length)
        if self.channels != "independent":
            raise InputError("single-channel forecasts need a model trained with channels='independent'")
        phases = check_phases(phases, len(series), self.cycle_length_)
        return forecast_series(self.network_, series, channel_index, steps or self.horizon,
                               device=resolve_device(self.device), phases=phases, batch_size=batch_size)

    # --------------------------------------------------------------------------------------------- evaluating
    def evaluate(self, data: str | Path | pd.DataFrame, *, protocol: str | None = None,
                 interval: float | None = 0.8, units: bool = False) -> dict[str, float]:
        """MSE and MAE on every window of the protocol's test split, on the scaled values (as published tables),
        and with ``units`` the usual metrics per channel in the data's units.

        The split is the one ``fit`` used (or ``protocol``); the scaler is the fitted one (fit on the training rows).

        Parameters
        ----------
        data : path or DataFrame
        protocol : str, optional
        interval : float or None, default 0.8
            Also report the share of test values inside this central interval of the calibrated quantiles (ideally
            about ``interval``); skipped when None or when the model has no calibrated quantiles.
        units : bool, default False
            Also return ``"channels"``: a DataFrame of :func:`forecast.metrics.channel_metrics` per channel in the
            data's units (MAE, MSE, RMSE, MAPE, sMAPE, MASE against the seasonal naive forecast at the cycle length,
            and CRPS / wQL of the calibrated quantiles).

        Returns
        -------
        dict
            ``{"mse": ..., "mae": ..., "windows": n_test_windows}`` and ``"interval_coverage"`` when measured.
        """
        check_is_fitted(self, "network_")
        wide = self.read_like_fit(data)
        chosen = self.protocol_ if protocol is None else resolve_protocol(protocol, dataset_name(data))
        prepared = self._scaled_splits(wide, chosen)
        error = self.part_errors(prepared, "test", self.split_phases(wide.index, prepared))
        truth = window_targets(prepared.test, self.lookback, self.horizon)
        floor = getattr(self, "floor_", None)
        if floor is not None and np.isfinite(floor).any():  # the forecasts clipped at 0, as predict gives them
            error = np.maximum(truth + error, self.scaler_.transform(floor)) - truth
        scores = {"mse": float(np.nanmean(np.square(error))), "mae": float(np.nanmean(np.abs(error))),
                  "windows": len(error)}  # NaN: windows of ragged series where they do not exist
        calibrated = getattr(self, "residual_quantiles_", None) is not None
        if interval is not None and calibrated:
            low, high = self.residual_quantiles([(1 - interval) / 2, (1 + interval) / 2])
            scores["interval_coverage"] = coverage(error, low, high)
        if units:
            offsets = self.residual_quantiles(CRPS_LEVELS) if calibrated else []
            values = wide.to_numpy()  # not the scaled values transformed back: a 0 would come back as 1e-16
            scores["channels"] = channel_metrics(
                window_targets(values[slice(*prepared.split.test)], self.lookback, self.horizon),
                self.to_units(truth + error), self.columns_,
                insample=values[slice(*prepared.split.train)], season=self.cycle_length_ or 1,
                quantile_forecasts={level: self.to_units(truth + error + offset)
                                    for level, offset in zip(CRPS_LEVELS, offsets)})
        return scores

    def cross_validation(self, data: str | Path | pd.DataFrame, n_windows: int = 1, step_size: int | None = None,
                         refit: bool = False, *, h: int | None = None, quantiles: list[float] | None = None,
                         **fit_options) -> pd.DataFrame:
        """Backtest: forecasts from ``n_windows`` cutoffs ``step_size`` rows apart at the end of ``data``, each from
        the rows up to its cutoff, by copies of this estimator fitted there once (or at every cutoff with
        ``refit``); this estimator is not changed. Returns the long frame ``unique_id, ds, cutoff, y, forecast``
        (:func:`forecast.backtest.cross_validation`; ``backtest_metrics`` scores it)."""
        return cross_validation(self, data, n_windows, step_size, refit, h=h, quantiles=quantiles, **fit_options)

    def part_errors(self, prepared: ProtocolData, part: str, phases: dict,
                    max_windows: int | None = None) -> np.ndarray:
        """Errors ``[n, horizon, c]`` of the windows of split ``part`` ("train", "val", "test"): from the lookback
        windows (:meth:`split_errors`), or with a context from the whole series before each origin."""
        if self.context_length is None:
            return self.split_errors(getattr(prepared, part), phases[part], max_windows=max_windows)
        return context_errors(self.network_, whole_series(prepared), whole_series(prepared, phases),
                              getattr(prepared.split, part), max_windows=max_windows)

    def _context_forecast(self, history: pd.DataFrame, steps: int, carried: bool) -> np.ndarray:
        """Scaled forecasts ``[steps, c]`` after ``history`` whose memory reads its rows (with the carried state of
        fit's data when ``carried``)."""
        phases = self.phases_at(history.index[:1])
        return context_roll_out(self.network_, self.scaler_.transform(history.to_numpy()),
                                None if phases is None else int(phases[0]), steps,
                                states=self.context_state_ if carried else None)

    @uses_threads
    def split_errors(self, values: np.ndarray, phases: np.ndarray | None,
                     max_windows: int | None = None) -> np.ndarray:
        """Errors (forecast - truth) ``[n, horizon, c]`` of the windows of a scaled split (:func:`window_errors`)."""
        check_is_fitted(self, "network_")
        return window_errors(self.network_, values, phases, device=resolve_device(self.device),
                             max_windows=max_windows)

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
        return save_forecaster(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "MemoryForecaster":
        """Read a model written by :meth:`save` (by this version or an earlier one).

        Raises :class:`memorycore.CheckpointError` on a missing, foreign or corrupt file.
        """
        return load_forecaster(cls, path)
