"""bench/kernel_resources.py compiles the neural-memory kernels for an H100 without a GPU and reads their resources."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytest.importorskip("triton.language")
kernel_resources = pytest.importorskip("kernel_resources")


# Compiled in a fresh process: once the Triton interpreter has run in a process (the kernel tests), compiling there
# fails on a cold cache (Triton 3.9: "'value' object has no attribute 'dtype'"), so in-process the result would
# depend on test order and on the cache.
COMPILE_SMALL_KERNEL = """
import json, triton.language as tl, kernel_resources as kr
print(json.dumps(kr.resources(kr.nm._forward_depth1_kernel, dict(D=16, CHUNK=16, MM=tl.bfloat16), 4, 1)))
"""


def test_registers_and_stack_of_a_small_kernel():
    bench = Path(__file__).resolve().parents[1] / "bench"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(bench), environment.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE_SMALL_KERNEL], capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    small = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < small["registers"] <= 255  # an sm_90 thread has at most 255 registers
    assert small["stack_bytes"] == 0  # 16 x 16 tiles fit in registers: nothing spills
    assert small["shared_bytes"] > 0  # tl.dot operands pass through shared memory
    assert small["compile_seconds"] > 0


def test_the_signature_marks_constexprs_and_input_pointers():
    types, names = kernel_resources.signature(kernel_resources.nm._forward_depth1_kernel, "fp16")
    assert names[:4] == ["q_ptr", "k_ptr", "v_ptr", "y_ptr"]
    assert types["q_ptr"] == "*fp16" and types["w_ptr"] == "*fp32"
    assert types["T"] == "i32" and types["CHUNK"] == "constexpr"


def test_the_ramnet_signature_marks_int64_indices_and_float_scalars():
    chunk = kernel_resources._compilable_kernels("memorycore.kernels.ramnet.chunk")
    types, names = kernel_resources.signature(chunk._pdma_chunk_backward_kernel, "fp32")
    assert types["write_index_ptr"] == types["read_index_ptr"] == "*i64"
    assert types["gamma"] == types["proxy_eps"] == "fp32"
    assert types["T"] == "i32" and types["BLOCK_C"] == "constexpr" and types["dv_ptr"] == "*fp32"
