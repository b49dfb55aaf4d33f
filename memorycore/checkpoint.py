"""Checkpoints: one ``.safetensors`` file with the weights, and the JSON config in its metadata.

Loading never unpickles anything: safetensors holds raw tensors, and the config is plain JSON.
Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memorycore.errors import CheckpointError
from memorycore.files import atomic_path

METADATA_KEY = "memorycore"
# 2: NeuralMemory's theta carries the factor 1 - eta (memorycore 0.2); a format-1 model would load and predict wrongly
FORMAT_VERSION = 2


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``config`` to one safetensors file, atomically.

    Parameters
    ----------
    path : path-like
        Destination, usually ending in ``.safetensors``; parent folders are created.
    tensors : dict of str to Tensor
        The weights (e.g. ``model.state_dict()``); they are made contiguous and moved to CPU.
    config : dict
        JSON-serialisable description of the model; must contain ``"class"``. The library version is added.

    Returns
    -------
    Path
        The written file.
    """
    from memorycore import __version__

    if "class" not in config:
        raise ValueError("config must name the model's class under 'class'")
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT_VERSION, "version": __version__, **config})}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read only the JSON config of a checkpoint (cheap: the weights are not loaded)."""
    path = _existing_file(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors model file ({_short(error)})") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a memorycore model (no '{METADATA_KEY}' metadata)")
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt memorycore metadata (not valid JSON)") from None
    if not isinstance(config, dict) or "class" not in config:
        raise CheckpointError(f"{path} has memorycore metadata without a model class; the file is corrupt")
    if config.get("format") != FORMAT_VERSION:
        from memorycore import __version__

        raise CheckpointError(f"{path} was saved by memorycore {config.get('version', '?')} (file format "
                              f"{config.get('format', '?')}); memorycore {__version__} (format {FORMAT_VERSION}) would "
                              "not predict with it as it was trained: train the model again")
    return config


def load_checkpoint(path: str | os.PathLike, expected_class: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : path-like
    expected_class : str
        The ``"class"`` the config must name (e.g. ``"MemoryForecaster"``).

    Returns
    -------
    tensors : dict of str to Tensor
    config : dict

    Raises
    ------
    CheckpointError
        The file is missing, not safetensors, corrupt, not a memorycore model, or a model of another class.
    """
    config = read_config(path)
    if config["class"] != expected_class:
        raise CheckpointError(f"{path} holds a {config['class']}, not a {expected_class}; pass the right model file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is corrupt: its weights cannot be read ({_short(error)})") from None
    return tensors, config


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} does not exist; train one first or check the path")
    if not path.is_file():
        raise CheckpointError(f"model path {path} is not a file")
    return path


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
