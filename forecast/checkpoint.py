"""A fitted :class:`~forecast.estimator.MemoryForecaster` as one ``.safetensors`` file: the network's weights, the
last lookback window and the calibrated quantiles as tensors, everything else as JSON in the metadata (no pickle).
Files of earlier versions load: what they lack takes the value that reproduces their behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from forecast.context import state_tensors, states_from_tensors
from forecast.data import StandardScaler
from forecast.intervals import QUANTILE_LEVELS
from forecast.model import ForecastNetConfig, MemoryForecastNet
from forecast.outliers import OutlierBounds
from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.errors import CheckpointError
from memorycore.training import TrainingHistory

CHECKPOINT_CLASS = "MemoryForecaster"
_HISTORY_KEY = "__last_window__"  # tensor name of the stored lookback window
_QUANTILES_KEY = "__residual_quantiles__"  # tensor name of the calibrated residual quantiles
_CONTEXT_KEY = "__context_state__"  # tensor names of the memory's carried state (context_length="all")


def save_forecaster(model, path: str | Path) -> Path:
    """Write the fitted ``model`` to ``path`` (atomically); returns the path written."""
    tensors = {f"network.{k}": v for k, v in model.network_.state_dict().items()}
    tensors[_HISTORY_KEY] = torch.as_tensor(model.last_window_.to_numpy(), dtype=torch.float64)
    if getattr(model, "residual_quantiles_", None) is not None:
        tensors[_QUANTILES_KEY] = torch.as_tensor(model.residual_quantiles_)
    tensors.update(state_tensors(getattr(model, "context_state_", None), _CONTEXT_KEY))
    history = model.history_
    config = {
        "class": CHECKPOINT_CLASS,
        "params": model.get_params(),
        "network": model.network_.config.to_dict(),
        "scaler": model.scaler_.to_dict(),
        "columns": model.columns_,
        "protocol": model.protocol_,
        "cycle_length": model.cycle_length_,
        "step_ns": model.step_ns_,
        "start_val_loss": model.start_val_loss_,
        "quantile_levels": list(QUANTILE_LEVELS),
        "input_format": model.input_format_,
        "read_options": model.read_options_,
        "outliers": model.outliers_,
        "outlier_bounds": model.outlier_bounds_.to_dict(),
        "floor": [None if math.isinf(v) else float(v) for v in model.floor_],
        "last_window_index": [t.isoformat() for t in model.last_window_.index],
        "last_window_index_name": model.last_window_.index.name,
        "history": {"train_loss": history.train_loss, "val_loss": history.val_loss,
                    "best_epoch": history.best_epoch, "seconds": history.seconds},
    }
    return save_checkpoint(path, tensors, config)


def load_forecaster(cls: type, path: str | Path):
    """An instance of ``cls`` (MemoryForecaster) read from a file written by :func:`save_forecaster`.

    Raises :class:`memorycore.CheckpointError` on a missing, foreign or corrupt file.
    """
    tensors, config = load_checkpoint(path, CHECKPOINT_CLASS)
    try:
        model = cls(**config["params"])
        network = MemoryForecastNet(ForecastNetConfig(**config["network"]))
        network.load_state_dict({k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")})
        index = pd.DatetimeIndex(pd.to_datetime(config["last_window_index"]), name=config["last_window_index_name"])
        last_window = pd.DataFrame(tensors[_HISTORY_KEY].numpy(), index=index, columns=config["columns"])
        history = TrainingHistory(**config["history"])
        quantiles = tensors.get(_QUANTILES_KEY)  # files written before the calibration have none
        if quantiles is not None and tuple(config["quantile_levels"]) != QUANTILE_LEVELS:
            raise ValueError("its quantile levels differ from this version's")
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is a MemoryForecaster file but its contents are corrupt "
                              f"({str(error).splitlines()[0][:200]})") from None
    network.eval()
    model.context_state_ = states_from_tensors(tensors, _CONTEXT_KEY, len(network.blocks))
    model.network_, model.scaler_ = network, StandardScaler.from_dict(config["scaler"])
    model.columns_, model.n_features_in_ = list(config["columns"]), len(config["columns"])
    model.protocol_, model.input_format_ = config["protocol"], config["input_format"]
    # files written before the cycle existed have none
    model.cycle_length_, model.step_ns_ = config.get("cycle_length", 0), config.get("step_ns", 0)
    model.start_val_loss_ = config.get("start_val_loss", math.nan)
    model.read_options_, model.last_window_, model.history_ = config["read_options"], last_window, history
    model.residual_quantiles_ = None if quantiles is None else quantiles.numpy()
    # files written before the outlier handling and the clipping at 0 have neither: they read data as they did
    bounds, floor = config.get("outlier_bounds"), config.get("floor")
    model.outliers_ = config.get("outliers", "keep")
    model.outlier_bounds_ = None if bounds is None else OutlierBounds.from_dict(bounds)
    model.floor_ = None if floor is None else np.array([-np.inf if v is None else v for v in floor])
    return model
