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
* Two passes (depths 1 and 2, :func:`_passes`): a serial kernel carries only the state chain (forward) or the
  state-gradient chain (backward); kernels over (batch, head, chunk) compute the outputs and every gradient. Exact,
  deterministic, never run on a GPU: the fused kernels above stay the default (comment above the two-pass kernels).

Coverage (see :func:`unsupported_reason` and :func:`tile_sizes`): depth 1, 2 or 3 (depth 3: one program per
(batch, head) holding whole [D, H], [H, H], [H, D] tiles); head dims up to 128 and chunks up to 256, any hidden width;
float32, bfloat16 and float16 inputs. A head dim, hidden width or chunk that is not a power of two of at least 16 runs
padded up to one, exactly (padded tokens have zero gates, padded features and units zero weights). float32 inputs run
tf32 dots on a GPU (Triton's default ``input_precision``, 10-bit mantissa, like torch with ``allow_tf32``; the
interpreter computes them in full fp32) with an fp32 state and fp32 accumulation. On a GPU a configuration runs
only if every kernel it launches fits the chip's shared memory (compiled for the GPU at first use, then cached): fp32
tiles of 64 or more usually do not (PERFORMANCE.md, "Coverage"). Anything else (depth 4+, float64, head dim > 128,
chunk > 256) runs the reference instead; that is a property of this implementation, not of the layer.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from memorycore.kernels.neural_memory.reference import Weights, chunk_coefficients, neural_memory_reference

_MATMUL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # Triton's names


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
# Depth 3 (MLP memory d -> hidden -> hidden -> d), one program per (batch, head), whole hidden tiles
# ----------------------------------------------------------------------------------------------------------------------
#
# The state is held as whole [D, H], [H, H] and [H, D] tiles (no split, no hidden tiling): simple and exact, sized for
# the narrow memories the applications use (on a GPU the shared-memory check of kernel_supports decides what fits).
# The backward follows the same order as depth 2, with the per-layer steps in helpers: retrieval layer by layer from
# the output down, the weight/momentum update of every layer, then the chain of errors delta_1 <- delta_2 <- err
# upwards (each delta_l is complete once layer l's retrieval and update have added to it), then the key path down.


@triton.jit
def _retrieve_layer(hq, a, delta, w, s, keep, carry, coef, MM: tl.constexpr):
    """One layer of the per-token retrieval: keep hq W + carry hq S - ((hq a^T) * coef) delta (pre-activation)."""
    scores = (_mm(hq, tl.trans(a), MM) * coef).to(MM)
    return keep[:, None] * _mm(hq, w, MM) + carry[:, None] * _mm(hq, s, MM) - _mm(scores, delta, MM)


@triton.jit
def _retrieve_layer_backward(d_zq, hq, a, delta, w, s, keep, carry, coef, MM: tl.constexpr):
    """Gradients of _retrieve_layer: (d hq, d a, d delta, d W, d S, d keep, d carry, d coef)."""
    hq_a = _mm(hq, tl.trans(a), MM)
    d_scores = -_mm(d_zq, tl.trans(delta), MM)
    d_hq_a = d_scores * coef
    d_keep = tl.sum(d_zq * _mm(hq, w, MM), axis=1)
    d_carry = tl.sum(d_zq * _mm(hq, s, MM), axis=1)
    d_hq = (_mm(keep[:, None] * d_zq, tl.trans(w), MM) + _mm(carry[:, None] * d_zq, tl.trans(s), MM)
            + _mm(d_hq_a, a, MM))
    d_a = _mm(tl.trans(d_hq_a), hq, MM)
    d_delta = -_mm(tl.trans(hq_a * coef), d_zq, MM)
    dw = _mm(tl.trans(hq), keep[:, None] * d_zq, MM)
    ds = _mm(tl.trans(hq), carry[:, None] * d_zq, MM)
    return d_hq, d_a, d_delta, dw, ds, d_keep, d_carry, d_scores * hq_a


@triton.jit
def _update_layer(a, delta, w, s, coef_last, mcoef, keep_end, carry_end, eta_end, MM: tl.constexpr):
    """A layer's end-of-chunk weights and momentum."""
    new_w = keep_end * w + carry_end * s - _mm(tl.trans(a), coef_last[:, None] * delta, MM)
    new_s = eta_end * s - _mm(tl.trans(a), mcoef[:, None] * delta, MM)
    return new_w, new_s


@triton.jit
def _add_update_layer_grads(a, delta, w, s, dw_ptr, ds_ptr, coef_last, mcoef, keep_end, carry_end, eta_end,
                            d_a, d_delta, dw, ds, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end,
                            MM: tl.constexpr):
    """Add the gradients of _update_layer, from the incoming state gradient at dw_ptr / ds_ptr, to those given:
    returns (d a, d delta, d W, d S, d coef_last, d mcoef, d keep_end, d carry_end, d eta_end)."""
    dw_next = tl.load(dw_ptr)
    ds_next = tl.load(ds_ptr)
    a_dw = _mm(a, dw_next, MM)
    a_ds = _mm(a, ds_next, MM)
    d_delta -= coef_last[:, None] * a_dw + mcoef[:, None] * a_ds
    d_a -= _mm(coef_last[:, None] * delta, tl.trans(dw_next), MM) + _mm(mcoef[:, None] * delta, tl.trans(ds_next), MM)
    dw += keep_end * dw_next
    ds += carry_end * dw_next + eta_end * ds_next
    return (d_a, d_delta, dw, ds, d_coef_last - tl.sum(a_dw * delta, axis=1), d_mcoef - tl.sum(a_ds * delta, axis=1),
            d_keep_end + tl.sum(dw_next * w), d_carry_end + tl.sum(dw_next * s), d_eta_end + tl.sum(ds_next * s))


@triton.jit
def _key_path_depth3(k, v, w1, w2, w3, MM: tl.constexpr):
    """The key path of one chunk: pre-activations z1, z2, errors delta1, delta2, err and their inputs g1, g2."""
    z1 = _mm(k, w1, MM)
    a2, da2, _ = _silu_parts(z1)
    z2 = _mm(a2, w2, MM)
    a3, da3, _ = _silu_parts(z2)
    err = 2.0 * (_mm(a3, w3, MM) - v)
    g2 = _mm(err, tl.trans(w3), MM)
    delta2 = g2 * da3
    g1 = _mm(delta2, tl.trans(w2), MM)
    delta1 = g1 * da2
    return z1, z2, a2, a3, err, g1, g2, delta1, delta2


