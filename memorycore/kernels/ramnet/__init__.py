"""RAM-Net sparse addressable memory: the address decoder and the PDMA write/read.

``product_topk`` decodes addresses (plain PyTorch: O(U K^2) per token, no kernel needed). ``pdma`` runs the memory
over a sequence with autograd (training) and ``pdma_step`` runs one token in place (inference); both dispatch to the
Triton kernels or the PyTorch reference by the rule in :mod:`memorycore.kernels`.

Two Triton training kernels exist: ``scan`` (:mod:`memorycore.kernels.ramnet.triton`, a fused token-by-token scan, the default)
and ``chunk`` (:mod:`memorycore.kernels.ramnet.chunk`, the exact chunk form). Pick one with ``pdma(..., kernel=...)`` or the
environment variable ``MEMORYCORE_RAMNET_KERNEL=scan|chunk``; both give the same result up to rounding. The scan is
the default because it is the one measured on a GPU: on an H100 with Triton 3.6 the chunk kernels, then with
full-precision float32 matmuls, took 12 s (forward) and 37 s (backward) to compile at 64 (token, slot) pairs per
chunk and minutes at the 128 pairs of ``top_k=8``; with tf32x3 matmuls they compile faster but still spill heavily,
and have not run on a GPU since (2026-11-23; see :mod:`memorycore.kernels.ramnet.chunk`).
"""

from __future__ import annotations

import torch
from torch import Tensor

import os
from typing import NamedTuple

from memorycore.kernels import use_triton
from memorycore.kernels.ramnet.reference import (
    pdma_chunked_reference,
    pdma_recurrent_reference,
    pdma_step_reference,
    product_topk,
)

TRAINING_KERNELS = ("chunk", "scan")


def training_kernel(kernel: str | None = None) -> str:
    """The Triton training kernel to run: ``kernel`` if given, else ``MEMORYCORE_RAMNET_KERNEL`` (default scan)."""
    if kernel is None:
        kernel = os.environ.get("MEMORYCORE_RAMNET_KERNEL", "scan").strip().lower() or "scan"
    if kernel not in TRAINING_KERNELS:
        raise ValueError(f"RAM-Net training kernel {kernel!r} is not one of {', '.join(TRAINING_KERNELS)}; "
                         "set kernel= or MEMORYCORE_RAMNET_KERNEL to one of them")
    return kernel


