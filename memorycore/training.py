"""The shared fit loop of every memorycore estimator.

One loop for all applications: AdamW with weight-decay groups, linear warm-up then cosine decay, gradient clipping,
early stopping on a validation set (the best weights are restored), bf16 autocast on CUDA, a rich progress bar on
stderr, and data-parallel training over several devices with torch.distributed (launch with ``torchrun``).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from memorycore.devices import resolve_device
from memorycore.errors import InputError, TrainingError
from memorycore.training_checkpoint import RunState, load_training_state, save_training_state
from memorycore.validation import POSITIVE_INT, TRAINING_CONSTRAINTS, check_params

LossFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]


@dataclass
class TrainingHistory:
    """What happened during :func:`fit_model`.

    Attributes
    ----------
    train_loss : list of float
        Mean training loss of each epoch.
    val_loss : list of float
        Mean validation loss after each epoch (empty without validation data).
    best_epoch : int
        Index of the epoch whose weights were kept (the last one without validation data).
    seconds : float
        Wall-clock training time.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def fit_model(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Dataset,
    val_data: Dataset | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    grad_clip: float | None = 1.0,
    patience: int | None = 3,
    warmup_fraction: float = 0.05,
    device: str | torch.device = "auto",
    devices: int = 1,
    random_state: int | None = 0,
    verbose: bool = True,
    description: str = "training",
    max_steps_per_epoch: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = 200,
    resume: bool = False,
    generators: Sequence[torch.Generator] = (),
) -> TrainingHistory:
    """Train ``model`` in place to minimise ``loss_fn`` and return the history.

    Parameters
    ----------
    model : nn.Module
        Moved to ``device``; on return it holds the best weights seen (by validation loss, if given).
    loss_fn : callable
        ``loss_fn(model, batch) -> scalar Tensor``; ``batch`` is the collated tuple of tensors of the dataset's items,
        already on the device.
    train_data, val_data : Dataset
        Items are tuples of tensors. Without ``val_data`` there is no early stopping.
    epochs, batch_size, lr, weight_decay : training hyperparameters (AdamW; no decay on biases and norms).
    grad_clip : float or None
        Maximum global gradient norm.
    patience : int or None
        Stop after this many epochs without a better validation loss (None: never stop early).
    warmup_fraction : float
        Share of all steps spent warming the learning rate up linearly before the cosine decay.
    device : str or torch.device
        ``"auto"`` picks CUDA when available.
    devices : int
        Number of data-parallel processes. Values above 1 need the script to be started by
        ``torchrun --nproc-per-node N``; each process then trains on its shard of every epoch.
    random_state : int or None
        Seeds the order of the batches.
    verbose : bool
        Show a progress bar on stderr.
    description : str
        Label of the progress bar.
    max_steps_per_epoch : int, optional
        Cap on optimiser steps per epoch (an "epoch" then sees a random subset of the training data).
    checkpoint : path-like, optional
        Write a training checkpoint there (atomically; :mod:`memorycore.training_checkpoint`) every
        ``checkpoint_every`` steps and after each epoch.
    checkpoint_every : int or None
        Steps between checkpoints (None: after each epoch only).
    resume : bool
        Continue from ``checkpoint`` when it exists (a warning says when it does not): the run ends with the same
        weights as one never interrupted. The model, data and settings must be those of the interrupted run.
    generators : sequence of torch.Generator
        Other generators the training draws from (e.g. a loss function's augmentation); checkpointed and restored.

    Returns
    -------
    TrainingHistory
    """
    # lr 0 is allowed here (the loop runs, frozen: tests of the loop itself use it), so only a non-zero one is checked
    check_hyperparameters(lr=lr or None, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size,
                          devices=devices)
    check_params({"checkpoint_every": checkpoint_every}, {"checkpoint_every": [POSITIVE_INT, None]})
    if len(train_data) == 0:
        raise InputError("no training examples: the training data is empty")
    with _process_group(devices) as distributed:
        device = _local_device(device, distributed)
        model.to(device)
        trained = nn.parallel.DistributedDataParallel(model) if distributed else model
        generator = torch.Generator().manual_seed(random_state if random_state is not None else torch.seed())
        sampler = DistributedSampler(train_data, seed=random_state or 0) if distributed else None
        loader = DataLoader(train_data, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                            generator=generator, drop_last=len(train_data) > batch_size)
        steps_per_epoch = min(len(loader), max_steps_per_epoch or len(loader))
        optimizer = _adamw(model, lr, weight_decay)
        schedule = _warmup_cosine(optimizer, steps_per_epoch * epochs, warmup_fraction)
        is_main = not distributed or dist.get_rank() == 0

        history, progress_state, best_state = TrainingHistory(), RunState(), None
        loader_state = generator.get_state()
        signature = {"examples": len(train_data), "batch_size": batch_size, "epochs": epochs,
                     "steps_per_epoch": steps_per_epoch, "parameters": sum(p.numel() for p in model.parameters())}
        if resume and checkpoint is not None and Path(checkpoint).exists():
            progress_state, best_state, loader_state = load_training_state(
                checkpoint, model=model, optimizer=optimizer, schedule=schedule, generators=generators,
                signature=signature, device=device)
            history = TrainingHistory(**progress_state.history)
        elif resume:
            warnings.warn(f"no training checkpoint at {checkpoint} to resume from: training starts afresh",
                          stacklevel=2)
        run = progress_state

        def save(epoch_start_state: torch.Tensor) -> None:
            if checkpoint is not None and is_main:
                run.history = asdict(history) | {"seconds": history.seconds + time.perf_counter() - start}
                save_training_state(checkpoint, model=model, optimizer=optimizer, schedule=schedule,
                                    best_state=best_state, progress=run, loader_state=epoch_start_state,
                                    generators=generators, signature=signature, device=device)

        start = time.perf_counter()
        with _progress(verbose and is_main, description) as progress:
            task = progress.add_task(description, total=steps_per_epoch * epochs,
                                     completed=run.epoch * steps_per_epoch + run.step, status="")
            for epoch in range(run.epoch, epochs):
                if run.finished:
                    break
                if sampler is not None:
                    sampler.set_epoch(epoch)
                generator.set_state(loader_state)  # a resumed epoch draws the batch order it drew before

                def report(mean_loss: float, epoch: int = epoch) -> None:
                    progress.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {mean_loss:.4f}",
                                    epoch=epoch + 1, epochs=epochs, loss=mean_loss)

                def after_step(step: int, running: float, seen: int, epoch: int = epoch,
                               epoch_start_state: torch.Tensor = loader_state) -> None:
                    run.epoch, run.step, run.running, run.seen = epoch, step, running, seen
                    if checkpoint_every and (epoch * steps_per_epoch + step) % checkpoint_every == 0:
                        save(epoch_start_state)

                train_loss = _train_epoch(trained, loss_fn, loader, steps_per_epoch, optimizer, schedule,
                                          grad_clip=grad_clip, device=device, epoch=epoch, report=report,
                                          first_step=run.step, running=run.running, seen=run.seen,
                                          after_step=after_step)
                loader_state = generator.get_state()
                run.epoch, run.step, run.running, run.seen = epoch + 1, 0, 0.0, 0
                run.finished = epoch + 1 == epochs
                history.train_loss.append(_all_mean(train_loss, distributed))

                if val_data is None:
                    history.best_epoch = epoch
                    save(loader_state)
                    continue
                val_loss = _all_mean(evaluate_loss(model, loss_fn, val_data, batch_size=batch_size, device=device),
                                     distributed)
                if not math.isfinite(val_loss):  # the last steps sent the weights to inf / NaN
                    if best_state is None:
                        raise TrainingError(f"the validation loss became {val_loss} after epoch {epoch + 1}; "
                                            "lower lr or check the data for extreme values")
                    warnings.warn(f"the validation loss became {val_loss} after epoch {epoch + 1}: training stops "
                                  f"and keeps epoch {history.best_epoch + 1}'s weights; a lower lr may do better",
                                  stacklevel=2)
                    run.finished = True
                    save(loader_state)
                    break
                history.val_loss.append(val_loss)
                best = min(run.best_loss, val_loss)
                progress.update(task, status=f"epoch {epoch + 1}/{epochs} val {val_loss:.4f} (best {best:.4f})",
                                val=val_loss, best=best)
                if val_loss < run.best_loss:
                    run.best_loss, best_state, run.stale = val_loss, copy.deepcopy(model.state_dict()), 0
                    history.best_epoch = epoch
                else:
                    run.stale += 1
                    run.finished = run.finished or (patience is not None and run.stale >= patience)
                save(loader_state)
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        history.seconds += time.perf_counter() - start
        return history


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, data: Dataset, *, batch_size: int = 256,
                  device: str | torch.device = "auto") -> float:
    """Mean of ``loss_fn`` over ``data``, weighted by batch size, in eval mode."""
    device = resolve_device(device)
    model.eval()
    total, count = 0.0, 0
    for batch in ordered_batches(data, batch_size):
        batch = tuple(t.to(device) for t in batch)
        with _autocast(device):
            total += loss_fn(model, batch).item() * len(batch[0])
        count += len(batch[0])
    return total / max(count, 1)


