"""RAM-Net kernels: the decoder's exact top-K, chunk form == token-by-token recurrence, Triton == reference."""

import itertools

import pytest
import torch

from memorycore.kernels.ramnet import pdma, pdma_step
from memorycore.kernels.ramnet.reference import (
    pdma_chunked_reference,
    pdma_recurrent_reference,
    pdma_step_reference,
    product_topk,
)


def brute_force_topk(logits: torch.Tensor, top_k: int):
    """All M = d_p^U log products of the factor softmaxes (kron order), then top-K."""
    log_prob = torch.log_softmax(logits, -1)
    factors, size = logits.shape[-2:]
    total = torch.zeros(*logits.shape[:-2], 1, dtype=logits.dtype)
    for u in range(factors):
        total = (total[..., :, None] + log_prob[..., u, None, :]).flatten(-2)
    assert total.shape[-1] == size**factors
    return total.topk(top_k, dim=-1)


@pytest.mark.parametrize("factors,size,top_k", [(1, 8, 3), (2, 5, 7), (3, 4, 8), (4, 3, 16), (2, 3, 9)],
                         ids=lambda v: str(v))
def test_decoder_topk_equals_brute_force(factors, size, top_k):
    logits = 2 * torch.randn(4, 6, factors, size, dtype=torch.float64)
    log_weight, slot = product_topk(logits, top_k)
    best, best_slot = brute_force_topk(logits, top_k)
    torch.testing.assert_close(log_weight, best)
    assert torch.equal(slot, best_slot)


def test_decoder_weights_are_differentiable():
    logits = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: product_topk(x, 5)[0], (logits,))


def random_problem(batch=2, heads=2, time=11, top_k=3, slots=10, dim=5, dtype=torch.float64, sharp=False):
    """Random PDMA inputs with distinct slots per token; many collisions across tokens (slots is small)."""
    def distinct_slots():
        return torch.rand(batch, heads, time, slots).topk(top_k, dim=-1).indices

    write_weight = torch.rand(batch, heads, time, top_k, dtype=dtype)
    if sharp:  # weights near 1 exercise the decay floor and the stable proxy
        write_weight[..., 0] = 1 - 1e-9
    leaves = dict(
        v=torch.randn(batch, heads, time, dim, dtype=dtype),
        write_weight=write_weight,
        read_weight=torch.rand(batch, heads, time, top_k, dtype=dtype),
        slots=torch.randn(batch, heads, slots, dim, dtype=dtype),
        normaliser=torch.rand(batch, heads, slots, dtype=dtype) + 0.05,
    )
    for value in leaves.values():
        value.requires_grad_()
    indices = dict(write_index=distinct_slots(), read_index=distinct_slots())
    return leaves, indices


def run(fn, leaves, indices, **kwargs):
    return fn(leaves["v"], indices["write_index"], leaves["write_weight"], indices["read_index"],
              leaves["read_weight"], leaves["slots"], leaves["normaliser"], **kwargs)


def outputs_and_grads(fn, leaves, indices, cotangents=None, **kwargs):
    outputs = run(fn, leaves, indices, **kwargs)
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outputs]
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outputs, cotangents))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return outputs, grads, cotangents


@pytest.mark.parametrize("gamma,chunk_size", list(itertools.product([0.0, 0.5, 1.0, 2.5], [1, 4, 16])),
                         ids=lambda v: str(v))
def test_chunk_form_equals_token_by_token(gamma, chunk_size):
    leaves, indices = random_problem()
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=gamma, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(pdma_chunked_reference, leaves, indices, cot, gamma=gamma, eps=1e-6,
                                                chunk_size=chunk_size)
    for a, e in zip(actual + actual_grads, expected + expected_grads):
        torch.testing.assert_close(a, e)