def compact_slots(write_index: Tensor, read_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Renumber the slots a sequence touches as 0..n-1 per (batch, head).

    Returns ``slot_ids [b, h, n]`` (the original slot of each compact row; rows past a head's own count repeat
    its compact row 0), ``write_local`` and ``read_local`` ([b, h, t, k], indices into the compact rows) and
    ``is_padding [b, h, n]``. Every untouched slot keeps its value through the sequence, so the memory can run on
    the n <= min(M, 2 t k) touched rows alone: the work per token does not depend on the number of slots M, and
    the working set stops growing with M once M exceeds 2 t k.
    """
    top_k = write_index.shape[-1]
    index = torch.cat([write_index, read_index], dim=-1).flatten(2)  # [b, h, 2 t k]
    sorted_index, order = index.sort(dim=-1)
    starts = torch.ones_like(sorted_index, dtype=torch.bool)
    starts[..., 1:] = sorted_index[..., 1:] != sorted_index[..., :-1]
    local_sorted = starts.cumsum(-1) - 1
    local = torch.empty_like(index).scatter_(-1, order, local_sorted)
    counts = local_sorted[..., -1] + 1  # [b, h]
    size = int(counts.max())
    slot_ids = sorted_index[..., :1].expand(*index.shape[:-1], size).clone()
    slot_ids.scatter_(-1, local_sorted, sorted_index)  # duplicates carry the same slot
    is_padding = torch.arange(size, device=index.device) >= counts[..., None]
    write_local, read_local = local.view(*write_index.shape[:-1], 2 * top_k).split(top_k, dim=-1)
    return slot_ids, write_local, read_local, is_padding


class TouchedRows(NamedTuple):
    """The memory after a sequence, kept as the rows the sequence touched (O(touched) instead of O(slots)).

    Every slot outside ``slot_ids`` keeps its value from ``base_slots`` / ``base_normaliser``, or from the empty
    memory (S = 0, z = 1 / num_slots) when those are None. ``slot_ids`` may repeat a slot (padding of
    :func:`compact_slots`); repeated entries carry the same row.
    """

    slot_ids: Tensor  # [b, h, n]
    rows: Tensor  # [b, h, n, d]
    norms: Tensor  # [b, h, n]
    num_slots: int
    base_slots: Tensor | None
    base_normaliser: Tensor | None

    def lookup(self, slot_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The rows ``[b, h, q, d]`` and normalisers ``[b, h, q]`` of ``slot_ids [b, h, q]`` in this state.

        O((n + q) log n) per (batch, head) for n touched rows: nothing of O(slots) is read or built. Differentiable
        in the rows (and in the base tensors).
        """
        found, rows, norms = self._find(slot_ids)
        if self.base_slots is None:
            fallback_rows, fallback_norms = torch.zeros_like(rows), torch.full_like(norms, 1.0 / self.num_slots)
        else:
            fallback_rows = self.base_slots.gather(2, slot_ids[..., None].expand_as(rows))
            fallback_norms = self.base_normaliser.gather(2, slot_ids)
        return torch.where(found[..., None], rows, fallback_rows), torch.where(found, norms, fallback_norms)

    def followed_by(self, later: "TouchedRows") -> "TouchedRows":
        """This state updated by ``later`` (rows computed from this state; its base is ignored): one TouchedRows.

        ``later``'s rows come first, then this state's, those that ``later`` touched again taking its values
        detached: a repeated slot holds one value everywhere and passes its gradient once, through its first entry.
        """
        overwritten, newer_rows, newer_norms = later._find(self.slot_ids)
        rows = torch.where(overwritten[..., None], newer_rows.detach(), self.rows)
        norms = torch.where(overwritten, newer_norms.detach(), self.norms)
        return TouchedRows(torch.cat([later.slot_ids, self.slot_ids], -1), torch.cat([later.rows, rows], 2),
                           torch.cat([later.norms, norms], -1), self.num_slots, self.base_slots, self.base_normaliser)

    def _find(self, slot_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Whether each of ``slot_ids`` is among the touched rows, and its row and normaliser there (any if not)."""
        sorted_ids, order = self.slot_ids.sort(dim=-1, stable=True)  # a repeated slot: its first entry is found
        position = torch.searchsorted(sorted_ids, slot_ids).clamp_max(sorted_ids.shape[-1] - 1)
        found = sorted_ids.gather(-1, position) == slot_ids
        index = order.gather(-1, position)
        rows = self.rows.gather(2, index[..., None].expand(*index.shape, self.rows.shape[-1]))
        return found, rows, self.norms.gather(2, index)

    def materialise(self) -> tuple[Tensor, Tensor]:
        """The full state ``slots [b, h, m, d]``, ``normaliser [b, h, m]`` (differentiable in the rows)."""
        row_ids = self.slot_ids[..., None].expand_as(self.rows)
        if self.base_slots is not None:  # the input state is not modified
            return (self.base_slots.scatter(2, row_ids, self.rows),
                    self.base_normaliser.scatter(2, self.slot_ids, self.norms))
        batch, heads, _, dim = self.rows.shape
        options = dict(device=self.rows.device, dtype=self.rows.dtype)
        slots = torch.zeros(batch, heads, self.num_slots, dim, **options)
        normaliser = torch.full((batch, heads, self.num_slots), 1.0 / self.num_slots, **options)
        # buffers of our own: fill them in place instead of copying M rows
        return slots.scatter_(2, row_ids, self.rows), normaliser.scatter_(2, self.slot_ids, self.norms)


def pdma_touched(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor | TouchedRows | None,
    normaliser: Tensor | None,
    *,
    gamma: float,
    eps: float,
    num_slots: int | None = None,
    chunk_size: int = 8,
    kernel: str | None = None,
) -> tuple[Tensor, TouchedRows]:
    """:func:`pdma` returning the new state as :class:`TouchedRows`: no O(slots) allocation or copy.

    The backends run on the touched slots only (:func:`compact_slots`), so with the state kept as touched rows
    nothing here depends on the number of slots M. Call ``.materialise()`` for the full state. ``slots`` may also
    be the :class:`TouchedRows` a previous call returned (``normaliser`` None): streaming then stays free of O(M)
    work too, except that once the rows touched since the last full state reach a quarter of the slots, that state
    is built once (amortised O(1) per touched row).
    """
    batch, heads, _, dim = v.shape
    slot_ids, write_local, read_local, is_padding = compact_slots(write_index, read_index)
    previous = slots if isinstance(slots, TouchedRows) else None
    if previous is not None:
        num_slots, slots, normaliser = previous.num_slots, None, None
        start_rows, start_norms = previous.lookup(slot_ids)
        state_dtype = start_rows.dtype
    elif slots is None:
        if num_slots is None:
            raise ValueError("pass num_slots to start from the empty memory (slots=None)")
        state_dtype = torch.promote_types(v.dtype, torch.float32)
        start_rows = torch.zeros(*slot_ids.shape, dim, device=v.device, dtype=state_dtype)
        start_norms = torch.full(slot_ids.shape, 1.0 / num_slots, device=v.device, dtype=state_dtype)
    else:
        num_slots, state_dtype = slots.shape[2], slots.dtype
        start_rows = slots.gather(2, slot_ids[..., None].expand(*slot_ids.shape, dim))
        start_norms = normaliser.gather(2, slot_ids)
    compact = (start_rows, start_norms)
    if use_triton(v, start_rows) and training_kernel(kernel) == "chunk":
        from memorycore.kernels.ramnet.chunk import pdma_chunk_triton

        out, rows, norms = pdma_chunk_triton(
            v, write_local, write_weight, read_local, read_weight, *compact, gamma, eps, chunk_size
        )
    elif use_triton(v, start_rows):
        from memorycore.kernels.ramnet.triton import pdma_triton

        out, rows, norms = pdma_triton(v, write_local, write_weight, read_local, read_weight, *compact, gamma, eps)
    else:
        out, rows, norms = pdma_chunked_reference(
            v, write_local, write_weight, read_local, read_weight, *compact, gamma, eps, chunk_size
        )
    # Padding rows repeat their head's compact row 0 (same slot), so each slot receives one value; detached, so
    # the gradient of that slot reaches row 0 once.
    rows = torch.where(is_padding[..., None], rows[..., :1, :].detach(), rows).to(state_dtype)
    norms = torch.where(is_padding, norms[..., :1].detach(), norms).to(state_dtype)
    touched = TouchedRows(slot_ids, rows, norms, num_slots, slots, normaliser)
    if previous is None:
        return out, touched
    if 4 * (previous.slot_ids.shape[-1] + slot_ids.shape[-1]) < num_slots:
        return out, previous.followed_by(touched)
    base_slots, base_normaliser = previous.materialise()
    return out, touched._replace(base_slots=base_slots, base_normaliser=base_normaliser)


def pdma(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor | None,
    normaliser: Tensor | None,
    *,
    gamma: float,
    eps: float,
    num_slots: int | None = None,
    chunk_size: int = 8,
    kernel: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Write every token into the slot memory and read it back (causal), returning the output and the new state.

    See :func:`memorycore.kernels.ramnet.reference.pdma_chunked_reference` for the shapes and the math. The input state is not
    modified; ``slots=None, normaliser=None`` with ``num_slots`` starts from the empty memory (S = 0, z = 1/M)
    without materialising it first. The backends run on the touched slots only (:func:`compact_slots`), so the cost
    depends on the number of slots only through building the returned full state (:func:`pdma_touched` skips
    that). ``chunk_size`` shapes the work of the chunk form (reference and Triton ``chunk`` kernel), not the
    result. ``kernel`` picks the Triton training kernel (see :func:`training_kernel`); it is ignored when the
    reference runs.
    """
    out, touched = pdma_touched(v, write_index, write_weight, read_index, read_weight, slots, normaliser,
                                gamma=gamma, eps=eps, num_slots=num_slots, chunk_size=chunk_size, kernel=kernel)
    return (out, *touched.materialise())


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
        from memorycore.kernels.ramnet.triton import pdma_step_triton

        return pdma_step_triton(v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps)
    out, _, _ = pdma_step_reference(
        v.to(slots.dtype), write_index, write_weight.to(slots.dtype), read_index, read_weight.to(slots.dtype),
        slots, normaliser, gamma, eps, inplace=True,
    )
    return out.to(v.dtype)


__all__ = [
    "pdma",
    "pdma_touched",
    "TouchedRows",
    "training_kernel",
    "compact_slots",
    "pdma_step",
    "product_topk",
    "pdma_chunked_reference",
    "pdma_recurrent_reference",
    "pdma_step_reference",
]
