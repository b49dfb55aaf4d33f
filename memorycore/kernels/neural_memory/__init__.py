"""Titans neural memory: chunk-wise update and causal retrieval.

``neural_memory`` is the public entry point; it dispatches to the Triton kernel or the PyTorch reference by the rule
in :mod:`memorycore.kernels`.
"""

from __future__ import annotations

from torch import Tensor

from memorycore.kernels import use_triton
from memorycore.kernels.neural_memory.reference import Weights, neural_memory_reference


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_eta: Tensor,
    log_keep: Tensor,
    weights: Weights,
    momentum: Weights,
    chunk_size: int,
) -> tuple[Tensor, Weights, Weights]:
    """Write every (k_t, v_t) into the memory and read ``y_t = M_t(q_t)``, chunk by chunk.

    See :func:`memorycore.kernels.neural_memory.reference.neural_memory_reference` for the shapes and the math; both backends
    take and return the same things.
    """
    if use_triton(q, k, v):
        from memorycore.kernels.neural_memory.triton import neural_memory_triton

        return neural_memory_triton(q, k, v, lr, log_eta, log_keep, weights, momentum, chunk_size)
    return neural_memory_reference(q, k, v, lr, log_eta, log_keep, weights, momentum, chunk_size)


__all__ = ["neural_memory", "neural_memory_reference"]