def predict_batches(
    fn: Callable[[Sequence[Tensor]], Tensor],
    data: Dataset,
    *,
    batch_size: int | None = 256,
    device: str | torch.device = "auto",
    autocast: bool = False,
    verbose: bool = False,
    description: str = "predicting",
) -> Tensor:
    """Apply ``fn`` to ``data`` batch by batch under inference mode and concatenate the outputs on CPU.

    Parameters
    ----------
    fn : callable
        ``fn(batch) -> Tensor`` with ``batch`` the collated tuple of tensors, already on the device.
    data : Dataset
    batch_size : int or None
        None: the items of ``data`` are batches already (of varying shapes, e.g. padded to their own longest row).
    device : str or torch.device
    autocast : bool
        Run ``fn`` under bf16 autocast on CUDA, as training does (float32 elsewhere).
    verbose : bool
        Show a progress bar on stderr.
    description : str
        Label of the progress bar.
    """
    device = resolve_device(device)
    loader = ordered_batches(data, batch_size)
    outputs = []
    with torch.inference_mode(), _progress(verbose, description) as progress:
        task = progress.add_task(description, total=len(loader), status="")
        for batch in loader:
            with _autocast(device) if autocast else nullcontext():
                outputs.append(fn(tuple(t.to(device) for t in batch)).float().cpu())
            progress.update(task, advance=1)
    return torch.cat(outputs) if outputs else torch.empty(0)