@triton.jit
def _forward_depth3_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    w1_ptr, w2_ptr, w3_ptr, s1_ptr, s2_ptr, s3_ptr,
    T, n_chunks, n_slots,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    hid = tl.arange(0, HIDDEN)
    seq = pid * T * D
    mat_1 = cols[:, None] * HIDDEN + hid[None, :]  # [D, HIDDEN]
    mat_2 = hid[:, None] * HIDDEN + hid[None, :]  # [HIDDEN, HIDDEN]
    mat_3 = hid[:, None] * D + cols[None, :]  # [HIDDEN, D]
    for chunk in range(n_chunks):
        q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
        keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
            keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, (pid * n_chunks + chunk) * CHUNK,
            rows, CHUNK)
        src, dst = pid * n_slots + chunk % n_slots, pid * n_slots + (chunk + 1) % n_slots
        w1 = tl.load(w1_ptr + src * D * HIDDEN + mat_1)
        w2 = tl.load(w2_ptr + src * HIDDEN * HIDDEN + mat_2)
        w3 = tl.load(w3_ptr + src * HIDDEN * D + mat_3)
        s1 = tl.load(s1_ptr + src * D * HIDDEN + mat_1)
        s2 = tl.load(s2_ptr + src * HIDDEN * HIDDEN + mat_2)
        s3 = tl.load(s3_ptr + src * HIDDEN * D + mat_3)
        z1, z2, a2, a3, err, g1, g2, delta1, delta2 = _key_path_depth3(k, v, w1, w2, w3, MM)
        hq1, _, _ = _silu_parts(_retrieve_layer(q, k, delta1, w1, s1, keep, carry, coef, MM))
        hq2, _, _ = _silu_parts(_retrieve_layer(hq1, a2, delta2, w2, s2, keep, carry, coef, MM))
        y = _retrieve_layer(hq2, a3, err, w3, s3, keep, carry, coef, MM)
        _store_rows(y_ptr + seq, y, chunk, T, rows, cols, D)
        new_w, new_s = _update_layer(k, delta1, w1, s1, coef_last, mcoef, keep_end, carry_end, eta_end, MM)
        tl.store(w1_ptr + dst * D * HIDDEN + mat_1, new_w)
        tl.store(s1_ptr + dst * D * HIDDEN + mat_1, new_s)
        new_w, new_s = _update_layer(a2, delta2, w2, s2, coef_last, mcoef, keep_end, carry_end, eta_end, MM)
        tl.store(w2_ptr + dst * HIDDEN * HIDDEN + mat_2, new_w)
        tl.store(s2_ptr + dst * HIDDEN * HIDDEN + mat_2, new_s)
        new_w, new_s = _update_layer(a3, err, w3, s3, coef_last, mcoef, keep_end, carry_end, eta_end, MM)
        tl.store(w3_ptr + dst * HIDDEN * D + mat_3, new_w)
        tl.store(s3_ptr + dst * HIDDEN * D + mat_3, new_s)
        tl.debug_barrier()  # the next chunk reads the state this one wrote


@triton.jit
def _backward_depth3_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr,
    w1_ptr, w2_ptr, w3_ptr, s1_ptr, s2_ptr, s3_ptr, dw1_ptr, dw2_ptr, dw3_ptr, ds1_ptr, ds2_ptr, ds3_ptr,
    T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    hid = tl.arange(0, HIDDEN)
    seq = pid * T * D
    mat_1 = cols[:, None] * HIDDEN + hid[None, :]
    mat_2 = hid[:, None] * HIDDEN + hid[None, :]
    mat_3 = hid[:, None] * D + cols[None, :]
    grad_1, grad_2, grad_3 = pid * D * HIDDEN, pid * HIDDEN * HIDDEN, pid * HIDDEN * D
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
        dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
        row_offset = (pid * n_chunks + chunk) * CHUNK
        keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
            keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK)
        src = pid * (n_chunks + 1) + chunk
        w1 = tl.load(w1_ptr + src * D * HIDDEN + mat_1)
        w2 = tl.load(w2_ptr + src * HIDDEN * HIDDEN + mat_2)
        w3 = tl.load(w3_ptr + src * HIDDEN * D + mat_3)
        s1 = tl.load(s1_ptr + src * D * HIDDEN + mat_1)
        s2 = tl.load(s2_ptr + src * HIDDEN * HIDDEN + mat_2)
        s3 = tl.load(s3_ptr + src * HIDDEN * D + mat_3)

        # recompute the chunk: key path, then the retrieval's hidden layers
        z1, z2, a2, a3, err, g1, g2, delta1, delta2 = _key_path_depth3(k, v, w1, w2, w3, MM)
        zq1 = _retrieve_layer(q, k, delta1, w1, s1, keep, carry, coef, MM)
        hq1, dhq1, _ = _silu_parts(zq1)
        zq2 = _retrieve_layer(hq1, a2, delta2, w2, s2, keep, carry, coef, MM)
        hq2, dhq2, _ = _silu_parts(zq2)

        # retrieval, from the output down
        d_hq2, d_a3, d_err, dw3, ds3, d_keep, d_carry, d_coef = _retrieve_layer_backward(
            dy, hq2, a3, err, w3, s3, keep, carry, coef, MM)
        d_hq1, d_a2, d_delta2, dw2, ds2, d_keep_2, d_carry_2, d_coef_2 = _retrieve_layer_backward(
            d_hq2 * dhq2, hq1, a2, delta2, w2, s2, keep, carry, coef, MM)
        dq, dk, d_delta1, dw1, ds1, d_keep_1, d_carry_1, d_coef_1 = _retrieve_layer_backward(
            d_hq1 * dhq1, q, k, delta1, w1, s1, keep, carry, coef, MM)
        d_keep += d_keep_2 + d_keep_1
        d_carry += d_carry_2 + d_carry_1
        d_coef += d_coef_2 + d_coef_1

        # the update of every layer, from the incoming state gradient
        d_coef_last = tl.zeros((CHUNK,), dtype=tl.float32)
        d_mcoef = tl.zeros((CHUNK,), dtype=tl.float32)
        d_keep_end, d_carry_end, d_eta_end = 0.0, 0.0, 0.0
        d_a3, d_err, dw3, ds3, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end = _add_update_layer_grads(
            a3, err, w3, s3, dw3_ptr + grad_3 + mat_3, ds3_ptr + grad_3 + mat_3, coef_last, mcoef, keep_end,
            carry_end, eta_end, d_a3, d_err, dw3, ds3, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end, MM)
        d_a2, d_delta2, dw2, ds2, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end = _add_update_layer_grads(
            a2, delta2, w2, s2, dw2_ptr + grad_2 + mat_2, ds2_ptr + grad_2 + mat_2, coef_last, mcoef, keep_end,
            carry_end, eta_end, d_a2, d_delta2, dw2, ds2, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end, MM)
        dk, d_delta1, dw1, ds1, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end = _add_update_layer_grads(
            k, delta1, w1, s1, dw1_ptr + grad_1 + mat_1, ds1_ptr + grad_1 + mat_1, coef_last, mcoef, keep_end,
            carry_end, eta_end, dk, d_delta1, dw1, ds1, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end, MM)

        # the errors: delta1 = (delta2 W2^T) silu'(z1), delta2 = (err W3^T) silu'(z2), err = 2 (pred - v)
        _, da2, dda2 = _silu_parts(z1)
        _, da3, dda3 = _silu_parts(z2)
        d_g1 = d_delta1 * da2
        d_z1 = d_delta1 * g1 * dda2
        d_delta2 += _mm(d_g1, w2, MM)
        dw2 += _mm(tl.trans(d_g1), delta2, MM)
        d_g2 = d_delta2 * da3
        d_z2 = d_delta2 * g2 * dda3
        d_err += _mm(d_g2, w3, MM)
        dw3 += _mm(tl.trans(d_g2), err, MM)

        # the key path: pred = a3 W3, a3 = silu(z2), z2 = a2 W2, a2 = silu(z1), z1 = k W1
        d_pred = 2.0 * d_err
        dw3 += _mm(tl.trans(a3), d_pred, MM)
        d_z2 += (d_a3 + _mm(d_pred, tl.trans(w3), MM)) * da3
        dw2 += _mm(tl.trans(a2), d_z2, MM)
        d_z1 += (d_a2 + _mm(d_z2, tl.trans(w2), MM)) * da2
        dw1 += _mm(tl.trans(k), d_z1, MM)
        dk += _mm(d_z1, tl.trans(w1), MM)

        _store_rows(dq_ptr + seq, dq, chunk, T, rows, cols, D)
        _store_rows(dk_ptr + seq, dk, chunk, T, rows, cols, D)
        _store_rows(dv_ptr + seq, -d_pred, chunk, T, rows, cols, D)
        _store_gate_grads(dkeep_ptr, dcarry_ptr, dcoef_ptr, dcoef_last_ptr, dends_ptr, dmcoef_ptr, row_offset, rows,
                          d_keep, d_carry, d_coef, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end,
                          CHUNK, False)
        tl.debug_barrier()  # every thread has read the incoming state gradient before it is overwritten
        tl.store(dw1_ptr + grad_1 + mat_1, dw1)
        tl.store(dw2_ptr + grad_2 + mat_2, dw2)
        tl.store(dw3_ptr + grad_3 + mat_3, dw3)
        tl.store(ds1_ptr + grad_1 + mat_1, ds1)
        tl.store(ds2_ptr + grad_2 + mat_2, ds2)
        tl.store(ds3_ptr + grad_3 + mat_3, ds3)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Depth 1 in two passes: a serial kernel carries only the chunk-to-chunk state, kernels over (batch, head, chunk) do
