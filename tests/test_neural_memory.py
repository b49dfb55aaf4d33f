"""NeuralMemory: the chunk-wise math equals the paper's recurrence, streaming equals one call, and it learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from memorycore.kernels.neural_memory import neural_memory
from memorycore import NeuralMemory


def random_memory(batch, heads, d, depth, expansion=2, dtype=torch.float64, momentum_scale=0.1):
    widths = [d] + [d * expansion] * (depth - 1) + [d]
    weights = tuple(torch.randn(batch, heads, i, o, dtype=dtype) / math.sqrt(i) for i, o in zip(widths, widths[1:]))
    momentum = tuple(momentum_scale * torch.randn_like(w) for w in weights)
    return weights, momentum


def random_inputs(batch, heads, time, d, momentum=True, decay=True, dtype=torch.float64):
    q, k = (F.normalize(torch.randn(batch, heads, time, d, dtype=dtype), dim=-1) for _ in range(2))
    v = torch.randn(batch, heads, time, d, dtype=dtype)
    lr = 0.2 * torch.rand(batch, heads, time, dtype=dtype)
    log_eta = F.logsigmoid(torch.randn(batch, heads, time, dtype=dtype)) if momentum else \
        torch.full((batch, heads, time), float("-inf"), dtype=dtype)
    log_keep = F.logsigmoid(torch.randn(batch, heads, time, dtype=dtype) + 3) if decay else \
        torch.zeros(batch, heads, time, dtype=dtype)
    return q, k, v, lr, log_eta, log_keep


def mlp(x, weights):
    for layer, w in enumerate(weights):
        x = torch.einsum("bhi,bhio->bho", x, w)
        if layer < len(weights) - 1:
            x = F.silu(x)
    return x


def paper_recurrence(q, k, v, lr, log_eta, log_keep, weights, momentum):
    """Titans Eq. 13-14 token by token, the inner gradient taken by autograd (independent of the closed form)."""
    weights, momentum, outputs = list(weights), list(momentum), []
    for t in range(q.shape[2]):
        current = [w.detach().requires_grad_() for w in weights]
        loss = ((mlp(k[:, :, t], current) - v[:, :, t]) ** 2).sum()
        grads = torch.autograd.grad(loss, current)
        eta, keep, theta = (g[:, :, t, None, None] for g in (log_eta.exp(), log_keep.exp(), lr))
        momentum = [eta * s - theta * g for s, g in zip(momentum, grads)]
        weights = [keep * w + s for w, s in zip(weights, momentum)]
        outputs.append(mlp(q[:, :, t], weights))
    return torch.stack(outputs, dim=2), weights, momentum


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("momentum,decay", [(True, True), (False, True), (True, False), (False, False)])
def test_chunk_size_one_equals_paper_recurrence(depth, momentum, decay):
    inputs = random_inputs(2, 3, 7, 4, momentum=momentum, decay=decay)
    weights, moments = random_memory(2, 3, 4, depth)
    expected = paper_recurrence(*inputs, weights, moments)
    y, new_weights, new_momentum = neural_memory(*inputs, weights, moments, chunk_size=1)
    torch.testing.assert_close(y, expected[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(new_weights + new_momentum, tuple(expected[1]) + tuple(expected[2])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_chunks_take_gradients_at_chunk_start_weights():
    """Within a chunk the memory is not updated between gradients: the result differs from chunk_size=1,
    and equals the recurrence in which every gradient of a chunk is evaluated at the chunk's first weights."""
    q, k, v, lr, log_eta, log_keep = random_inputs(1, 2, 8, 4)
    weights, moments = random_memory(1, 2, 4, 2)
    y4, *_ = neural_memory(q, k, v, lr, log_eta, log_keep, weights, moments, chunk_size=4)

    w, s, outputs = list(weights), list(moments), []
    for start in (0, 4):
        base = [x.detach().requires_grad_() for x in w]
        for t in range(start, start + 4):
            grads = torch.autograd.grad(((mlp(k[:, :, t], base) - v[:, :, t]) ** 2).sum(), base)
            eta, keep, theta = (g[:, :, t, None, None] for g in (log_eta.exp(), log_keep.exp(), lr))
            s = [eta * s_ - theta * g for s_, g in zip(s, grads)]
            w = [keep * w_ + s_ for w_, s_ in zip(w, s)]
            outputs.append(mlp(q[:, :, t], w))
    torch.testing.assert_close(y4, torch.stack(outputs, dim=2), rtol=1e-10, atol=1e-10)
    y1, *_ = neural_memory(q, k, v, lr, log_eta, log_keep, weights, moments, chunk_size=1)
    assert (y4 - y1).abs().max() > 1e-4