def _train_epoch(trained: nn.Module, loss_fn: LossFn, loader: DataLoader, steps: int,
                 optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler, *,
                 grad_clip: float | None, device: torch.device, epoch: int,
                 report: Callable[[float], None], first_step: int = 0, running: float = 0.0, seen: int = 0,
                 after_step: Callable[[int, float, int], None] | None = None) -> float:
    """One optimiser step per batch, ``steps`` at most; returns the epoch's mean loss. ``report`` gets the running
    mean after each step, ``after_step`` the steps done, the loss sum and the step count. A resumed epoch starts at
    ``first_step`` with the loss sum ``running`` of ``seen`` steps: the batches before it are drawn, not trained on."""
    trained.train()
    # Iterate the loader to its end (or one batch past the cap), never stopping exactly at the last batch: the random
    # sampler draws its next permutation from the generator when it runs out, and skipping that draw would change
    # every later epoch's batch order, and every published result, against earlier releases.
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        if step < first_step:
            continue
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        with _autocast(device):
            loss = loss_fn(trained, batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                "lower lr or check the data for extreme values")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(trained.parameters(), grad_clip)
        optimizer.step()
        schedule.step()
        running, seen = running + loss.item(), seen + 1
        report(running / seen)
        if after_step is not None:
            after_step(step + 1, running, seen)
    return running / max(seen, 1)


def _autocast(device: torch.device):
    # bf16 on CUDA, where the kernels and the tensor cores want it; float32 everywhere else.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only: biases, norm scales and other vectors keep their values.
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    kept = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(enabled: bool, description: str):
    if not enabled:
        return _SilentProgress()
    if not sys.stderr.isatty():  # a log file or a notebook: a bar would show nothing until the end
        return _EpochLines(description)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=stderr_console(), transient=False,
    )


def stderr_console() -> Console:
    """A rich Console on stderr for progress bars, 120 columns wide where stderr is not a terminal (a log file,
    make's output), where rich would otherwise cut every line at 80 columns."""
    return Console(file=sys.stderr, width=None if sys.stderr.isatty() else 120)


