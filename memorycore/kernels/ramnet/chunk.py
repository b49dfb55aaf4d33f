"""Triton kernels for the RAM-Net PDMA memory in the exact chunk form, forward and backward (training).

The math is :func:`memorycore.kernels.ramnet.reference.pdma_chunk_reference`. Tiling: one program owns one (batch, head) and
walks its chunks in order (the state is carried from chunk to chunk). A chunk of BLOCK_C tokens holds
BLOCK_P = BLOCK_C * BLOCK_K (token, k) pairs, laid out as ``p = token * BLOCK_K + k`` (k >= K and tokens past the
end are masked). Per chunk:

1. gather the chunk-start rows of the state for the write slots and the read slots (BLOCK_P x BLOCK_D each);
2. match every query slot against every write slot of the chunk: a BLOCK_P x BLOCK_P 0/1 matrix X, causal in time;
3. decays as segment sums in log space: the log-decay written to the query's slot by the pairs strictly after pair p
   and up to the query is ``A = (X * log_decay) @ LATER`` (LATER[p', p] = token(p') > token(p), a matmul), and the
   decay from the chunk start is the row sum F of ``X * log_decay``;
4. values by a matmul against the chunk's values: ``S_t[j] = exp(F) S_0[j] + (X w exp(A)) @ V`` (the same for z with
   a row sum), then the read ``sum_k r / (z + eps) S`` per token (a reshape to [BLOCK_C, BLOCK_K, BLOCK_D] and a sum);
5. the end-of-chunk rows are the same formula with the chunk's write slots as queries at its last token; each touched
   slot is stored once, by its last writer in the chunk.

The forward saves the chunk-start value of every written row when gradients are needed (T K rows and normalisers:
linear in time; nothing without gradients). The backward walks the chunks in reverse from the final state: it
restores the chunk's written rows from what was saved (so the state buffer holds the chunk's start state), recomputes
X, A, F from the chunk's inputs, and propagates the adjoint of the state (same size as the state, updated in place:
written slots are overwritten by their start adjoint, then the reads' contributions are added once per distinct read
slot) together with the gradients of v, w, r.

Threads of one program touch rows chosen by data, so a barrier separates each phase that stores rows from the next
phase that loads them. Inputs may be float32, bfloat16 or float16; every product is accumulated in float32 and the
state is float32. Matmuls use ``input_precision="tf32x3"`` (three tf32 tensor-core products per fp32 product, close
to fp32 accuracy; plain tf32 would not do, as the log-decays need full precision). Index arithmetic is 64-bit and
every load is masked.

Not the default training kernel (see :mod:`memorycore.kernels.ramnet`). Until 2026-11-23 the matmuls were ``"ieee"``, which
Triton lowers to unrolled fp32 FMAs (4,152 in the forward at 64 pairs): on an H100 with Triton 3.6 that compiled in
12 s (forward) and 37 s (backward) at BLOCK_P = 64 and not within minutes at BLOCK_P = 128 (top_k 8, chunks of 16).
Compiled for sm_90 on a CPU (``python bench/kernel_resources.py --ramnet``, Triton 3.9), "ieee" at 128 pairs had not
finished the forward after 11 minutes. With tf32x3 and at most 64 pairs per chunk (MAX_PAIRS; top_k 8 then gives
chunks of 8 tokens) the forward and backward compile in 4 s and 9 s there and need 80 / 160 KB of shared memory, but
still spill 1.8 / 4.7 KB per thread, as [BLOCK_P, BLOCK_P] float32 tiles do not fit in registers. Their accuracy and
speed on a GPU are not yet measured (``bench/ramnet_throughput.py --kernel chunk`` checks against the reference
before timing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from memorycore.kernels.ramnet.reference import DECAY_FLOOR, PROXY_EPS
from memorycore.kernels.ramnet.triton import flat_heads

# Fresh buffers come from here; the tests swap it for a NaN-filling allocator to catch reads of uninitialised memory.
new_buffer = torch.empty
NUM_WARPS = 4
MIN_PAIRS = 16  # tl.dot needs every dimension >= 16
MAX_PAIRS = 64  # BLOCK_P x BLOCK_P float32 tiles: at 128 pairs the tf32x3 kernels ask for 256 / 512 KB of shared
# memory (an H100 has 227 KB per block) and spill 6.6 / 11 KB per thread; at 64, 80 / 160 KB (bench/kernel_resources.py)


@triton.jit
def _load_pairs(index_ptr, weight_ptr, bh, chunk_start, T,
                K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Slots, weights (float32), token offsets within the chunk, validity and flat offsets of a chunk's pairs."""
    offs_p = tl.arange(0, BLOCK_C * BLOCK_K)
    token_in_chunk = offs_p // BLOCK_K
    k = offs_p % BLOCK_K
    token = chunk_start + token_in_chunk
    valid = (k < K) & (token < T)
    offset = (bh * T + token) * K + k
    slot = tl.load(index_ptr + offset, mask=valid, other=-1).to(tl.int64)
    weight = tl.load(weight_ptr + offset, mask=valid, other=0.0).to(tl.float32)
    return slot, weight, token_in_chunk, valid, offset