# the rest (issue 27, item 2; chosen by _passes)
# ----------------------------------------------------------------------------------------------------------------------
#
# Exact: a chunk's outputs depend on the state only through its start state, so the forward first runs the state
# chain (each chunk's update from its start state, stored at every boundary), then every chunk's retrieval in parallel.
# The backward splits the gradient of each start state into the chunk's local term G_c (through its own outputs,
# linear in dy: parallel) and the vector-Jacobian product of the update map J_c^T dS_{c+1} (serial):
#     dS_c = G_c + J_c^T dS_{c+1}.
# One buffer [bh, n + 1, D, D] per state matrix holds G_c at slot c, then the serial kernel overwrites it, from the
# last chunk down, with dS_c; the last kernel reads dS_{c+1} at slot c + 1 for the gradients of k, v and the update's
# gates. On the serial chain per chunk: 3 dots of [CHUNK, D] x [D, D] in the forward (k W, and k^T times the two
# error columns) and 3 in the backward (k dW, k dS, k^T d_pred), against 7 and 18 in the fused kernels. Every output
# is written once by one program: no atomics, bit-identical reruns.


@triton.jit
def _chain_depth1_kernel(
    k_ptr, v_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, w_ptr, s_ptr, T, n_chunks,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """The state chain: every chunk-boundary state, from slot 0 (the initial state) on."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    seq = pid * T * D
    mat = cols[:, None] * D + cols[None, :]
    for chunk in range(n_chunks):
        k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
        v = _load_rows(v_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
        row_offset = (pid * n_chunks + chunk) * CHUNK
        coef_last = tl.load(coef_last_ptr + row_offset + rows)
        mcoef = tl.load(mcoef_ptr + row_offset + rows)
        end = (pid * n_chunks + chunk) * 3
        src = (pid * (n_chunks + 1) + chunk) * D * D
        w = tl.load(w_ptr + src + mat)
        s = tl.load(s_ptr + src + mat)
        err = 2.0 * (_mm(k, w, MM) - v)
        new_w, new_s = _update_layer(k, err, w, s, coef_last, mcoef, tl.load(ends_ptr + end),
                                     tl.load(ends_ptr + end + 1), tl.load(ends_ptr + end + 2), MM)
        tl.store(w_ptr + src + D * D + mat, new_w)
        tl.store(s_ptr + src + D * D + mat, new_s)
        tl.debug_barrier()  # the next chunk reads the state this one wrote


@triton.jit
def _chunk_of_program(q_ptr, k_ptr, v_ptr, w_ptr, s_ptr, T, n_chunks,
                      D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr):
    """The start of every kernel over (batch * heads, chunks): this program's chunk, its offsets (rows, seq, mat,
    row_offset into the gates, slot into the [bh, n + 1, D, D] boundary buffers), q, k, v, start state and err."""
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    seq = pid * T * D
    mat = cols[:, None] * D + cols[None, :]
    q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
    slot = (pid * (n_chunks + 1) + chunk) * D * D
    w = tl.load(w_ptr + slot + mat)
    s = tl.load(s_ptr + slot + mat)
    err = 2.0 * (_mm(k, w, MM) - v)
    return chunk, rows, cols, seq, mat, (pid * n_chunks + chunk) * CHUNK, slot, q, k, v, w, s, err


@triton.jit
def _outputs_depth1_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr, keep_ptr, carry_ptr, coef_ptr, w_ptr, s_ptr, T, n_chunks,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """One chunk's retrieval from its start state (grid: batch * heads, chunks)."""
    chunk, rows, cols, seq, mat, row_offset, slot, q, k, v, w, s, err = _chunk_of_program(
        q_ptr, k_ptr, v_ptr, w_ptr, s_ptr, T, n_chunks, D, CHUNK, MM)
    keep = tl.load(keep_ptr + row_offset + rows)
    carry = tl.load(carry_ptr + row_offset + rows)
    coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
    _store_rows(y_ptr + seq, _retrieve_layer(q, k, err, w, s, keep, carry, coef, MM), chunk, T, rows, cols, D)


@triton.jit
def _local_grads_depth1_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, keep_ptr, carry_ptr, coef_ptr, dkeep_ptr, dcarry_ptr, dcoef_ptr,
    w_ptr, s_ptr, dw_ptr, ds_ptr, T, n_chunks,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """One chunk's gradients through its own outputs: of q and the retrieval's gates, and G_c, the local term of
    its start state's gradient, into slot c of dw_ptr / ds_ptr (grid: batch * heads, chunks)."""
    chunk, rows, cols, seq, mat, row_offset, slot, q, k, v, w, s, err = _chunk_of_program(
        q_ptr, k_ptr, v_ptr, w_ptr, s_ptr, T, n_chunks, D, CHUNK, MM)
    dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
    keep = tl.load(keep_ptr + row_offset + rows)
    carry = tl.load(carry_ptr + row_offset + rows)
    coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
    dq, _, d_err, dw, ds, d_keep, d_carry, d_coef = _retrieve_layer_backward(dy, q, k, err, w, s, keep, carry, coef,
                                                                             MM)
    dw += _mm(tl.trans(k), 2.0 * d_err, MM)  # err = 2 (k W - v)
    _store_rows(dq_ptr + seq, dq, chunk, T, rows, cols, D)
    tl.store(dkeep_ptr + row_offset + rows, d_keep)
    tl.store(dcarry_ptr + row_offset + rows, d_carry)
    tl.store(dcoef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :], d_coef)
    tl.store(dw_ptr + slot + mat, dw)
    tl.store(ds_ptr + slot + mat, ds)


