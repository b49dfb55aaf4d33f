"""MemoryBlock: the pre-norm residual block both applications (and the Titans stack) build on."""

import pytest
import torch

from memorycore import MemoryBlock, NeuralMemory, RAMNet


@pytest.mark.parametrize("layer", ["neural_memory", "ramnet"])
def test_pieces_with_the_carried_state_equal_the_whole(layer):
    torch.manual_seed(0)
    memory = (NeuralMemory(16, heads=2, chunk_size=4) if layer == "neural_memory"
              else RAMNet(16, heads=2, factors=2, factor_size=4, top_k=2, chunk_size=4))
    block = MemoryBlock(16, memory, torch.nn.Linear(16, 16), dropout=0.1).eval()
    x = torch.randn(2, 12, 16)
    whole, _ = block(x)
    first, state = block(x[:, :8])
    second, _ = block(x[:, 8:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-5)


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    memory, mixer = NeuralMemory(8, heads=2, chunk_size=4), torch.nn.Linear(8, 8)
    block = MemoryBlock(8, memory, mixer).eval()
    x = torch.randn(1, 6, 8)
    h = x + memory(block.memory_norm(x))[0]
    torch.testing.assert_close(block(x)[0], h + mixer(block.mixer_norm(h)))
    assert MemoryBlock(8, memory).mixer_norm is None  # no mixer: the memory half only


def test_backward_memory_reads_each_row_reversed():
    torch.manual_seed(0)
    forward, backward = NeuralMemory(8, heads=2, chunk_size=4), NeuralMemory(8, heads=2, chunk_size=4)
    block = MemoryBlock(8, forward, backward_memory=backward).eval()
    x = torch.randn(2, 5, 8)
    h = block.memory_norm(x)
    expected = x + forward(h)[0] + backward(h.flip(1))[0].flip(1)
    torch.testing.assert_close(block(x)[0], expected)
    index = torch.arange(4, -1, -1).expand(2, 5)
    torch.testing.assert_close(block(x, backward_index=index)[0], expected)
