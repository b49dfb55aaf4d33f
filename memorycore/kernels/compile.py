"""Compile a Triton kernel of this package for an NVIDIA GPU on any machine, no GPU needed.

Used by the neural-memory dispatch (does a configuration's kernel fit the GPU's shared memory?) and by
``bench/kernel_resources.py`` (registers, spills and shared memory of every kernel). Triton's NVIDIA backend compiles
for a target given by hand, so these figures come out the same on a CPU machine as on the GPU with the same Triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import tempfile
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Pointers to tensors in the input dtype; every other pointer is a float32 buffer (gates, state, gradients of them).
# The depth-2 neural-memory kernels add y, dq and dk into float32 sums (the parts' shares); the counter of their
# in-kernel wait is int32.
INPUT_DTYPE_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "dy_ptr"}
INPUT_DTYPE_POINTERS_ONE_PROGRAM = {"y_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}  # kernels that write them whole
INT_POINTERS = {"counter_ptr"}
# RAM-Net: slot indices are int64; its float scalar arguments
INT64_POINTERS = {"write_index_ptr", "read_index_ptr"}
FLOAT_SCALARS = {"gamma", "eps", "decay_floor", "proxy_eps"}


@contextlib.contextmanager
def environment(name: str, value: str):
    """Set the environment variable ``name`` to ``value`` for the duration of the block."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def compilable(name: str):
    """The kernel module ``name``, loaded with the interpreter off when this process runs it (TRITON_INTERPRET=1),
    so that its kernels can be compiled."""
    module = importlib.import_module(name)
    if os.environ.get("TRITON_INTERPRET") != "1":
        return module
    return _compiled_copy(name, module.__file__)


@functools.lru_cache(maxsize=None)
def _compiled_copy(name: str, path: str):
    with environment("TRITON_INTERPRET", "0"):
        spec = importlib.util.spec_from_file_location("_compiled_" + name.replace(".", "_"), path)
        compiled = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compiled)
    return compiled


def signature(kernel, input_type: str) -> tuple[dict[str, str], list[str]]:
    """Triton's signature of a kernel (pointer and integer arguments; constexprs marked) and its parameter names."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    whole_outputs = kernel.fn.__name__ not in ("_forward_depth2_kernel", "_backward_depth2_kernel")  # no fp32 sums
    types = {}
    for name in names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INT_POINTERS:
            types[name] = "*i32"
        elif name in INT64_POINTERS:
            types[name] = "*i64"
        elif name in FLOAT_SCALARS:
            types[name] = "fp32"
        elif name.endswith("_ptr"):
            in_input_dtype = name in INPUT_DTYPE_POINTERS or (whole_outputs and name in INPUT_DTYPE_POINTERS_ONE_PROGRAM)
            types[name] = f"*{input_type}" if in_input_dtype else "*fp32"
        else:
            types[name] = "i32"
    return types, names


def compile_for(kernel, constants: dict, input_type: str, capability: int, num_warps: int, num_stages: int,
                cold_cache: bool = False):
    """Compile ``kernel`` (a JIT function of a :func:`compilable` module) with ``constants`` for an NVIDIA GPU of
    compute ``capability`` (90: H100); ``input_type`` is Triton's name of the input dtype (bf16, fp16, fp32).
    ``cold_cache`` compiles in an empty cache (a real compile time). Returns Triton's compiled kernel (``asm``,
    ``metadata.shared``)."""
    types, names = signature(kernel, input_type)
    constants = {name: value for name, value in constants.items() if name in types}
    source = ASTSource(fn=kernel, signature=types, constexprs={(names.index(k),): v for k, v in constants.items()})
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton's notice about its FP-fusion default
        if cold_cache:
            stack.enter_context(environment("TRITON_CACHE_DIR", stack.enter_context(tempfile.TemporaryDirectory())))
        return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