@triton.jit
def _grad_chain_depth1_kernel(
    k_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, dw_ptr, ds_ptr, T, n_chunks,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """The state-gradient chain dS_c = G_c + J_c^T dS_{c+1}, from the last chunk down, in place (slot n holds the
    gradient of the final state)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    seq = pid * T * D
    mat = cols[:, None] * D + cols[None, :]
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        k = _load_rows(k_ptr + seq, chunk, T, rows, cols, D).to(MM)
        row_offset = (pid * n_chunks + chunk) * CHUNK
        coef_last = tl.load(coef_last_ptr + row_offset + rows)
        mcoef = tl.load(mcoef_ptr + row_offset + rows)
        end = (pid * n_chunks + chunk) * 3
        slot = (pid * (n_chunks + 1) + chunk) * D * D
        dw_next = tl.load(dw_ptr + slot + D * D + mat)
        ds_next = tl.load(ds_ptr + slot + D * D + mat)
        # new_w = keep_end w + carry_end s - k^T (coef_last err), new_s = eta_end s - k^T (mcoef err), err = 2 (k w - v)
        d_pred = -2.0 * (coef_last[:, None] * _mm(k, dw_next, MM) + mcoef[:, None] * _mm(k, ds_next, MM))
        dw = tl.load(dw_ptr + slot + mat) + tl.load(ends_ptr + end) * dw_next + _mm(tl.trans(k), d_pred, MM)
        ds = tl.load(ds_ptr + slot + mat) + tl.load(ends_ptr + end + 1) * dw_next + tl.load(ends_ptr + end + 2) * ds_next
        tl.store(dw_ptr + slot + mat, dw)
        tl.store(ds_ptr + slot + mat, ds)
        tl.debug_barrier()  # the next (earlier) chunk reads the gradient this one wrote


@triton.jit
def _input_grads_depth1_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dk_ptr, dv_ptr, keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    dcoef_last_ptr, dends_ptr, dmcoef_ptr, w_ptr, s_ptr, dw_ptr, ds_ptr, T, n_chunks,
    D: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """One chunk's gradients of k, v and the update's gates, from dy and its end state's gradient dS_{c+1}
    (grid: batch * heads, chunks)."""
    chunk, rows, cols, seq, mat, row_offset, slot, q, k, v, w, s, err = _chunk_of_program(
        q_ptr, k_ptr, v_ptr, w_ptr, s_ptr, T, n_chunks, D, CHUNK, MM)
    dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
    keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
        keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK)
    _, dk, d_err, _, _, _, _, _ = _retrieve_layer_backward(dy, q, k, err, w, s, keep, carry, coef, MM)
    zero_rows = tl.zeros((CHUNK,), dtype=tl.float32)
    dk, d_err, _, _, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end = _add_update_layer_grads(
        k, err, w, s, dw_ptr + slot + D * D + mat, ds_ptr + slot + D * D + mat, coef_last, mcoef, keep_end,
        carry_end, eta_end, dk, d_err, w, s, zero_rows, zero_rows, 0.0, 0.0, 0.0, MM)
    d_pred = 2.0 * d_err
    dk += _mm(d_pred, tl.trans(w), MM)
    _store_rows(dk_ptr + seq, dk, chunk, T, rows, cols, D)
    _store_rows(dv_ptr + seq, -d_pred, chunk, T, rows, cols, D)
    tl.store(dcoef_last_ptr + row_offset + rows, d_coef_last)
    tl.store(dmcoef_ptr + row_offset + rows, d_mcoef)
    end = row_offset // CHUNK * 3
    tl.store(dends_ptr + end, d_keep_end)
    tl.store(dends_ptr + end + 1, d_carry_end)
    tl.store(dends_ptr + end + 2, d_eta_end)


# Depth 2 in two passes, the same structure with whole [D, H] and [H, D] tiles (one program per (batch, head) on the
# serial chains, no split over the hidden units). The chain kernels carry the key path (M(k), its error and delta_1:
# 3 dots) and the update (forward: 4 more dots; backward: the update's vector-Jacobian product and the key path's
# second-order terms, 14 more), against 16 and 33 in the fused kernels. At head dim 64, hidden 256 the whole tiles
# spill more than the fused kernels and the local-terms kernel outgrows an H100's shared memory (PERFORMANCE.md).


@triton.jit
def _key_path_depth2(k, v, w1, w2, MM: tl.constexpr):
    """The key path of one chunk: a1 = silu(k W1) (with silu' and silu''), err = 2 (a1 W2 - v), g1 = err W2^T and
    delta1 = g1 silu'(k W1)."""
    a1, da1, dda1 = _silu_parts(_mm(k, w1, MM))
    err = 2.0 * (_mm(a1, w2, MM) - v)
    g1 = _mm(err, tl.trans(w2), MM)
    return a1, da1, dda1, err, g1, g1 * da1


@triton.jit
def _key_path_depth2_backward(k, a1, da1, dda1, err, g1, w1, w2, d_a1, d_err, d_delta1, MM: tl.constexpr):
    """Gradients of _key_path_depth2 from those of a1, err and delta1: (d W1, d W2, d k, d pred)."""
    d_g1 = d_delta1 * da1
    d_z1 = d_delta1 * g1 * dda1
    d_pred = 2.0 * (d_err + _mm(d_g1, w2, MM))
    dw2 = _mm(tl.trans(d_g1), err, MM) + _mm(tl.trans(a1), d_pred, MM)
    d_z1 += (d_a1 + _mm(d_pred, tl.trans(w2), MM)) * da1
    return _mm(tl.trans(k), d_z1, MM), dw2, _mm(d_z1, tl.trans(w1), MM), d_pred


@triton.jit
def _retrieval_depth2_backward(q, k, a1, err, delta1, w1, w2, s1, s2, dy, keep, carry, coef, MM: tl.constexpr):
    """Gradients through one chunk's retrieval y = layer 2 (silu (layer 1 (q))): (dq, d k, d a1, d err, d delta1,
    d W1, d S1, d W2, d S2, d keep, d carry, d coef)."""
    hq, dhq, _ = _silu_parts(_retrieve_layer(q, k, delta1, w1, s1, keep, carry, coef, MM))
    d_hq, d_a1, d_err, dw2, ds2, d_keep, d_carry, d_coef = _retrieve_layer_backward(dy, hq, a1, err, w2, s2, keep,
                                                                                    carry, coef, MM)
    dq, dk, d_delta1, dw1, ds1, d_keep_1, d_carry_1, d_coef_1 = _retrieve_layer_backward(d_hq * dhq, q, k, delta1, w1,
                                                                                         s1, keep, carry, coef, MM)
    return (dq, dk, d_a1, d_err, d_delta1, dw1, ds1, dw2, ds2, d_keep + d_keep_1, d_carry + d_carry_1,
            d_coef + d_coef_1)


@triton.jit
def _offsets_depth2(D: tl.constexpr, HIDDEN: tl.constexpr):
    """Element offsets of a depth-2 memory's two matrices: W1 [D, HIDDEN] and W2 [HIDDEN, D], row-major."""
    cols = tl.arange(0, D)
    hid = tl.arange(0, HIDDEN)
    return cols[:, None] * HIDDEN + hid[None, :], hid[:, None] * D + cols[None, :]


@triton.jit
def _state_depth2(w1_ptr, w2_ptr, s1_ptr, s2_ptr, slot, mat_1, mat_2, D: tl.constexpr, HIDDEN: tl.constexpr):
    """The four state matrices at a slot (a [bh, n + 1] index) of the boundary buffers."""
    return (tl.load(w1_ptr + slot * D * HIDDEN + mat_1), tl.load(w2_ptr + slot * HIDDEN * D + mat_2),
            tl.load(s1_ptr + slot * D * HIDDEN + mat_1), tl.load(s2_ptr + slot * HIDDEN * D + mat_2))


@triton.jit
def _chunk_of_program_depth2(q_ptr, k_ptr, v_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, T, n_chunks,
                             D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr):
    """The start of the depth-2 kernels over (batch * heads, chunks), as _chunk_of_program: offsets, q, k, v, the
    start state and the key path."""
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    seq = pid * T * D
    mat_1, mat_2 = _offsets_depth2(D, HIDDEN)
    q, k, v = _load_qkv(q_ptr, k_ptr, v_ptr, seq, chunk, T, rows, cols, D, MM)
    slot = pid * (n_chunks + 1) + chunk
    w1, w2, s1, s2 = _state_depth2(w1_ptr, w2_ptr, s1_ptr, s2_ptr, slot, mat_1, mat_2, D, HIDDEN)
    a1, da1, dda1, err, g1, delta1 = _key_path_depth2(k, v, w1, w2, MM)
    return (chunk, rows, cols, seq, mat_1, mat_2, (pid * n_chunks + chunk) * CHUNK, slot, q, k, v, w1, w2, s1, s2,
            a1, da1, dda1, err, g1, delta1)


@triton.jit
def _chain_step_depth2(k_ptr, v_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
                       pid, chunk, T, n_chunks, mat_1, mat_2,
                       D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr):
    """What a chain kernel reads for one chunk: k, the update's gates, the chunk's start state and its key path."""
    rows = tl.arange(0, CHUNK)
    cols = tl.arange(0, D)
    k = _load_rows(k_ptr + pid * T * D, chunk, T, rows, cols, D).to(MM)
    v = _load_rows(v_ptr + pid * T * D, chunk, T, rows, cols, D).to(tl.float32)
    row_offset = (pid * n_chunks + chunk) * CHUNK
    end = ends_ptr + row_offset // CHUNK * 3
    slot = pid * (n_chunks + 1) + chunk
    w1, w2, s1, s2 = _state_depth2(w1_ptr, w2_ptr, s1_ptr, s2_ptr, slot, mat_1, mat_2, D, HIDDEN)
    a1, da1, dda1, err, g1, delta1 = _key_path_depth2(k, v, w1, w2, MM)
    return (k, tl.load(coef_last_ptr + row_offset + rows), tl.load(mcoef_ptr + row_offset + rows), tl.load(end),
            tl.load(end + 1), tl.load(end + 2), slot, w1, w2, s1, s2, a1, da1, dda1, err, g1, delta1)


@triton.jit
def _chain_depth2_kernel(
    k_ptr, v_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """The state chain: every chunk-boundary state, from slot 0 (the initial state) on."""
    pid = tl.program_id(0).to(tl.int64)
    mat_1, mat_2 = _offsets_depth2(D, HIDDEN)
    for chunk in range(n_chunks):
        (k, coef_last, mcoef, keep_end, carry_end, eta_end, slot, w1, w2, s1, s2, a1, da1, dda1, err, g1,
         delta1) = _chain_step_depth2(k_ptr, v_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
                                      pid, chunk, T, n_chunks, mat_1, mat_2, D, HIDDEN, CHUNK, MM)
        new_w, new_s = _update_layer(k, delta1, w1, s1, coef_last, mcoef, keep_end, carry_end, eta_end, MM)
        tl.store(w1_ptr + (slot + 1) * D * HIDDEN + mat_1, new_w)
        tl.store(s1_ptr + (slot + 1) * D * HIDDEN + mat_1, new_s)
        new_w, new_s = _update_layer(a1, err, w2, s2, coef_last, mcoef, keep_end, carry_end, eta_end, MM)
        tl.store(w2_ptr + (slot + 1) * HIDDEN * D + mat_2, new_w)
        tl.store(s2_ptr + (slot + 1) * HIDDEN * D + mat_2, new_s)
        tl.debug_barrier()  # the next chunk reads the state this one wrote


@triton.jit
def _outputs_depth2_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr, keep_ptr, carry_ptr, coef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """One chunk's retrieval from its start state (grid: batch * heads, chunks)."""
    (chunk, rows, cols, seq, _, _, row_offset, _, q, k, v, w1, w2, s1, s2, a1, _, _, err, _,
     delta1) = _chunk_of_program_depth2(q_ptr, k_ptr, v_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, T, n_chunks, D, HIDDEN,
                                        CHUNK, MM)
    keep = tl.load(keep_ptr + row_offset + rows)
    carry = tl.load(carry_ptr + row_offset + rows)
    coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
    hq, _, _ = _silu_parts(_retrieve_layer(q, k, delta1, w1, s1, keep, carry, coef, MM))
    _store_rows(y_ptr + seq, _retrieve_layer(hq, a1, err, w2, s2, keep, carry, coef, MM), chunk, T, rows, cols, D)


@triton.jit
def _local_grads_depth2_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, keep_ptr, carry_ptr, coef_ptr, dkeep_ptr, dcarry_ptr, dcoef_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """One chunk's gradients through its own outputs (dq, the retrieval's gates) and G_c, into slot c of the
    state-gradient buffers (grid: batch * heads, chunks)."""
    (chunk, rows, cols, seq, mat_1, mat_2, row_offset, slot, q, k, v, w1, w2, s1, s2, a1, da1, dda1, err, g1,
     delta1) = _chunk_of_program_depth2(q_ptr, k_ptr, v_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, T, n_chunks, D, HIDDEN,
                                        CHUNK, MM)
    dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
    keep = tl.load(keep_ptr + row_offset + rows)
    carry = tl.load(carry_ptr + row_offset + rows)
    coef = tl.load(coef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :])
    dq, _, d_a1, d_err, d_delta1, dw1, ds1, dw2, ds2, d_keep, d_carry, d_coef = _retrieval_depth2_backward(
        q, k, a1, err, delta1, w1, w2, s1, s2, dy, keep, carry, coef, MM)
    dw1_key, dw2_key, _, _ = _key_path_depth2_backward(k, a1, da1, dda1, err, g1, w1, w2, d_a1, d_err, d_delta1, MM)
    _store_rows(dq_ptr + seq, dq, chunk, T, rows, cols, D)
    tl.store(dkeep_ptr + row_offset + rows, d_keep)
    tl.store(dcarry_ptr + row_offset + rows, d_carry)
    tl.store(dcoef_ptr + row_offset * CHUNK + rows[:, None] * CHUNK + rows[None, :], d_coef)
    tl.store(dw1_ptr + slot * D * HIDDEN + mat_1, dw1 + dw1_key)
    tl.store(ds1_ptr + slot * D * HIDDEN + mat_1, ds1)
    tl.store(dw2_ptr + slot * HIDDEN * D + mat_2, dw2 + dw2_key)
    tl.store(ds2_ptr + slot * HIDDEN * D + mat_2, ds2)


@triton.jit
def _grad_chain_depth2_kernel(
    k_ptr, v_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
    dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """The state-gradient chain dS_c = G_c + J_c^T dS_{c+1}, from the last chunk down, in place."""
    pid = tl.program_id(0).to(tl.int64)
    mat_1, mat_2 = _offsets_depth2(D, HIDDEN)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step
        (k, coef_last, mcoef, keep_end, carry_end, eta_end, slot, w1, w2, s1, s2, a1, da1, dda1, err, g1,
         delta1) = _chain_step_depth2(k_ptr, v_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr,
                                      pid, chunk, T, n_chunks, mat_1, mat_2, D, HIDDEN, CHUNK, MM)
        dw1, dw2, ds1, ds2 = _state_depth2(dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, slot, mat_1, mat_2, D, HIDDEN)  # G_c
        zero_rows = tl.zeros((CHUNK,), dtype=tl.float32)
        d_a1, d_err, dw2, ds2, _, _, _, _, _ = _add_update_layer_grads(
            a1, err, w2, s2, dw2_ptr + (slot + 1) * HIDDEN * D + mat_2, ds2_ptr + (slot + 1) * HIDDEN * D + mat_2,
            coef_last, mcoef, keep_end, carry_end, eta_end, tl.zeros((CHUNK, HIDDEN), dtype=tl.float32),
            tl.zeros((CHUNK, D), dtype=tl.float32), dw2, ds2, zero_rows, zero_rows, 0.0, 0.0, 0.0, MM)
        _, d_delta1, dw1, ds1, _, _, _, _, _ = _add_update_layer_grads(
            k, delta1, w1, s1, dw1_ptr + (slot + 1) * D * HIDDEN + mat_1, ds1_ptr + (slot + 1) * D * HIDDEN + mat_1,
            coef_last, mcoef, keep_end, carry_end, eta_end, tl.zeros((CHUNK, D), dtype=tl.float32),
            tl.zeros((CHUNK, HIDDEN), dtype=tl.float32), dw1, ds1, zero_rows, zero_rows, 0.0, 0.0, 0.0, MM)
        dw1_key, dw2_key, _, _ = _key_path_depth2_backward(k, a1, da1, dda1, err, g1, w1, w2, d_a1, d_err, d_delta1,
                                                           MM)
        tl.store(dw1_ptr + slot * D * HIDDEN + mat_1, dw1 + dw1_key)
        tl.store(ds1_ptr + slot * D * HIDDEN + mat_1, ds1)
        tl.store(dw2_ptr + slot * HIDDEN * D + mat_2, dw2 + dw2_key)
        tl.store(ds2_ptr + slot * HIDDEN * D + mat_2, ds2)
        tl.debug_barrier()  # the next (earlier) chunk reads the gradient this one wrote


@triton.jit
def _input_grads_depth2_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dk_ptr, dv_ptr, keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr,
    dcoef_last_ptr, dends_ptr, dmcoef_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr,
    T, n_chunks,
    D: tl.constexpr, HIDDEN: tl.constexpr, CHUNK: tl.constexpr, MM: tl.constexpr,
):
    """One chunk's gradients of k, v and the update's gates, from dy and its end state's gradient dS_{c+1}
    (grid: batch * heads, chunks)."""
    (chunk, rows, cols, seq, mat_1, mat_2, row_offset, slot, q, k, v, w1, w2, s1, s2, a1, da1, dda1, err, g1,
     delta1) = _chunk_of_program_depth2(q_ptr, k_ptr, v_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, T, n_chunks, D, HIDDEN,
                                        CHUNK, MM)
    dy = _load_rows(dy_ptr + seq, chunk, T, rows, cols, D).to(tl.float32)
    keep, carry, coef, coef_last, mcoef, keep_end, carry_end, eta_end = _load_gates(
        keep_ptr, carry_ptr, coef_ptr, coef_last_ptr, ends_ptr, mcoef_ptr, row_offset, rows, CHUNK)
    _, dk, d_a1, d_err, d_delta1, _, _, _, _, _, _, _ = _retrieval_depth2_backward(
        q, k, a1, err, delta1, w1, w2, s1, s2, dy, keep, carry, coef, MM)
    zero_rows = tl.zeros((CHUNK,), dtype=tl.float32)
    d_a1, d_err, _, _, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end = _add_update_layer_grads(
        a1, err, w2, s2, dw2_ptr + (slot + 1) * HIDDEN * D + mat_2, ds2_ptr + (slot + 1) * HIDDEN * D + mat_2,
        coef_last, mcoef, keep_end, carry_end, eta_end, d_a1, d_err, w2, s2, zero_rows, zero_rows, 0.0, 0.0, 0.0, MM)
    dk, d_delta1, _, _, d_coef_last, d_mcoef, d_keep_end, d_carry_end, d_eta_end = _add_update_layer_grads(
        k, delta1, w1, s1, dw1_ptr + (slot + 1) * D * HIDDEN + mat_1, ds1_ptr + (slot + 1) * D * HIDDEN + mat_1,
        coef_last, mcoef, keep_end, carry_end, eta_end, dk, d_delta1, w1, s1, d_coef_last, d_mcoef, d_keep_end,
        d_carry_end, d_eta_end, MM)
    _, _, dk_key, d_pred = _key_path_depth2_backward(k, a1, da1, dda1, err, g1, w1, w2, d_a1, d_err, d_delta1, MM)
    _store_rows(dk_ptr + seq, dk + dk_key, chunk, T, rows, cols, D)
    _store_rows(dv_ptr + seq, -d_pred, chunk, T, rows, cols, D)
    tl.store(dcoef_last_ptr + row_offset + rows, d_coef_last)
    tl.store(dmcoef_ptr + row_offset + rows, d_mcoef)
    tl.store(dends_ptr + row_offset // CHUNK * 3, d_keep_end)
    tl.store(dends_ptr + row_offset // CHUNK * 3 + 1, d_carry_end)
    tl.store(dends_ptr + row_offset // CHUNK * 3 + 2, d_eta_end)


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


# The fused kernels of depth 1, and the two-pass kernels of depths 1 and 2: exact and deterministic, never run on a GPU
FUSED_DEPTH1_KERNELS = (("_forward_depth1_kernel", 1), ("_backward_depth1_kernel", 1))
TWO_PASS_KERNELS = {depth: tuple(f"_{step}_depth{depth}_kernel" for step in
                                 ("chain", "outputs", "local_grads", "grad_chain", "input_grads"))
                    for depth in (1, 2)}


def _passes(q: Tensor, depth: int, chunk_size: int) -> int:
    """1: the fused kernels (all of a chunk's work on the serial chain); 2: the two-pass kernels (depths 1 and 2).

    ``MEMORYCORE_NM_PASSES`` = ``auto`` (default) | ``1`` | ``2``. ``auto`` keeps the fused kernels, which are the
    ones timed on a GPU, except on a GPU where they do not fit its shared memory and the two-pass ones do (depth 1,
    float32, head dim 64, chunk 64 on an H100: the fused backward asks for 240 KB, the largest two-pass kernel for
    192 KB), so that such inputs run a kernel rather than the reference.
    """
    forced = os.environ.get("MEMORYCORE_NM_PASSES", "auto")
    if forced not in ("auto", "1", "2"):
        raise ValueError(f"MEMORYCORE_NM_PASSES={forced} must be auto, 1 (fused kernels) or 2 (two passes, depth 1 "
                         "or 2)")
    if depth not in TWO_PASS_KERNELS:
        return 1
    if forced != "auto":
        return int(forced)
    if not _on_gpu(q) or depth != 1:
        return 1
    tiles, limit = tile_sizes(q.shape[-1], q.shape[-1], chunk_size, 1, on_gpu=True), _shared_memory_limit(q.device)
    fused = _shared_memory_needed(q, tiles, FUSED_DEPTH1_KERNELS)
    return 2 if fused > limit >= _shared_memory_needed(q, tiles, [(name, 1) for name in TWO_PASS_KERNELS[1]]) else 1


def _on_gpu(q: Tensor) -> bool:
    return q.is_cuda


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fresh buffer the kernels fully overwrite (the tests swap in a NaN fill to catch reads of unwritten memory)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _is_tile_size(n: int) -> bool:
    """tl.dot needs power-of-two dimensions of at least 16."""
    return n >= 16 and n & (n - 1) == 0


def _tile(n: int, floor: int = 16) -> int:
    """The tile a dimension of ``n`` runs in: the next power of two, at least ``floor`` (tl.dot needs 16)."""
    return max(floor, 1 << (n - 1).bit_length())


# Beyond these the kernels are untested, and on an H100 their tiles outgrow shared memory even in 16 bits
# (PERFORMANCE.md, "Coverage"); deeper memories have no kernel.
MAX_DEPTH, MAX_HEAD_DIM, MAX_CHUNK = 3, 128, 256


def tile_sizes(head_dim: int, hidden: int, chunk_size: int, depth: int, on_gpu: bool) -> tuple[int, int, int]:
    """The (head dim, hidden width, chunk) the kernels run for a layer's shape, each padded up to a tile.

    The padding is exact: padded tokens have zero gates (they read and write nothing), padded features and hidden
    units have zero inputs and zero weights, which stay zero through every update, so they add nothing to any real
    output or gradient. It costs work in proportion (chunk 8 runs 16-token tiles: twice the arithmetic). On a GPU the
    depth-2 hidden width is padded to whole tiles of BLOCK_HIDDEN (narrower tiles were miscompiled by Triton 3.6).
    """
    hidden_floor = BLOCK_HIDDEN if on_gpu and depth == 2 else 16
    return _tile(head_dim), (_tile(hidden, hidden_floor) if depth > 1 else _tile(head_dim)), _tile(chunk_size)


def unsupported_reason(q: Tensor, weights: Weights, chunk_size: int) -> str | None:
    """Why these inputs cannot run on the Triton kernels (then the reference computes them), or None if they can."""
    depth, head_dim = len(weights), q.shape[-1]
    if q.dtype not in _MATMUL_DTYPES:
        return f"{q.dtype} inputs: the kernels compute in float32 at most (float64 stays exact on the reference)"
    if not 1 <= depth <= MAX_DEPTH:
        return f"memory depth {depth}: kernels exist for depth 1 to {MAX_DEPTH}"
    if head_dim > MAX_HEAD_DIM or chunk_size > MAX_CHUNK:
        return (f"head dim {head_dim} / chunk {chunk_size}: the kernels are tested up to head dim {MAX_HEAD_DIM} and "
                f"chunk {MAX_CHUNK}")
    if q.shape[2] == 0:
        return "an empty sequence"
    if _on_gpu(q):
        tiles = tile_sizes(head_dim, weights[0].shape[-1], chunk_size, depth, on_gpu=True)
        kernels = _kernels_for(q, depth, tiles)
        needed, limit = _shared_memory_needed(q, tiles, kernels), _shared_memory_limit(q.device)
        if needed > limit:
            return (f"the kernels for these tiles (head dim, hidden, chunk = {tiles}, {q.dtype}) need {needed} bytes "
                    f"of shared memory; this GPU has {limit}")
    return None


def kernel_supports(q: Tensor, weights: Weights, chunk_size: int) -> bool:
    """Whether these inputs run on the Triton kernels (otherwise the reference computes them)."""
    return unsupported_reason(q, weights, chunk_size) is None


def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (opt-in maximum per block), in bytes."""
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "shared_memory_per_block_optin", 232_448)


def _shared_memory_needed(q: Tensor, tiles: tuple[int, int, int], kernels) -> int:
    """The most shared memory any of ``kernels`` ((name, parts) pairs) asks for at these tiles, compiled for this
    GPU (cached)."""
    capability = torch.cuda.get_device_capability(q.device)
    head_dim, hidden, chunk = tiles
    return max(kernel_shared_memory(name, str(q.dtype).removeprefix("torch."), head_dim, hidden, chunk, parts,
                                    capability[0] * 10 + capability[1]) for name, parts in kernels)


def _kernels_for(q: Tensor, depth: int, tiles: tuple[int, int, int]) -> list[tuple[str, int]]:
    """(kernel name, parts) of every kernel one forward + backward launches."""
    head_dim, hidden, chunk = tiles
    if _passes(q, depth, chunk) == 2:
        return [(name, 1) for name in TWO_PASS_KERNELS[depth]]
    if depth == 2:
        parts, _ = _split(q.shape[0] * q.shape[1], hidden, q.device)
        return [("_forward_depth2_kernel", parts), ("_backward_depth2_kernel", parts)]
    return [(f"_forward_depth{depth}_kernel", 1), (f"_backward_depth{depth}_kernel", 1)]


@functools.lru_cache(maxsize=None)
def kernel_shared_memory(name: str, dtype: str, head_dim: int, hidden: int, chunk: int, parts: int,
                         capability: int) -> int:
    """Bytes of shared memory kernel ``name`` needs at these tiles, compiled for an NVIDIA GPU of ``capability``
    (e.g. 90 for an H100; no GPU needed). Compiled once per configuration and process."""
    from memorycore.kernels.compile import compilable, compile_for

    module = compilable(__name__)
    constants = kernel_constants(getattr(torch, dtype), head_dim, hidden, chunk, parts, interpreted=False)
    constants.update(PHASES=0b111 if name.startswith("_backward") else 0b011, SYNC=parts > 1)  # the GPU form
    compiled = compile_for(getattr(module, name), constants, _TYPE_NAMES[getattr(torch, dtype)], capability,
                           NUM_WARPS, NUM_STAGES)
    return int(compiled.metadata.shared)


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


def kernel_constants(dtype: torch.dtype, head_dim: int, hidden: int, chunk: int, parts: int = 1,
                     interpreted: bool | None = None) -> dict:
    """The compile-time constants of the kernels for inputs of ``dtype`` at these tile sizes (``interpreted``: for
    the Triton interpreter; by default, whether this process runs it)."""
    matmul_dtype = _MATMUL_DTYPES[dtype]
    if interpreted is None:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if matmul_dtype == tl.bfloat16 and interpreted:
        matmul_dtype = tl.float32  # the Triton interpreter (3.9) returns garbage for bf16 tl.dot; fp32 is exact there
    return dict(D=head_dim, CHUNK=chunk, MM=matmul_dtype, HIDDEN=hidden, PARTS=parts,
                BLOCK_HIDDEN=min(hidden // parts, BLOCK_HIDDEN))


def _launch_options(q: Tensor, state: tuple[Tensor, ...], chunk_size: int, parts: int = 1,
                    two_pass: bool = False) -> dict:
    """Constants and launch settings of the kernels for q and the (padded) state; only depth 2 uses the split."""
    hidden = state[0].shape[-1]
    options = kernel_constants(q.dtype, q.shape[-1], hidden, chunk_size, parts)
    if len(state) != 4 or two_pass:
        del options["PARTS"], options["BLOCK_HIDDEN"]
    if len(state) == 2:
        del options["HIDDEN"]
    return dict(options, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


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
    two_pass = _passes(q, len(state) // 2, chunk_size) == 2
    # inference ping-pongs between two slots; the two-pass kernels keep every boundary, as training does
    n_slots = n_chunks + 1 if keep_boundaries or two_pass else 2
    buffers = []
    for s in state:
        buffer = _empty((bh, n_slots, *s.shape[-2:]), torch.float32, q.device)
        buffer[:, 0] = s.reshape(bh, *s.shape[-2:])
        buffers.append(buffer)
    if two_pass:
        y = _empty(q.shape, q.dtype, q.device)
        keep, carry, coef, coef_last, ends, mcoef = gates
        options = _launch_options(q, state, chunk_size, two_pass=True)
        chain, outputs = (globals()[name] for name in TWO_PASS_KERNELS[len(state) // 2][:2])
        chain[(bh,)](k, v, coef_last, ends, mcoef, *buffers, time, n_chunks, **options)
        outputs[(bh, n_chunks)](q, k, v, y, keep, carry, coef, *buffers, time, n_chunks, **options)
    elif len(state) != 4:  # depth 1 or 3: one program per (batch, head)
        y = _empty(q.shape, q.dtype, q.device)
        kernel = _forward_depth1_kernel if len(state) == 2 else _forward_depth3_kernel
        kernel[(bh,)](q, k, v, y, *gates, *buffers, time, n_chunks, n_slots, **_launch_options(q, state, chunk_size))
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
    if _passes(q, len(buffers) // 2, chunk_size) == 2:
        return _backward_two_pass(q, k, v, dy, gates, buffers, d_state, chunk_size)
    if len(buffers) != 4:  # depth 1 or 3: one program per (batch, head)
        dq, dk, dv = (_empty(q.shape, q.dtype, q.device) for _ in range(3))
        d_gates = [_empty(g.shape, torch.float32, q.device) for g in gates]
        kernel = _backward_depth1_kernel if len(buffers) == 2 else _backward_depth3_kernel
        kernel[(bh,)](q, k, v, dy, dq, dk, dv, *gates, *d_gates, *buffers, *d_state, time, n_chunks,
                      **_launch_options(q, buffers, chunk_size))
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


def _backward_two_pass(q: Tensor, k: Tensor, v: Tensor, dy: Tensor, gates: tuple[Tensor, ...],
                       buffers: tuple[Tensor, ...], d_final: list[Tensor], chunk_size: int) -> tuple[Tensor, ...]:
    """The two-pass backward: local terms over every chunk, the state-gradient chain, the input gradients."""
    batch, heads, time, _ = q.shape
    bh, n_chunks = batch * heads, gates[0].shape[1]
    keep, carry, coef, coef_last, ends, mcoef = gates
    d_keep, d_carry, d_coef, d_coef_last, d_ends, d_mcoef = d_gates = [_empty(g.shape, torch.float32, q.device)
                                                                       for g in gates]
    dq, dk, dv = (_empty(q.shape, q.dtype, q.device) for _ in range(3))
    d_buffers = []  # slot c: G_c, then dS_c; slot n: the gradient of the final state
    for buffer, d in zip(buffers, d_final):
        d_buffer = _empty(buffer.shape, torch.float32, q.device)
        d_buffer[:, n_chunks] = d
        d_buffers.append(d_buffer)
    options = _launch_options(q, buffers, chunk_size, two_pass=True)
    _, _, local_grads, grad_chain, input_grads = (globals()[name] for name in TWO_PASS_KERNELS[len(buffers) // 2])
    local_grads[(bh, n_chunks)](q, k, v, dy, dq, keep, carry, coef, d_keep, d_carry, d_coef, *buffers, *d_buffers,
                                time, n_chunks, **options)
    # depth 1's state-gradient chain needs neither v nor the state (its update is linear in the state)
    chain_state = (k, coef_last, ends, mcoef) if len(buffers) == 2 else (k, v, coef_last, ends, mcoef, *buffers)
    grad_chain[(bh,)](*chain_state, *d_buffers, time, n_chunks, **options)
    input_grads[(bh, n_chunks)](q, k, v, dy, dk, dv, *gates, d_coef_last, d_ends, d_mcoef, *buffers, *d_buffers,
                                time, n_chunks, **options)
    d_initial = tuple(d[:, 0].reshape(batch, heads, *d.shape[-2:]) for d in d_buffers)
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
    depth, (batch, heads, time, head_dim) = len(weights), q.shape
    widths = [head_dim] + [weights[0].shape[-1]] * (depth - 1) + [head_dim]
    tile_dim, tile_hidden, tile_chunk = tile_sizes(head_dim, widths[1], chunk_size, depth, _on_gpu(q))
    tile_widths = [tile_dim] + [tile_hidden] * (depth - 1) + [tile_dim]
    q, k, v = (_pad_chunks(F.pad(x.to(q.dtype), (0, tile_dim - head_dim)), chunk_size, tile_chunk).contiguous()
               for x in (q, k, v))
    keep, carry, coef, coef_last, ends, momentum_coef = chunk_gates(lr, log_eta, log_keep, chunk_size)
    pad = tile_chunk - chunk_size  # padded tokens: zero gates, so they neither read nor write the memory
    gates = tuple(F.pad(g, (0, pad)) for g in (keep, carry)) + (F.pad(coef, (0, pad, 0, pad)),
                                                                 F.pad(coef_last, (0, pad)), ends,
                                                                 F.pad(momentum_coef, (0, pad)))
    state = tuple(F.pad(s, (0, o - s.shape[-1], 0, i - s.shape[-2]))
                  for s, i, o in zip(weights + momentum, tile_widths[:-1] * 2, tile_widths[1:] * 2))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *gates, *state)):
        y, *final = NeuralMemoryFunction.apply(tile_chunk, q, k, v, *gates, *state)
    else:
        y, final, _ = _forward(q, k, v, gates, state, tile_chunk, keep_boundaries=False)
    if tile_chunk != chunk_size:
        y = y.reshape(batch, heads, -1, tile_chunk, tile_dim)[:, :, :, :chunk_size].reshape(batch, heads, -1, tile_dim)
    y = y[:, :, :time, :head_dim]
    final = tuple(s[..., :i, :o] for s, i, o in zip(final, widths[:-1] * 2, widths[1:] * 2))
    return y, final[:depth], final[depth:]


def _pad_chunks(x: Tensor, chunk_size: int, tile_chunk: int) -> Tensor:
    """[b, h, t, d] -> [b, h, n * tile_chunk, d]: every chunk's tokens followed by zero rows up to a whole tile."""
    if tile_chunk == chunk_size:
        return x
    batch, heads, time, dim = x.shape
    n_chunks = -(-time // chunk_size)
    x = F.pad(x, (0, 0, 0, n_chunks * chunk_size - time)).reshape(batch, heads, n_chunks, chunk_size, dim)
    return F.pad(x, (0, 0, 0, tile_chunk - chunk_size)).reshape(batch, heads, n_chunks * tile_chunk, dim)
