"""Chunk-wise Titans neural memory in plain PyTorch: the ground truth for the Triton kernels.

Shapes (einops legend): b batch, h heads, t time, c chunk, d head dim, i/o a memory layer's input/output dims.

The memory of each (batch, head) is an MLP ``M(x) = silu(...silu(x W_1)...) W_L`` (no biases; depth L = 1 is linear
memory). Per token t the paper's recurrence (Titans, Eq. 13-14) is

    S_t = eta_t S_{t-1} - theta_t grad ||M_{t-1}(k_t) - v_t||^2
    M_t = (1 - alpha_t) M_{t-1} + S_t
    y_t = M_t(q_t)

Chunk-wise parallel form (paper section 3.2): inside a chunk every gradient is taken at the chunk's start weights
W (momentum S). With P and B the running products of eta and (1 - alpha) over the chunk, unrolling gives

    W_t = B_t W + c_t S - sum_{i<=t} coef[t, i] g_i
    c_t = sum_{s<=t} (B_t / B_s) P_s
    coef[t, i] = theta_i sum_{i<=s<=t} (B_t / B_s) (P_s / P_i)

Each g_i is an outer product a_i^T delta_i (layer input times backpropagated error, computed here in closed form, no
autograd), so both the end-of-chunk weights and the per-token retrieval ``M_t(q_t)`` are matmuls: for a layer input
h_t of the query, ``h_t W_t = B_t h_t W + c_t h_t S - sum_i coef[t, i] (h_t . a_i) delta_i``, an attention-like product
with the causal mask folded into ``coef``. All products of gates are formed in log space (segment sums), so no ratio
ever divides by a small number. With chunk_size = 1 this is exactly the token-by-token recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Weights = tuple[Tensor, ...]


def silu_derivative(z: Tensor) -> Tensor:
    """d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def segment_sum(log_gate: Tensor) -> Tensor:
    """``out[..., t, s] = sum_{s < j <= t} log_gate[..., j]`` for s <= t, and -inf above the diagonal.

    Built by a masked cumulative sum rather than a difference of cumulative sums, so gates of exactly zero
    (log = -inf, e.g. momentum switched off) give 0 after ``exp`` instead of ``-inf - -inf = nan``.
    """
    c = log_gate.shape[-1]
    x = log_gate[..., :, None].expand(*log_gate.shape, c)  # x[..., j, s] = log_gate[j]
    strictly_lower = torch.ones(c, c, dtype=torch.bool, device=log_gate.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = x.cumsum(dim=-2)  # out[t, s] = sum_{s < j <= t}
    lower = torch.ones(c, c, dtype=torch.bool, device=log_gate.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def mlp_forward(x: Tensor, weights: Weights) -> tuple[list[Tensor], list[Tensor]]:
    """Run the memory MLP; return every layer's input and every layer's pre-activation output."""
    inputs, pre_activations = [], []
    h = x
    for layer, w in enumerate(weights):
        inputs.append(h)
        z = h @ w
        pre_activations.append(z)
        if layer < len(weights) - 1:
            h = F.silu(z)
    return inputs, pre_activations


def mlp_backward(pre_activations: list[Tensor], weights: Weights, output_grad: Tensor) -> list[Tensor]:
    """Backpropagate ``output_grad`` through the MLP; return d loss / d (each layer's output)."""
    deltas = [output_grad]
    for layer in range(len(weights) - 1, 0, -1):
        delta = (deltas[0] @ weights[layer].transpose(-1, -2)) * silu_derivative(pre_activations[layer - 1])
        deltas.insert(0, delta)
    return deltas


def chunk_coefficients(lr: Tensor, log_eta: Tensor, log_keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gate products of one chunk.

    Returns
    -------
    keep_cum : [..., c]      B_t, the decay applied to the chunk-start weights at token t
    carry : [..., c]         c_t, the weight of the chunk-start momentum in W_t
    coef : [..., c, c]       coef[t, i], the weight of gradient g_i in W_t (zero for i > t)
    eta_cum_last : [...]     P_C, the decay of the chunk-start momentum at the chunk's end
    momentum_coef : [..., c] theta_i P_C / P_i, the weight of g_i in the end-of-chunk momentum
    """
    decay = torch.exp(segment_sum(log_keep))  # [t, s] = B_t / B_s
    eta_path = torch.exp(segment_sum(log_eta))  # [s, i] = P_s / P_i
    keep_cum = torch.exp(log_keep.cumsum(-1))
    eta_cum = torch.exp(log_eta.cumsum(-1))
    carry = (decay @ eta_cum[..., None]).squeeze(-1)
    coef = (decay @ eta_path) * lr[..., None, :]
    momentum_coef = eta_path[..., -1, :] * lr
    return keep_cum, carry, coef, eta_cum[..., -1], momentum_coef


def memory_chunk(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, log_eta: Tensor, log_keep: Tensor, weights: Weights, momentum: Weights
) -> tuple[Tensor, Weights, Weights]:
    """Update the memory with one chunk and retrieve every query with the weights of its own time step."""
    key_inputs, key_pre = mlp_forward(k, weights)
    output_grad = 2.0 * (key_pre[-1] - v)  # d ||M(k) - v||^2 / d M(k)
    deltas = mlp_backward(key_pre, weights, output_grad)
    keep_cum, carry, coef, eta_last, momentum_coef = chunk_coefficients(lr, log_eta, log_keep)

    h = q
    for layer, (w, s) in enumerate(zip(weights, momentum)):
        scores = (h @ key_inputs[layer].transpose(-1, -2)) * coef
        z = keep_cum[..., None] * (h @ w) + carry[..., None] * (h @ s) - scores @ deltas[layer]
        h = F.silu(z) if layer < len(weights) - 1 else z

    last_coef = coef[..., -1, :, None]
    new_weights = tuple(
        keep_cum[..., -1, None, None] * w + carry[..., -1, None, None] * s - a.transpose(-1, -2) @ (last_coef * g)
        for w, s, a, g in zip(weights, momentum, key_inputs, deltas)
    )
    new_momentum = tuple(
        eta_last[..., None, None] * s - a.transpose(-1, -2) @ (momentum_coef[..., None] * g)
        for s, a, g in zip(momentum, key_inputs, deltas)
    )
    return h, new_weights, new_momentum


def neural_memory_reference(
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
    """Chunk-wise memory update and causal retrieval over a whole sequence.

    Parameters
    ----------
    q, k, v : Tensor [b, h, t, d]
        Queries, keys (both usually L2-normalised) and values.
    lr : Tensor [b, h, t]
        theta_t, the inner learning rate of each token.
    log_eta : Tensor [b, h, t]
        log of the momentum gate eta_t (``-inf`` switches momentum off).
    log_keep : Tensor [b, h, t]
        log(1 - alpha_t), the weight-decay gate (0 switches decay off).
    weights, momentum : tuple of Tensor [b, h, i, o]
        The memory MLP's weights and momentum at the start of the sequence.
    chunk_size : int
        Tokens per chunk; gradients inside a chunk are taken at the chunk's start weights.

    Returns
    -------
    y : Tensor [b, h, t, d]
        ``M_t(q_t)`` in the dtype of ``q``.
    weights, momentum : tuple of Tensor
        The state after the last token, in float32 (float64 for float64 inputs).
    """
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, lr, log_eta, log_keep = (x.to(dtype) for x in (q, k, v, lr, log_eta, log_keep))
    weights = tuple(w.to(dtype) for w in weights)
    momentum = tuple(s.to(dtype) for s in momentum)
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        chunk = slice(start, start + chunk_size)
        y, weights, momentum = memory_chunk(
            q[:, :, chunk], k[:, :, chunk], v[:, :, chunk],
            lr[:, :, chunk], log_eta[:, :, chunk], log_keep[:, :, chunk],
            weights, momentum,
        )
        outputs.append(y)
    return torch.cat(outputs, dim=2).to(out_dtype), weights, momentum
