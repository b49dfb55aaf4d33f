import pytest
import torch
import torch.nn.functional as F

from memorycore.causal_conv import CausalDepthwiseConv


def conv1d_with_left_padding(conv: CausalDepthwiseConv, x: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch definition: zero history, nn.Conv1d's own forward over [batch, channels, time]."""
    padded = F.pad(x.transpose(1, 2), (conv.kernel_size[0] - 1, 0))
    return F.conv1d(padded, conv.weight, conv.bias, groups=conv.groups).transpose(1, 2)


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_equals_conv1d_in_output_and_gradients(kernel):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, kernel).double()
    x = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    ours, _ = conv(x)
    reference = conv1d_with_left_padding(conv, x)
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [x, conv.weight, conv.bias], upstream)
    expected = torch.autograd.grad(reference, [x, conv.weight, conv.bias], upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_pieces_with_carried_history_equal_the_whole():
    torch.manual_seed(1)
    conv = CausalDepthwiseConv(5, 4).double()
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    whole, whole_history = conv(x)
    first, history = conv(x[:, :2])  # shorter than the kernel: the history must mix old zeros and new inputs
    second, history = conv(x[:, 2:], history)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(history, whole_history)
    torch.testing.assert_close(history, x[:, -3:])


def test_low_precision_input_keeps_its_dtype_and_sums_in_float32():
    torch.manual_seed(2)
    conv = CausalDepthwiseConv(8, 4)
    x = torch.randn(2, 16, 8)
    out, history = conv(x.bfloat16())
    assert out.dtype == history.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), conv(x)[0], atol=0.05, rtol=0.02)


def test_parameters_are_those_of_conv1d():
    """Checkpoints of layers built on nn.Conv1d load into it unchanged."""
    plain = torch.nn.Conv1d(4, 4, 3, groups=4)
    conv = CausalDepthwiseConv(4, 3)
    conv.load_state_dict(plain.state_dict())
    assert list(conv.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(conv(torch.ones(1, 5, 4))[0][0, -1], plain.weight.sum(-1)[:, 0] + plain.bias)


def test_both_ways_of_computing_it_agree():
    """The shifted sum runs on CPU, conv1d elsewhere: the same function."""
    torch.manual_seed(3)
    conv = CausalDepthwiseConv(6, 4).double()
    padded = torch.randn(2, 12, 6, dtype=torch.float64)
    torch.testing.assert_close(conv._shifted_sum(padded), conv._convolution(padded))


def test_a_layer_without_convolution_keeps_no_parameters_and_no_history():
    from memorycore import NeuralMemory, RAMNet

    for layer in (NeuralMemory(16, heads=2, conv_kernel=0), RAMNet(32, heads=2, factors=2, factor_size=4, top_k=2,
                                                                   conv_kernel=0)):
        assert not any(name.startswith("qkv_conv") for name in layer.state_dict())  # as checkpoints before
        _, state = layer(torch.randn(2, 5, layer.dim))
        assert state.conv is None