class _SilentProgress:
    """Stands in for a rich Progress when verbose=False."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass


class _EpochLines(_SilentProgress):
    """Stands in for a rich Progress where stderr is not a terminal: one line per epoch on stderr, with the losses,
    the time spent and the time left (at most: early stopping may end sooner).

    It reads the fields fit_model gives the bar: ``epoch``, ``epochs`` and ``loss`` (the running training loss) with
    each step, then ``val`` and ``best`` after validation. Without validation, an epoch's line comes with the first step
    of the next one, or at the end.
    """

    def __init__(self, description: str) -> None:
        self.description, self.total, self.completed, self.pending = description, 0, 0, None

    def __enter__(self):
        self.start, self.done_before = time.perf_counter(), 0
        return self

    def __exit__(self, *exc):
        if self.pending is not None and exc[0] is None:
            self._write()
        return False

    def add_task(self, description: str = "", *, total: float | None = None, completed: int = 0, **fields) -> int:
        self.total, self.completed, self.done_before = total or 0, completed, completed  # resumed steps take no time
        return 0

    def update(self, task: int = 0, *, advance: int = 0, epoch: int | None = None, epochs: int | None = None,
               loss: float | None = None, val: float | None = None, best: float | None = None, **fields) -> None:
        if epoch is not None and self.pending is not None and self.pending[0] != epoch:
            self._write()  # the previous epoch had no validation
        self.completed += advance
        if epoch is not None:
            self.pending = (epoch, epochs, loss)
        if val is not None and self.pending is not None:
            self._write(f" val {val:.4f} (best {best:.4f})")

    def _write(self, validation: str = "") -> None:
        epoch, epochs, loss = self.pending
        self.pending = None
        elapsed = time.perf_counter() - self.start
        done = self.completed - self.done_before
        left = elapsed / done * (self.total - self.completed) if done else 0.0
        print(f"{self.description}: epoch {epoch}/{epochs} train {loss:.4f}{validation}, "
              f"{format_duration(elapsed)} elapsed, at most {format_duration(left)} left", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def ordered_batches(data: Dataset, batch_size: int) -> DataLoader:
    """A DataLoader over ``data`` in order that leaves torch's global generator alone: without a generator of its
    own, a DataLoader draws a seed from the global one on every pass, so evaluating or predicting would change the
    caller's random numbers."""
    return DataLoader(data, batch_size=batch_size, generator=torch.Generator())


def resolve_seed(random_state: int | None) -> int:
    """``random_state``, or a fresh seed drawn from the operating system's entropy when it is None."""
    return random_state if random_state is not None else int(np.random.SeedSequence().entropy % 2**31)


@contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch's global generators (CPU, and ``device`` when it is CUDA) for the block, and give the caller's
    state back afterwards: weight init and dropout draw from them, the caller's own draws must not change."""
    cuda_devices = [torch.cuda.current_device() if device.index is None else device.index] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def check_hyperparameters(*, lr: float | None = None, weight_decay: float | None = None,
                          dropout: float | None = None, **positive_integers: object) -> None:
    """Raise :class:`InputError` naming the first hyperparameter out of range.

    ``lr`` must be finite and > 0 (an infinite one trains to NaN weights without a word), ``weight_decay`` finite and
    >= 0, ``dropout`` in [0, 1) (each unchecked when None), and every other keyword an integer >= 1.

    Examples
    --------
    >>> check_hyperparameters(lr=1e-3, epochs=5, batch_size=32)
    >>> check_hyperparameters(lr=float("inf"))
    Traceback (most recent call last):
    ...
    memorycore.errors.InputError: lr must be a finite number > 0, got inf
    """
    given = {"lr": lr, "weight_decay": weight_decay, "dropout": dropout}
    constraints = {name: [POSITIVE_INT] for name in positive_integers}
    constraints.update({name: TRAINING_CONSTRAINTS[name] for name, value in given.items() if value is not None})
    check_params({**positive_integers, **given}, constraints)


@contextmanager
def _process_group(devices: int):
    """Yield whether training is distributed (``devices`` > 1, under torchrun).

    A process group started here is also ended here, so the process is left as it was found; a group the caller
    started stays open.
    """
    if devices == 1:
        yield False
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != devices:
        raise InputError(f"devices={devices} trains one process per device: start the script with "
                         f"`torchrun --nproc-per-node {devices} script.py` (found WORLD_SIZE={world})")
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield True
    finally:
        if started_here:
            dist.destroy_process_group()


def _local_device(device: str | torch.device, distributed: bool) -> torch.device:
    device = resolve_device(device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _all_mean(value: float, distributed: bool) -> float:
    if not distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()