def test_retrieval_is_causal():
    layer = NeuralMemory(16, heads=2, chunk_size=4).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    y, _ = layer(x)
    x_changed = x.clone()
    x_changed[:, 7:] = torch.randn(1, 5, 16, dtype=torch.float64)
    y_changed, _ = layer(x_changed)
    torch.testing.assert_close(y[:, :7], y_changed[:, :7])
    assert (y[:, 7:] - y_changed[:, 7:]).abs().max() > 1e-6


def test_layer_with_chunk_size_one_equals_token_loop():
    """The whole layer (projections, convolution, gates) with chunk_size=1 equals feeding one token at a time."""
    layer = NeuralMemory(16, heads=2, chunk_size=1).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, state = layer(x)
    stepped, step_state = [], None
    for t in range(x.shape[1]):
        y_t, step_state = layer(x[:, t:t + 1], state=step_state)
        stepped.append(y_t)
    torch.testing.assert_close(y, torch.cat(stepped, dim=1))
    for a, b in zip(state.weights + state.momentum + (state.conv,), step_state.weights + step_state.momentum
                    + (step_state.conv,)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conv_kernel", [0, 4])
def test_pieces_with_carried_state_equal_one_call(conv_kernel):
    layer = NeuralMemory(24, heads=3, chunk_size=4, conv_kernel=conv_kernel).double()
    x = torch.randn(2, 22, 24, dtype=torch.float64)  # 22 is not a multiple of the chunk
    whole, whole_state = layer(x)
    pieces, state = [], None
    for start, stop in [(0, 8), (8, 12), (12, 22)]:
        y, state = layer(x[:, start:stop], state=state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole)
    for a, b in zip(state.weights + state.momentum, whole_state.weights + whole_state.momentum):
        torch.testing.assert_close(a, b)


def test_time_shorter_than_chunk_and_not_a_multiple():
    layer = NeuralMemory(16, heads=2, chunk_size=64)
    for time in (1, 5, 70):
        y, _ = layer(torch.randn(1, time, 16))
        assert y.shape == (1, time, 16) and torch.isfinite(y).all()


def recall_error(keys, values, weights, momentum):
    """Read the memory without writing (theta = 0, momentum off) and compare with the stored values."""
    zeros = torch.zeros(keys.shape[:3], dtype=keys.dtype)
    y, *_ = neural_memory(keys, keys, values, zeros, zeros - math.inf, zeros, weights, momentum, chunk_size=16)
    return ((y - values) ** 2).mean().item()


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_learns_at_test_time(depth):
    """Writing random key/value pairs makes them recallable, and more passes recall better."""
    keys = F.normalize(torch.randn(1, 2, 32, 32), dim=-1)
    values = torch.randn(1, 2, 32, 32)
    weights, moments = random_memory(1, 2, 32, depth, expansion=4, dtype=torch.float32, momentum_scale=0.0)
    before = recall_error(keys, values, weights, moments)
    lr = torch.full(keys.shape[:3], 0.05)
    log_eta = torch.full(keys.shape[:3], math.log(0.5))
    no_decay = torch.zeros(keys.shape[:3])
    errors = []
    for _ in range(4):
        _, weights, moments = neural_memory(keys, keys, values, lr, log_eta, no_decay, weights, moments, chunk_size=16)
        errors.append(recall_error(keys, values, weights, moments))
    assert errors[0] < 0.8 * before
    assert errors[-1] < 0.4 * before
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))


