"""Triton kernels for the chunk-wise Titans neural memory, forward and backward.

Same function as :func:`kernels.neural_memory.reference.neural_memory_reference` (read its docstring for the math);
this module only changes where the arithmetic happens.

Design
------
* Gates. The gate products of every chunk (``B_t``, ``c_t``, ``coef[t, i]``, the end-of-chunk values and the
  momentum coefficients) are small (``[b, h, n, c, c]`` at most) and cheap, so they are formed for ALL chunks at once in
  PyTorch by the reference's own :func:`chunk_coefficients`. The autograd function below takes these coefficient
  tensors as inputs and returns their gradients, so PyTorch's autograd chains them back to ``lr``, ``log_eta`` and
  ``log_keep`` exactly as in the reference. A final partial chunk is padded with ``lr = 0`` (padded keys then write
  nothing) and its end-of-chunk values are read at its last real token.
* Forward kernel. One program per (batch, head) loops over the chunks in order (the chunk recurrence is non-linear,
  so chunks cannot run in parallel). The memory state (depth 2, d = 64, x4: four fp32 matrices of 64 KB) is too big for
  registers or shared memory, so it lives in global memory (in practice L2) and every chunk streams it in tiles of
  ``BLOCK_HIDDEN`` columns of the hidden layer: one pass builds ``M(k)`` and the output error, a second pass
  backpropagates the error into each tile, retrieves the queries with the per-token weights (attention-like products
  masked by ``coef``) and writes the tile's updated weights and momentum. Every product is a ``tl.dot`` of
  ``chunk x 64 x BLOCK_HIDDEN`` shape (tensor cores), with operands in the input dtype (bf16/fp16) or fp32 and fp32
  accumulation; the state itself is always fp32.
* Memory. With gradients needed, the forward keeps the state at every chunk boundary (``[b, h, n + 1, ...]``,
  linear in time, 256 KB per (batch, head) and chunk for the default sizes) and no per-token activation. Without
  gradients (inference) it ping-pongs between two slots: constant memory in time.
* Backward kernel. One program per (batch, head) walks the chunks in reverse. It recomputes the chunk's key path and
  retrieval from the stored chunk-start state, then backpropagates through retrieval, the weight/momentum update and
  the MLP's closed-form gradient (second-order terms included: the error ``delta`` depends on the weights and on k, v).
  The gradient of the state flows from chunk to chunk in an fp32 buffer updated tile by tile in place. The hidden
  tiles are visited twice: the first visit produces everything that is local to the tile and accumulates the
  chunk-wide sums (``dE``, the score gradients); the second one, once ``dE`` is complete, finishes the key path
  (``d k``, ``d W_1``, ``d W_2``) from a per-program scratch tile.

Supported: depth 1 or 2, head dim and hidden width powers of two >= 16, chunk a power of two >= 16, float32 /
bfloat16 / float16 inputs (the interpreter runs all of these). On a GPU only what was checked on an H100 runs the
kernels: bf16/fp16 inputs, head dim 64, chunk 64, hidden width a multiple of 64 (see ``_verified_on_gpu``). Anything
else (deeper memory, float64, tiny chunks, float32 on a GPU) runs the reference instead; that is a property of this
implementation, not of the layer.
"""

from __future__ import annotations

import os


import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.neural_memory.reference import Weights, chunk_coefficients, neural_memory_reference

_MATMUL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, MM: tl.constexpr):
    """a @ b with operands in the matmul dtype and fp32 accumulation (TF32 tensor cores when MM is fp32)."""
    return tl.dot(a.to(MM), b.to(MM))


@triton.jit
def _silu_parts(z):
    """silu(z), silu'(z) and silu''(z) from one sigmoid."""
    s = tl.sigmoid(z)
    act = z * s
    d1 = s * (1.0 + z * (1.0 - s))
    d2 = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    return act, d1, d2


