"""The Triton neural-memory kernels equal the PyTorch reference: outputs, final state and every gradient.

Run on CPU through the Triton interpreter (TRITON_INTERPRET=1, which conftest.py sets before triton is imported).
"""

import os
import threading
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import memorycore.kernels.neural_memory.triton as nm_triton
from memorycore.kernels.neural_memory import neural_memory
from memorycore.kernels.neural_memory.reference import neural_memory_reference
from memorycore.kernels.neural_memory.triton import neural_memory_triton

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels run on CPU only through the Triton interpreter", allow_module_level=True)


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so a read of memory no kernel wrote shows up in the results."""
    monkeypatch.setattr(nm_triton, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                        device=device))


def memory_inputs(batch=2, heads=2, time=40, dim=16, depth=2, hidden=32, momentum=True, decay=True,
                  dtype=torch.float32):
    """Random inputs of neural_memory, with an initial state that is not the zero / learned default."""
    q = F.normalize(torch.randn(batch, heads, time, dim), dim=-1)
    k = F.normalize(torch.randn(batch, heads, time, dim), dim=-1)
    v = torch.randn(batch, heads, time, dim)
    lr = 0.2 * torch.rand(batch, heads, time)
    if momentum:
        log_eta = F.logsigmoid(torch.randn(batch, heads, time) + 1.0)
    else:
        log_eta = torch.full((batch, heads, time), float("-inf"))
    log_keep = F.logsigmoid(torch.randn(batch, heads, time) + 3.0) if decay else torch.zeros(batch, heads, time)
    widths = [dim] + [hidden] * (depth - 1) + [dim]
    weights = tuple(torch.randn(batch, heads, i, o) / i**0.5 for i, o in zip(widths, widths[1:]))
    mom = tuple(0.1 * torch.randn(batch, heads, i, o) for i, o in zip(widths, widths[1:]))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return [q, k, v, lr, log_eta, log_keep, weights, mom]


def run_with_grads(fn, inputs, chunk_size, seed=1):
    """Outputs and gradients of a random linear loss of y AND of the final state, w.r.t. every input."""
    leaves = [tuple(t.clone().requires_grad_() for t in x) if isinstance(x, tuple) else x.clone().requires_grad_()
              for x in inputs]
    y, weights, momentum = fn(*leaves, chunk_size)
    generator = torch.Generator().manual_seed(seed)
    outputs = [y, *weights, *momentum]
    loss = sum((out.float() * torch.randn(out.shape, generator=generator)).sum() for out in outputs)
    loss.backward()
    flat_leaves = [t for x in leaves for t in (x if isinstance(x, tuple) else (x,))]
    return [out.detach() for out in outputs], [t.grad for t in flat_leaves]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def assert_close(actual_list, expected_list, tolerance, what):
    for index, (actual, expected) in enumerate(zip(actual_list, expected_list)):
        assert actual is not None and expected is not None, f"{what}[{index}] has no gradient"
        assert torch.isfinite(actual).all(), f"{what}[{index}] is not finite (unwritten memory read?)"
        assert actual.shape == expected.shape
        error = relative_error(actual, expected)
        assert error < tolerance, f"{what}[{index}] differs from the reference: relative error {error:.2e}"


def assert_gradients_match(actual_grads, expected_grads):
    """Gradients w.r.t. q, k, v, lr, log_eta, log_keep, initial weights and momentum; with momentum off the reference's
    gradients of log_eta and of the initial momentum are exactly zero, and so must ours be."""
    for index, (actual, expected) in enumerate(zip(actual_grads, expected_grads)):
        if expected.abs().max() == 0:
            assert torch.equal(actual, expected), f"gradient {index} should be exactly zero"
        else:
            assert_close([actual], [expected], 1e-5, f"gradient {index}")


CASES = [
    pytest.param(dict(depth=1), id="D1-mom-decay"),
    pytest.param(dict(depth=1, momentum=False, decay=False), id="D1-plain"),
    pytest.param(dict(depth=2), id="D2-mom-decay"),
    pytest.param(dict(depth=2, momentum=False), id="D2-decay"),
    pytest.param(dict(depth=2, decay=False), id="D2-mom"),
    pytest.param(dict(depth=2, time=32, batch=1, heads=3), id="D2-B1-H3-T32"),
    pytest.param(dict(depth=2, hidden=64, time=19), id="D2-hidden64-T19"),
]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_forward_and_backward(case):
    inputs = memory_inputs(**case)
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, 16)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, 16)
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_gradients_match(actual_grads, expected_grads)


SPLITS = [
    pytest.param(dict(hidden=64), 2, id="H64-2parts"),
    pytest.param(dict(hidden=64, batch=1, heads=3), 4, id="H64-4parts-B1-H3"),
    pytest.param(dict(hidden=32, momentum=False, time=32), 2, id="H32-2parts-no-momentum"),
]


@pytest.mark.parametrize("case, parts", SPLITS)
def test_hidden_units_split_over_several_programs(monkeypatch, case, parts):
    """Each (batch, head) shared out over several programs gives the reference's outputs, state and gradients.

    Here the parts exchange their shares between launches (one per chunk and phase: the interpreter runs programs one
    after another); the GPU form, one launch with the parts waiting for each other, is the next test.
    """
    monkeypatch.setenv("MEMORYCORE_NM_PARTS", str(parts))
    launches = []
    original = nm_triton._launch_depth2
    monkeypatch.setattr(nm_triton, "_launch_depth2", lambda *a: launches.append(a[3:5]) or original(*a))
    inputs = memory_inputs(depth=2, **case)
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, 16)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, 16)
    assert launches == [(parts, False), (parts, False)]  # forward and backward, split, one launch per phase
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_gradients_match(actual_grads, expected_grads)


@contextmanager
def programs_run_concurrently(timeout: float = 300.0):
    """Run the programs of each interpreter launch side by side, one thread each, as a GPU runs resident programs.

    The interpreter runs a launch's programs one after another and keeps the program id on one shared builder,
    so programs that wait for each other inside a launch would wait forever. Here the program id is thread-local
    and a launch starts all its programs at once; the interpreter's atomics are C++ atomics. A launch whose programs
    are still waiting after ``timeout`` seconds fails the test.
    """
    from triton.runtime import interpreter

    local = threading.local()
    builder_class, executor_call = interpreter.InterpreterBuilder, interpreter.GridExecutor.__call__
    builder = interpreter.interpreter_builder

    def run_side_by_side(executor, *args, **kwargs):
        program, launched = executor.fn, []

        def collect(**program_args):  # called once per program, in order, by the interpreter's loop
            launched.append(builder.grid_idx)
            if len(launched) < builder.grid_dim[0] * builder.grid_dim[1] * builder.grid_dim[2]:
                return
            errors = []

            def run(index):
                local.grid_idx = index
                try:
                    program(**program_args)
                except BaseException as error:  # noqa: BLE001  (reported below)
                    errors.append(error)

            threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in launched]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout)
            if any(thread.is_alive() for thread in threads):
                raise TimeoutError(f"programs of a {builder.grid_dim} launch still waiting after {timeout} s")
            if errors:
                raise errors[0]

        def set_grid_dim(*dims):  # the interpreter's last step before its loop over programs
            builder_class.set_grid_dim(builder, *dims)
            executor.fn = collect

        builder.set_grid_dim = set_grid_dim
        try:
            return executor_call(executor, *args, **kwargs)
        finally:
            executor.fn = program
            del builder.set_grid_dim

    builder_class.grid_idx = property(lambda self: getattr(local, "grid_idx", None),
                                      lambda self, value: setattr(local, "grid_idx", value))
    interpreter.GridExecutor.__call__ = run_side_by_side
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = executor_call
        del builder_class.grid_idx


@pytest.mark.parametrize("case, parts", [
    pytest.param(dict(hidden=64, batch=1, heads=2, time=40), 4, id="H64-4parts"),
    pytest.param(dict(hidden=32, batch=2, heads=1, time=48), 2, id="H32-2parts"),
])
def test_split_parts_waiting_for_each_other_inside_one_launch(monkeypatch, case, parts):
    """The GPU form of the split: every chunk in one launch, the parts waiting on the atomic counter (SYNC).

    Run with the programs side by side, it tests the waiting protocol itself (counter targets, the double-buffered
    exchange, the phase order); what it cannot test is the GPU memory model (release/acquire, L1 bypass).
    """
    monkeypatch.setenv("MEMORYCORE_NM_PARTS", str(parts))
    monkeypatch.setattr(nm_triton, "_sm_count", lambda device: 132)  # as on an H100: one launch, in-kernel wait
    launches = []
    original = nm_triton._launch_depth2
    monkeypatch.setattr(nm_triton, "_launch_depth2", lambda *a: launches.append(a[3:5]) or original(*a))
    inputs = memory_inputs(depth=2, **case)
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, 16)
    with programs_run_concurrently():
        actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, 16)
        with torch.no_grad():  # inference: two state slots, ping-ponged, instead of one per chunk boundary
            y, weights, momentum = neural_memory_triton(*inputs, 16)
    assert launches == [(parts, True), (parts, True), (parts, True)]
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_close([y, *weights, *momentum], expected_out, 1e-5, "inference output/state")
    assert_gradients_match(actual_grads, expected_grads)


def test_split_policy(monkeypatch):
    """On a GPU the hidden units split into tiles of 64 while the grid fits one program per SM; never on CPU."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(nm_triton, "_sm_count", lambda device: 132 if device.type == "cuda" else 0)
    monkeypatch.delenv("MEMORYCORE_NM_PARTS", raising=False)
    monkeypatch.delenv("MEMORYCORE_NM_SYNC", raising=False)
    assert nm_triton._split(16, 256, cuda) == (4, True)  # the default: 2 x 8192 tokens, 8 heads: 64 programs
    monkeypatch.setattr(nm_triton, "SPLIT_BY_DEFAULT", False)
    assert nm_triton._split(16, 256, cuda) == (1, True)
    monkeypatch.setenv("MEMORYCORE_NM_PARTS", "auto")
    assert nm_triton._split(16, 256, cuda) == (4, True)
    assert nm_triton._split(64, 256, cuda) == (2, True)  # 8 x 2048: 128 programs
    assert nm_triton._split(256, 256, cuda) == (1, True)
    assert nm_triton._split(16, 64, cuda) == (1, True)  # one tile of 64 cannot split
    assert nm_triton._split(16, 256, torch.device("cpu")) == (1, True)
    monkeypatch.setenv("MEMORYCORE_NM_SYNC", "launch")
    assert nm_triton._split(16, 256, cuda) == (4, False)
    monkeypatch.delenv("MEMORYCORE_NM_SYNC")
    monkeypatch.setenv("MEMORYCORE_NM_PARTS", "4")
    assert nm_triton._split(64, 256, cuda) == (4, False)  # forced past one program per SM: launches per phase
    monkeypatch.setenv("MEMORYCORE_NM_PARTS", "8")
    assert nm_triton._split(64, 256, torch.device("cpu")) == (8, False)  # 32-unit tiles run in the interpreter
    with pytest.raises(ValueError, match="slices of 32 hidden units; on a GPU they must be at least 64"):
        nm_triton._split(64, 256, cuda)


