"""RAMNet layer: state contract (pieces == whole, chunked == token-by-token), CAPE, gradients, bad arguments."""

import math
import pickle

import pytest
import torch

from memorycore.kernels.ramnet.reference import pdma_recurrent_reference
from memorycore import InputError, RAMNet, RAMNetState
from memorycore.ramnet import slot_imbalance


def small_layer(**overrides) -> RAMNet:
    settings = dict(heads=2, factors=3, factor_size=4, top_k=5, chunk_size=4)
    settings.update(overrides)
    return RAMNet(32, **settings)


def test_shapes_and_state():
    layer = small_layer(value_dim=6)
    y, state = layer(torch.randn(3, 10, 32))
    assert y.shape == (3, 10, 32)
    assert isinstance(state, RAMNetState)
    assert state.slots.shape == (3, 2, 64, 6) and state.normaliser.shape == (3, 2, 64)
    assert state.position == 10
    assert layer.state_size() == {"total": 2 * 64 * 7, "per_token": 2 * 2 * 5 * 7}


@pytest.mark.parametrize("cape,conv_kernel,gamma", [(True, 4, 1.0), (False, 0, 0.5), (True, 1, 2.0)],
                         ids=lambda v: str(v))
def test_pieces_equal_whole(cape, conv_kernel, gamma):
    layer = small_layer(cape=cape, conv_kernel=conv_kernel, gamma=gamma)
    x = torch.randn(2, 15, 32)
    whole, whole_state = layer(x)
    state, pieces = None, []
    for part in (x[:, :6], x[:, 6:7], x[:, 7:]):  # lengths that do not align with chunk_size
        y, state = layer(part, state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    torch.testing.assert_close(state.slots, whole_state.slots)
    torch.testing.assert_close(state.normaliser, whole_state.normaliser)
    assert state.position == whole_state.position == 15


@pytest.mark.parametrize("factors", [3, 6], ids=["state-built", "state-kept-as-rows"])
def test_streamed_pieces_equal_whole_in_values_and_gradients(factors):
    """With few slots the carried state gets built between pieces; with many it stays as touched rows (merged from
    call to call). Either way the outputs, the final state and every gradient equal one call on the whole (without
    the slot-balance regulariser, which each call computes over its own tokens)."""
    layer = small_layer(factors=factors, balance=0.0)
    x = torch.randn(2, 17, 32, requires_grad=True)
    whole, whole_state = layer(x)
    state, pieces = None, []
    for part in (x[:, :6], x[:, 6:7], x[:, 7:12], x[:, 12:]):
        y, state = layer(part, state)
        pieces.append(y)
    if factors == 6:  # 4096 slots: three calls touch at most 2 * 17 * 5 rows per head, so nothing was built
        assert state._touched is not None and state._touched.base_slots is None
    streamed = torch.cat(pieces, 1)
    torch.testing.assert_close(streamed, whole)
    cotangent, state_cotangent = torch.randn_like(whole), torch.randn_like(whole_state.slots)
    grads = [torch.autograd.grad((out * cotangent).sum() + (final.slots * state_cotangent).sum(),
                                 [x, *layer.parameters()])
             for out, final in ((streamed, state), (whole, whole_state))]
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(state.normaliser, whole_state.normaliser)


def test_streaming_a_huge_memory_builds_nothing_of_its_size():
    layer = RAMNet(32, heads=2, factors=10, factor_size=4, top_k=4)  # 2^20 slots per head: 128 MB if built
    state = None
    for _ in range(3):
        _, state = layer(torch.randn(1, 16, 32), state)
    touched = state._touched
    assert touched.base_slots is None and touched.rows.shape[2] <= 3 * 2 * 16 * 4


def test_chunked_forward_equals_token_by_token_steps():
    layer = small_layer()
    x = torch.randn(2, 13, 32)
    y, final = layer(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y)
    torch.testing.assert_close(state.slots, final.slots)
    assert state.position == 13


def test_result_does_not_depend_on_chunk_size():
    layer = small_layer(chunk_size=1)
    x = torch.randn(2, 11, 32)
    expected, _ = layer(x)
    layer.chunk_size = 8
    torch.testing.assert_close(layer(x)[0], expected)


def test_forward_does_not_modify_the_given_state_but_step_does():
    layer = small_layer()
    _, state = layer(torch.randn(1, 5, 32))
    before = state.slots.clone()
    layer(torch.randn(1, 3, 32), state)
    assert torch.equal(state.slots, before)
    _, stepped = layer.step(torch.randn(1, 32), state)
    assert stepped.slots is state.slots and not torch.equal(state.slots, before)


@pytest.mark.parametrize("from_state", [False, True], ids=["empty", "given"])
def test_full_state_is_built_only_when_read_and_equals_the_recurrence(from_state):
    """Training that ignores the state must not allocate O(slots); reading it gives the same values and gradients."""
    layer = small_layer()
    x = torch.randn(2, 9, 32, requires_grad=True)
    start = layer.initial_state(2)
    if from_state:
        start = RAMNetState(torch.randn_like(start.slots), torch.rand_like(start.normaliser) + 0.1, start.conv, 0)
    y, state = layer(x, start if from_state else None)
    assert state._slots is None and state.memory_shape() == (2, 2, 64, 16)  # nothing of O(slots) built yet
    assert state.detach()._slots is None
    read_index, read_weight, write_index, write_weight, v, _ = layer._addresses(x, start)
    expected = pdma_recurrent_reference(v, write_index, write_weight, read_index, read_weight, start.slots,
                                        start.normaliser, layer.gamma, layer.eps)
    torch.testing.assert_close(state.slots, expected[1])
    torch.testing.assert_close(state.normaliser, expected[2])
    torch.testing.assert_close(state.detach().slots, expected[1])
    cotangent = torch.randn_like(expected[1])
    (actual_grad,) = torch.autograd.grad((state.slots * cotangent).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected[1] * cotangent).sum(), x)
    torch.testing.assert_close(actual_grad, expected_grad)