@triton.jit
def _load_rows(ptr, chunk, T, rows, cols, D: tl.constexpr):
    """Load the chunk's rows of a [T, D] matrix, zero past the end of the sequence."""
    tok = chunk * rows.shape[0] + rows
    mask = (tok < T)[:, None]
    return tl.load(ptr + tok[:, None].to(tl.int64) * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, chunk, T, rows, cols, D: tl.constexpr):
    tok = chunk * rows.shape[0] + rows
    mask = (tok < T)[:, None]
    tl.store(ptr + tok[:, None].to(tl.int64) * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D: tl.constexpr, MM: tl.constexpr):
    """The chunk's q and k in the matmul dtype (they only feed dots) and v in fp32."""
    q = _load_rows(q_ptr + seq, chunk, T, rows, cols, D).to(MM)
    k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
    v = _load_rows(v_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
    return q, k, v


@triton.jit
def _store_chunk_grads(
    dq_ptr, dk_ptr, dv_ptr, dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr,
    seq, chunk, T, row_offset, rows, cols,
    dq, dk, dv, d_keep, d_carry, d_coef, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end,
    D: tl.constexpr, CHUNK: tl.constexpr,
):
    """Write one chunk's gradients of q, k, v and of its gate coefficients (the layout of _load_gates)."""
    _store_rows(dq_ptr + seq, dq, chunk, T, rows, cols, D)
    _store_rows(dk_ptr + seq, dk, chunk, T, rows, cols, D)
    _store_rows(dv_ptr + seq, dv, chunk, T, rows, cols, D)
    tl.store(dkeep_ptr + row_offset + rows, d_keep)
    tl.store(dcarry_ptr + row_offset + rows, d_carry)
    tl.store(dcoef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :], d_coef)
    tl.store(dcoef_last_ptr + row_offset + rows, d_coef_last)
    tl.store(dmcoef_ptr + row_offset + rows, d_mcoef)
    end = row_offset // CHUNK * 3
    tl.store(dends_ptr + end, d_keep_end)
    tl.store(dends_ptr + end + 1, d_carry_end)
    tl.store(dends_ptr + end + 2, d_eta_end)


@triton.jit
def _load_gates(keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK: tl.constexpr):
    """The gate coefficients of one chunk (row_offset = (program * n_chunks + chunk) * CHUNK)."""
    keep = tl.load(keep_ptr + row_offset + rows)
    carry = tl.load(carry_ptr + row_offset + rows)
    coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
    coef_last = tl.load(coef_last_ptr + row_offset + rows)
    mcoef = tl.load(mcoef_ptr + row_offset + rows)
    end = row_offset // CHUNK * 3
    keep_end = tl.load(ends_ptr + end)
    carry_end = tl.load(ends_ptr + end + 1)
    eta_end = tl.load(ends_ptr + end + 2)
    return keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end


# ----------------------------------------------------------------------------------------------------------------------
# Depth 1 (linear memory)
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _forward_depth1_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    w_ptr, s_ptr,
    T, n_chunks, n_slots,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    seq = pid * T * D
    rows_d = tl.arange(0, D)
    mat = rows_d[:, None] * D + cols[None, :]
    for chunk in range(n_chunks):
        q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
        keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
            keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, (pid * n_chunks + chunk) * CHUNK,
            rows, CHUNK)
        src = (pid * n_slots + chunk % n_slots) * D * D
        dst = (pid * n_slots + (chunk + 1) % n_slots) * D * D
        w = tl.load(w_ptr + src + mat)
        s = tl.load(s_ptr + src + mat)
        err = 2.0 * (_mm(k, w, MM) - v)
        scores = _mm(q, tl.trans(k), MM) * coef
        y = keep[:, None] * _mm(q, w, MM) + carry[:, None] * _mm(q, s, MM) - _mm(scores, err, MM)
        _store_rows(y_ptr + seq, y, chunk, T, rows, cols, D)
        new_w = keep_end * w + carry_end * s - _mm(tl.trans(k), coef_last[:, None] * err, MM)
        new_s = eta_end * s - _mm(tl.trans(k), mcoef[:, None] * err, MM)
        tl.store(w_ptr + dst + mat, new_w)
        tl.store(s_ptr + dst + mat, new_s)
        tl.debug_barrier()  # the next chunk reads the state this one wrote


