"""The chunk-form Triton training kernel (memorycore/kernels/ramnet/chunk.py) == the PyTorch chunk form (TRITON_INTERPRET=1)."""

import pytest
import torch

from memorycore.kernels.ramnet import pdma, training_kernel
from memorycore.kernels.ramnet.reference import pdma_chunked_reference, pdma_recurrent_reference
from test_ramnet_kernels import outputs_and_grads, random_problem, triton_backend  # noqa: F401 (a fixture)

NAMES = ["out", "slots", "normaliser", "grad v", "grad write_weight", "grad read_weight", "grad slots",
         "grad normaliser"]


@pytest.fixture
def chunk_kernel(triton_backend):
    """The chunk kernels module, run on CPU by the interpreter with NaN-filled fresh buffers (``triton_backend``)."""
    import memorycore.kernels.ramnet.chunk as ramnet_chunk

    return ramnet_chunk


def repeated_in_a_chunk(write_index, chunk_size):
    """Whether some slot is written by two tokens of the same chunk (the case the last-writer logic handles)."""
    time = write_index.shape[2]
    for start in range(0, time, chunk_size):
        slots = write_index[:, :, start:start + chunk_size].flatten(2)
        if (slots.sort(-1).values.diff(dim=-1) == 0).any():
            return True
    return False


def assert_all_close(actual, expected, rtol, atol):
    for name, a, e in zip(NAMES, actual, expected):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# T not a multiple of the chunk; K = 1 .. 16 (K = 3 pads the k axis); chunks of 1 .. 16 tokens; gamma 0 .. 2.5;
# M small enough that slots repeat inside a chunk; every case starts from a random (non-empty) state.
CASES = [
    dict(batch=2, heads=2, time=9, top_k=3, slots=10, dim=5, gamma=1.0, chunk_size=4),
    dict(batch=1, heads=3, time=13, top_k=4, slots=16, dim=16, gamma=0.5, chunk_size=8),
    dict(batch=2, heads=1, time=6, top_k=8, slots=9, dim=24, gamma=0.0, chunk_size=2),
    dict(batch=1, heads=2, time=21, top_k=2, slots=6, dim=3, gamma=2.5, chunk_size=16),
    dict(batch=1, heads=1, time=7, top_k=1, slots=3, dim=8, gamma=1.0, chunk_size=1),
    dict(batch=1, heads=2, time=19, top_k=16, slots=40, dim=32, gamma=4.0, chunk_size=8),  # the largest tile, 128
]


def case_id(case):
    return "B{batch}-H{heads}-T{time}-K{top_k}-M{slots}-D{dim}-g{gamma}-c{chunk_size}".format(**case)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunk_kernel_matches_reference(chunk_kernel, case):
    case = dict(case)
    gamma, chunk_size = case.pop("gamma"), case.pop("chunk_size")
    torch.manual_seed(0)
    leaves, indices = random_problem(**case, dtype=torch.float32)
    block_c = chunk_kernel.chunk_blocks(case["top_k"], case["dim"], chunk_size)[0]
    assert repeated_in_a_chunk(indices["write_index"], block_c)
    expected, expected_grads, cot = outputs_and_grads(pdma_chunked_reference, leaves, indices, gamma=gamma,
                                                      eps=1e-6, chunk_size=chunk_size)
    actual, actual_grads, _ = outputs_and_grads(chunk_kernel.pdma_chunk_triton, leaves, indices, cot, gamma=gamma,
                                                eps=1e-6, chunk_size=chunk_size)
    assert_all_close(actual + actual_grads, expected + expected_grads, rtol=1e-4, atol=1e-5)


def test_chunk_kernel_with_saturated_writes(chunk_kernel):
    """Weights next to 1 hit the decay floor and the stable proxy derivative; all stays finite and exact."""
    torch.manual_seed(1)
    leaves, indices = random_problem(1, 2, 10, 3, 8, 4, dtype=torch.float32, sharp=True)
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=0.5, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(chunk_kernel.pdma_chunk_triton, leaves, indices, cot, gamma=0.5,
                                                eps=1e-6, chunk_size=4)
    assert_all_close(actual + actual_grads, expected + expected_grads, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunk_kernel_takes_half_precision_inputs(chunk_kernel, dtype):
    """Half inputs are upcast on load and accumulated in float32: as the float32 reference on the same values."""
    torch.manual_seed(2)
    leaves, indices = random_problem(2, 2, 11, 4, 12, 16, dtype=torch.float32)
    half = {name: value.detach().to(dtype).requires_grad_() for name, value in leaves.items()}
    for name in ("slots", "normaliser"):  # the state is float32 in the layer
        half[name] = leaves[name]
    upcast = {name: value.detach().float().requires_grad_() for name, value in half.items()}
    expected, expected_grads, cot = outputs_and_grads(pdma_chunked_reference, upcast, indices, gamma=1.0, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(chunk_kernel.pdma_chunk_triton, half, indices, cot, gamma=1.0,
                                                eps=1e-6)
    assert actual[0].dtype == dtype and actual_grads[0].dtype == dtype and actual[1].dtype == torch.float32
    assert_all_close(actual + actual_grads, expected + expected_grads, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", ["chunk", "scan"])
def test_dispatch_runs_either_kernel_on_touched_slots(chunk_kernel, kernel):
    """pdma renumbers the touched slots, then runs the chosen Triton kernel; both equal the recurrence."""
    torch.manual_seed(3)
    leaves, indices = random_problem(2, 2, 10, 3, 40, 8, dtype=torch.float32)
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=1.0, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(pdma, leaves, indices, cot, gamma=1.0, eps=1e-6, chunk_size=4,
                                                kernel=kernel)
    assert_all_close(actual + actual_grads, expected + expected_grads, rtol=1e-4, atol=1e-5)


def test_kernel_choice_defaults_to_scan_and_rejects_unknown(monkeypatch):
    monkeypatch.delenv("MEMORYCORE_RAMNET_KERNEL", raising=False)
    assert training_kernel() == "scan"
    monkeypatch.setenv("MEMORYCORE_RAMNET_KERNEL", "chunk")
    assert training_kernel() == "chunk"
    assert training_kernel("scan") == "scan"
    with pytest.raises(ValueError, match="chunk, scan"):
        training_kernel("fused")


def test_chunk_kernel_without_gradients_gives_the_same_result(chunk_kernel):
    """Without gradients the forward skips saving the chunk-start rows; the result must not change."""
    torch.manual_seed(4)
    leaves, indices = random_problem(1, 2, 10, 3, 7, 8, dtype=torch.float32)
    detached = {name: value.detach() for name, value in leaves.items()}
    args = (indices["write_index"], indices["read_index"])
    expected = pdma_chunked_reference(detached["v"], args[0], detached["write_weight"], args[1],
                                      detached["read_weight"], detached["slots"], detached["normaliser"], 1.0, 1e-6, 4)
    actual = chunk_kernel.pdma_chunk_triton(detached["v"], args[0], detached["write_weight"], args[1],
                                            detached["read_weight"], detached["slots"], detached["normaliser"],
                                            1.0, 1e-6, 4)
    assert not actual[0].requires_grad
    assert_all_close(actual, expected, rtol=1e-4, atol=1e-5)
