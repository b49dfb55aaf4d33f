"""Presses on our attention models: brute-force choices, the newest token, full-cache equivalence, per-head lengths."""

import math

import pytest
import torch
from namm_helpers import Stack, run_in_pieces
from torch import nn

from memorycore import InputError
from memorycore.attention import KVCache, SlidingWindowAttention
from memorycore.namm import BAMScorer, H2OPress, L2NormPress, NAMMPress, Press, make_press
from memorycore.namm.press import H2O_ATTENTION


def hand_built_cache(lengths=(8, 6)) -> KVCache:
    """One batch element, two heads holding ``lengths`` entries at positions 0, 1, ... (padding after)."""
    capacity = max(lengths)
    valid = torch.tensor([[i < n for i in range(capacity)] for n in lengths]).view(1, len(lengths), capacity)
    positions = torch.arange(capacity).expand(1, len(lengths), capacity).clone()
    keys = torch.randn(1, len(lengths), capacity, 4)
    return KVCache(keys, torch.randn_like(keys), positions, valid)


def kept_positions(cache: KVCache) -> list[set[int]]:
    return [set(cache.positions[0, h][cache.valid[0, h]].tolist()) for h in range(cache.positions.shape[1])]


def test_h2o_keeps_the_recent_tokens_and_the_heaviest_hitters():
    cache = hand_built_cache((8, 6))
    attention = torch.rand(1, 2, 8, 8).masked_fill(~cache.valid[:, :, None], 0)
    press = H2OPress(0.5, recent=0.5, interval=8)
    pressed = press.compress("layer", cache, attention)
    for head, length in enumerate((8, 6)):
        received = attention[0, head].sum(0)[:length]
        recent = {length - 1, length - 2}  # ceil(0.5 * 8) = 4 kept, 2 of them recent
        heavy = sorted(set(range(length)) - recent, key=lambda p: -float(received[p]))[:2]
        assert kept_positions(pressed)[head] == recent | set(heavy)
    assert press.stats["layer"].before.tolist() == [[8, 6]] and press.stats["layer"].after.tolist() == [[4, 4]]
    # the statistics followed the kept entries
    kept = pressed.positions[0, 0][pressed.valid[0, 0]]
    torch.testing.assert_close(pressed.extras[H2O_ATTENTION][0, 0][pressed.valid[0, 0]], attention[0, 0].sum(0)[kept])


def test_h2o_accumulates_attention_over_calls():
    cache = hand_built_cache((4, 4))
    press = H2OPress(1.0, interval=100)
    first, second = torch.rand(1, 2, 3, 4), torch.rand(1, 2, 2, 4)
    cache = press.compress("layer", cache, first)
    cache = press.compress("layer", cache, second)
    torch.testing.assert_close(cache.extras[H2O_ATTENTION], first.sum(2) + second.sum(2))


def test_l2_keeps_the_lowest_norm_keys_and_the_newest():
    cache = hand_built_cache((8, 8))
    pressed = L2NormPress(compression_ratio=0.5, interval=8).compress("layer", cache, torch.zeros(1, 2, 1, 8))
    for head in range(2):
        norms = cache.keys[0, head].norm(dim=-1)
        lowest = sorted(range(7), key=lambda p: float(norms[p]))[:3]
        assert kept_positions(pressed)[head] == {7, *lowest}


@pytest.mark.parametrize("press", [H2OPress(0.01, recent=0.0, interval=4), L2NormPress(0.01, interval=4),
                                   NAMMPress(BAMScorer().load_vector(torch.cat([torch.zeros(3584),
                                                                                torch.tensor([-1.0])])),
                                             interval=4)], ids=["h2o", "l2", "namm"])
def test_the_newest_token_is_never_evicted(press):
    model = Stack(window=None)
    with press(model):
        _, states = run_in_pieces(model, torch.randn(2, 24, 16), 4)
    for state in states:  # NAMM scores everything -1; the budgets round to 1 token
        assert kept_positions_all(state.cache) == {23}


def kept_positions_all(cache: KVCache) -> set[int]:
    return set(cache.positions[cache.valid].tolist())


