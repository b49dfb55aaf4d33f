"""Triton kernels for the RAM-Net PDMA memory: a fused scan over time, forward and backward.

Training on CUDA runs the chunk-form kernel (memorycore/kernels/ramnet/chunk.py) by default; this scan is kept selectable
(MEMORYCORE_RAMNET_KERNEL=scan) and is always the one-token inference step.

One program owns one (batch, head): it walks the tokens in order and, per token, gathers the K written rows of the
state from global memory, updates them, scatters them back and reads the K query rows, so the per-token work is
O(K d) and independent of the number of slots M (the state lives in global memory, never in registers). The same
kernel with one token and no saving is the inference step, updating the state in place.

Backward runs the scan in reverse. The forward saves the K rows (and normalisers) each token overwrote, O(t K d);
the backward starts from the final state and restores those rows token by token, so it always reads the exact
state of step t while it accumulates the state's adjoint (same size as the state) in place.

Threads of one program touch rows chosen by data, so a barrier separates each phase that stores rows from the
next phase that loads them. Index arithmetic is 64-bit, loads are masked, accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from memorycore.kernels.ramnet.reference import DECAY_FLOOR, PROXY_EPS

# Fresh buffers come from here; the tests swap it for a NaN-filling allocator to catch reads of uninitialised memory.
new_buffer = torch.empty
NUM_WARPS = 4


@triton.jit
def _pdma_forward_kernel(
    v_ptr, write_index_ptr, write_weight_ptr, read_index_ptr, read_weight_ptr,
    slots_ptr, norm_ptr, out_ptr, saved_rows_ptr, saved_norms_ptr,
    T, M, D, gamma, eps, decay_floor,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SAVE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < D
    mask_kd = mask_k[:, None] & mask_d[None, :]
    slots_base = slots_ptr + bh * M * D
    norm_base = norm_ptr + bh * M
    for t in range(0, T):
        token = bh * T + t
        # write: S[j] <- (1 - w)^gamma S[j] + w v, z[j] <- (1 - w)^gamma z[j] + w for the K addressed rows
        w_index = tl.load(write_index_ptr + token * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        w_weight = tl.load(write_weight_ptr + token * K + offs_k, mask=mask_k, other=0.0)
        value = tl.load(v_ptr + token * D + offs_d, mask=mask_d, other=0.0)
        row_ptrs = slots_base + w_index[:, None] * D + offs_d[None, :]
        rows = tl.load(row_ptrs, mask=mask_kd, other=0.0)
        norms = tl.load(norm_base + w_index, mask=mask_k, other=0.0)
        if SAVE:
            saved = saved_rows_ptr + (token * K + offs_k[:, None]) * D + offs_d[None, :]
            tl.store(saved, rows, mask=mask_kd)
            tl.store(saved_norms_ptr + token * K + offs_k, norms, mask=mask_k)
        decay = tl.exp(gamma * tl.log(tl.maximum(1.0 - w_weight, decay_floor)))
        tl.store(row_ptrs, decay[:, None] * rows + w_weight[:, None] * value[None, :], mask=mask_kd)
        tl.store(norm_base + w_index, decay * norms + w_weight, mask=mask_k)
        tl.debug_barrier()
        # read: o = sum_k r_k S[j_k] / (z[j_k] + eps)
        r_index = tl.load(read_index_ptr + token * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        r_weight = tl.load(read_weight_ptr + token * K + offs_k, mask=mask_k, other=0.0)
        read_rows = tl.load(slots_base + r_index[:, None] * D + offs_d[None, :], mask=mask_kd, other=0.0)
        read_norms = tl.load(norm_base + r_index, mask=mask_k, other=1.0)
        coef = r_weight / (read_norms + eps)
        tl.store(out_ptr + token * D + offs_d, tl.sum(coef[:, None] * read_rows, axis=0), mask=mask_d)
        tl.debug_barrier()


@triton.jit
def _pdma_backward_kernel(
    v_ptr, write_index_ptr, write_weight_ptr, read_index_ptr, read_weight_ptr,
    slots_ptr, norm_ptr, saved_rows_ptr, saved_norms_ptr, dout_ptr, dslots_ptr, dnorm_ptr,
    dv_ptr, dwrite_weight_ptr, dread_weight_ptr,
    T, M, D, gamma, eps, decay_floor, proxy_eps,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < D
    mask_kd = mask_k[:, None] & mask_d[None, :]
    slots_base = slots_ptr + bh * M * D
    norm_base = norm_ptr + bh * M
    dslots_base = dslots_ptr + bh * M * D
    dnorm_base = dnorm_ptr + bh * M
    for step in range(0, T):
        token = bh * T + (T - 1 - step)
        # read phase, with the state S_t after token t's write
        r_index = tl.load(read_index_ptr + token * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        r_weight = tl.load(read_weight_ptr + token * K + offs_k, mask=mask_k, other=0.0)
        dout = tl.load(dout_ptr + token * D + offs_d, mask=mask_d, other=0.0)
        read_rows = tl.load(slots_base + r_index[:, None] * D + offs_d[None, :], mask=mask_kd, other=0.0)
        denom = tl.load(norm_base + r_index, mask=mask_k, other=0.0) + eps
        dot = tl.sum(read_rows * dout[None, :], axis=1)
        tl.store(dread_weight_ptr + token * K + offs_k, dot / denom, mask=mask_k)
        dread_ptrs = dslots_base + r_index[:, None] * D + offs_d[None, :]
        dread_rows = tl.load(dread_ptrs, mask=mask_kd, other=0.0)
        tl.store(dread_ptrs, dread_rows + (r_weight / denom)[:, None] * dout[None, :], mask=mask_kd)
        dread_norms = tl.load(dnorm_base + r_index, mask=mask_k, other=0.0)
        tl.store(dnorm_base + r_index, dread_norms - r_weight * dot / (denom * denom), mask=mask_k)
        tl.debug_barrier()
        # write phase: adjoint of S_t = g S_{t-1} + w v, then restore S_{t-1} from the saved rows
        w_index = tl.load(write_index_ptr + token * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        w_weight = tl.load(write_weight_ptr + token * K + offs_k, mask=mask_k, other=0.0)
        value = tl.load(v_ptr + token * D + offs_d, mask=mask_d, other=0.0)
        dwrite_ptrs = dslots_base + w_index[:, None] * D + offs_d[None, :]
        drows = tl.load(dwrite_ptrs, mask=mask_kd, other=0.0)
        dnorms = tl.load(dnorm_base + w_index, mask=mask_k, other=0.0)
        saved = saved_rows_ptr + (token * K + offs_k[:, None]) * D + offs_d[None, :]
        prev_rows = tl.load(saved, mask=mask_kd, other=0.0)
        prev_norms = tl.load(saved_norms_ptr + token * K + offs_k, mask=mask_k, other=0.0)
        decay = tl.exp(gamma * tl.log(tl.maximum(1.0 - w_weight, decay_floor)))
        # stable proxy: d/dw (eps + (1 - eps)(1 - w))^gamma
        ddecay = -gamma * (1.0 - proxy_eps) * tl.exp(
            (gamma - 1.0) * tl.log(proxy_eps + (1.0 - proxy_eps) * (1.0 - w_weight)))
        tl.store(dv_ptr + token * D + offs_d, tl.sum(w_weight[:, None] * drows, axis=0), mask=mask_d)
        dweight = (tl.sum(drows * value[None, :], axis=1) + dnorms
                   + ddecay * (tl.sum(drows * prev_rows, axis=1) + dnorms * prev_norms))
        tl.store(dwrite_weight_ptr + token * K + offs_k, dweight, mask=mask_k)
        tl.store(dwrite_ptrs, decay[:, None] * drows, mask=mask_kd)
        tl.store(dnorm_base + w_index, decay * dnorms, mask=mask_k)
        tl.store(slots_base + w_index[:, None] * D + offs_d[None, :], prev_rows, mask=mask_kd)
        tl.store(norm_base + w_index, prev_norms, mask=mask_k)
        tl.debug_barrier()


def _blocks(top_k: int, value_dim: int) -> tuple[int, int]:
    return triton.next_power_of_2(top_k), max(16, triton.next_power_of_2(value_dim))


def _launch_forward(v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps, save):
    """Run the forward scan on flattened [bh, ...] float32 tensors; ``slots`` / ``normaliser`` are updated in place."""
    bh, time, dim = v.shape
    top_k, slots_count = write_index.shape[-1], slots.shape[1]
    out = new_buffer(bh, time, dim, device=v.device, dtype=torch.float32)
    if save:
        saved_rows = new_buffer(bh, time, top_k, dim, device=v.device, dtype=torch.float32)
        saved_norms = new_buffer(bh, time, top_k, device=v.device, dtype=torch.float32)
    else:
        saved_rows = saved_norms = out  # never touched when SAVE is off
    block_k, block_d = _blocks(top_k, dim)
    _pdma_forward_kernel[(bh,)](
        v, write_index, write_weight, read_index, read_weight, slots, normaliser, out, saved_rows, saved_norms,
        time, slots_count, dim, float(gamma), float(eps), DECAY_FLOOR,
        K=top_k, BLOCK_K=block_k, BLOCK_D=block_d, SAVE=save, num_warps=NUM_WARPS,
    )
    return out, saved_rows, saved_norms


def flat_heads(x: Tensor, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """[b, h, ...] -> contiguous [b * h, ...] (optionally cast)."""
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return (x if dtype is None else x.to(dtype)).contiguous()


class PDMAFunction(torch.autograd.Function):
    """Autograd wrapper of the fused scan; tensors are flattened to [b * h, ...] float32."""

    @staticmethod
    def forward(ctx, v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps):
        slots, normaliser = slots.clone(), normaliser.clone()
        out, saved_rows, saved_norms = _launch_forward(
            v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps, save=True
        )
        # If the returned state is later stepped in place, pdma_step_triton bumps its version, so backward fails
        # loudly instead of reading a changed state.
        ctx.save_for_backward(v, write_index, write_weight, read_index, read_weight,
                              slots, normaliser, saved_rows, saved_norms)
        ctx.gamma, ctx.eps = gamma, eps
        return out, slots, normaliser

    @staticmethod
    def backward(ctx, dout, dslots, dnorm):
        v, write_index, write_weight, read_index, read_weight, slots, normaliser, saved_rows, saved_norms = (
            ctx.saved_tensors
        )
        bh, time, dim = v.shape
        top_k = write_index.shape[-1]
        slots, normaliser = slots.clone(), normaliser.clone()  # rolled back in place, token by token
        dout = torch.zeros_like(v) if dout is None else dout.float().contiguous()
        dslots = torch.zeros_like(slots) if dslots is None else dslots.float().contiguous().clone()
        dnorm = torch.zeros_like(normaliser) if dnorm is None else dnorm.float().contiguous().clone()
        dv = new_buffer(bh, time, dim, device=v.device, dtype=torch.float32)
        dwrite_weight = new_buffer(bh, time, top_k, device=v.device, dtype=torch.float32)
        dread_weight = new_buffer(bh, time, top_k, device=v.device, dtype=torch.float32)
        block_k, block_d = _blocks(top_k, dim)
        _pdma_backward_kernel[(bh,)](
            v, write_index, write_weight, read_index, read_weight, slots, normaliser, saved_rows, saved_norms,
            dout, dslots, dnorm, dv, dwrite_weight, dread_weight,
            time, slots.shape[1], dim, float(ctx.gamma), float(ctx.eps), DECAY_FLOOR, PROXY_EPS,
            K=top_k, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )
        return dv, None, dwrite_weight, None, dread_weight, dslots, dnorm, None, None


def pdma_triton(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    gamma: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused scan with autograd; same contract as :func:`memorycore.kernels.ramnet.reference.pdma_chunked_reference`."""
    batch, heads, _, dim = v.shape
    out, new_slots, new_norm = PDMAFunction.apply(
        flat_heads(v), flat_heads(write_index, torch.int64), flat_heads(write_weight),
        flat_heads(read_index, torch.int64),
        flat_heads(read_weight), flat_heads(slots), flat_heads(normaliser), gamma, eps,
    )
    return (out.view(batch, heads, -1, dim).to(v.dtype), new_slots.view(batch, heads, *slots.shape[2:]),
            new_norm.view(batch, heads, -1))


def pdma_step_triton(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    gamma: float,
    eps: float,
) -> Tensor:
    """One token, updating contiguous float32 ``slots`` [b, h, m, d] and ``normaliser`` [b, h, m] in place.

    No autograd (inference); returns out [b, h, d] in the dtype of v.
    """
    if slots.dtype != torch.float32 or not slots.is_contiguous() or not normaliser.is_contiguous():
        raise ValueError("the in-place step needs contiguous float32 slots and normaliser (as the layer makes them)")
    batch, heads, dim = v.shape
    flat_slots = slots.view(batch * heads, *slots.shape[2:])
    flat_norm = normaliser.view(batch * heads, -1)
    out, _, _ = _launch_forward(
        flat_heads(v[:, :, None]), flat_heads(write_index[:, :, None], torch.int64),
        flat_heads(write_weight[:, :, None]),
        flat_heads(read_index[:, :, None], torch.int64), flat_heads(read_weight[:, :, None]),
        flat_slots, flat_norm, gamma, eps, save=False,
    )
    torch.autograd.graph.increment_version((slots, normaliser))  # tell autograd the state changed in place
    return out.view(batch, heads, dim).to(v.dtype)