def test_gradcheck_every_input_of_the_chunked_update():
    q, k, v, lr, log_eta, log_keep = random_inputs(1, 1, 5, 3)
    weights, moments = random_memory(1, 1, 3, 2, expansion=2)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, lr, log_eta, log_keep, *weights, *moments)]

    def run(q, k, v, lr, log_eta, log_keep, w1, w2, s1, s2):
        y, w, s = neural_memory(q, k, v, lr, log_eta, log_keep, (w1, w2), (s1, s2), chunk_size=2)
        return y, *w, *s

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5)


def test_gradients_reach_every_parameter():
    layer = NeuralMemory(16, heads=2, chunk_size=4)
    y, _ = layer(torch.randn(2, 10, 16))
    y.square().mean().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gradcheck_through_the_layer():
    layer = NeuralMemory(8, heads=2, chunk_size=2, depth=2, expansion=2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=1e-6, atol=1e-5)


def test_state_detach_cuts_the_graph():
    layer = NeuralMemory(16, heads=2, chunk_size=4)
    _, state = layer(torch.randn(1, 8, 16))
    assert state.weights[0].requires_grad
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.weights + detached.momentum + (detached.conv,))


def test_low_precision_inputs_keep_an_fp32_state():
    layer = NeuralMemory(16, heads=2, chunk_size=4).to(torch.bfloat16)
    y, state = layer(torch.randn(1, 8, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state.weights[0].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=10, heads=3), "not divisible by heads"),
        (dict(dim=16, chunk_size=0), "chunk_size must be a positive integer"),
        (dict(dim=16, depth=0), "depth must be a positive integer"),
        (dict(dim=16, conv_kernel=-1), "conv_kernel"),
        (dict(dim=16, max_lr=0.0), "max_lr"),
        (dict(dim=16, max_momentum=1.0), "max_momentum"),
        (dict(dim=16, initial_forgetting=1.0), "initial_forgetting"),
        (dict(dim=16, initial_forgetting=0.0), "initial_forgetting"),
    ],
)
def test_bad_arguments_say_what_to_fix(kwargs, message):
    dim = kwargs.pop("dim")
    with pytest.raises(ValueError, match=message):
        NeuralMemory(dim, **kwargs)


@pytest.mark.parametrize("shape", [(16,), (2, 16), (1, 4, 8), (1, 4, 16, 1)])
def test_wrong_input_shape_is_a_clear_error(shape):
    layer = NeuralMemory(16, heads=2)
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, time, 16\]"):
        layer(torch.randn(*shape))


def test_a_state_of_another_layer_or_batch_is_a_clear_error():
    from memorycore import InputError

    layer, x = NeuralMemory(16, heads=2, chunk_size=4, expansion=4), torch.randn(2, 8, 16)
    others = [NeuralMemory(16, heads=2, chunk_size=4, expansion=1)(x)[1],  # narrower memory: it ran before
              NeuralMemory(16, heads=2, chunk_size=4, depth=1)(x)[1],
              NeuralMemory(16, heads=4, chunk_size=4, expansion=4)(x)[1],
              layer(x[:1])[1],  # another batch size
              (None, None, None)]
    for state in others:
        with pytest.raises(InputError, match="state does not fit this layer and batch"):
            layer(x, state=state)
    with pytest.raises(InputError, match="the input is empty \\(batch 0"):
        layer(x[:0])
    layer(x, state=layer(x)[1])  # its own state fits


def test_default_memory_stays_finite_on_long_sequences():
    """With the default inner learning rate, 64-token chunks of correlated keys do not blow the memory up."""
    layer = NeuralMemory(128, heads=2, chunk_size=64)
    with torch.no_grad():
        y, state = layer(torch.randn(1, 1024, 128))
    assert torch.isfinite(y).all()
    assert max(w.abs().max().item() for w in state.weights) < 10


def test_max_momentum_bounds_eta_and_default_leaves_it_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    bounded, free = NeuralMemory(16, heads=2, max_momentum=0.5), NeuralMemory(16, heads=2)
    torch.nn.init.normal_(bounded.to_gates.weight, std=10.0)  # push the gates to their extremes
    free.load_state_dict(bounded.state_dict())
    _, log_eta_bounded, _ = bounded.gates(x)
    _, log_eta_free, _ = free.gates(x)
    assert log_eta_free.exp().max() > 0.99
    assert log_eta_bounded.exp().max() <= 0.5
    torch.testing.assert_close(log_eta_bounded, log_eta_free + math.log(0.5))


