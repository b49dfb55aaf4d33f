"""RAM-Net sparse addressable memory in plain PyTorch: the ground truth for the Triton kernels.

Shapes (einops legend): b batch, h heads, t time, c chunk, k the K addressed slots of a token, m slots (M),
d value dim (d_v), u factors (U), p factor size (d_p).

Address decoder. A key is split into U parts of d_p logits; its address over M = d_p^U slots is the Kronecker
product of the U softmaxes, truncated to its K largest entries (no renormalisation). The top K come from a beam
merge in log space, factor by factor, so the M scores are never formed: O(U K^2 + U d_p log d_p) per token.

PDMA memory (per head). State: slot values S [m, d] and a normaliser z [m] (z_0 = 1/M). With write weights w_t
(K non-zero entries) and read weights r_t:

    S_t = Diag(1 - w_t)^gamma S_{t-1} + w_t^T v_t
    z_t = Diag(1 - w_t)^gamma z_{t-1} + w_t^T
    o_t = r_t Diag(z_t + eps)^{-1} S_t

Only the K addressed rows change per token. The decay (1 - w)^gamma uses ``1 - w`` floored at ``DECAY_FLOOR`` so the
log-domain chunk form stays finite (the difference is below DECAY_FLOOR^gamma), and its backward is the stable proxy
d/dw (PROXY_EPS + (1 - PROXY_EPS)(1 - w))^gamma, which stays bounded when w -> 1 and gamma < 1.

Exact chunk form. Inside a chunk, the value of slot j at token t is

    S_t[j] = D_j(0, t) S_0[j] + sum_{s <= t} w_s[j] D_j(s, t) v_s,
    D_j(s, t) = prod_{s < s' <= t} (1 - w_s'[j])^gamma

where only writes that address j contribute to D. Matching every read slot with every write slot of the chunk gives
a [c, c] read matrix and one matmul with the values; the end-of-chunk state is the same formula evaluated at the last
token for every written slot, scattered back once per slot. It equals the token-by-token recurrence exactly
(up to rounding): the tests check it.
"""

from __future__ import annotations

import torch
from torch import Tensor

DECAY_FLOOR = 1e-6
PROXY_EPS = 1e-3


