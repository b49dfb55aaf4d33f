"""Choosing the device an estimator trains and predicts on, and its CPU thread count."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

from memorycore.errors import InputError

Method = TypeVar("Method", bound=Callable)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a torch.device into a usable device.

    ``"auto"`` picks CUDA when available, else CPU. A device that is named but unavailable is an InputError.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here; use the device 'cpu' or 'auto'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available here; use the device 'cpu' or 'auto'")
    return resolved


# Why 1 (the table: README, "CPU threads"): our networks' tensors are small (the default DNA classifier's and
# forecaster's steps take 2 s and 0.13 s on one thread), and torch's threads spin-wait for each other between such
# ops: on the project's 2-core machine shared with other jobs, 2 threads made a step 5-20x slower, never faster.
DEFAULT_THREADS = 1


def resolve_threads(n_threads: int | None = None) -> int:
    """The torch CPU thread count an estimator or a bench script runs with: ``n_threads``, or DEFAULT_THREADS (1).

    The one rule for every estimator (``n_threads=``), the command line and the bench scripts (``--threads``).

    Examples
    --------
    >>> resolve_threads(None), resolve_threads(4)
    (1, 4)
    """
    if n_threads is None:
        return DEFAULT_THREADS
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise InputError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    return n_threads


@contextmanager
def torch_threads(n_threads: int | None = None) -> Iterator[int]:
    """Run the block with :func:`resolve_threads` ``(n_threads)`` torch CPU threads, then give the caller's count back
    (an estimator's ``fit`` must not change the threads of the code around it).

    Examples
    --------
    >>> with torch_threads(2):
    ...     torch.get_num_threads()
    2
    """
    wanted, previous = resolve_threads(n_threads), torch.get_num_threads()
    if wanted != previous:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def uses_threads(method: Method) -> Method:
    """Run an estimator's method under :func:`torch_threads` ``(self.n_threads)``: how every estimator's ``fit`` and
    prediction methods apply the thread rule."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch_threads(getattr(self, "n_threads", None)):
            return method(self, *args, **kwargs)

    return wrapper