def test_a_split_that_does_not_fit_the_hidden_width_is_refused(monkeypatch):
    monkeypatch.setenv("MEMORYCORE_NM_PARTS", "4")
    with pytest.raises(ValueError, match="MEMORYCORE_NM_PARTS=4 must be 'auto' or divide the memory's hidden width 32"):
        neural_memory_triton(*memory_inputs(depth=2, hidden=32, time=16), 16)


def test_chunk_of_32_and_head_dim_32():
    inputs = memory_inputs(batch=1, heads=1, time=70, dim=32, hidden=64)
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, 32)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, 32)
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_close(actual_grads, expected_grads, 1e-5, "gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_inputs_keep_an_fp32_state(dtype):
    inputs = memory_inputs(time=32, dtype=dtype)
    expected_y, expected_w, expected_s = neural_memory_reference(*inputs, 16)
    y, weights, momentum = neural_memory_triton(*inputs, 16)
    assert y.dtype == dtype and all(w.dtype == torch.float32 for w in weights + momentum)
    assert relative_error(y, expected_y) < 2e-2
    assert_close(list(weights + momentum), list(expected_w + expected_s), 2e-2, "state")


def test_autocast_runs_the_kernels_in_its_dtype():
    """Under bf16 autocast, float32 q/k/v (the layer's normalised q and k) take the bf16 kernel path."""
    inputs = memory_inputs(time=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, weights, _ = neural_memory_triton(*inputs, 16)
    expected_y, expected_w, _ = neural_memory_reference(*inputs, 16)
    assert y.dtype == torch.bfloat16 and weights[0].dtype == torch.float32
    assert relative_error(y, expected_y) < 2e-2


def test_inference_without_gradients_equals_training_path():
    """Without autograd the forward keeps two state slots instead of one per chunk; the results must not change."""
    inputs = memory_inputs(time=48)
    with torch.no_grad():
        y, weights, momentum = neural_memory_triton(*inputs, 16)
    (y_grad, *state_grad), _ = run_with_grads(neural_memory_triton, inputs, 16)
    assert torch.equal(y, y_grad)
    assert all(torch.equal(a, b) for a, b in zip(weights + momentum, state_grad))


def test_streaming_in_pieces_equals_one_call():
    q, k, v, lr, log_eta, log_keep, weights, momentum = memory_inputs(time=48)
    y_whole, w_whole, s_whole = neural_memory_triton(q, k, v, lr, log_eta, log_keep, weights, momentum, 16)
    first, second = slice(0, 32), slice(32, 48)
    y1, w, s = neural_memory_triton(q[:, :, first], k[:, :, first], v[:, :, first], lr[..., first],
                                    log_eta[..., first], log_keep[..., first], weights, momentum, 16)
    y2, w, s = neural_memory_triton(q[:, :, second], k[:, :, second], v[:, :, second], lr[..., second],
                                    log_eta[..., second], log_keep[..., second], w, s, 16)
    assert relative_error(torch.cat([y1, y2], dim=2), y_whole) < 1e-6
    assert_close(list(w + s), list(w_whole + s_whole), 1e-6, "state")


@pytest.mark.parametrize("case, chunk_size, why", [
    pytest.param(dict(depth=4, hidden=16, time=12), 8, "memory depth 4", id="depth4"),
    pytest.param(dict(dim=16, time=12, dtype=torch.float64), 8, "torch.float64 inputs", id="float64"),
    pytest.param(dict(dim=16, time=12), 512, "chunk 512", id="chunk512"),
])
def test_what_the_kernels_do_not_cover_falls_back_to_the_reference(case, chunk_size, why):
    """The documented exceptions (kernels.neural_memory.triton.unsupported_reason) run the reference, same results."""
    inputs = memory_inputs(**case)
    assert why in nm_triton.unsupported_reason(inputs[0], inputs[6], chunk_size)
    y, weights, momentum = neural_memory_triton(*inputs, chunk_size)
    expected_y, expected_w, expected_s = neural_memory_reference(*inputs, chunk_size)
    assert torch.equal(y, expected_y)
    assert all(torch.equal(a, b) for a, b in zip(weights + momentum, expected_w + expected_s))


def test_dispatch_uses_the_kernel_when_forced(monkeypatch):
    calls = []
    original = nm_triton.NeuralMemoryFunction.apply
    monkeypatch.setattr(nm_triton.NeuralMemoryFunction, "apply", lambda *a: calls.append(1) or original(*a))
    inputs = memory_inputs(time=16)
    inputs[0].requires_grad_()
    monkeypatch.setenv("MEMORYCORE_BACKEND", "torch")
    y_torch, _, _ = neural_memory(*inputs, 16)
    assert not calls
    monkeypatch.setenv("MEMORYCORE_BACKEND", "triton")
    y_triton, _, _ = neural_memory(*inputs, 16)
    assert calls, "MEMORYCORE_BACKEND=triton did not reach the Triton kernels"
    assert relative_error(y_triton, y_torch) < 1e-5


def test_neural_memory_layer_trains_identically_on_both_backends(monkeypatch):
    from memorycore import NeuralMemory

    layer = NeuralMemory(32, heads=2, chunk_size=16)
    x = torch.randn(2, 40, 32)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MEMORYCORE_BACKEND", backend)
        layer.zero_grad()
        y, _ = layer(x)
        (y.square().mean()).backward()
        results[backend] = [y.detach()] + [p.grad.clone() for p in layer.parameters()]
    assert_close(results["triton"], results["torch"], 1e-4, "layer output/parameter gradient")


# ----------------------------------------------------------------------------------------------------------------------
# Coverage: every configuration the applications use, and the corners of the supported range (issue 27). Small
# shapes: the interpreter is slow. Head dims, hidden widths and chunks that are not tiles run padded (tile_sizes).
# ----------------------------------------------------------------------------------------------------------------------

COVERAGE = [
    # the applications' shapes (forecast/model.py, genomics/model.py, bench/mqar.py, language models)
    pytest.param(dict(time=12, dim=16, hidden=32), 8, id="forecaster-D16-H32-C8-T12"),
    pytest.param(dict(batch=1, time=12, dim=32, hidden=64), 8, id="forecaster-D32-H64-C8-T12"),
    pytest.param(dict(batch=1, time=40, dim=16, hidden=64), 16, id="genomics-D16-H64-C16"),
    pytest.param(dict(batch=1, heads=1, time=24, dim=64, hidden=256), 16, id="mqar-D64-H256-C16"),
    pytest.param(dict(batch=1, time=40, dim=48, hidden=192), 32, id="lm-D48-H192-C32"),
    pytest.param(dict(batch=1, heads=1, time=70, dim=96, hidden=384), 64, id="lm-D96-H384-C64"),
    # head dims, chunks and depths at the ends of the range
    pytest.param(dict(depth=1, batch=1, heads=1, time=20, dim=128), 16, id="D1-D128-C16"),
    pytest.param(dict(batch=1, heads=1, time=20, dim=128, hidden=128), 16, id="D2-D128-H128-C16"),
    pytest.param(dict(batch=1, heads=1, time=260, dim=16, hidden=32), 256, id="D2-C256-T260"),
    pytest.param(dict(depth=1, batch=1, time=140, dim=32), 128, id="D1-C128-T140"),
    pytest.param(dict(depth=1, time=20, dim=16), 8, id="D1-C8-T20"),
    pytest.param(dict(time=5, dim=16, hidden=16, batch=1), 1, id="D2-C1-token-by-token"),
    pytest.param(dict(depth=3, time=40, dim=16, hidden=32), 16, id="D3-D16-H32-C16"),
    pytest.param(dict(depth=3, batch=1, time=20, dim=32, hidden=64), 8, id="D3-D32-H64-C8"),
    pytest.param(dict(depth=3, momentum=False, time=24, dim=16, hidden=16), 16, id="D3-no-momentum"),
    pytest.param(dict(depth=3, decay=False, batch=1, heads=1, time=70, dim=16, hidden=64), 64, id="D3-no-decay-C64"),
    pytest.param(dict(depth=3, time=21, dim=8, hidden=24), 5, id="D3-D8-H24-C5"),
]


@pytest.mark.parametrize("case, chunk_size", COVERAGE)
def test_every_covered_configuration_matches_the_reference(case, chunk_size):
    inputs = memory_inputs(**case)
    assert nm_triton.unsupported_reason(inputs[0], inputs[6], chunk_size) is None
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, chunk_size)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, chunk_size)
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_gradients_match(actual_grads, expected_grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case, chunk_size", [
    pytest.param(dict(depth=1, time=20, dim=16), 8, id="D1-C8"),
    pytest.param(dict(time=12, dim=16, hidden=32), 8, id="D2-forecaster"),
    pytest.param(dict(depth=3, time=24, dim=32, hidden=32, batch=1), 16, id="D3-D32"),
])
def test_16_bit_inputs_match_the_reference_with_gradients(dtype, case, chunk_size):
    """16-bit q, k, v: outputs and q/k/v gradients are rounded to 16 bits (and fp16 dots round their operands)."""
    inputs = memory_inputs(dtype=dtype, **case)
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, chunk_size)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, chunk_size)
    assert actual_out[0].dtype == dtype and all(g.dtype == dtype for g in actual_grads[:3])
    assert_close(actual_out, expected_out, 2e-2, "output/state")
    assert_close(actual_grads, expected_grads, 2e-2, "gradient")


