"""Compute kernels for memorycore's layers, and the rule that picks an implementation.

Each operation lives in its own folder: ``reference.py`` is readable PyTorch and the ground truth;
the Triton implementation (when present) must match it in the tests.

Dispatch rule (DESIGN.md): Triton when the tensors are on CUDA and triton imports; the PyTorch reference
otherwise. The environment variable ``MEMORYCORE_BACKEND`` = ``auto`` | ``torch`` | ``triton`` overrides it
(``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``, which is how the tests run the kernels). Past this rule an
operation's Triton entry point runs its reference for the inputs its kernels document as unsupported (the neural
memory: ``memorycore.kernels.neural_memory.triton.unsupported_reason``, which says why).

This package imports nothing from the rest of the project.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache  # asked once per kernel call: a token-by-token decoder calls it hundreds of times a second
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """The backend asked for through ``MEMORYCORE_BACKEND`` (default ``auto``)."""
    backend = os.environ.get("MEMORYCORE_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"MEMORYCORE_BACKEND={backend!r} is not a backend; use one of {', '.join(BACKENDS)}"
        )
    return backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether an operation on ``tensors`` runs its Triton kernel.

    Parameters
    ----------
    *tensors
        The operation's input tensors; ``auto`` picks Triton only when all of them are on CUDA.

    Returns
    -------
    bool
        True for the Triton kernel, False for the PyTorch reference.
    """
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("MEMORYCORE_BACKEND=triton but triton is not installed; pip install triton")
        on_cpu = any(not t.is_cuda for t in tensors)
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "MEMORYCORE_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
            )
        return True
    return all(t.is_cuda for t in tensors) and triton_available()