def product_topk(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Exact top-K of the U-order product softmax, by a beam merge across factors.

    Parameters
    ----------
    logits : Tensor [..., u, p]
        Address logits, one row of d_p per factor.
    top_k : int
        K, how many slots to keep (at most d_p^U).

    Returns
    -------
    log_weight : Tensor [..., k]
        log of the K largest products of the factor softmaxes, in descending order (differentiable).
    slot : Tensor [..., k] int64
        Their slot indices, ``sum_u i_u d_p^(U-1-u)`` (factor 0 most significant, the order of ``kron``).
    """
    factors, factor_size = logits.shape[-2:]
    log_prob = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    # A slot in the global top K has each prefix in the top K of its prefixes (else K better slots exist), so
    # keeping K beams per factor and extending each by its factor's K best entries is exact.
    per_factor = min(top_k, factor_size)
    best, best_index = log_prob.topk(per_factor, dim=-1)  # [..., u, per_factor]
    beam, slot = best[..., 0, :], best_index[..., 0, :]
    for u in range(1, factors):
        candidates = (beam[..., :, None] + best[..., u, None, :]).flatten(-2)
        candidate_slots = (slot[..., :, None] * factor_size + best_index[..., u, None, :]).flatten(-2)
        beam, keep = candidates.topk(min(top_k, candidates.shape[-1]), dim=-1)
        slot = candidate_slots.gather(-1, keep)
    return beam, slot


def write_decay(weight: Tensor, gamma: float) -> Tensor:
    """(1 - w)^gamma in the forward pass, with the stable proxy derivative in the backward pass."""
    exact = (1 - weight.detach()).clamp_min(DECAY_FLOOR) ** gamma
    proxy = (PROXY_EPS + (1 - PROXY_EPS) * (1 - weight)) ** gamma
    return exact + (proxy - proxy.detach())


def log_write_decay(weight: Tensor, gamma: float) -> Tensor:
    """gamma log(1 - w), whose exp has the same value and the same (proxy) derivative as :func:`write_decay`."""
    exact = (1 - weight.detach()).clamp_min(DECAY_FLOOR) ** gamma
    proxy = (PROXY_EPS + (1 - PROXY_EPS) * (1 - weight)) ** gamma
    return gamma * torch.log((1 - weight.detach()).clamp_min(DECAY_FLOOR)) + (proxy - proxy.detach()) / exact


def _gather_rows(slots: Tensor, index: Tensor) -> Tensor:
    """slots [b, h, m, d], index [b, h, q] -> rows [b, h, q, d]."""
    return slots.gather(2, index[..., None].expand(*index.shape, slots.shape[-1]))


def pdma_step_reference(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    gamma: float,
    eps: float,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token of the PDMA recurrence: write, then read.

    Parameters
    ----------
    v : Tensor [b, h, d]
    write_index, read_index : Tensor [b, h, k] int64
        Slots addressed by the key and by the query (distinct within a token).
    write_weight, read_weight : Tensor [b, h, k]
    slots : Tensor [b, h, m, d]
    normaliser : Tensor [b, h, m]
    gamma, eps : float
    inplace : bool, default False
        Update ``slots`` and ``normaliser`` in place (inference: O(K d) work, no copy of the state).

    Returns
    -------
    out : Tensor [b, h, d]
    slots, normaliser : the state after the token.
    """
    decay = write_decay(write_weight, gamma)
    rows = decay[..., None] * _gather_rows(slots, write_index) + write_weight[..., None] * v[..., None, :]
    norms = decay * normaliser.gather(2, write_index) + write_weight
    row_index = write_index[..., None].expand_as(rows)
    if inplace:
        slots.scatter_(2, row_index, rows)
        normaliser.scatter_(2, write_index, norms)
    else:
        slots = slots.scatter(2, row_index, rows)
        normaliser = normaliser.scatter(2, write_index, norms)
    coef = read_weight / (normaliser.gather(2, read_index) + eps)
    out = (coef[..., None] * _gather_rows(slots, read_index)).sum(-2)
    return out, slots, normaliser


def pdma_recurrent_reference(
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
    """The token-by-token recurrence over a sequence (v [b, h, t, d], indices and weights [b, h, t, k])."""
    outputs = []
    for t in range(v.shape[2]):
        out, slots, normaliser = pdma_step_reference(
            v[:, :, t], write_index[:, :, t], write_weight[:, :, t], read_index[:, :, t], read_weight[:, :, t],
            slots, normaliser, gamma, eps,
        )
        outputs.append(out)
    return torch.stack(outputs, dim=2), slots, normaliser


def _slot_values_in_chunk(
    query_slot: Tensor,
    query_time: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    log_decay: Tensor,
    v: Tensor,
    slots: Tensor,
    normaliser: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """S_t[j] and z_t[j] for queries (t, j) inside a chunk that starts from ``slots`` / ``normaliser``.

    query_slot [b, h, q], query_time [q]; write_index / write_weight / log_decay [b, h, c, k]; v [b, h, c, d].
    Returns the values [b, h, q, d], the normalisers [b, h, q] and the chunk-start rows [b, h, q, d].
    """
    chunk = v.shape[2]
    causal = torch.arange(chunk, device=v.device)[None, :] <= query_time[:, None]  # [q, c]
    match = (write_index[:, :, None] == query_slot[..., None, None]) & causal[..., None]  # [b, h, q, c, k]
    match = match.to(v.dtype)
    slot_log_decay = (match * log_decay[:, :, None]).sum(-1)  # [b, h, q, c]: the decay written to j at time s
    slot_weight = (match * write_weight[:, :, None]).sum(-1)
    # Decay from s (exclusive) to t: a suffix sum over s' > s; entries after t are zero through the causal mask,
    # and a suffix sum (not a difference of prefix sums) never cancels large numbers.
    suffix = slot_log_decay.flip(-1).cumsum(-1).flip(-1)
    after = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)
    coef = slot_weight * torch.exp(after)  # [b, h, q, c]
    from_start = torch.exp(suffix[..., 0])  # [b, h, q]
    start_rows = _gather_rows(slots, query_slot)
    values = from_start[..., None] * start_rows + coef @ v
    norms = from_start * normaliser.gather(2, query_slot) + coef.sum(-1)
    return values, norms, start_rows


def pdma_chunk_reference(
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
    """One chunk of the exact chunk form (shapes as :func:`pdma_recurrent_reference`, t = the chunk's length)."""
    batch, heads, chunk, top_k = write_index.shape
    log_decay = log_write_decay(write_weight, gamma)
    times = torch.arange(chunk, device=v.device).repeat_interleave(top_k)  # the token of each (t, k) pair

    reads, read_norms, _ = _slot_values_in_chunk(
        read_index.flatten(2), times, write_index, write_weight, log_decay, v, slots, normaliser
    )
    coef = read_weight.flatten(2) / (read_norms + eps)
    out = (coef[..., None] * reads).view(batch, heads, chunk, top_k, -1).sum(3)

    # End of chunk: every written slot evaluated at the last token, scattered once per slot (by its last writer),
    # so no slot receives two updates and autograd sees each one once.
    written = write_index.flatten(2)
    later = (written[..., :, None] == written[..., None, :]) & (times[None, :] > times[:, None])
    is_last = (~later.any(-1)).to(v.dtype)  # [b, h, c k]
    last_time = torch.full_like(times, chunk - 1)
    ends, end_norms, start_rows = _slot_values_in_chunk(
        written, last_time, write_index, write_weight, log_decay, v, slots, normaliser
    )
    row_index = written[..., None].expand_as(ends)
    slots = slots.scatter_add(2, row_index, is_last[..., None] * (ends - start_rows))
    normaliser = normaliser.scatter_add(2, written, is_last * (end_norms - normaliser.gather(2, written)))
    return out, slots, normaliser


def pdma_chunked_reference(
    v: Tensor,
    write_index: Tensor,
    write_weight: Tensor,
    read_index: Tensor,
    read_weight: Tensor,
    slots: Tensor,
    normaliser: Tensor,
    gamma: float,
    eps: float,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor, Tensor]:
    """PDMA write/read over a sequence, chunk by chunk (exact; equal to :func:`pdma_recurrent_reference`).

    Parameters
    ----------
    v : Tensor [b, h, t, d]
    write_index, read_index : Tensor [b, h, t, k] int64
        Slots in [0, M) addressed by each token's key and query; distinct within a token.
    write_weight, read_weight : Tensor [b, h, t, k]
    slots : Tensor [b, h, m, d]
        S at the start of the sequence (not modified).
    normaliser : Tensor [b, h, m]
        z at the start of the sequence.
    gamma : float
        Forgetting exponent of the write (0 cumulative mean, 1 EMA, > 1 faster).
    eps : float
        Added to z before the division in the read.
    chunk_size : int, default 16
        Tokens processed together; memory grows as chunk_size^2 K^2 per (batch, head).

    Returns
    -------
    out : Tensor [b, h, t, d] (dtype of v)
    slots, normaliser : the state after the last token (float32, or float64 for float64 inputs).
    """
    out_dtype = v.dtype
    dtype = torch.promote_types(v.dtype, torch.float32)
    v, write_weight, read_weight = v.to(dtype), write_weight.to(dtype), read_weight.to(dtype)
    slots, normaliser = slots.to(dtype), normaliser.to(dtype)
    outputs = []
    for start in range(0, v.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        out, slots, normaliser = pdma_chunk_reference(
            v[:, :, part], write_index[:, :, part], write_weight[:, :, part],
            read_index[:, :, part], read_weight[:, :, part], slots, normaliser, gamma, eps,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=2).to(out_dtype), slots, normaliser