@pytest.mark.parametrize("case, chunk_size", [
    pytest.param(dict(depth=1, time=20), 8, id="D1"),
    pytest.param(dict(depth=2, time=20, hidden=48), 8, id="D2-padded"),
    pytest.param(dict(depth=3, time=20), 16, id="D3"),
])
def test_two_runs_are_bit_identical(case, chunk_size):
    """One program per (batch, head) writes every output once: no atomics, so runs repeat exactly."""
    inputs = memory_inputs(**case)
    first_out, first_grads = run_with_grads(neural_memory_triton, inputs, chunk_size)
    second_out, second_grads = run_with_grads(neural_memory_triton, inputs, chunk_size)
    assert all(torch.equal(a, b) for a, b in zip(first_out + first_grads, second_out + second_grads))


def test_tile_sizes_pad_each_dimension_to_a_power_of_two_of_at_least_16():
    assert nm_triton.tile_sizes(16, 32, 8, depth=2, on_gpu=False) == (16, 32, 16)
    assert nm_triton.tile_sizes(48, 192, 12, depth=2, on_gpu=False) == (64, 256, 16)
    assert nm_triton.tile_sizes(64, 256, 64, depth=2, on_gpu=False) == (64, 256, 64)  # nothing to pad
    assert nm_triton.tile_sizes(16, 32, 8, depth=2, on_gpu=True) == (16, 64, 16)  # hidden tiles of 64 on a GPU
    assert nm_triton.tile_sizes(16, 32, 8, depth=3, on_gpu=True) == (16, 32, 16)
    assert nm_triton.tile_sizes(8, 8, 1, depth=1, on_gpu=False) == (16, 16, 16)