def test_chunk_form_stays_finite_with_saturated_writes():
    leaves, indices = random_problem(sharp=True)
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=0.5, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(pdma_chunked_reference, leaves, indices, cot, gamma=0.5, eps=1e-6,
                                                chunk_size=8)
    for a, e in zip(actual + actual_grads, expected + expected_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_only_addressed_rows_change():
    leaves, indices = random_problem(time=1)
    _, slots, normaliser = run(pdma_recurrent_reference, leaves, indices, gamma=1.0, eps=1e-6)
    untouched = torch.ones_like(normaliser, dtype=torch.bool).scatter(2, indices["write_index"][:, :, 0], False)
    assert torch.equal(slots[untouched], leaves["slots"][untouched])
    assert torch.equal(normaliser[untouched], leaves["normaliser"][untouched])
    assert not torch.equal(slots[~untouched], leaves["slots"][~untouched])


def test_read_of_a_fresh_write_returns_the_value():
    """One write into empty slots and a read of the same slots gives back v (the normaliser divides w out)."""
    leaves, indices = random_problem(time=1, dtype=torch.float64)
    slots = torch.zeros_like(leaves["slots"])
    normaliser = torch.full_like(leaves["normaliser"], 1e-9)
    out, _, _ = pdma_step_reference(leaves["v"][:, :, 0], indices["write_index"][:, :, 0],
                                    leaves["write_weight"][:, :, 0], indices["write_index"][:, :, 0],
                                    torch.full_like(leaves["read_weight"][:, :, 0], 1 / 3), slots, normaliser,
                                    1.0, 1e-12)
    torch.testing.assert_close(out, leaves["v"][:, :, 0], rtol=1e-6, atol=1e-6)


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton kernels on CPU through the interpreter, with NaN-filled fresh buffers."""
    pytest.importorskip("triton")
    if __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) to run Triton kernels on CPU")
    import memorycore.kernels.ramnet.chunk as ramnet_chunk
    import memorycore.kernels.ramnet.triton as ramnet_triton

    monkeypatch.setenv("MEMORYCORE_BACKEND", "triton")
    for module in (ramnet_triton, ramnet_chunk):
        monkeypatch.setattr(module, "new_buffer", lambda *shape, **kwargs: torch.full(shape, float("nan"), **kwargs))


@pytest.mark.parametrize("batch,heads,time,top_k,slots,dim,gamma", [
    (2, 2, 9, 3, 10, 5, 1.0), (1, 3, 7, 4, 16, 16, 0.5), (2, 1, 6, 8, 9, 24, 0.0), (1, 2, 8, 2, 6, 3, 2.0),
], ids=lambda v: str(v))
def test_triton_matches_reference(triton_backend, batch, heads, time, top_k, slots, dim, gamma):
    leaves, indices = random_problem(batch, heads, time, top_k, slots, dim, dtype=torch.float32)
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=gamma, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(pdma, leaves, indices, cot, gamma=gamma, eps=1e-6)
    for a, e in zip(actual + actual_grads, expected + expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_triton_backward_with_saturated_writes(triton_backend):
    leaves, indices = random_problem(1, 2, 6, 3, 8, 4, dtype=torch.float32, sharp=True)
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=0.5, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(pdma, leaves, indices, cot, gamma=0.5, eps=1e-6)
    for a, e in zip(actual + actual_grads, expected + expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_triton_step_updates_in_place_like_reference(triton_backend):
    leaves, indices = random_problem(2, 3, 1, 4, 12, 8, dtype=torch.float32)
    args = {name: value.detach()[:, :, 0] for name, value in leaves.items() if name in ("v", "write_weight",
                                                                                        "read_weight")}
    index = {name: value[:, :, 0] for name, value in indices.items()}
    slots, normaliser = leaves["slots"].detach().clone(), leaves["normaliser"].detach().clone()
    out = pdma_step(args["v"], index["write_index"], args["write_weight"], index["read_index"], args["read_weight"],
                    slots, normaliser, gamma=1.0, eps=1e-6)
    expected, expected_slots, expected_norm = pdma_step_reference(
        args["v"], index["write_index"], args["write_weight"], index["read_index"], args["read_weight"],
        leaves["slots"].detach(), leaves["normaliser"].detach(), 1.0, 1e-6)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(slots, expected_slots)
    torch.testing.assert_close(normaliser, expected_norm)


def test_stepping_the_returned_state_in_place_leaves_backward_right(triton_backend):
    leaves, indices = random_problem(1, 1, 4, 2, 6, 4, dtype=torch.float32)
    _, _, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=1.0, eps=1e-6)
    outputs = run(pdma, leaves, indices, gamma=1.0, eps=1e-6)
    with torch.no_grad():
        pdma_step(leaves["v"][:, :, 0].detach(), indices["write_index"][:, :, 0],
                  leaves["write_weight"][:, :, 0].detach(), indices["read_index"][:, :, 0],
                  leaves["read_weight"][:, :, 0].detach(), outputs[1], outputs[2], gamma=1.0, eps=1e-6)
    loss = sum((o * c).sum() for o, c in zip(outputs[:1], cot[:1]))
    _, grads_output_only, _ = outputs_and_grads(pdma_recurrent_reference, leaves, indices,
                                                [cot[0], torch.zeros_like(cot[1]), torch.zeros_like(cot[2])],
                                                gamma=1.0, eps=1e-6)
    for a, e in zip(torch.autograd.grad(loss, list(leaves.values())), grads_output_only):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_pdma_on_touched_slots_equals_recurrence_on_all_slots(gamma):
    """pdma runs on the compact set of touched slots (padded per head); state and gradients must not change."""
    leaves, indices = random_problem(batch=2, heads=3, time=5, top_k=2, slots=40)
    expected, expected_grads, cot = outputs_and_grads(pdma_recurrent_reference, leaves, indices, gamma=gamma, eps=1e-6)
    actual, actual_grads, _ = outputs_and_grads(pdma, leaves, indices, cot, gamma=gamma, eps=1e-6)
    for a, e in zip(actual + actual_grads, expected + expected_grads):
        torch.testing.assert_close(a, e)


def test_pdma_from_the_empty_memory():
    leaves, indices = random_problem(time=6, slots=30)
    slots = torch.zeros_like(leaves["slots"])
    normaliser = torch.full_like(leaves["normaliser"], 1 / 30)
    args = (leaves["v"], indices["write_index"], leaves["write_weight"], indices["read_index"], leaves["read_weight"])
    expected = pdma_recurrent_reference(*args, slots, normaliser, 1.0, 1e-6)
    actual = pdma(*args, None, None, gamma=1.0, eps=1e-6, num_slots=30)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