@triton.jit
def _backward_depth1_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr,
    w_ptr, s_ptr, dw_ptr, ds_ptr,
    T, n_chunks,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    seq = pid * T * D
    rows_d = tl.arange(0, D)
    mat = rows_d[:, None] * D + cols[None, :]
    grad_state = pid * D * D
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
        dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(MM)
        row_offset = (pid * n_chunks + chunk) * CHUNK
        keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
            keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK)
        src = (pid * (n_chunks + 1) + chunk) * D * D
        w = tl.load(w_ptr + src + mat)
        s = tl.load(s_ptr + src + mat)
        dw_next = tl.load(dw_ptr + grad_state + mat)
        ds_next = tl.load(ds_ptr + grad_state + mat)

        # recompute the chunk
        err = 2.0 * (_mm(k, w, MM) - v)
        qk = _mm(q, tl.trans(k), MM)
        scores = qk * coef
        qw = _mm(q, w, MM)
        qs = _mm(q, s, MM)

        # retrieval y = keep * q w + carry * q s - (qk * coef) err
        d_keep = tl.sum(dy * qw, axis=1)
        d_carry = tl.sum(dy * qs, axis=1)
        d_scores = -_mm(dy, tl.trans(err), MM)
        d_coef = d_scores * qk
        d_qk = d_scores * coef
        dq = _mm(keep[:, None] * dy, tl.trans(w), MM) + _mm(carry[:, None] * dy, tl.trans(s), MM) + _mm(d_qk, k, MM)
        dk = _mm(tl.trans(d_qk), q, MM)
        d_err = -_mm(tl.trans(scores), dy, MM)
        dw = keep_end * dw_next + _mm(tl.trans(q), keep[:, None] * dy, MM)
        ds = carry_end * dw_next + eta_end * ds_next + _mm(tl.trans(q), carry[:, None] * dy, MM)

        # update new_w = keep_end w + carry_end s - k^T (coef_last err); new_s = eta_end s - k^T (mcoef err)
        k_dw = _mm(k, dw_next, MM)
        k_ds = _mm(k, ds_next, MM)
        d_err -= coef_last[:, None] * k_dw + mcoef[:, None] * k_ds
        d_coef_last = -tl.sum(k_dw * err, axis=1)
        d_mcoef = -tl.sum(k_ds * err, axis=1)
        dk -= _mm(coef_last[:, None] * err, tl.trans(dw_next), MM) + _mm(mcoef[:, None] * err, tl.trans(ds_next), MM)

        # key path err = 2 (k w - v)
        d_pred = 2.0 * d_err
        dk += _mm(d_pred, tl.trans(w), MM)
        dw += _mm(tl.trans(k), d_pred, MM)

        _store_chunk_grads(dq_ptr, dk_ptr, dv_ptr, dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr,
                           dmcoef_ptr, seq, chunk, T, row_offset, rows, cols,
                           dq, dk, -d_pred, d_keep, d_carry, d_coef, d_coef_last, d_mcoef,
                           tl.sum(dw_next * w), tl.sum(dw_next * s), tl.sum(ds_next * s), D, CHUNK)
        tl.debug_barrier()  # every thread has read the incoming state gradient before it is overwritten
        tl.store(dw_ptr + grad_state + mat, dw)
        tl.store(ds_ptr + grad_state + mat, ds)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Depth 2 (MLP memory d -> hidden -> d)
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _output_error(k, v, w1_ptr, w2_ptr, tile_1, tile_2,
                  D: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, CHUNK: tl.constexpr,
                  MM: tl.constexpr):
    """2 (M(k) - v) for the depth-2 memory whose weights start at w1_ptr / w2_ptr, streamed by hidden tiles."""
    pred = tl.zeros((CHUNK, D), dtype=tl.float32)
    for j in range(0, HIDDEN, BLOCK_HIDDEN):
        w1 = tl.load(w1_ptr + j + tile_1)
        w2 = tl.load(w2_ptr + j * D + tile_2)
        a1, _, _ = _silu_parts(_mm(k, w1, MM))
        pred += _mm(a1, w2, MM)
    return 2.0 * (pred - v)