def test_gates_bound_the_total_step_of_a_gradient():
    """theta / (1 - eta) <= max_lr whatever the gates: the momentum's replays of a gradient are inside the bound."""
    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, chunk_size=8)
    torch.nn.init.normal_(layer.to_gates.weight, std=10.0)  # push the gates to their extremes
    lr, log_eta, _ = layer.gates(torch.randn(2, 64, 16))
    one_minus_eta = -torch.expm1(log_eta)
    assert (lr <= layer.max_lr * one_minus_eta * (1 + 1e-5)).all()
    assert (lr / one_minus_eta)[one_minus_eta > 0].max() > 0.9 * layer.max_lr  # the bound is reached
    assert log_eta.exp().max() > 0.99


@pytest.mark.parametrize("max_momentum", [None, 0.5])
def test_deep_memory_stays_finite_with_gates_at_their_extremes(max_momentum):
    """The largest step, eta near 1 and no forgetting (what a DNA classifier and an MQAR model learnt): before theta
    carried the factor 1 - eta, this overflowed (weights past 1e19) within 256 tokens."""
    torch.manual_seed(0)
    layer = NeuralMemory(32, heads=2, chunk_size=16, max_momentum=max_momentum)
    with torch.no_grad():
        layer.to_gates.bias.view(3, 2)[0].fill_(10.0)  # theta at its bound
        layer.to_gates.bias.view(3, 2)[1].fill_(6.0)  # eta = sigmoid(6) ~ 0.9975 unbounded
        layer.to_gates.bias.view(3, 2)[2].fill_(-10.0)  # no forgetting
        y, state = layer(torch.randn(1, 256, 32))
    assert torch.isfinite(y).all()
    assert max(w.abs().max().item() for w in state.weights) < 10


def test_read_is_the_forward_pass_of_a_memory_that_does_not_learn():
    """read() retrieves M(q) without writing: with a zero learning rate and no decay, forward reads the same."""
    torch.manual_seed(0)
    mem = NeuralMemory(16, heads=2, chunk_size=4, weight_decay=False).double()
    with torch.no_grad():
        mem.to_gates.bias.view(3, 2)[0].fill_(-1e4)  # theta = max_lr * sigmoid(-1e4) = 0: no write
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    _, state = mem(torch.randn(2, 8, 16, dtype=torch.float64))
    expected, after = mem(x, state)
    read, conv = mem.read(x, state, state.conv)
    torch.testing.assert_close(read, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv, after.conv)
    assert all(torch.equal(a, b) for a, b in zip(state.weights, after.weights))


def test_value_norm_bounds_what_is_written_however_large_the_values():
    """Values that grow with their projection (MAC writes attention outputs) push a deep memory's weights up with
    them; with value_norm every value has unit RMS per head, so the weights stay where the projection's scale
    cannot reach them."""
    torch.manual_seed(0)
    plain = NeuralMemory(32, heads=2, chunk_size=16)
    normed = NeuralMemory(32, heads=2, chunk_size=16, value_norm=True)
    normed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 64, 32)

    def largest_weight(layer, value_scale):
        with torch.no_grad():
            value_rows = layer.to_qkv.weight[2 * 32:]
            value_rows.mul_(value_scale)
            _, state = layer(x)
            value_rows.div_(value_scale)
        return max(w.abs().max().item() for w in state.weights)

    assert largest_weight(plain, 100.0) > 20 * largest_weight(plain, 1.0)
    assert largest_weight(normed, 100.0) < 1.5 * largest_weight(normed, 1.0)
    assert "value_norm=True" in repr(normed)


@pytest.mark.parametrize("forgetting", [0.01, 0.001])
def test_initial_forgetting_is_the_gate_every_token_starts_with(forgetting):
    layer = NeuralMemory(16, heads=2, chunk_size=8, initial_forgetting=forgetting)
    _, _, log_keep = layer.gates(torch.randn(2, 5, 16))
    torch.testing.assert_close(log_keep.exp(), torch.full_like(log_keep, 1 - forgetting))
