"""Triton kernels for the chunk-wise Titans neural memory, forward and backward.

Same function as :func:`memorycore.kernels.neural_memory.reference.neural_memory_reference` (read its docstring for the math);
this module only changes where the arithmetic happens.

Design
------
* Gates. The gate products of every chunk (``B_t``, ``c_t``, ``coef[t, i]``, the end-of-chunk values and the
  momentum coefficients) are small (``[b, h, n, c, c]`` at most) and cheap, so they are formed for ALL chunks at once in
  PyTorch by the reference's own :func:`chunk_coefficients`. The autograd function below takes these coefficient
  tensors as inputs and returns their gradients, so PyTorch's autograd chains them back to ``lr``, ``log_eta`` and
  ``log_keep`` exactly as in the reference. A final partial chunk is padded with ``lr = 0`` (padded keys then write
  nothing) and its end-of-chunk values are read at its last real token.
* Forward kernel. The chunks run in order inside the kernel (the chunk recurrence is non-linear, so chunks cannot run
  in parallel). The memory state (depth 2, d = 64, x4: four fp32 matrices of 64 KB) is too big for registers or shared
  memory, so it lives in global memory (in practice L2) and every chunk streams it in tiles of ``BLOCK_HIDDEN``
  columns of the hidden layer. Depth 1 runs one program per (batch, head). Depth 2 splits each (batch, head) over
  ``PARTS`` programs along the hidden units, so a small batch still fills the GPU (2 x 8192 tokens, 8 heads: 64
  programs rather than 16): each part computes its share of ``M(k)``, the parts exchange shares to form the output
  error, then each part backpropagates the error into its tiles, retrieves the queries with the per-token weights
  (attention-like products masked by ``coef``; its share of y) and writes its tiles' updated weights and momentum.
  Every product is a ``tl.dot`` of ``chunk x 64 x BLOCK_HIDDEN`` shape (tensor cores), with operands in the input
  dtype (bf16/fp16) or fp32 and fp32 accumulation; the state itself is always fp32.
* Memory. With gradients needed, the forward keeps the state at every chunk boundary (``[b, h, n + 1, ...]``,
  linear in time, 256 KB per (batch, head) and chunk for the default sizes) and no per-token activation. Without
  gradients (inference) it ping-pongs between two slots: constant memory in time.
* Backward kernel. The chunks run in reverse, split like the forward. Each chunk recomputes its key path and
  retrieval from the stored chunk-start state, then backpropagates through retrieval, the weight/momentum update and
  the MLP's closed-form gradient (second-order terms included: the error ``delta`` depends on the weights and on k, v).
  The gradient of the state flows from chunk to chunk in an fp32 buffer updated tile by tile in place. The hidden
  tiles are visited twice: the first visit produces everything that is local to the tile and the part's share of
  the chunk-wide sums (``d loss / d err``, the score gradients); the second one, once the parts have exchanged their
  shares of ``d loss / d err``, finishes the key path (``d k``, ``d W_1``, ``d W_2``) from a scratch tile.
* Splitting. How the parts wait for each other, and how many there are, is in the comment above the depth-2 kernels
  and in :func:`_split`; the CPU tests run it with one launch per chunk and phase, and in one launch with the
  interpreter's programs run side by side as threads (tests/test_neural_memory_triton.py).

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

from memorycore.kernels.neural_memory.reference import Weights, chunk_coefficients, neural_memory_reference

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
def _add_rows(ptr, value, chunk, T, rows, cols, D: tl.constexpr):
    """Add to the chunk's rows of a zeroed fp32 [T, D] matrix that the parts of a (batch, head) sum into."""
    tok = chunk * rows.shape[0] + rows
    mask = (tok < T)[:, None]
    tl.atomic_add(ptr + tok[:, None].to(tl.int64) * D + cols[None, :], value, mask=mask, sem="relaxed")


