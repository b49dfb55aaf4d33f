"""Titans architectures (MAC, MAG, MAL) and the baselines: causal, streamable, decodable, trainable."""

import math

import pytest
import torch
import torch.nn.functional as F

from memorycore import InputError, NeuralMemory
from memorycore.lm.model import TitansLM
from memorycore.tasks import answer_accuracy, needle_batch
from memorycore.titans import MemoryAsContext, TitansConfig, TitansModel

DIM, TIME, SEGMENT = 32, 24, 8
CASES = [(variant, "neural") for variant in ("mac", "mag", "mal", "lmm", "swa", "attention")] + [
    (variant, "ramnet") for variant in ("mac", "mag", "mal", "lmm")]
IDS = [f"{variant}-{memory}" for variant, memory in CASES]


def make_model(variant, memory="neural", depth=2):
    torch.manual_seed(0)
    return TitansModel(DIM, depth, variant=variant, memory=memory, heads=4, window=8, segment_len=SEGMENT,
                       memory_chunk=4, persistent_tokens=2).double()


def tolerance(memory):
    # RAM-Net keeps its slots in float32 whatever the model's dtype
    return 1e-3 if memory == "ramnet" else 1e-10


@pytest.mark.parametrize("variant, memory", CASES, ids=IDS)
def test_causal(variant, memory):
    model = make_model(variant, memory)
    x = torch.randn(2, TIME, DIM, dtype=torch.float64)
    y, _ = model(x)
    changed = x.clone()
    changed[:, 15] += 1.0
    y_changed, _ = model(changed)
    assert torch.equal(y_changed[:, :15], y[:, :15])
    assert (y_changed[:, 15:] - y[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant, memory", CASES, ids=IDS)
def test_pieces_and_token_by_token_equal_the_whole(variant, memory):
    model = make_model(variant, memory)
    x = torch.randn(2, TIME, DIM, dtype=torch.float64)
    whole, _ = model(x)
    cuts = [0, 8, 16, TIME] if variant == "mac" else [0, 5, 13, TIME]  # MAC: segment-aligned pieces
    state, pieces = None, []
    for start, end in zip(cuts, cuts[1:]):
        y, state = model(x[:, start:end], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=0, atol=tolerance(memory))

    state, tokens = None, []
    for t in range(TIME):
        y, state = model(x[:, t:t + 1], state)
        tokens.append(y)
    torch.testing.assert_close(torch.cat(tokens, 1), whole, rtol=0, atol=tolerance(memory))


def test_mac_equals_the_papers_equations_over_two_segments():
    """Per segment: h = M*(q) with the previous segment's memory; attention over [p | h | S] (h_j visible from
    token j on); write y into the memory; o = y * sigmoid(norm(M*(y)))."""
    torch.manual_seed(0)
    config = TitansConfig(dim=DIM, depth=1, variant="mac", heads=4, segment_len=SEGMENT, memory_chunk=4,
                          persistent_tokens=3)
    mac = MemoryAsContext(config).double()
    memory, attention = mac.memory.memory, mac.attention
    x = torch.randn(1, 2 * SEGMENT, DIM, dtype=torch.float64)

    expected, memory_state, read_conv = [], None, None
    for segment in x.split(SEGMENT, dim=1):
        h, read_conv = memory.read(segment, memory_state, read_conv)
        y = written_attention(attention, segment, h, len(expected) * SEGMENT)
        read_after_write, memory_state = memory(mac.write_norm(y), memory_state)
        expected.append(y * torch.sigmoid(mac.gate_norm(read_after_write)))

    y, _ = mac(x)
    torch.testing.assert_close(y, torch.cat(expected, 1), rtol=0, atol=1e-12)



def largest_mac_memory_weight(**options) -> float:
    """MAC's memory after 512 near-identical tokens (keys aligned within every chunk) with its gates at their
    extremes (the largest step, momentum 0.95, no forgetting) and tripled initial weights; inf when not finite."""
    torch.manual_seed(0)
    mac = MemoryAsContext(TitansConfig(dim=32, depth=1, variant="mac", heads=2, segment_len=16, memory_chunk=16,
                                       **options))
    memory = mac.memory.memory
    with torch.no_grad():
        gates = memory.to_gates.bias.view(3, 2)
        gates[0].fill_(10.0), gates[1].fill_(3.0), gates[2].fill_(-10.0)
        for weight in memory.initial_weights:
            weight.mul_(3.0)
        x = torch.randn(1, 1, 32) + 0.1 * torch.randn(1, 512, 32)
        y, state = mac(x)
    largest = max(w.abs().max().item() for w in state.write.committed.weights)
    return largest if torch.isfinite(y).all() and largest == largest else float("inf")


def test_mac_memory_stays_bounded_where_the_usual_step_bound_runs_away():
    """MAC writes its attention outputs, which turn alike within a segment: a chunk's gradients then add up in one
    direction, and at NeuralMemory's usual bound (1 / chunk per token) a deep memory's weights ran away (to 1e12
    within one 64-token sequence of a needle task). MAC's default is a quarter of that bound."""
    assert largest_mac_memory_weight() < 10
    assert largest_mac_memory_weight(memory_max_lr=1 / 16) > 1e6

    def neural_memory(variant, **options):
        model = TitansModel(32, 1, variant=variant, heads=2, segment_len=16, memory_chunk=16, **options)
        return next(module for module in model.modules() if isinstance(module, NeuralMemory))

    assert neural_memory("mac").max_lr == 1 / 64 and neural_memory("mag").max_lr == 1 / 16
    chosen = neural_memory("mac", memory_max_lr=0.2, memory_value_norm=True)
    assert chosen.max_lr == 0.2 and chosen.value_norm


def written_attention(attention, segment, retrieved, offset):
    """Softmax attention of the segment's queries over [persistent | h | segment], masks written out."""
    time, head_dim = segment.shape[1], attention.head_dim
    positions = torch.arange(offset, offset + time)

    def heads(t, width):
        return t.view(1, time, -1, head_dim).transpose(1, 2)[:, :width]

    q = heads(attention.to_q(segment), attention.heads)
    k, v = attention.to_kv(segment).chunk(2, dim=-1)
    h_k, h_v = attention.to_kv(retrieved).chunk(2, dim=-1)
    k, v, h_k, h_v = (heads(t, attention.kv_heads) for t in (k, v, h_k, h_v))
    q_rot = attention.rotary(q, positions)
    keys = torch.cat([attention.rotary(h_k, positions), attention.rotary(k, positions)], 2)
    scores = q_rot @ keys.transpose(-1, -2) / math.sqrt(head_dim)
    causal = positions[:, None] >= positions[None]
    scores = scores.masked_fill(~torch.cat([causal, causal], 1), float("-inf"))
    persistent_scores = q @ attention.persistent[0].transpose(-1, -2) / math.sqrt(head_dim)
    weights = torch.cat([persistent_scores, scores], -1).softmax(-1)
    values = torch.cat([attention.persistent[1].unsqueeze(0), h_v, v], 2)
    return attention.to_out((weights @ values).transpose(1, 2).reshape(1, time, -1))


@pytest.mark.parametrize("variant, memory", CASES, ids=IDS)
def test_every_parameter_gets_a_gradient(variant, memory):
    model = make_model(variant, memory).float()
    y, _ = model(torch.randn(2, 2 * SEGMENT, DIM))
    y.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_a_tiny_needle_task_learns_well_above_chance():
    torch.manual_seed(0)
    lm = TitansLM(32, TitansConfig(dim=32, depth=1, variant="mag", heads=2, window=32, memory_chunk=8))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        inputs, labels = needle_batch(16, 16, value_len=1, vocab_size=32, random_state=generator)
        loss = F.cross_entropy(lm(inputs)[0].flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs, labels = needle_batch(64, 16, value_len=1, vocab_size=32, random_state=1)
    with torch.no_grad():
        accuracy = answer_accuracy(lm(inputs)[0], labels)
    assert accuracy > 0.5  # chance: 1 / 16


@pytest.mark.parametrize("options, match", [
    ({"window": 0}, "window"), ({"segment_len": 0}, "segment_len"), ({"variant": "gru"}, "unknown variant"),
    ({"memory": "lstm"}, "unknown memory"), ({"heads": 5}, "divisible"),
    ({"segment_len": 6, "memory_chunk": 4}, "multiple of memory_chunk"), ({"dropout": 1.5}, "dropout"),
    ({"variant": "mac", "memory_max_lr": 0.0}, "max_lr"), ({"memory_forgetting": 1.5}, "initial_forgetting"),
])
def test_bad_arguments_say_what_to_fix(options, match):
    with pytest.raises(InputError, match=match):
        TitansModel(DIM, 1, **options)


def test_a_state_of_another_model_is_refused():
    _, state = make_model("mag", depth=1)(torch.randn(1, 4, DIM, dtype=torch.float64))
    with pytest.raises(InputError, match="state does not fit"):
        make_model("mag", depth=2)(torch.randn(1, 4, DIM, dtype=torch.float64), state)