@triton.jit
def _forward_depth2_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    T, n_chunks, n_slots,
    D: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    blk = tl.arange(0, BLOCK_HIDDEN)
    seq = pid * T * D
    tile_1 = cols[:, None] * HIDDEN + blk[None, :]  # a [D, BLOCK_HIDDEN] tile of a [D, HIDDEN] matrix
    tile_2 = blk[:, None] * D + cols[None, :]  # a [BLOCK_HIDDEN, D] tile of a [HIDDEN, D] matrix
    for chunk in range(n_chunks):
        q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
        keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
            keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, (pid * n_chunks + chunk) * CHUNK,
            rows, CHUNK)
        src = (pid * n_slots + chunk % n_slots) * D * HIDDEN
        dst = (pid * n_slots + (chunk + 1) % n_slots) * D * HIDDEN

        # pass 1: the memory's prediction of v from k, and the output error 2 (M(k) - v)
        err = _output_error(k, v, w1_ptr + src, w2_ptr + src, tile_1, tile_2, D, HIDDEN, BLOCK_HIDDEN, CHUNK, MM)

        # pass 2: per hidden tile, backpropagate err, retrieve, update the state
        scores_1 = (_mm(q, tl.trans(k), MM) * coef).to(MM)
        y = tl.zeros((CHUNK, D), dtype=tl.float32)
        hq_a1 = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
        for j in range(0, HIDDEN, BLOCK_HIDDEN):
            w1 = tl.load(w1_ptr + src + j + tile_1)
            s1 = tl.load(s1_ptr + src + j + tile_1)
            w2 = tl.load(w2_ptr + src + j * D + tile_2)
            s2 = tl.load(s2_ptr + src + j * D + tile_2)
            a1, da1, _ = _silu_parts(_mm(k, w1, MM))
            delta1 = _mm(err, tl.trans(w2), MM) * da1
            zq = keep[:, None] * _mm(q, w1, MM) + carry[:, None] * _mm(q, s1, MM) - _mm(scores_1, delta1, MM)
            hq, _, _ = _silu_parts(zq)
            y += keep[:, None] * _mm(hq, w2, MM) + carry[:, None] * _mm(hq, s2, MM)
            hq_a1 += _mm(hq, tl.trans(a1), MM)
            tl.store(w1_ptr + dst + j + tile_1,
                     keep_end * w1 + carry_end * s1 - _mm(tl.trans(k), coef_last[:, None] * delta1, MM))
            tl.store(s1_ptr + dst + j + tile_1, eta_end * s1 - _mm(tl.trans(k), mcoef[:, None] * delta1, MM))
            tl.store(w2_ptr + dst + j * D + tile_2,
                     keep_end * w2 + carry_end * s2 - _mm(tl.trans(a1), coef_last[:, None] * err, MM))
            tl.store(s2_ptr + dst + j * D + tile_2, eta_end * s2 - _mm(tl.trans(a1), mcoef[:, None] * err, MM))
        coef = tl.load(coef_ptr + (pid * n_chunks + chunk) * CHUNK * CHUNK + rows[:, None] * CHUNK + rows[None, :])
        y -= _mm(hq_a1 * coef, err, MM)
        _store_rows(y_ptr + seq, y, chunk, T, rows, cols, D)
        tl.debug_barrier()  # the next chunk reads the state this one wrote