@triton.jit
def _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D: tl.constexpr, MM: tl.constexpr):
    """The chunk's q and k in the matmul dtype (they only feed dots) and v in fp32."""
    q = _load_rows(q_ptr + seq, chunk, T, rows, cols, D).to(MM)
    k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
    v = _load_rows(v_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
    return q, k, v


@triton.jit
def _put(ptr, value, ADD: tl.constexpr):
    """Store, or add to a zeroed buffer that several programs sum into."""
    if ADD:
        tl.atomic_add(ptr, value, sem="relaxed")
    else:
        tl.store(ptr, value)


@triton.jit
def _store_gate_grads(
    dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr, row_offset, rows,
    d_keep, d_carry, d_coef, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end, CHUNK: tl.constexpr,
    ADD: tl.constexpr,
):
    """Write (or, with ADD, add) one chunk's gradients of its gate coefficients (the layout of _load_gates)."""
    _put(dkeep_ptr + row_offset + rows, d_keep, ADD)
    _put(dcarry_ptr + row_offset + rows, d_carry, ADD)
    _put(dcoef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :], d_coef, ADD)
    _put(dcoef_last_ptr + row_offset + rows, d_coef_last, ADD)
    _put(dmcoef_ptr + row_offset + rows, d_mcoef, ADD)
    end = row_offset // CHUNK * 3
    _put(dends_ptr + end, d_keep_end, ADD)
    _put(dends_ptr + end + 1, d_carry_end, ADD)
    _put(dends_ptr + end + 2, d_eta_end, ADD)


@triton.jit
def _load_gates(keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows,
                CHUNK: tl.constexpr):
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

        _store_rows(dq_ptr + seq, dq, chunk, T, rows, cols, D)
        _store_rows(dk_ptr + seq, dk, chunk, T, rows, cols, D)
        _store_rows(dv_ptr + seq, -d_pred, chunk, T, rows, cols, D)
        _store_gate_grads(dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr, row_offset, rows,
                          d_keep, d_carry, d_coef, d_coef_last, d_mcoef,
                          tl.sum(dw_next * w), tl.sum(dw_next * s), tl.sum(ds_next * s), CHUNK, False)
        tl.debug_barrier()  # every thread has read the incoming state gradient before it is overwritten
        tl.store(dw_ptr + grad_state + mat, dw)
        tl.store(ds_ptr + grad_state + mat, ds)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Depth 2 (MLP memory d -> hidden -> d), each (batch, head) split over PARTS programs along the hidden units
# ----------------------------------------------------------------------------------------------------------------------
#
# The grid is (batch * heads, PARTS). Part p owns the hidden units [p, p + 1) * HIDDEN / PARTS: those columns of W_1
# and S_1, those rows of W_2 and S_2, and the same slices of their gradients, which it walks in tiles of BLOCK_HIDDEN.
# Almost everything a chunk computes is then local to a part or a sum over parts that the parts add into zeroed fp32
# buffers (y, dq, dk, the gate gradients: relaxed atomic adds, so memory does not grow with PARTS; with one part the
# result is deterministic, with several the order of the additions is not). Only two [CHUNK, D] matrices need every
# hidden unit before a part can go on: the output error err = 2 (M(k) - v) (forward and backward) and, in the
# backward, d loss / d err. Each part writes its share of them to an exchange buffer, waits for the other parts of its
# (batch, head) (_sync_parts), and sums the shares. At small batch this puts PARTS times as many SMs to work, and each
# program holds a PARTS-th of the state.
#
# PHASES says which phases of a chunk a launch runs (bit 0: the share of M(k); bit 1: the rest of the forward, or the
# backward's first visit of the tiles; bit 2: the backward's second visit). All phases in one launch (the GPU) need
# SYNC, a barrier on an atomic counter per (batch, head), and every part of a (batch, head) resident at once, which the
# host ensures by launching at most one program per SM. The Triton interpreter runs programs one after another, so
# there (and wherever the host chooses it) each chunk runs as one launch per phase, and launches separate the phases.


@triton.jit
def _sync_parts(counter_ptr, target, SYNC: tl.constexpr):
    """Wait until every part of this (batch, head) has written its share: the counter reaches ``target``."""
    tl.debug_barrier()  # every thread of this program has stored its part of the share
    if SYNC:
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()