def dense(slot: torch.Tensor, weight: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.zeros(*slot.shape[:-1], slots, dtype=weight.dtype).scatter(-1, slot, weight)


def addresses_at(layer: RAMNet, x: torch.Tensor, position: int) -> dict:
    """The layer's addresses of ``x`` as if the sequence had reached ``position`` (same convolution history)."""
    state = layer.initial_state(x.shape[0])
    state.position = position
    return layer.addresses(x, state)


def overlaps(layer: RAMNet, x: torch.Tensor, start: int) -> torch.Tensor:
    """<r_t, w_t'> for every read time t and write time t' when the sequence starts at ``start``."""
    found = addresses_at(layer, x, start)
    read = dense(found["read_slots"], found["read_weights"], layer.slots)
    write = dense(found["write_slots"], found["write_weights"], layer.slots)
    return read @ write.transpose(-1, -2)  # [b, h, t, t']


def test_cape_gives_relative_addressing():
    layer = small_layer(cape=True)
    x = torch.randn(1, 6, 32)
    torch.testing.assert_close(overlaps(layer, x, 0), overlaps(layer, x, 37))
    # the same key written at two times lands on shifted slots: addresses are relative, not absolute
    slot_at_0 = addresses_at(layer, x[:, :1], 0)["write_slots"]
    slot_at_5 = addresses_at(layer, x[:, :1], 5)["write_slots"]
    assert torch.equal(torch.remainder(slot_at_0 - 5, layer.slots), slot_at_5)
    # a constant input's query and key overlap by a function of t - t' only (a Toeplitz matrix); the convolution
    # sees a constant history once its kernel is full, so the first tokens are left out
    constant = x[:, :1].expand(1, 12, 32)
    same = overlaps(layer, constant, 3)[..., 4:, 4:]
    for lag in range(-5, 6):
        diagonal = torch.diagonal(same, offset=lag, dim1=-2, dim2=-1)
        torch.testing.assert_close(diagonal, diagonal[..., :1].expand_as(diagonal))


def test_without_cape_the_same_key_addresses_the_same_slots():
    layer = small_layer(cape=False)
    x = torch.randn(1, 1, 32)
    assert torch.equal(addresses_at(layer, x, 0)["write_slots"], addresses_at(layer, x, 11)["write_slots"])


def test_gradients_reach_every_parameter():
    layer = small_layer()
    y, _ = layer(torch.randn(2, 9, 32))
    y.square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_state_detach_and_pickle():
    layer = small_layer()
    _, state = layer(torch.randn(1, 4, 32, requires_grad=True))
    assert state.slots.requires_grad and not state.detach().slots.requires_grad
    restored = pickle.loads(pickle.dumps(layer))
    x = torch.randn(1, 6, 32)
    torch.testing.assert_close(restored(x)[0], layer(x)[0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(heads=3), "divisible by heads"),
    (dict(factor_size=1), "factor_size"),
    (dict(top_k=65), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(gamma=-0.5), "gamma"),
    (dict(factors=40, factor_size=4), "slots"),
    (dict(conv_kernel=-1), "conv_kernel"),
    (dict(eps=0.0), "eps"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(balance=-0.1), "balance"),
    (dict(balance=float("nan")), "balance"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
], ids=lambda v: str(v))
def test_bad_arguments_raise_value_error(kwargs, message):
    settings = dict(heads=2, factors=3, factor_size=4, top_k=5)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RAMNet(32, **settings)


def test_bad_inputs_raise_input_error():
    layer = small_layer()
    with pytest.raises(InputError, match=r"\[batch, time, 32\]"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(InputError, match="empty"):
        layer(torch.randn(2, 0, 32))
    _, state = layer(torch.randn(2, 3, 32))
    with pytest.raises(InputError, match="state does not fit"):
        layer(torch.randn(3, 3, 32), state)
    with pytest.raises(InputError, match="one token"):
        layer.step(torch.randn(2, 3, 32), state)
    with pytest.raises(InputError, match="the batch is empty"):
        layer(torch.randn(0, 3, 32))
    with pytest.raises(InputError, match="the batch is empty"):
        layer.step(torch.randn(0, 32))


def test_layer_on_the_triton_backend_matches_the_reference(monkeypatch):
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run Triton kernels on CPU")
    layer = small_layer()
    x = torch.randn(2, 7, 32)
    expected, expected_state = layer(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    monkeypatch.setenv("MEMORYCORE_BACKEND", "triton")
    actual, state = layer(x)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.slots, expected_state.slots, rtol=1e-4, atol=1e-5)
    for a, e in zip((p.grad for p in layer.parameters()), expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    y_step, _ = layer.step(x[:, 0])
    torch.testing.assert_close(y_step, expected[:, 0], rtol=1e-4, atol=1e-5)


def test_explicit_initial_state_equals_none():
    layer = small_layer()
    x = torch.randn(2, 9, 32)
    expected, expected_state = layer(x)
    actual, state = layer(x, layer.initial_state(2))
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(state.slots, expected_state.slots)
    torch.testing.assert_close(state.normaliser, expected_state.normaliser)


def test_addresses_tell_which_reads_find_a_written_slot():
    """A token whose read slots miss every slot written so far reads zeros; one that hits reads something."""
    torch.manual_seed(0)
    layer = small_layer(cape=False, top_k=2)  # 64 slots, 2 per token: both outcomes occur in 16 tokens
    with torch.no_grad():
        layer.to_out.weight.copy_(torch.eye(32))  # y = the heads' reads side by side
    x = torch.randn(3, 16, 32)
    found = layer.addresses(x)
    assert all(t.shape == (3, 2, 16, 2) for t in found.values())
    assert found["read_slots"].dtype == torch.int64 and (found["write_weights"] <= 1).all()
    written = torch.zeros(3, 2, 16, layer.slots).scatter_(-1, found["write_slots"], 1.0).cummax(dim=2).values
    hit = written.gather(-1, found["read_slots"]).amax(-1).bool()  # [batch, heads, time]
    reads = layer(x)[0].view(3, 16, 2, 16).transpose(1, 2).norm(dim=-1)  # [batch, heads, time]
    assert hit.any() and not hit.all()
    assert (reads[~hit] == 0).all() and (reads[hit] > 0).all()


def test_slot_imbalance_is_zero_for_even_use_and_largest_when_one_slot_takes_all():
    sharp = 50 * torch.eye(4).repeat(1, 3).view(4, 3, 4)  # token i picks index i in every factor
    even = sharp[None, None]  # [batch 1, heads 1, time 4, factors 3, factor_size 4]
    torch.testing.assert_close(slot_imbalance(even), torch.tensor(0.0))
    same = sharp[:1].expand(4, 3, 4)[None, None]  # every token picks index 0
    torch.testing.assert_close(slot_imbalance(same), torch.tensor(3.0))
    torch.testing.assert_close(slot_imbalance(torch.zeros(2, 1, 5, 3, 4)), torch.tensor(0.0))  # all soft: even too


def test_balance_adds_the_penalty_gradient_and_leaves_the_output_alone():
    """Training with balance b gives the gradients of loss + b/2 (imbalance(q) + imbalance(k)), the same output, and
    nothing at all in eval mode."""
    torch.manual_seed(0)
    layer, plain = small_layer(balance=0.4), small_layer(balance=0.0)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, 32)
    y, _ = layer(x)
    y_plain, _ = plain(x)
    torch.testing.assert_close(y, y_plain)
    cotangent = torch.randn_like(y)
    actual = torch.autograd.grad((y * cotangent).sum(), list(layer.parameters()))
    qkv, _ = plain.qkv_conv(plain.to_qkv(x))
    q, k, _ = qkv.view(2, 9, 2, -1).transpose(1, 2).split([plain.key_dim, plain.key_dim, plain.value_dim], -1)
    temperature = plain.log_temperature.exp()[:, None, None, None]
    penalty = sum(slot_imbalance(a.reshape(2, 2, 9, 3, 4) * temperature) for a in (q, k))
    expected = torch.autograd.grad((y_plain * cotangent).sum() + 0.2 * penalty, list(plain.parameters()))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    (without,) = torch.autograd.grad((plain(x)[0] * cotangent).sum(), plain.to_qkv.weight)
    assert not torch.allclose(dict(zip(dict(layer.named_parameters()), actual))["to_qkv.weight"], without)
    layer.eval()
    evaluated = torch.autograd.grad((layer(x)[0] * cotangent).sum(), list(layer.parameters()))
    for a, e in zip(evaluated, torch.autograd.grad((plain.eval()(x)[0] * cotangent).sum(), list(plain.parameters()))):
        torch.testing.assert_close(a, e)


def test_balance_is_off_by_default():
    """The paper's layer unless asked: at d_model 128 the balance kept MQAR from learning (see RAMNet's Notes)."""
    assert small_layer().balance == small_layer(cape=False).balance == 0.0


def test_normalize_reads_weighs_the_read_slots_by_one_and_keeps_the_writes():
    """normalize_reads: read weights sum to 1 per token and head; the slots and the write weights are unchanged."""
    torch.manual_seed(0)
    plain = RAMNet(32, heads=2, factors=2, factor_size=8, top_k=4, cape=False)
    normed = RAMNet(32, heads=2, factors=2, factor_size=8, top_k=4, cape=False, normalize_reads=True)
    normed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 32)
    a, b = plain.addresses(x), normed.addresses(x)
    torch.testing.assert_close(b["read_weights"].sum(-1), torch.ones(2, 2, 12))
    torch.testing.assert_close(b["read_weights"], a["read_weights"] / a["read_weights"].sum(-1, keepdim=True))
    assert torch.equal(a["read_slots"], b["read_slots"]) and torch.equal(a["write_weights"], b["write_weights"])
    assert a["read_weights"].sum(-1).max() < 0.9  # so the option does change the reads
    y, _ = normed(x)
    y.sum().backward()
    assert normed.to_qkv.weight.grad.isfinite().all()


def test_temperature_scales_the_logits_and_keeps_the_chosen_slots():
    """temperature=s starts alpha at log s: the same slots, with the weights of the logits multiplied by s."""
    torch.manual_seed(0)
    plain = RAMNet(32, heads=2, factors=2, factor_size=8, top_k=4, cape=False)
    hot = RAMNet(32, heads=2, factors=2, factor_size=8, top_k=4, cape=False, temperature=3.0)
    torch.testing.assert_close(hot.log_temperature, torch.full((2,), math.log(3.0)))
    hot.load_state_dict({**plain.state_dict(), "log_temperature": hot.log_temperature.detach()})
    x = torch.randn(2, 12, 32)
    a, b = plain.addresses(x), hot.addresses(x)
    assert torch.equal(a["read_slots"], b["read_slots"]) and torch.equal(a["write_slots"], b["write_slots"])
    assert (b["read_weights"].sum(-1) > a["read_weights"].sum(-1)).all()  # sharper: more mass on the chosen slots
    with torch.no_grad():  # the same logits by the other route: the convolution's output 3x, temperature 1
        plain.qkv_conv.weight.mul_(3.0)
        plain.qkv_conv.bias.mul_(3.0)
    torch.testing.assert_close(plain.addresses(x)["read_weights"], b["read_weights"])


@torch.no_grad()
def test_step_leaves_states_that_forward_made_from_it_alone():
    layer = small_layer().eval()
    x = torch.randn(2, 12, 32)
    _, first = layer(x[:, :10])
    first.slots  # built: a later state reads these tensors as its base
    _, later = layer(x[:, 10:], state=first)
    expected = layer(x[:, 10:], state=first)[1].slots.clone()
    for _ in range(3):
        layer.step(10 * torch.randn(2, 32), first)
    torch.testing.assert_close(later.slots, expected)
    assert not torch.equal(first.slots, layer(x[:, :10])[1].slots)  # step did update `first` in place


@torch.no_grad()
def test_step_leaves_forks_of_earlier_steps_and_detached_copies_alone():
    layer = small_layer().eval()
    _, state = layer.step(torch.randn(2, 32))
    _, again = layer.step(torch.randn(2, 32), state)
    assert again is state  # step updates its state and returns it: one holder of the memory
    _, fork = layer(torch.randn(2, 4, 32), state)
    detached = state.detach()
    fork_before, detached_before = fork.slots.clone(), detached.slots.clone()
    layer.step(10 * torch.randn(2, 32), state)
    torch.testing.assert_close(fork.slots, fork_before)
    torch.testing.assert_close(detached.slots, detached_before)