@triton.jit
def _backward_depth2_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, scratch_ptr,
    T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    blk = tl.arange(0, BLOCK_HIDDEN)
    seq = pid * T * D
    tile_1 = cols[:, None] * HIDDEN + blk[None, :]
    tile_2 = blk[:, None] * D + cols[None, :]
    tile_c = rows[:, None] * HIDDEN + blk[None, :]  # a [CHUNK, BLOCK_HIDDEN] tile of the [CHUNK, HIDDEN] scratch
    grad_state = pid * D * HIDDEN
    scratch = pid * CHUNK * HIDDEN
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
        dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(MM)
        row_offset = (pid * n_chunks + chunk) * CHUNK
        keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
            keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK)
        src = (pid * (n_chunks + 1) + chunk) * D * HIDDEN

        # recompute the key path: err = 2 (M(k) - v)
        err = _output_error(k, v, w1_ptr + src, w2_ptr + src, tile_1, tile_2, D, HIDDEN, BLOCK_HIDDEN, CHUNK, MM)

        scores_1 = (_mm(q, tl.trans(k), MM) * coef).to(MM)
        d_hq_a1 = (-_mm(dy, tl.trans(err), MM) * coef).to(MM)  # d loss / d (hq a1^T), layer-2 retrieval
        hq_a1 = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
        d_qk = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)  # holds d loss / d scores_1 until the end of the tiles
        d_err = tl.zeros((CHUNK, D), dtype=tl.float32)
        d_err_update = tl.zeros((CHUNK, D), dtype=tl.float32)  # the layer-2 update's share of d_err
        dq = tl.zeros((CHUNK, D), dtype=tl.float32)
        dk = tl.zeros((CHUNK, D), dtype=tl.float32)
        d_keep = tl.zeros((CHUNK,), dtype=tl.float32)
        d_carry = tl.zeros((CHUNK,), dtype=tl.float32)
        d_coef_last = tl.zeros((CHUNK,), dtype=tl.float32)
        d_mcoef = tl.zeros((CHUNK,), dtype=tl.float32)
        d_keep_end = 0.0
        d_carry_end = 0.0
        d_eta_end = 0.0

        # first visit of the hidden tiles: everything local to the tile, and the chunk-wide sums
        for j in range(0, HIDDEN, BLOCK_HIDDEN):
            w1 = tl.load(w1_ptr + src + j + tile_1)
            s1 = tl.load(s1_ptr + src + j + tile_1)
            w2 = tl.load(w2_ptr + src + j * D + tile_2)
            s2 = tl.load(s2_ptr + src + j * D + tile_2)
            dw1_next = tl.load(dw1_ptr + grad_state + j + tile_1)
            ds1_next = tl.load(ds1_ptr + grad_state + j + tile_1)
            dw2_next = tl.load(dw2_ptr + grad_state + j * D + tile_2)
            ds2_next = tl.load(ds2_ptr + grad_state + j * D + tile_2)
            d_keep_end += tl.sum(dw1_next * w1) + tl.sum(dw2_next * w2)
            d_carry_end += tl.sum(dw1_next * s1) + tl.sum(dw2_next * s2)
            d_eta_end += tl.sum(ds1_next * s1) + tl.sum(ds2_next * s2)

            a1, da1, dda1 = _silu_parts(_mm(k, w1, MM))
            g1 = _mm(err, tl.trans(w2), MM)
            delta1 = g1 * da1
            qw1 = _mm(q, w1, MM)
            qs1 = _mm(q, s1, MM)
            zq = keep[:, None] * qw1 + carry[:, None] * qs1 - _mm(scores_1, delta1, MM)
            hq, dhq, _ = _silu_parts(zq)
            hq_a1 += _mm(hq, tl.trans(a1), MM)

            # layer-2 retrieval y = keep hq w2 + carry hq s2 - (hq a1^T * coef) err
            dy_w2 = _mm(dy, tl.trans(w2), MM)
            dy_s2 = _mm(dy, tl.trans(s2), MM)
            d_keep += tl.sum(hq * dy_w2, axis=1)
            d_carry += tl.sum(hq * dy_s2, axis=1)
            d_zq = (keep[:, None] * dy_w2 + carry[:, None] * dy_s2 + _mm(d_hq_a1, a1, MM)) * dhq
            dw2 = keep_end * dw2_next + _mm(tl.trans(hq), keep[:, None] * dy, MM)
            ds2 = carry_end * dw2_next + eta_end * ds2_next + _mm(tl.trans(hq), carry[:, None] * dy, MM)
            d_a1 = (_mm(tl.trans(d_hq_a1), hq, MM) - _mm(coef_last[:, None] * err, tl.trans(dw2_next), MM)
                    - _mm(mcoef[:, None] * err, tl.trans(ds2_next), MM))
            a1_dw2 = _mm(a1, dw2_next, MM)
            a1_ds2 = _mm(a1, ds2_next, MM)
            d_coef_last -= tl.sum(a1_dw2 * err, axis=1)
            d_mcoef -= tl.sum(a1_ds2 * err, axis=1)
            d_err_update += coef_last[:, None] * a1_dw2 + mcoef[:, None] * a1_ds2

            # layer-1 retrieval zq = keep q w1 + carry q s1 - (q k^T * coef) delta1
            d_keep += tl.sum(d_zq * qw1, axis=1)
            d_carry += tl.sum(d_zq * qs1, axis=1)
            dw1 = keep_end * dw1_next + _mm(tl.trans(q), keep[:, None] * d_zq, MM)
            ds1 = carry_end * dw1_next + eta_end * ds1_next + _mm(tl.trans(q), carry[:, None] * d_zq, MM)
            d_qk -= _mm(d_zq, tl.trans(delta1), MM)
            dq += _mm(keep[:, None] * d_zq, tl.trans(w1), MM) + _mm(carry[:, None] * d_zq, tl.trans(s1), MM)

            # layer-1 update: new_w1 = ... - k^T (coef_last delta1), new_s1 = ... - k^T (mcoef delta1)
            k_dw1 = _mm(k, dw1_next, MM)
            k_ds1 = _mm(k, ds1_next, MM)
            d_delta1 = -_mm(tl.trans(scores_1), d_zq, MM) - coef_last[:, None] * k_dw1 - mcoef[:, None] * k_ds1
            d_coef_last -= tl.sum(k_dw1 * delta1, axis=1)
            d_mcoef -= tl.sum(k_ds1 * delta1, axis=1)
            dk -= (_mm(coef_last[:, None] * delta1, tl.trans(dw1_next), MM)
                   + _mm(mcoef[:, None] * delta1, tl.trans(ds1_next), MM))

            # delta1 = (err w2^T) * silu'(z1): into err, w2 and (later) z1
            d_g1 = d_delta1 * da1
            d_err += _mm(d_g1, w2, MM)
            dw2 += _mm(tl.trans(d_g1), err, MM)
            # d loss / d z1 without the term through err, which is known only after every tile
            tl.store(scratch_ptr + scratch + j + tile_c, d_delta1 * g1 * dda1 + d_a1 * da1)

            tl.debug_barrier()  # the incoming state gradient of this tile is read; overwrite it
            tl.store(dw1_ptr + grad_state + j + tile_1, dw1)
            tl.store(ds1_ptr + grad_state + j + tile_1, ds1)
            tl.store(dw2_ptr + grad_state + j * D + tile_2, dw2)
            tl.store(ds2_ptr + grad_state + j * D + tile_2, ds2)

        # chunk-wide sums
        # reloaded and recomputed here rather than kept in registers through the tile loop
        coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
        qk = _mm(q, tl.trans(k), MM)
        d_err -= _mm(tl.trans(hq_a1 * coef), dy, MM) + d_err_update
        d_coef = -_mm(dy, tl.trans(err), MM) * hq_a1 + d_qk * qk
        d_qk = d_qk * coef
        dq += _mm(d_qk, k, MM)
        dk += _mm(tl.trans(d_qk), q, MM)
        d_pred = 2.0 * d_err
        tl.debug_barrier()

        # second visit: finish the key path z1 = k w1, a1 = silu(z1), pred = a1 w2
        for j in range(0, HIDDEN, BLOCK_HIDDEN):
            w1 = tl.load(w1_ptr + src + j + tile_1)
            w2 = tl.load(w2_ptr + src + j * D + tile_2)
            a1, da1, _ = _silu_parts(_mm(k, w1, MM))
            d_z1 = tl.load(scratch_ptr + scratch + j + tile_c) + _mm(d_pred, tl.trans(w2), MM) * da1
            dk += _mm(d_z1, tl.trans(w1), MM)
            dw1 = tl.load(dw1_ptr + grad_state + j + tile_1) + _mm(tl.trans(k), d_z1, MM)
            dw2 = tl.load(dw2_ptr + grad_state + j * D + tile_2) + _mm(tl.trans(a1), d_pred, MM)
            tl.store(dw1_ptr + grad_state + j + tile_1, dw1)
            tl.store(dw2_ptr + grad_state + j * D + tile_2, dw2)

        _store_chunk_grads(dq_ptr, dk_ptr, dv_ptr, dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr,
                           dmcoef_ptr, seq, chunk, T, row_offset, rows, cols,
                           dq, dk, -d_pred, d_keep, d_carry, d_coef, d_coef_last, d_mcoef,
                           d_keep_end, d_carry_end, d_eta_end, D, CHUNK)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Host side: gates, launchers, autograd