@triton.jit
def _share_prediction(k, w1_ptr, w2_ptr, share_ptr, tile_1, tile_2, rows, cols,
                      D: tl.constexpr, PART_HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, CHUNK: tl.constexpr,
                      MM: tl.constexpr):
    """Write this part's share of M(k), ``silu(k W_1) W_2`` over its hidden units, to ``share_ptr`` [CHUNK, D].

    The tiles are those of the part's first BLOCK_HIDDEN units; the loop steps through the part from there.
    """
    pred = tl.zeros((CHUNK, D), dtype=tl.float32)
    for j in range(0, PART_HIDDEN, BLOCK_HIDDEN):
        w1 = tl.load(w1_ptr + j + tile_1)
        w2 = tl.load(w2_ptr + j * D + tile_2)
        a1, _, _ = _silu_parts(_mm(k, w1, MM))
        pred += _mm(a1, w2, MM)
    tl.store(share_ptr + rows[:, None] * D + cols[None, :], pred)


@triton.jit
def _sum_shares(shares_ptr, rows, cols, D: tl.constexpr, CHUNK: tl.constexpr, PARTS: tl.constexpr):
    """The sum of every part's [CHUNK, D] share, read past L1 (other SMs wrote them)."""
    total = tl.zeros((CHUNK, D), dtype=tl.float32)
    for p in tl.static_range(PARTS):
        total += tl.load(shares_ptr + p * CHUNK * D + rows[:, None] * D + cols[None, :], cache_modifier=".cg")
    return total


@triton.jit
def _forward_depth2_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, exchange_ptr, counter_ptr,
    T, n_chunks, n_slots, chunk_begin, chunk_end,
    D: tl.constexpr, HIDDEN: tl.constexpr, PARTS: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, CHUNK: tl.constexpr,
    MM: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
):
    """Chunks [chunk_begin, chunk_end) of one part; the parts add their shares of y into y_ptr (zeroed fp32)."""
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    PART_HIDDEN: tl.constexpr = HIDDEN // PARTS
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    blk = part * PART_HIDDEN + tl.arange(0, BLOCK_HIDDEN)  # the part's first tile of hidden units
    seq = pid * T * D
    tile_1 = cols[:, None] * HIDDEN + blk[None, :]  # a [D, BLOCK_HIDDEN] tile of a [D, HIDDEN] matrix
    tile_2 = blk[:, None] * D + cols[None, :]  # a [BLOCK_HIDDEN, D] tile of a [HIDDEN, D] matrix
    for step in range(chunk_end - chunk_begin):
        chunk = chunk_begin + step
        src = (pid * n_slots + chunk % n_slots) * D * HIDDEN
        dst = (pid * n_slots + (chunk + 1) % n_slots) * D * HIDDEN
        shares = exchange_ptr + (pid * 2 + chunk % 2) * PARTS * CHUNK * D

        # phase 1: this part's share of the memory's prediction M(k)
        if PHASES & 1:
            k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
            _share_prediction(k, w1_ptr + src, w2_ptr + src, shares + part * CHUNK * D, tile_1, tile_2, rows, cols,
                              D, PART_HIDDEN, BLOCK_HIDDEN, CHUNK, MM)
        _sync_parts(counter_ptr + pid, PARTS * (step + 1), SYNC)

        # phase 2: per hidden tile, backpropagate err, retrieve, update the state
        if PHASES & 2:
            q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
            keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
                keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, (pid * n_chunks + chunk) * CHUNK,
                rows, CHUNK)
            err = 2.0 * (_sum_shares(shares, rows, cols, D, CHUNK, PARTS) - v)
            scores_1 = (_mm(q, tl.trans(k), MM) * coef).to(MM)
            y = tl.zeros((CHUNK, D), dtype=tl.float32)
            hq_a1 = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
            for j in range(0, PART_HIDDEN, BLOCK_HIDDEN):
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
            # the layer-2 score correction is linear in hq a1^T, so each part subtracts its own share
            coef = tl.load(coef_ptr + (pid * n_chunks + chunk) * CHUNK * CHUNK + rows[:, None] * CHUNK + rows[None, :])
            y -= _mm(hq_a1 * coef, err, MM)
            _add_rows(y_ptr + seq, y, chunk, T, rows, cols, D)
        tl.debug_barrier()  # the next chunk reads the state tiles this one wrote


