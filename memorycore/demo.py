"""See the neural memory learn at test time: write random key/value pairs, then recall them.

Run ``python -m memorycore.demo``. No training of any outer parameter happens here: the memory MLP is updated only by
its own inner gradient steps (surprise, momentum, decay) while it reads the pairs, exactly as at inference time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memorycore.kernels.neural_memory import neural_memory
from memorycore import NeuralMemory


def recall_error(memory_state, keys: torch.Tensor, values: torch.Tensor) -> float:
    """Mean squared error of reading ``keys`` without writing (learning rate 0, momentum off)."""
    weights, momentum = memory_state
    zeros = torch.zeros(keys.shape[:3])
    recalled, _, _ = neural_memory(keys, keys, values, zeros, zeros - math.inf, zeros, weights, momentum, chunk_size=16)
    return F.mse_loss(recalled, values).item()


def main(pairs: int = 32, head_dim: int = 64, heads: int = 4, passes: int = 6, seed: int = 0) -> list[float]:
    """Write ``pairs`` random associations into a fresh deep memory ``passes`` times; print recall error each time."""
    torch.manual_seed(seed)
    layer = NeuralMemory(heads * head_dim, heads=heads, depth=2, expansion=4, chunk_size=16)
    state = layer.initial_state(batch_size=1)
    memory = (tuple(w.detach() for w in state.weights), state.momentum)
    keys = F.normalize(torch.randn(1, heads, pairs, head_dim), dim=-1)
    values = torch.randn(1, heads, pairs, head_dim)
    learning_rate = torch.full(keys.shape[:3], 0.03)
    log_momentum = torch.full(keys.shape[:3], math.log(0.5))
    no_forgetting = torch.zeros(keys.shape[:3])

    errors = [recall_error(memory, keys, values)]
    print(f"Neural memory: {heads} heads, depth-2 MLP of width {head_dim}x{4 * head_dim}, "
          f"{pairs} random key/value pairs per head\n")
    print(f"{'passes written':>15} {'recall MSE':>11} {'vs. before':>11}")
    print(f"{0:>15} {errors[0]:>11.4f} {1.0:>10.0%}")
    with torch.no_grad():
        for written in range(1, passes + 1):
            _, weights, momentum = neural_memory(keys, keys, values, learning_rate, log_momentum, no_forgetting,
                                                 *memory, chunk_size=16)
            memory = (weights, momentum)
            errors.append(recall_error(memory, keys, values))
            print(f"{written:>15} {errors[-1]:>11.4f} {errors[-1] / errors[0]:>10.0%}")
    return errors


if __name__ == "__main__":
    main()
