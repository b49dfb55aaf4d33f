"""Training checkpoints of :func:`memorycore.training.fit_model`: what a killed run needs to go on as if it never
stopped.

One ``.safetensors`` file (written atomically by :func:`memorycore.checkpoint.save_checkpoint`): the weights, the
best weights so far, the optimiser's moments and every random generator's state as tensors; the epoch and step, the
optimiser's and the schedule's settings and the history as JSON. Nothing is pickled, so loading a checkpoint someone
hands you runs no code.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.errors import CheckpointError, InputError

CHECKPOINT_CLASS = "TrainingCheckpoint"


@dataclass
class RunState:
    """Where a run stands: the next step to train is ``step`` of ``epoch``, after ``running`` (the sum of this
    epoch's ``seen`` step losses); ``finished`` once training ended (early stopping or the last epoch)."""

    epoch: int = 0
    step: int = 0
    running: float = 0.0
    seen: int = 0
    finished: bool = False
    best_loss: float = math.inf
    stale: int = 0
    history: dict = field(default_factory=dict)


def save_training_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        schedule: Any, best_state: dict[str, Tensor] | None, progress: RunState,
                        loader_state: Tensor, generators: Sequence[torch.Generator], signature: dict,
                        device: torch.device) -> None:
    """Write the run's state to ``path`` atomically. ``loader_state``: the batch-order generator's state at the start
    of ``progress.epoch`` (a resumed epoch draws the same batch order again, then skips ``progress.step`` batches)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        tensors.update({f"optimizer.{index}.{key}": torch.as_tensor(value) for key, value in values.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loader"] = loader_state
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors.update({f"rng.generator.{i}": g.get_state() for i, g in enumerate(generators)})
    config = {"class": CHECKPOINT_CLASS, "signature": signature, "progress": asdict(progress),
              "has_best": best_state is not None, "optimizer_groups": optimizer_state["param_groups"],
              "schedule": schedule.state_dict()}
    save_checkpoint(path, tensors, config)


def load_training_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        schedule: Any, generators: Sequence[torch.Generator], signature: dict,
                        device: torch.device) -> tuple[RunState, dict[str, Tensor] | None, Tensor]:
    """Restore what :func:`save_training_state` wrote into ``model``, ``optimizer``, ``schedule``, torch's global
    generators and ``generators``; return the progress, the best weights so far and the batch-order generator's
    state at the start of the epoch to resume.

    Raises
    ------
    InputError
        The checkpoint is of another training run (other data size, epochs, batch size or model).
    """
    tensors, config = load_checkpoint(path, CHECKPOINT_CLASS)
    if config["signature"] != signature:
        differs = sorted(k for k in {**signature, **config["signature"]}
                         if signature.get(k) != config["signature"].get(k))
        raise InputError(f"{path} is the checkpoint of another training run ({', '.join(differs)} differ); "
                         "delete it or pass another checkpoint path to start afresh")

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(part("model."))
        best_state = part("best.") if config["has_best"] else None
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in part("optimizer.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
                  for group in config["optimizer_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        schedule.load_state_dict(config["schedule"])
        progress = RunState(**config["progress"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is a corrupt training checkpoint ({str(error).splitlines()[0][:200]})") \
            from None
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    for i, generator in enumerate(generators):
        generator.set_state(tensors[f"rng.generator.{i}"])
    return progress, best_state, tensors["rng.loader"]
