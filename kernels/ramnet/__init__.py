"""RAM-Net sparse addressable memory: the address decoder and the PDMA write/read.

``product_topk`` decodes addresses (plain PyTorch: O(U K^2) per token, no kernel needed). ``pdma`` runs the memory
over a sequence with autograd (training) and ``pdma_step`` runs one token in place (inference); both dispatch to the
Triton kernels or the PyTorch reference by the rule in :mod:`kernels`.
"""

from __future__ import annotations

from torch import Tensor

from kernels import use_triton
from kernels.ramnet.reference import (
    pdma_chunked_reference,
    pdma_recurrent_reference,
    pdma_step_reference,
    product_topk,
)


def pdma(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    *,
    gamma: float,
    eps: float,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor, Tensor]:
    """Write every token into the slot memory and read it back (causal), returning the output and the new state.

    See :func:`kernels.ramnet.reference.pdma_chunked_reference` for the shapes and the math. The input state is not
    modified. ``chunk_size`` only shapes the PyTorch reference (the Triton kernel scans token by token); both give the
    same result.
    """
    if use_triton(v, slots):
        from kernels.ramnet.triton import pdma_triton

        return pdma_triton(v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps)
    return pdma_chunked_reference(
        v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps, chunk_size
    )


def pdma_step(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    *,
    gamma: float,
    eps: float,
) -> Tensor:
    """One token (v [b, h, d], indices and weights [b, h, k]): updates ``slots`` and ``normaliser`` in place.

    O(K d) work per (batch, head) whatever the number of slots; no autograd. Returns the read [b, h, d].
    """
    if use_triton(v, slots):
        from kernels.ramnet.triton import pdma_step_triton

        return pdma_step_triton(v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps)
    out, _, _ = pdma_step_reference(
        v.to(slots.dtype), write_index, write_weight.to(slots.dtype), read_index, read_weight.to(slots.dtype),
        slots, normaliser, gamma, eps, inplace=True,
    )
    return out.to(v.dtype)


__all__ = [
    "pdma",
    "pdma_step",
    "product_topk",
    "pdma_chunked_reference",
    "pdma_recurrent_reference",
    "pdma_step_reference",
]