# ----------------------------------------------------------------------------------------------------------------------

NUM_WARPS = 8  # warps per program
NUM_STAGES = 1  # software pipelining of the tile loops (deeper costs shared memory and registers)
BLOCK_HIDDEN = 64  # hidden-layer columns per tile of the depth-2 kernels (32 was miscompiled by Triton 3.6 on H100)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fresh buffer the kernels fully overwrite (the tests swap in a NaN fill to catch reads of unwritten memory)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _is_tile_size(n: int) -> bool:
    """tl.dot needs power-of-two dimensions of at least 16."""
    return n >= 16 and n & (n - 1) == 0


def kernel_supports(q: Tensor, weights: Weights, chunk_size: int) -> bool:
    """Whether these inputs run on the Triton kernels (otherwise the reference computes them)."""
    depth, head_dim = len(weights), q.shape[-1]
    if q.is_cuda and not _verified_on_gpu(q, weights, chunk_size):
        return False
    return (
        q.dtype in _MATMUL_DTYPES
        and depth in (1, 2)
        and _is_tile_size(head_dim)
        and _is_tile_size(chunk_size)
        and (depth == 1 or _is_tile_size(weights[0].shape[-1]))
        and q.shape[2] > 0
    )


def _verified_on_gpu(q: Tensor, weights: Weights, chunk_size: int) -> bool:
    """The configurations checked against the reference on an H100 (Triton 3.6).

    float32 tiles need more shared memory than the chip has (the backward kernels ask for 240-350 KB), and tiles
    32 wide were miscompiled (out-of-bounds shared-memory reads), so the GPU path is limited to 16-bit inputs, head dim
    64, chunk 64 and a hidden width that is a multiple of 64. Other inputs on a GPU take the reference.
    """
    hidden_ok = len(weights) == 1 or weights[0].shape[-1] % BLOCK_HIDDEN == 0
    return q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == 64 and chunk_size == 64 and hidden_ok