def test_the_neural_memory_layer_takes_the_kernels_for_the_applications_shapes(monkeypatch):
    """Through the public layer (MEMORYCORE_BACKEND=triton under the interpreter): the forecaster's and the DNA
    classifier's memories run the kernels, not the reference."""
    from memorycore import NeuralMemory

    monkeypatch.setenv("MEMORYCORE_BACKEND", "triton")
    calls = []
    original = nm_triton.NeuralMemoryFunction.apply
    monkeypatch.setattr(nm_triton.NeuralMemoryFunction, "apply", lambda *a: calls.append(a[0]) or original(*a))
    for layer, time in [(NeuralMemory(64, heads=4, depth=2, expansion=2, chunk_size=8), 12),
                        (NeuralMemory(64, heads=2, depth=2, expansion=2, chunk_size=8), 12),
                        (NeuralMemory(64, heads=4, depth=2, chunk_size=16), 20)]:
        y, _ = layer(torch.randn(2, time, 64))
        y.sum().backward()
    assert calls == [16, 16, 16]  # chunks of 8 run as tiles of 16


# ----------------------------------------------------------------------------------------------------------------------
# Two passes (depths 1 and 2): the state chain alone is serial, everything else runs over (batch, head, chunk)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_pass(monkeypatch):
    """MEMORYCORE_NM_PASSES=2, and a record of the two-pass backward's runs."""
    monkeypatch.setenv("MEMORYCORE_NM_PASSES", "2")
    runs = []
    original = nm_triton._backward_two_pass
    monkeypatch.setattr(nm_triton, "_backward_two_pass", lambda *a: runs.append(1) or original(*a))
    return runs