@triton.jit
def _backward_depth2_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, scratch_ptr, exchange_ptr, counter_ptr,
    T, n_chunks, chunk_begin, chunk_end,
    D: tl.constexpr, HIDDEN: tl.constexpr, PARTS: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, CHUNK: tl.constexpr,
    MM: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
):
    """Chunks chunk_end - 1 down to chunk_begin of one part.

    The parts add their shares of dq, dk and the gate gradients into zeroed fp32 buffers; dv is written by part 0.
    The state gradients and the scratch are [bh, ...] and each part touches only its own slices.
    """
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    PART_HIDDEN: tl.constexpr = HIDDEN // PARTS
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    blk = part * PART_HIDDEN + tl.arange(0, BLOCK_HIDDEN)  # the part's first tile of hidden units
    seq = pid * T * D
    tile_1 = cols[:, None] * HIDDEN + blk[None, :]
    tile_2 = blk[:, None] * D + cols[None, :]
    tile_c = rows[:, None] * HIDDEN + blk[None, :]  # a [CHUNK, BLOCK_HIDDEN] tile of the [CHUNK, HIDDEN] scratch
    grad_state = pid * D * HIDDEN
    scratch = pid * CHUNK * HIDDEN
    error_shares = exchange_ptr + pid * 2 * PARTS * CHUNK * D  # shares of M(k)
    d_error_shares = error_shares + PARTS * CHUNK * D  # shares of d loss / d err
    for step in range(chunk_end - chunk_begin):
        chunk = chunk_end - 1 - step
        row_offset = (pid * n_chunks + chunk) * CHUNK
        src = (pid * (n_chunks + 1) + chunk) * D * HIDDEN

        # phase 1: recompute this part's share of M(k)
        if PHASES & 1:
            k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
            _share_prediction(k, w1_ptr + src, w2_ptr + src, error_shares + part * CHUNK * D, tile_1, tile_2,
                              rows, cols, D, PART_HIDDEN, BLOCK_HIDDEN, CHUNK, MM)
        _sync_parts(counter_ptr + pid, PARTS * (2 * step + 1), SYNC)

        # phase 2: first visit of the part's hidden tiles: everything local to a tile, and the part's share of the
        # chunk-wide sums
        if PHASES & 2:
            q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
            dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(MM)
            keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
                keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK)
            err = 2.0 * (_sum_shares(error_shares, rows, cols, D, CHUNK, PARTS) - v)

            scores_1 = (_mm(q, tl.trans(k), MM) * coef).to(MM)
            d_hq_a1 = (-_mm(dy, tl.trans(err), MM) * coef).to(MM)  # d loss / d (hq a1^T), layer-2 retrieval
            hq_a1 = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
            d_qk = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)  # holds d loss / d scores_1 until the end of the tiles
            d_err = tl.zeros((CHUNK, D), dtype=tl.float32)
            dq = tl.zeros((CHUNK, D), dtype=tl.float32)
            dk = tl.zeros((CHUNK, D), dtype=tl.float32)
            d_keep = tl.zeros((CHUNK,), dtype=tl.float32)
            d_carry = tl.zeros((CHUNK,), dtype=tl.float32)
            d_coef_last = tl.zeros((CHUNK,), dtype=tl.float32)
            d_mcoef = tl.zeros((CHUNK,), dtype=tl.float32)
            d_keep_end = 0.0
            d_carry_end = 0.0
            d_eta_end = 0.0

            for j in range(0, PART_HIDDEN, BLOCK_HIDDEN):
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
                # the layer-2 update's share of d_err
                a1_dw2 = _mm(a1, dw2_next, MM)
                a1_ds2 = _mm(a1, ds2_next, MM)
                d_coef_last -= tl.sum(a1_dw2 * err, axis=1)
                d_mcoef -= tl.sum(a1_ds2 * err, axis=1)
                d_err -= coef_last[:, None] * a1_dw2 + mcoef[:, None] * a1_ds2

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

                # delta1 = (err w2^T) * silu'(z1): into err, w2 and (in phase 3) z1
                d_g1 = d_delta1 * da1
                d_err += _mm(d_g1, w2, MM)
                dw2 += _mm(tl.trans(d_g1), err, MM)
                # d loss / d z1 without the term through err, which is known only after every part
                tl.store(scratch_ptr + scratch + j + tile_c, d_delta1 * g1 * dda1 + d_a1 * da1)

                tl.debug_barrier()  # the incoming state gradient of this tile is read; overwrite it
                tl.store(dw1_ptr + grad_state + j + tile_1, dw1)
                tl.store(ds1_ptr + grad_state + j + tile_1, ds1)
                tl.store(dw2_ptr + grad_state + j * D + tile_2, dw2)
                tl.store(ds2_ptr + grad_state + j * D + tile_2, ds2)

            # the part's share of the chunk-wide sums; all are linear in hq_a1 and d_qk, so shares add up
            # (reloaded and recomputed here rather than kept in registers through the tile loop)
            coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
            qk = _mm(q, tl.trans(k), MM)
            d_err -= _mm(tl.trans(hq_a1 * coef), dy, MM)
            tl.store(d_error_shares + part * CHUNK * D + rows[:, None] * D + cols[None, :], d_err)
            d_coef = -_mm(dy, tl.trans(err), MM) * hq_a1 + d_qk * qk
            d_qk = d_qk * coef
            dq += _mm(d_qk, k, MM)
            dk += _mm(tl.trans(d_qk), q, MM)
            _add_rows(dq_ptr + seq, dq, chunk, T, rows, cols, D)
            _add_rows(dk_ptr + seq, dk, chunk, T, rows, cols, D)
            _store_gate_grads(dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr,
                              row_offset, rows, d_keep, d_carry, d_coef, d_coef_last, d_mcoef,
                              d_keep_end, d_carry_end, d_eta_end, CHUNK, True)
        _sync_parts(counter_ptr + pid, PARTS * (2 * step + 2), SYNC)

        # phase 3: second visit, once d loss / d err is complete: finish the key path z1 = k w1, a1 = silu(z1),
        # pred = a1 w2
        if PHASES & 4:
            k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
            d_pred = 2.0 * _sum_shares(d_error_shares, rows, cols, D, CHUNK, PARTS)
            dk = tl.zeros((CHUNK, D), dtype=tl.float32)
            for j in range(0, PART_HIDDEN, BLOCK_HIDDEN):
                w1 = tl.load(w1_ptr + src + j + tile_1)
                w2 = tl.load(w2_ptr + src + j * D + tile_2)
                a1, da1, _ = _silu_parts(_mm(k, w1, MM))
                d_z1 = tl.load(scratch_ptr + scratch + j + tile_c) + _mm(d_pred, tl.trans(w2), MM) * da1
                dk += _mm(d_z1, tl.trans(w1), MM)
                dw1 = tl.load(dw1_ptr + grad_state + j + tile_1) + _mm(tl.trans(k), d_z1, MM)
                dw2 = tl.load(dw2_ptr + grad_state + j * D + tile_2) + _mm(tl.trans(a1), d_pred, MM)
                tl.store(dw1_ptr + grad_state + j + tile_1, dw1)
                tl.store(dw2_ptr + grad_state + j * D + tile_2, dw2)
            _add_rows(dk_ptr + seq, dk, chunk, T, rows, cols, D)
            if part == 0:
                _store_rows(dv_ptr + seq, -d_pred, chunk, T, rows, cols, D)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Host side: gates, launchers, autograd