def chunk_gates(lr: Tensor, log_eta: Tensor, log_keep: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """The gate coefficients of every chunk, as the kernels read them (differentiable PyTorch).

    Returns ``keep [bh, n, c]``, ``carry [bh, n, c]``, ``coef [bh, n, c, c]``, ``coef_last [bh, n, c]`` (coef's row
    of the chunk's last real token), ``ends [bh, n, 3]`` (decay, momentum carry and momentum decay at that token) and
    ``momentum_coef [bh, n, c]``, all float32. A last partial chunk is padded with lr = 0 (padded keys write nothing)
    and gates of 1 (log 0), so its end values, read at its last real token, are those of the unpadded chunk.
    """
    batch, heads, time = lr.shape
    n_chunks = -(-time // chunk_size)
    pad = n_chunks * chunk_size - time

    def chunked(x: Tensor) -> Tensor:
        return F.pad(x.float(), (0, pad)).reshape(batch * heads, n_chunks, chunk_size)

    keep, carry, coef, eta_end, momentum_coef = chunk_coefficients(chunked(lr), chunked(log_eta), chunked(log_keep))
    last = chunk_size - 1 - pad
    coef_last = torch.cat([coef[:, :-1, -1], coef[:, -1:, last]], dim=1)
    keep_end = torch.cat([keep[:, :-1, -1], keep[:, -1:, last]], dim=1)
    carry_end = torch.cat([carry[:, :-1, -1], carry[:, -1:, last]], dim=1)
    ends = torch.stack([keep_end, carry_end, eta_end], dim=-1)
    return tuple(x.contiguous() for x in (keep, carry, coef, coef_last, ends, momentum_coef))


def _launch_options(q: Tensor, state: tuple[Tensor, ...], chunk_size: int) -> dict:
    depth = len(state) // 2
    matmul_dtype = _MATMUL_DTYPES[q.dtype]
    if matmul_dtype == tl.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        matmul_dtype = tl.float32  # the Triton interpreter (3.9) returns garbage for bf16 tl.dot; fp32 is exact there
    options = dict(D=q.shape[-1], CHUNK=chunk_size, MM=matmul_dtype, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if depth == 2:
        hidden = state[0].shape[-1]
        options.update(HIDDEN=hidden, BLOCK_HIDDEN=min(hidden, BLOCK_HIDDEN))
    return options


def _forward(
    q: Tensor, k: Tensor, v: Tensor, gates: tuple[Tensor, ...], state: tuple[Tensor, ...], chunk_size: int,
    keep_boundaries: bool,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run the forward kernel; return y, the final state and the state buffers [bh, slots, i, o]."""
    batch, heads, time, _ = q.shape
    n_chunks = gates[0].shape[1]
    n_slots = n_chunks + 1 if keep_boundaries else 2  # inference ping-pongs between two slots
    buffers = []
    for s in state:
        buffer = _empty((batch * heads, n_slots, *s.shape[-2:]), torch.float32, q.device)
        buffer[:, 0] = s.reshape(batch * heads, *s.shape[-2:])
        buffers.append(buffer)
    y = _empty(q.shape, q.dtype, q.device)
    kernel = _forward_depth1_kernel if len(state) == 2 else _forward_depth2_kernel
    kernel[(batch * heads,)](q, k, v, y, *gates, *buffers, time, n_chunks, n_slots,
                             **_launch_options(q, state, chunk_size))
    final = tuple(b[:, n_chunks % n_slots].reshape(batch, heads, *b.shape[-2:]).clone() for b in buffers)
    return y, final, tuple(buffers)


def _backward(
    q: Tensor, k: Tensor, v: Tensor, dy: Tensor, gates: tuple[Tensor, ...], buffers: tuple[Tensor, ...],
    d_final: tuple[Tensor, ...], chunk_size: int,
) -> tuple[Tensor, ...]:
    """Run the backward kernel; return the gradients of q, k, v, the gates and the initial state."""
    batch, heads, time, _ = q.shape
    bh, n_chunks = batch * heads, gates[0].shape[1]
    # the state gradient flows backwards through these buffers, starting from the gradient of the final state
    d_state = [g.reshape(bh, *g.shape[-2:]).to(torch.float32).clone(memory_format=torch.contiguous_format)
               for g in d_final]
    dq, dk, dv = (_empty(q.shape, q.dtype, q.device) for _ in range(3))
    d_gates = [_empty(g.shape, torch.float32, q.device) for g in gates]
    options = _launch_options(q, buffers, chunk_size)
    if len(buffers) == 2:
        _backward_depth1_kernel[(bh,)](q, k, v, dy, dq, dk, dv, *gates, *d_gates, *buffers, *d_state,
                                       time, n_chunks, **options)
    else:
        scratch = _empty((bh, chunk_size, options["HIDDEN"]), torch.float32, q.device)
        _backward_depth2_kernel[(bh,)](q, k, v, dy, dq, dk, dv, *gates, *d_gates, *buffers, *d_state, scratch,
                                       time, n_chunks, **options)
    d_initial = tuple(g.reshape(batch, heads, *g.shape[-2:]) for g in d_state)
    return (dq, dk, dv, *d_gates, *d_initial)


class NeuralMemoryFunction(torch.autograd.Function):
    """Autograd wrapper: saves the chunk-boundary states, recomputes each chunk in the backward kernel.

    Inputs: ``chunk_size, q, k, v, *gates (see chunk_gates), *weights, *momentum``; outputs ``y, *final_state``.
    """

    @staticmethod
    def forward(ctx, chunk_size: int, q: Tensor, k: Tensor, v: Tensor, *gates_and_state: Tensor):
        gates, state = gates_and_state[:6], gates_and_state[6:]
        y, final, buffers = _forward(q, k, v, gates, state, chunk_size, keep_boundaries=True)
        ctx.save_for_backward(q, k, v, *gates, *buffers)
        ctx.chunk_size = chunk_size
        ctx.state_shapes = [s.shape for s in state]
        return (y, *final)

    @staticmethod
    def backward(ctx, dy: Tensor | None, *d_final: Tensor | None):
        q, k, v, *rest = ctx.saved_tensors
        gates, buffers = tuple(rest[:6]), tuple(rest[6:])
        dy = torch.zeros_like(q) if dy is None else dy.to(q.dtype).contiguous()
        d_final = tuple(torch.zeros(shape, device=q.device) if g is None else g
                        for g, shape in zip(d_final, ctx.state_shapes))
        grads = _backward(q, k, v, dy, gates, buffers, d_final, ctx.chunk_size)
        return (None, *grads)


def _autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast, run the kernels in its 16-bit dtype, as autocast does for any matmul.

    In the layer, q and k come out of an L2 normalisation that autocast keeps in float32, which would otherwise send
    a bf16 training step to the float32 path (the reference, on a GPU).
    """
    device_type = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.bfloat16, torch.float16):
            return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def neural_memory_triton(
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
    """Chunk-wise memory update and causal retrieval on the Triton kernels.

    Takes and returns exactly what :func:`kernels.neural_memory.reference.neural_memory_reference` does (same shapes,
    y in the dtype of q, the state in float32) and is differentiable in every input, the initial state included.
    Inputs outside :func:`kernel_supports` go to the reference.
    """
    q, k, v = _autocast_inputs(q, k, v)
    if not kernel_supports(q, weights, chunk_size):
        return neural_memory_reference(q, k, v, lr, log_eta, log_keep, weights, momentum, chunk_size)
    depth = len(weights)
    q, k, v = (x.to(q.dtype).contiguous() for x in (q, k, v))
    gates = chunk_gates(lr, log_eta, log_keep, chunk_size)
    state = tuple(weights) + tuple(momentum)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *gates, *state)):
        y, *final = NeuralMemoryFunction.apply(chunk_size, q, k, v, *gates, *state)
    else:
        y, final, _ = _forward(q, k, v, gates, state, chunk_size, keep_boundaries=False)
    return y, tuple(final[:depth]), tuple(final[depth:])