@pytest.mark.parametrize("case, chunk_size", [
    pytest.param(dict(depth=1), 16, id="mom-decay"),
    pytest.param(dict(depth=1, momentum=False, decay=False), 16, id="plain"),
    pytest.param(dict(depth=1, time=20, dim=24), 8, id="D24-C8-T20"),
    pytest.param(dict(depth=1, batch=1, heads=1, time=20, dim=128), 16, id="D128"),
    pytest.param(dict(depth=1, batch=1, time=140, dim=32), 128, id="C128-T140"),
    pytest.param(dict(depth=2), 16, id="D2-mom-decay"),
    pytest.param(dict(depth=2, momentum=False, decay=False, time=21, dim=24, hidden=48), 8, id="D2-plain-padded"),
    pytest.param(dict(batch=1, time=40, dim=16, hidden=64), 16, id="D2-genomics"),
    pytest.param(dict(batch=1, heads=1, time=24, dim=64, hidden=256), 16, id="D2-mqar"),
])
def test_two_pass_kernels_match_the_reference(two_pass, case, chunk_size):
    inputs = memory_inputs(**case)
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, chunk_size)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, chunk_size)
    assert two_pass, "the two-pass backward did not run"
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_gradients_match(actual_grads, expected_grads)


@pytest.mark.parametrize("depth", [1, 2])
def test_two_pass_kernels_are_deterministic_and_infer_as_they_train(two_pass, depth):
    inputs = memory_inputs(depth=depth, time=40)
    first_out, first_grads = run_with_grads(neural_memory_triton, inputs, 16)
    second_out, second_grads = run_with_grads(neural_memory_triton, inputs, 16)
    assert all(torch.equal(a, b) for a, b in zip(first_out + first_grads, second_out + second_grads))
    with torch.no_grad():
        y, weights, momentum = neural_memory_triton(*inputs, 16)
    assert all(torch.equal(a, b) for a, b in zip([y, *weights, *momentum], first_out))


