"""Sliding-window attention: equals a masked dense reference, streams exactly, prunes per head."""

import math

import pytest
import torch

import memorycore.attention as attention_module
from memorycore import InputError
from memorycore.attention import KVCache, SlidingWindowAttention

DIM, HEADS, TIME = 32, 4, 23


def dense_reference(layer: SlidingWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out with a [time, time] mask: the ground truth for small inputs."""
    batch, time, _ = x.shape
    q = layer.to_q(x).view(batch, time, layer.heads, -1).transpose(1, 2)
    k, v = layer.to_kv(x).view(batch, time, 2, layer.kv_heads, -1).permute(2, 0, 3, 1, 4)
    positions = torch.arange(time)
    q_rotated = layer.rotary(q, positions) if layer.rotary is not None else q
    k = layer.rotary(k, positions) if layer.rotary is not None else k
    groups = layer.heads // layer.kv_heads
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q_rotated @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    distance = positions[:, None] - positions[None]
    allowed = (distance >= 0) & (distance < (layer.window or time + 1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    if layer.persistent is not None:  # position-free: scored against the unrotated queries
        persistent_k = layer.persistent[0].repeat_interleave(groups, 0)
        persistent_v = layer.persistent[1].repeat_interleave(groups, 0)
        scores = torch.cat([q @ persistent_k.transpose(-1, -2) / math.sqrt(layer.head_dim), scores], -1)
        v = torch.cat([persistent_v.expand(batch, -1, -1, -1), v], 2)
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, time, -1)
    return layer.to_out(y)


def make_layer(window, kv_heads=HEADS, persistent=0, rope=True):
    torch.manual_seed(0)
    return SlidingWindowAttention(DIM, heads=HEADS, window=window, kv_heads=kv_heads, rope=rope,
                                  persistent_tokens=persistent).double()


@pytest.mark.parametrize("window", [1, 5, TIME, 40, None], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("kv_heads", [4, 2], ids=lambda g: f"kv{g}")
@pytest.mark.parametrize("persistent", [0, 3], ids=lambda p: f"p{p}")
def test_equals_masked_dense_reference_whole_pieces_and_blocks(window, kv_heads, persistent, monkeypatch):
    layer = make_layer(window, kv_heads, persistent)
    x = torch.randn(2, TIME, DIM, dtype=torch.float64)
    expected = dense_reference(layer, x)
    whole, _ = layer(x)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-12)

    state, pieces = None, []
    for start, end in [(0, 5), (5, 6), (6, 17), (17, TIME)]:
        y, state = layer(x[:, start:end], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), expected, rtol=0, atol=1e-12)
    if window is not None:  # decoding keeps only what the next token can see: O(window)
        assert state.cache.capacity == min(window - 1, TIME)

    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 4)  # blocks of 4 queries, never a [time, time] mask
    blocked, _ = layer(x)
    torch.testing.assert_close(blocked, expected, rtol=0, atol=1e-12)


def test_window_at_least_time_equals_full_causal_attention():
    full, local = make_layer(None), make_layer(TIME)
    x = torch.randn(1, TIME, DIM, dtype=torch.float64)
    torch.testing.assert_close(local(x)[0], full(x)[0], rtol=0, atol=1e-12)


def test_persistent_tokens_reach_the_first_token_and_one_far_past_the_window():
    layer = make_layer(window=4, persistent=2)
    x = torch.randn(1, 64, DIM, dtype=torch.float64)
    before, _ = layer(x)
    with torch.no_grad():
        layer.persistent[1] += 1.0  # change the persistent values only
    after, _ = layer(x)
    assert (after[0, 0] - before[0, 0]).abs().max() > 1e-3
    assert (after[0, 63] - before[0, 63]).abs().max() > 1e-3


def test_persistent_scores_do_not_depend_on_position():
    """A query meets the persistent keys at the same score wherever it stands (they carry no position)."""
    layer = make_layer(window=1, persistent=2)  # window 1: a token sees itself and the persistent tokens only
    token = torch.randn(1, 1, DIM, dtype=torch.float64)
    first, _ = layer(token)
    _, state = layer(torch.randn(1, 300, DIM, dtype=torch.float64))
    later, _ = layer(token, state)
    torch.testing.assert_close(first, later, rtol=0, atol=1e-12)


def test_cache_keeps_per_head_lengths_and_decodes_as_a_masked_reference():
    layer = make_layer(None, kv_heads=2)
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    _, state = layer(x[:, :10])
    keep = torch.ones(1, 2, 10, dtype=torch.bool)
    keep[0, 0, [1, 4, 7]] = False  # head 0 forgets three tokens, head 1 none
    pruned = state.cache.keep(keep)
    assert pruned.lengths.tolist() == [[7, 10]] and pruned.capacity == 10
    assert pruned.positions[0, 0, :7].tolist() == [0, 2, 3, 5, 6, 8, 9]
    y, state = layer(x[:, 10:], state._replace(cache=pruned))
    assert state.cache.lengths.tolist() == [[9, 12]]

    # the same through the dense reference with those tokens' scores masked out for head 0's queries
    q = layer.to_q(x).view(1, 12, HEADS, -1).transpose(1, 2)
    k, v = layer.to_kv(x).view(1, 12, 2, 2, -1).permute(2, 0, 3, 1, 4)
    positions = torch.arange(12)
    q, k = layer.rotary(q, positions), layer.rotary(k, positions)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)).masked_fill(
        positions[:, None] < positions[None], float("-inf"))
    scores[:, :2, :, [1, 4, 7]] = float("-inf")  # query heads 0 and 1 share kv head 0
    expected = layer.to_out((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 12, -1))[:, 10:]
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_cache_extras_follow_appends_and_evictions():
    cache = KVCache.empty(1, 1, 2).append(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), torch.arange(3))
    cache = cache.with_extras(score=torch.tensor([[[1.0, 2.0, 3.0]]]))
    cache = cache.keep(torch.tensor([[[True, False, True]]]))
    cache = cache.append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.tensor([3]))
    assert cache.extras["score"].tolist() == [[[1.0, 3.0, 0.0]]]
    assert cache.positions.tolist() == [[[0, 2, 3]]]


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(InputError, match="window"):
        SlidingWindowAttention(DIM, heads=HEADS, window=0)
    with pytest.raises(InputError, match="divisible"):
        SlidingWindowAttention(30, heads=4, window=4)
    with pytest.raises(InputError, match="kv_heads"):
        SlidingWindowAttention(DIM, heads=4, kv_heads=3, window=4)
    layer = make_layer(4)
    _, state = layer(torch.randn(2, 5, DIM, dtype=torch.float64))
    with pytest.raises(InputError, match="state does not fit"):
        layer(torch.randn(3, 5, DIM, dtype=torch.float64), state)