@triton.jit
def _load_rows(base_ptr, row, mask, offs_d, mask_d, D):
    """Rows [P, BLOCK_D] of a [rows, D] matrix at ``row`` (float32)."""
    ptrs = base_ptr + row[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=mask[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _decays(query_slot, query_time, query_valid, write_slot, write_time, write_valid, log_decay, later):
    """X (float 0/1), E = X exp(A) and F for queries against the chunk's write pairs (see the module docstring)."""
    match = ((query_slot[:, None] == write_slot[None, :]) & (write_time[None, :] <= query_time[:, None])
             & query_valid[:, None] & write_valid[None, :])
    match_f = match.to(tl.float32)
    weighted = match_f * log_decay[None, :]
    segment = tl.dot(weighted, later, input_precision="tf32x3")
    from_start = tl.sum(weighted, axis=1)
    decay = tl.where(match, tl.exp(segment), 0.0)
    return match_f, decay, from_start


@triton.jit
def _decays_backward(match_f, decay, from_start, write_weight, values, later, dvalue, dnorm, start_rows, start_norms):
    """Gradients of v (per pair), w (direct) and log-decay (per pair) from the adjoints of S_t and z_t of queries."""
    coef = decay * write_weight[None, :]
    dcoef = tl.dot(dvalue, tl.trans(values), input_precision="tf32x3") + dnorm[:, None]
    dvalues = tl.dot(tl.trans(coef), dvalue, input_precision="tf32x3")
    dweight = tl.sum(dcoef * decay, axis=0)
    dsegment = dcoef * coef
    dfrom_start = tl.exp(from_start) * (tl.sum(start_rows * dvalue, axis=1) + start_norms * dnorm)
    dweighted = tl.dot(dsegment, tl.trans(later), input_precision="tf32x3") + dfrom_start[:, None]
    dlog_decay = tl.sum(match_f * dweighted, axis=0)
    return dvalues, dweight, dlog_decay


@triton.jit
def _chunk_layout(w_slot, w_time, w_valid):
    """LATER[p', p] = token(p') > token(p), and which write pair is the last writer of its slot in the chunk."""
    later = (w_time[:, None] > w_time[None, :]).to(tl.float32)
    overwritten = ((w_slot[:, None] == w_slot[None, :]) & (w_time[None, :] > w_time[:, None]) & w_valid[None, :])
    is_last = w_valid & (tl.sum(overwritten.to(tl.int32), axis=1) == 0)
    return later, is_last


@triton.jit
def _pdma_chunk_forward_kernel(
    v_ptr, write_index_ptr, write_weight_ptr, read_index_ptr, read_weight_ptr,
    slots_ptr, norm_ptr, out_ptr, saved_rows_ptr, saved_norms_ptr,
    T, M, D, gamma, eps, decay_floor,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SAVE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = tl.arange(0, BLOCK_C)
    slots_base = slots_ptr + bh * M * D
    norm_base = norm_ptr + bh * M
    for chunk_start in range(0, T, BLOCK_C):
        w_slot, w_weight, w_time, w_valid, w_offset = _load_pairs(
            write_index_ptr, write_weight_ptr, bh, chunk_start, T, K, BLOCK_C, BLOCK_K)
        r_slot, r_weight, r_time, r_valid, _ = _load_pairs(
            read_index_ptr, read_weight_ptr, bh, chunk_start, T, K, BLOCK_C, BLOCK_K)
        values = _load_rows(v_ptr, bh * T + chunk_start + w_time, w_valid, offs_d, mask_d, D)
        w_rows = _load_rows(slots_base, w_slot, w_valid, offs_d, mask_d, D)
        w_norms = tl.load(norm_base + w_slot, mask=w_valid, other=0.0)
        r_rows = _load_rows(slots_base, r_slot, r_valid, offs_d, mask_d, D)
        r_norms = tl.load(norm_base + r_slot, mask=r_valid, other=0.0)
        if SAVE:
            tl.store(saved_rows_ptr + w_offset[:, None] * D + offs_d[None, :], w_rows,
                     mask=w_valid[:, None] & mask_d[None, :])
            tl.store(saved_norms_ptr + w_offset, w_norms, mask=w_valid)
        log_decay = gamma * tl.log(tl.maximum(1.0 - w_weight, decay_floor))
        later, is_last = _chunk_layout(w_slot, w_time, w_valid)

        # reads: S_t and z_t of each read slot at its token, then o_t = sum_k r / (z + eps) S
        _, decay, from_start = _decays(r_slot, r_time, r_valid, w_slot, w_time, w_valid, log_decay, later)
        coef = decay * w_weight[None, :]
        start = tl.exp(from_start)
        read = start[:, None] * r_rows + tl.dot(coef, values, input_precision="tf32x3")
        read_norm = start * r_norms + tl.sum(coef, axis=1)
        scaled = (r_weight / (read_norm + eps))[:, None] * read
        out = tl.sum(tl.reshape(scaled, (BLOCK_C, BLOCK_K, BLOCK_D)), axis=1)
        out_rows = chunk_start + offs_c
        tl.store(out_ptr + (bh * T + out_rows)[:, None] * D + offs_d[None, :], out,
                 mask=(out_rows < T)[:, None] & mask_d[None, :])

        # end of chunk: the written slots at the chunk's last token, stored once per slot by its last writer
        _, decay, from_start = _decays(w_slot, w_time + BLOCK_C, w_valid, w_slot, w_time, w_valid, log_decay, later)
        coef = decay * w_weight[None, :]
        start = tl.exp(from_start)
        end_rows = start[:, None] * w_rows + tl.dot(coef, values, input_precision="tf32x3")
        end_norms = start * w_norms + tl.sum(coef, axis=1)
        tl.debug_barrier()
        tl.store(slots_base + w_slot[:, None] * D + offs_d[None, :], end_rows, mask=is_last[:, None] & mask_d[None, :])
        tl.store(norm_base + w_slot, end_norms, mask=is_last)
        tl.debug_barrier()


@triton.jit
def _pdma_chunk_backward_kernel(
    v_ptr, write_index_ptr, write_weight_ptr, read_index_ptr, read_weight_ptr,
    slots_ptr, norm_ptr, saved_rows_ptr, saved_norms_ptr, dout_ptr, dslots_ptr, dnorm_ptr,
    dv_ptr, dwrite_weight_ptr, dread_weight_ptr,
    T, M, D, gamma, eps, decay_floor, proxy_eps,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    BLOCK_P: tl.constexpr = BLOCK_C * BLOCK_K
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    slots_base = slots_ptr + bh * M * D
    norm_base = norm_ptr + bh * M
    dslots_base = dslots_ptr + bh * M * D
    dnorm_base = dnorm_ptr + bh * M
    num_chunks = tl.cdiv(T, BLOCK_C)
    for step in range(0, num_chunks):
        chunk_start = (num_chunks - 1 - step) * BLOCK_C
        w_slot, w_weight, w_time, w_valid, w_offset = _load_pairs(
            write_index_ptr, write_weight_ptr, bh, chunk_start, T, K, BLOCK_C, BLOCK_K)
        r_slot, r_weight, r_time, r_valid, r_offset = _load_pairs(
            read_index_ptr, read_weight_ptr, bh, chunk_start, T, K, BLOCK_C, BLOCK_K)
        values = _load_rows(v_ptr, bh * T + chunk_start + w_time, w_valid, offs_d, mask_d, D)
        dout = _load_rows(dout_ptr, bh * T + chunk_start + r_time, r_valid, offs_d, mask_d, D)
        log_decay = gamma * tl.log(tl.maximum(1.0 - w_weight, decay_floor))
        later, is_last = _chunk_layout(w_slot, w_time, w_valid)
        # adjoints of the end-of-chunk rows (each slot counted once, at its last writer)
        dend_rows = _load_rows(dslots_base, w_slot, is_last, offs_d, mask_d, D)
        dend_norms = tl.load(dnorm_base + w_slot, mask=is_last, other=0.0)
        # roll the state back to the chunk start
        w_rows = _load_rows(saved_rows_ptr, w_offset, w_valid, offs_d, mask_d, D)
        w_norms = tl.load(saved_norms_ptr + w_offset, mask=w_valid, other=0.0)
        tl.debug_barrier()
        tl.store(slots_base + w_slot[:, None] * D + offs_d[None, :], w_rows, mask=is_last[:, None] & mask_d[None, :])
        tl.store(norm_base + w_slot, w_norms, mask=is_last)
        tl.debug_barrier()
        r_rows = _load_rows(slots_base, r_slot, r_valid, offs_d, mask_d, D)
        r_norms = tl.load(norm_base + r_slot, mask=r_valid, other=0.0)

        # reads: recompute S_t, z_t and the output's pieces, then their adjoints
        r_match, r_decay, r_from_start = _decays(r_slot, r_time, r_valid, w_slot, w_time, w_valid, log_decay, later)
        coef = r_decay * w_weight[None, :]
        r_start = tl.exp(r_from_start)
        read = r_start[:, None] * r_rows + tl.dot(coef, values, input_precision="tf32x3")
        denom = r_start * r_norms + tl.sum(coef, axis=1) + eps
        scale = r_weight / denom
        dscale = tl.sum(read * dout, axis=1)
        tl.store(dread_weight_ptr + r_offset, dscale / denom, mask=r_valid)
        dread = scale[:, None] * dout
        dread_norm = -dscale * scale / denom
        dvalues, dweight, dlog_decay = _decays_backward(
            r_match, r_decay, r_from_start, w_weight, values, later, dread, dread_norm, r_rows, r_norms)

        # end of chunk
        e_match, e_decay, e_from_start = _decays(
            w_slot, w_time + BLOCK_C, w_valid, w_slot, w_time, w_valid, log_decay, later)
        e_dvalues, e_dweight, e_dlog_decay = _decays_backward(
            e_match, e_decay, e_from_start, w_weight, values, later, dend_rows, dend_norms, w_rows, w_norms)
        dvalues += e_dvalues
        dweight += e_dweight
        dlog_decay += e_dlog_decay
        # d log_decay / dw through the stable proxy: d/dw (eps + (1 - eps)(1 - w))^gamma / (1 - w)^gamma
        exact = tl.exp(gamma * tl.log(tl.maximum(1.0 - w_weight, decay_floor)))
        dproxy = -gamma * (1.0 - proxy_eps) * tl.exp(
            (gamma - 1.0) * tl.log(proxy_eps + (1.0 - proxy_eps) * (1.0 - w_weight)))
        tl.store(dwrite_weight_ptr + w_offset, dweight + dlog_decay * dproxy / exact, mask=w_valid)
        dv = tl.sum(tl.reshape(dvalues, (BLOCK_C, BLOCK_K, BLOCK_D)), axis=1)
        dv_rows = chunk_start + offs_c
        tl.store(dv_ptr + (bh * T + dv_rows)[:, None] * D + offs_d[None, :], dv,
                 mask=(dv_rows < T)[:, None] & mask_d[None, :])

        # adjoint of the chunk-start state: a written slot's start adjoint is exp(F) times its end adjoint (its
        # old value survives only through the decay), then every read adds exp(F) dS_t, once per distinct slot
        e_start = tl.exp(e_from_start)
        tl.store(dslots_base + w_slot[:, None] * D + offs_d[None, :], e_start[:, None] * dend_rows,
                 mask=is_last[:, None] & mask_d[None, :])
        tl.store(dnorm_base + w_slot, e_start * dend_norms, mask=is_last)
        tl.debug_barrier()
        same_slot = (r_slot[:, None] == r_slot[None, :]) & r_valid[:, None] & r_valid[None, :]
        seen_before = same_slot & (offs_p[None, :] < offs_p[:, None])
        is_first = r_valid & (tl.sum(seen_before.to(tl.int32), axis=1) == 0)
        same_f = same_slot.to(tl.float32)
        drows = tl.dot(same_f, r_start[:, None] * dread, input_precision="tf32x3")
        dnorms = tl.sum(same_f * (r_start * dread_norm)[None, :], axis=1)
        dread_ptrs = dslots_base + r_slot[:, None] * D + offs_d[None, :]
        first_mask = is_first[:, None] & mask_d[None, :]
        tl.store(dread_ptrs, tl.load(dread_ptrs, mask=first_mask, other=0.0) + drows, mask=first_mask)
        tl.store(dnorm_base + r_slot, tl.load(dnorm_base + r_slot, mask=is_first, other=0.0) + dnorms, mask=is_first)
        tl.debug_barrier()


def chunk_blocks(top_k: int, value_dim: int, chunk_size: int) -> tuple[int, int, int]:
    """BLOCK_C (tokens per chunk), BLOCK_K, BLOCK_D: chunk_size rounded to a power of two, BLOCK_C * BLOCK_K kept
    within [MIN_PAIRS, MAX_PAIRS] where K allows."""
    block_k = triton.next_power_of_2(top_k)
    block_c = triton.next_power_of_2(max(1, chunk_size))
    block_c = max(1, min(block_c, MAX_PAIRS // block_k))
    block_c = max(block_c, triton.cdiv(MIN_PAIRS, block_k))
    return block_c, block_k, max(16, triton.next_power_of_2(value_dim))


class ChunkPDMAFunction(torch.autograd.Function):
    """Autograd wrapper of the chunk kernels on [b * h, ...] tensors (float32 state; v and weights any float)."""

    @staticmethod
    def forward(ctx, v, write_index, write_weight, read_index, read_weight, slots, normaliser, gamma, eps,
                chunk_size):
        bh, time, dim = v.shape
        top_k = write_index.shape[-1]
        slots, normaliser = slots.clone(), normaliser.clone()  # updated in place into the final state
        out = new_buffer(bh, time, dim, device=v.device, dtype=torch.float32)
        save = any(ctx.needs_input_grad)  # without gradients nothing is kept: constant memory in time
        if save:
            saved_rows = new_buffer(bh, time, top_k, dim, device=v.device, dtype=torch.float32)
            saved_norms = new_buffer(bh, time, top_k, device=v.device, dtype=torch.float32)
        else:
            saved_rows = saved_norms = out  # never touched when SAVE is off
        block_c, block_k, block_d = chunk_blocks(top_k, dim, chunk_size)
        _pdma_chunk_forward_kernel[(bh,)](
            v, write_index, write_weight, read_index, read_weight, slots, normaliser, out, saved_rows, saved_norms,
            time, slots.shape[1], dim, float(gamma), float(eps), DECAY_FLOOR,
            K=top_k, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_D=block_d, SAVE=save, num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(v, write_index, write_weight, read_index, read_weight,
                              slots, normaliser, saved_rows, saved_norms)
        ctx.gamma, ctx.eps, ctx.blocks = gamma, eps, (block_c, block_k, block_d)
        return out.to(v.dtype), slots, normaliser

    @staticmethod
    def backward(ctx, dout, dslots, dnorm):
        v, write_index, write_weight, read_index, read_weight, slots, normaliser, saved_rows, saved_norms = (
            ctx.saved_tensors
        )
        bh, time, dim = v.shape
        top_k = write_index.shape[-1]
        slots, normaliser = slots.clone(), normaliser.clone()  # rolled back in place, chunk by chunk
        dout = torch.zeros_like(v) if dout is None else dout.contiguous()
        dslots = torch.zeros_like(slots) if dslots is None else dslots.float().contiguous().clone()
        dnorm = torch.zeros_like(normaliser) if dnorm is None else dnorm.float().contiguous().clone()
        dv = new_buffer(bh, time, dim, device=v.device, dtype=torch.float32)
        dwrite_weight = new_buffer(bh, time, top_k, device=v.device, dtype=torch.float32)
        dread_weight = new_buffer(bh, time, top_k, device=v.device, dtype=torch.float32)
        block_c, block_k, block_d = ctx.blocks
        _pdma_chunk_backward_kernel[(bh,)](
            v, write_index, write_weight, read_index, read_weight, slots, normaliser, saved_rows, saved_norms,
            dout, dslots, dnorm, dv, dwrite_weight, dread_weight,
            time, slots.shape[1], dim, float(ctx.gamma), float(ctx.eps), DECAY_FLOOR, PROXY_EPS,
            K=top_k, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )
        return (dv.to(v.dtype), None, dwrite_weight.to(write_weight.dtype), None, dread_weight.to(read_weight.dtype),
                dslots, dnorm, None, None, None)


def _kernel_dtype(x: Tensor) -> torch.dtype:
    """Half-precision inputs stay as they are (the kernel upcasts on load); anything else runs in float32."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


def pdma_chunk_triton(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    gamma: float,
    eps: float,
    chunk_size: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk kernels with autograd; same contract as :func:`memorycore.kernels.ramnet.reference.pdma_chunked_reference`.

    ``chunk_size`` is rounded to a power of two and kept so that a chunk holds 16 to 128 (token, k) pairs where K
    allows; the result does not depend on it (the chunk form is exact).
    """
    batch, heads, _, dim = v.shape
    indices = [flat_heads(index, torch.int64) for index in (write_index, read_index)]
    v, write_weight, read_weight = (flat_heads(x, _kernel_dtype(x)) for x in (v, write_weight, read_weight))
    out, new_slots, new_norm = ChunkPDMAFunction.apply(
        v, indices[0], write_weight, indices[1], read_weight,
        flat_heads(slots, torch.float32), flat_heads(normaliser, torch.float32), gamma, eps, chunk_size,
    )
    return (out.view(batch, heads, -1, dim).to(v.dtype), new_slots.view(batch, heads, *slots.shape[2:]),
            new_norm.view(batch, heads, -1))
