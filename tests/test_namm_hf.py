"""Presses on a tiny randomly initialised Hugging Face Llama (nothing downloaded): our decode loop over pruned caches."""

import pytest
import torch

from memorycore import InputError
from memorycore.namm import H2OPress, HFSession, L2NormPress, NAMMPress, Press, generate

transformers = pytest.importorskip("transformers")


def tiny_llama(attention: str = "eager") -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation=attention)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_press_that_keeps_everything_matches_the_full_cache():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    press = NAMMPress(interval=8)  # untrained: every score is 0, all kept
    session = HFSession(model, press)
    torch.testing.assert_close(session.forward(ids), expected, rtol=1e-5, atol=1e-5)
    assert press.stats["layers.1"].applications == 5 and press.kept_fraction() == 1.0
    with press(model):  # the press of the `with` block is the one generate applies
        assert torch.equal(generate(model, ids, max_new_tokens=6), reference)


def test_the_session_fed_in_pieces_equals_one_forward():
    model = tiny_llama("sdpa")  # without a press any attention that takes a 4-D mask works
    ids = torch.randint(0, 64, (1, 30))
    session = HFSession(model)
    pieces = [session.forward(ids[:, :11]), session.forward(ids[:, 11:25], chunk_size=4)]
    pieces += [session.forward(ids[:, t:t + 1]) for t in range(25, 30)]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(ids).logits, rtol=1e-5, atol=1e-5)


class FixedPress(Press):
    """Evicts, per layer and kv head, the positions it is told."""

    def __init__(self, evicted: dict[tuple[str, int], set[int]], interval: int) -> None:
        super().__init__(interval=interval)
        self.evicted = evicted

    def compress(self, name, cache, attention, full_length=None):
        self.current = name
        return super().compress(name, cache, attention, full_length)

    def keep(self, cache, query_end, full_length):
        keep = torch.ones_like(cache.valid)
        for (name, head), positions in self.evicted.items():
            if name == self.current:
                for position in positions:
                    keep[:, head] &= cache.positions[:, head] != position
        return keep


def test_per_head_lengths_decode_as_a_full_forward_with_per_head_masks():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 20))
    evicted = {("layers.0", 0): {0, 3, 7, 8, 11}, ("layers.0", 1): {2}, ("layers.1", 1): {1, 4, 5, 6, 9, 10}}
    session = HFSession(model, FixedPress(evicted, interval=16))
    got = torch.cat([session.forward(ids[:, :16])[:, -1:]] + [session.forward(ids[:, t:t + 1]) for t in range(16, 20)],
                    dim=1)
    assert {name: lengths.tolist() for name, lengths in session.lengths().items()} == {
        "layers.0": [[15, 19]] * 2, "layers.1": [[20, 14]] * 2}
    # reference: one forward over the whole sequence, each layer masking what its heads evicted from query 15 on
    # (the eviction came after the 16th token's attention)
    handles = [attention.register_forward_pre_hook(_masker(index, evicted), with_kwargs=True)
               for index, attention in enumerate(m for m in model.modules() if hasattr(m, "num_key_value_groups"))]
    try:
        with torch.no_grad():
            expected = model(ids, attention_mask=torch.zeros(2, 1, 20, 20)).logits[:, 15:]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _masker(index: int, evicted: dict):
    def hook(module, args, kwargs):
        allowed = torch.ones(20, 20, dtype=torch.bool).tril().repeat(2, 4, 1, 1)
        for (name, kv_head), positions in evicted.items():
            if name == f"layers.{index}":
                for head in (2 * kv_head, 2 * kv_head + 1):
                    allowed[:, head, 16:, sorted(positions)] = False
        kwargs["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return args, kwargs
    return hook


@pytest.mark.parametrize("press", [H2OPress(0.25, interval=8), L2NormPress(0.25, interval=8)], ids=["h2o", "l2"])
def test_budget_presses_hold_the_cache_at_their_share_and_keep_the_newest(press):
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 30))
    tokens = generate(model, ids, max_new_tokens=10, press=press)
    assert tokens.shape == (1, 40)
    # 39 tokens were fed (the last one generated is not): the last eviction came at 32, ceil(0.25 * 32) = 8 per head
    assert all(s.after.tolist() == [[8, 8]] for s in press.stats.values())
    session = HFSession(model, press)
    session.forward(tokens[:, :32])
    for track in session.tracks.values():
        assert (track.positions[track.valid] == 31).sum() == 2  # once per kv head


def test_hugging_face_misuse_raises_input_errors():
    model = tiny_llama()
    with H2OPress(0.5)(model):
        with pytest.raises(InputError, match="through memorycore.namm.generate or HFSession"):
            model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
        assert generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2).shape == (1, 5)
    model(torch.zeros(1, 3, dtype=torch.long))  # the guard leaves with the press
    with pytest.raises(InputError, match="attn_implementation='eager'"):
        HFSession(tiny_llama("sdpa"), H2OPress(0.5))
    with pytest.raises(InputError, match="not a Hugging Face causal LM"):
        HFSession(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(tiny_llama(), torch.zeros(1, 3, dtype=torch.long), max_new_tokens=-1)