def test_two_passes_for_depths_1_and_2(monkeypatch):
    q = memory_inputs(depth=1, time=16)[0]
    monkeypatch.setenv("MEMORYCORE_NM_PASSES", "2")
    assert [nm_triton._passes(q, depth, 16) for depth in (1, 2, 3)] == [2, 2, 1]
    monkeypatch.setenv("MEMORYCORE_NM_PASSES", "auto")
    assert nm_triton._passes(q, 1, 16) == 1  # the fused kernels, on CPU and wherever they fit
    monkeypatch.setenv("MEMORYCORE_NM_PASSES", "3")
    with pytest.raises(ValueError, match="MEMORYCORE_NM_PASSES=3 must be auto, 1"):
        nm_triton._passes(q, 1, 16)


def pretend_gpu(monkeypatch, shared_bytes):
    """Dispatch as on a GPU with 227 KB of shared memory per program whose kernels ask for ``shared_bytes(name)``."""
    monkeypatch.setattr(nm_triton, "_on_gpu", lambda q: True)
    monkeypatch.setattr(nm_triton, "_shared_memory_limit", lambda device: 232_448)
    monkeypatch.setattr(nm_triton, "_shared_memory_needed",
                        lambda q, tiles, kernels: max(shared_bytes(name) for name, _ in kernels))