# ----------------------------------------------------------------------------------------------------------------------

NUM_WARPS = 8  # warps per program
NUM_STAGES = 1  # software pipelining of the tile loops (deeper costs shared memory and registers)
BLOCK_HIDDEN = 64  # hidden-layer columns per tile of the depth-2 kernels (32 was miscompiled by Triton 3.6 on H100)
# Whether the depth-2 kernels split a (batch, head) over several programs by default (see _split). Checked against
# the reference and timed on an H100 on 2026-11-23 (PERFORMANCE.md): as exact as one program, and 1.3x (8 x 2048) to
# 2.1x (1 x 32768) faster forward + backward. MEMORYCORE_NM_PARTS=1 turns it off.
SPLIT_BY_DEFAULT = True


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


def _launch_options(q: Tensor, state: tuple[Tensor, ...], chunk_size: int, parts: int = 1) -> dict:
    depth = len(state) // 2
    matmul_dtype = _MATMUL_DTYPES[q.dtype]
    if matmul_dtype == tl.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        matmul_dtype = tl.float32  # the Triton interpreter (3.9) returns garbage for bf16 tl.dot; fp32 is exact there
    options = dict(D=q.shape[-1], CHUNK=chunk_size, MM=matmul_dtype, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if depth == 2:
        hidden = state[0].shape[-1]
        options.update(HIDDEN=hidden, PARTS=parts, BLOCK_HIDDEN=min(hidden // parts, BLOCK_HIDDEN))
    return options


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 elsewhere)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _split(batch_heads: int, hidden: int, device: torch.device) -> tuple[int, bool]:
    """How the depth-2 kernels share out one (batch, head): (parts, whole).

    ``parts`` programs split its hidden units; ``whole`` runs every chunk in one launch (the parts wait for each other
    inside the kernel), otherwise each chunk runs as one launch per phase. The automatic split doubles the parts, down
    to tiles of BLOCK_HIDDEN units, while the grid still fits one program per SM (the in-kernel wait needs every part
    resident); it is the default on a GPU (SPLIT_BY_DEFAULT). ``MEMORYCORE_NM_PARTS`` overrides: ``auto`` or a
    number of parts (``1``: no split); ``MEMORYCORE_NM_SYNC=launch`` forces launches per phase (a fallback should
    the in-kernel wait ever hang).
    """
    sms = _sm_count(device)
    forced = os.environ.get("MEMORYCORE_NM_PARTS", "auto" if SPLIT_BY_DEFAULT else "1")
    if forced == "auto":
        parts = 1
        while hidden // (2 * parts) >= BLOCK_HIDDEN and batch_heads * 2 * parts <= sms:
            parts *= 2
    else:
        parts = int(forced) if forced.isdigit() else 0
        if parts < 1 or hidden % parts or not _is_tile_size(hidden // parts):
            raise ValueError(f"MEMORYCORE_NM_PARTS={forced} must be 'auto' or divide the memory's hidden width "
                             f"{hidden} into power-of-two slices of at least 16 units")
        if device.type == "cuda" and hidden // parts < BLOCK_HIDDEN:
            raise ValueError(f"MEMORYCORE_NM_PARTS={forced} would give slices of {hidden // parts} hidden units; on a "
                             f"GPU they must be at least {BLOCK_HIDDEN} "
                             "(narrower tiles were miscompiled by Triton 3.6)")
    in_kernel_wait = batch_heads * parts <= sms
    whole = parts == 1 or (in_kernel_wait and os.environ.get("MEMORYCORE_NM_SYNC") != "launch")
    return parts, whole


def _launch_depth2(kernel, args: tuple, n_chunks: int, parts: int, whole: bool, all_phases: int, backwards: bool,
                   options: dict) -> None:
    """Run a depth-2 kernel over every chunk: in one launch, or one launch per chunk and phase."""
    grid = (args[0].shape[0] * args[0].shape[1], parts)
    if whole:
        kernel[grid](*args, 0, n_chunks, PHASES=all_phases, SYNC=parts > 1, **options)
        return
    for chunk in reversed(range(n_chunks)) if backwards else range(n_chunks):
        for phase in (1, 2, 4):
            if all_phases & phase:
                kernel[grid](*args, chunk, chunk + 1, PHASES=phase, SYNC=False, **options)


def _forward(
    q: Tensor, k: Tensor, v: Tensor, gates: tuple[Tensor, ...], state: tuple[Tensor, ...], chunk_size: int,
    keep_boundaries: bool,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run the forward kernel; return y, the final state and the state buffers [bh, slots, i, o]."""
    batch, heads, time, dim = q.shape
    bh, n_chunks = batch * heads, gates[0].shape[1]
    n_slots = n_chunks + 1 if keep_boundaries else 2  # inference ping-pongs between two slots
    buffers = []
    for s in state:
        buffer = _empty((bh, n_slots, *s.shape[-2:]), torch.float32, q.device)
        buffer[:, 0] = s.reshape(bh, *s.shape[-2:])
        buffers.append(buffer)
    if len(state) == 2:
        y = _empty(q.shape, q.dtype, q.device)
        _forward_depth1_kernel[(bh,)](q, k, v, y, *gates, *buffers, time, n_chunks, n_slots,
                                      **_launch_options(q, state, chunk_size))
    else:
        parts, whole = _split(bh, state[0].shape[-1], q.device)
        y_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # the parts add their shares
        exchange = _empty((bh, 2, parts, chunk_size, dim), torch.float32, q.device)
        counter = torch.zeros(bh, dtype=torch.int32, device=q.device)
        args = (q, k, v, y_sum, *gates, *buffers, exchange, counter, time, n_chunks, n_slots)
        _launch_depth2(_forward_depth2_kernel, args, n_chunks, parts, whole, 0b011, False,
                       _launch_options(q, state, chunk_size, parts))
        y = y_sum.to(q.dtype)
    final = tuple(b[:, n_chunks % n_slots].reshape(batch, heads, *b.shape[-2:]).clone() for b in buffers)
    return y, final, tuple(buffers)


def _backward(
    q: Tensor, k: Tensor, v: Tensor, dy: Tensor, gates: tuple[Tensor, ...], buffers: tuple[Tensor, ...],
    d_final: tuple[Tensor, ...], chunk_size: int,
) -> tuple[Tensor, ...]:
    """Run the backward kernel; return the gradients of q, k, v, the gates and the initial state."""
    batch, heads, time, dim = q.shape
    bh, n_chunks = batch * heads, gates[0].shape[1]
    # the state gradient flows backwards through these buffers, starting from the gradient of the final state
    d_state = [g.reshape(bh, *g.shape[-2:]).to(torch.float32).clone(memory_format=torch.contiguous_format)
               for g in d_final]
    if len(buffers) == 2:
        dq, dk, dv = (_empty(q.shape, q.dtype, q.device) for _ in range(3))
        d_gates = [_empty(g.shape, torch.float32, q.device) for g in gates]
        _backward_depth1_kernel[(bh,)](q, k, v, dy, dq, dk, dv, *gates, *d_gates, *buffers, *d_state,
                                       time, n_chunks, **_launch_options(q, buffers, chunk_size))
    else:
        hidden = buffers[0].shape[-1]
        parts, whole = _split(bh, hidden, q.device)
        # the parts add their shares of dq, dk and the gate gradients into zeroed fp32 buffers
        dq, dk = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        dv = _empty(q.shape, q.dtype, q.device)
        d_gates = [torch.zeros(g.shape, dtype=torch.float32, device=q.device) for g in gates]
        scratch = _empty((bh, chunk_size, hidden), torch.float32, q.device)
        exchange = _empty((bh, 2, parts, chunk_size, dim), torch.float32, q.device)
        counter = torch.zeros(bh, dtype=torch.int32, device=q.device)
        args = (q, k, v, dy, dq, dk, dv, *gates, *d_gates, *buffers, *d_state, scratch, exchange, counter,
                time, n_chunks)
        _launch_depth2(_backward_depth2_kernel, args, n_chunks, parts, whole, 0b111, True,
                       _launch_options(q, buffers, chunk_size, parts))
        dq, dk = dq.to(q.dtype), dk.to(q.dtype)
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

    Takes and returns exactly what :func:`memorycore.kernels.neural_memory.reference.neural_memory_reference` does (same shapes,
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