@pytest.mark.parametrize("window", [None, 12])
def test_a_press_that_keeps_everything_leaves_outputs_unchanged(window):
    model = Stack(window=window)
    x = torch.randn(2, 40, 16)
    expected, expected_states = run_in_pieces(model, x, 40)
    press = NAMMPress(interval=8)  # an untrained scorer scores every token 0: all kept
    with press(model):
        got, states = run_in_pieces(model, x, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [s.cache.lengths.tolist() for s in states] == [s.cache.lengths.tolist() for s in expected_states]
    assert press.stats["layers.0"].applications == 5 and press.kept_fraction() == 1.0
    assert all(layer.cache_hook is None for layer in model.layers)  # removed on exit


@pytest.mark.parametrize("variant", ["attention", "swa", "mag", "mac"])
def test_presses_apply_to_titans_models(variant):
    titans = pytest.importorskip("memorycore.titans")
    model = titans.TitansModel(16, 2, variant=variant, heads=2, window=16, persistent_tokens=2).eval()
    x = torch.randn(1, 48, 16)
    expected, _ = model(x)
    with NAMMPress(interval=16)(model):
        got, _ = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    press = H2OPress(0.25, interval=16)
    with press(model):
        state = None
        for piece in x.split(8, dim=1):
            _, state = model(piece, state)
    # what a layer holds without a press: every token, its window, or (MAC) a token and its retrieval per position
    full = {"attention": 48, "swa": 16, "mag": 16, "mac": 96}[variant]
    assert press.stats and all(s.after.tolist() == [[math.ceil(0.25 * full)] * 2] for s in press.stats.values())


def test_pressing_in_pieces_equals_pressing_at_once_at_the_same_eviction_points():
    model = Stack(window=None)
    x = torch.randn(1, 48, 16)
    results = []
    for piece in (16, 4, 1):
        press = H2OPress(0.5, interval=16)
        with press(model):
            y, states = run_in_pieces(model, x, piece)
        results.append((y, [kept_positions(s.cache) for s in states]))
    for y, kept in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-5, atol=1e-6)
        assert kept == results[0][1]


class FixedPress(Press):
    """Evicts, per head, the positions it is told (a stand-in scorer for exact decoding checks)."""

    def __init__(self, evicted: dict[int, set[int]], interval: int) -> None:
        super().__init__(interval=interval)
        self.evicted = evicted

    def keep(self, cache, query_end, full_length):
        keep = torch.ones_like(cache.valid)
        for head, positions in self.evicted.items():
            for position in positions:
                keep[:, head] &= cache.positions[:, head] != position
        return keep


def test_per_head_lengths_decode_as_attention_over_each_heads_tokens():
    torch.manual_seed(3)
    layer = SlidingWindowAttention(16, heads=4, kv_heads=2, window=None)
    x = torch.randn(1, 15, 16)
    evicted = {0: {1, 4, 5, 9}, 1: {0}}
    with FixedPress(evicted, interval=12)(layer):
        _, state = layer(x[:, :12])
        assert state.cache.lengths.tolist() == [[8, 11]]
        outputs = []
        for t in range(12, 15):
            y, state = layer(x[:, t:t + 1], state)
            outputs.append(y)
    got = torch.cat(outputs, dim=1)
    # the reference: plain softmax attention of each query head over the tokens its kv head kept
    q = layer.to_q(x).view(1, 15, 4, 4).transpose(1, 2)
    k, v = layer.to_kv(x).view(1, 15, 2, 2, 4).permute(2, 0, 3, 1, 4)
    positions = torch.arange(15)
    q, k = layer.rotary(q, positions), layer.rotary(k, positions)
    heads = []
    for head in range(4):
        kv_head = head // 2
        seen = [p for p in range(15) if p not in evicted.get(kv_head, set())]
        rows = []
        for t in range(12, 15):
            keys = [p for p in seen if p <= t]
            weights = torch.softmax(q[0, head, t] @ k[0, kv_head, keys].T / math.sqrt(4), dim=-1)
            rows.append(weights @ v[0, kv_head, keys])
        heads.append(torch.stack(rows))
    expected = layer.to_out(torch.stack(heads, dim=1).reshape(3, 16))[None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_raises_input_errors():
    with pytest.raises(InputError, match=r"budget must be the share of the cache to keep, in \(0, 1\]"):
        H2OPress(1.5)
    with pytest.raises(InputError, match="budget must be"):
        L2NormPress(0.0)
    with pytest.raises(InputError, match="compression_ratio must be"):
        L2NormPress(compression_ratio=1.0)
    with pytest.raises(InputError, match="either budget"):
        H2OPress(0.5, compression_ratio=0.5)
    with pytest.raises(InputError, match="unknown press 'snapkv'; pick one of full, h2o, l2"):
        make_press("snapkv", budget=0.5)
    with pytest.raises(InputError, match="needs a budget"):
        make_press("h2o")
    with pytest.raises(InputError, match="interval must be a positive integer"):
        H2OPress(0.5, interval=0)
    with pytest.raises(InputError, match="no attention cache"):
        with L2NormPress(0.5)(nn.Linear(2, 2)):
            pass
    model = Stack()
    with H2OPress(0.5)(model):
        with pytest.raises(InputError, match="another press is already applied"):
            with L2NormPress(0.5)(model):
                pass
    assert make_press("full") is None and isinstance(make_press("L2", budget=0.3), L2NormPress)