def test_a_depth_1_memory_the_fused_kernels_cannot_fit_runs_in_two_passes(monkeypatch, two_pass):
    """As float32 at head dim 64, chunk 64 on an H100 (bench/kernel_resources.py): fused backward 240 KB, two-pass
    kernels 192 KB at most; with MEMORYCORE_NM_PASSES=auto the dispatch takes the two passes, not the reference."""
    monkeypatch.setenv("MEMORYCORE_NM_PASSES", "auto")
    pretend_gpu(monkeypatch, lambda name: 245_760 if name == "_backward_depth1_kernel" else 196_608)
    inputs = memory_inputs(depth=1, time=40)
    assert nm_triton.unsupported_reason(inputs[0], inputs[6], 16) is None
    expected_out, expected_grads = run_with_grads(neural_memory_reference, inputs, 16)
    actual_out, actual_grads = run_with_grads(neural_memory_triton, inputs, 16)
    assert two_pass, "the two-pass backward did not run"
    assert_close(actual_out, expected_out, 1e-5, "output/state")
    assert_gradients_match(actual_grads, expected_grads)


def test_a_memory_whose_kernels_do_not_fit_the_gpu_says_so(monkeypatch):
    pretend_gpu(monkeypatch, lambda name: 300_000)
    inputs = memory_inputs(depth=2, time=16)
    reason = nm_triton.unsupported_reason(inputs[0], inputs[6], 16)
    assert "need 300000 bytes of shared memory; this GPU has 232448" in reason
