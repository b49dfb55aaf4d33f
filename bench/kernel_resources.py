"""Registers and spilled stack of the Triton kernels, compiled for an H100 on any machine (no GPU).

Spills are the first suspect when these kernels run far below the tensor cores' rate (memorycore/kernels/neural_memory/
PERFORMANCE.md). Triton's NVIDIA backend compiles for a target without a GPU, and its bundled cuobjdump reads the
registers per thread and the stack (spilled values) from the cubin, so a change meant to cut register pressure can be
checked here before it is timed on a GPU; the compile time is printed too (a kernel that takes minutes to compile
costs every training run those minutes). The figures come from the Triton installed here; the GPU machine may run
another version, whose compiler can allocate differently.

    python bench/kernel_resources.py                                  # the launch settings the kernels use
    python bench/kernel_resources.py --warps 4 8 --block-hidden 32 64   # a sweep
    python bench/kernel_resources.py --ramnet                         # the RAM-Net kernels (chunk and scan)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402



@contextlib.contextmanager
def _environment(name: str, value: str):
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


def _compilable_kernels(name: str = "memorycore.kernels.neural_memory.triton"):
    """The kernel module ``name`` loaded with the interpreter off, so its kernels can be compiled even in a process
    (the test suite) that runs them through TRITON_INTERPRET=1."""
    module = importlib.import_module(name)
    with _environment("TRITON_INTERPRET", "0"):
        spec = importlib.util.spec_from_file_location("_compiled_" + name.replace(".", "_"), module.__file__)
        compiled = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compiled)
    return compiled


nm = _compilable_kernels()
H100 = GPUTarget("cuda", 90, 32)
# Pointers to tensors in the input dtype; every other pointer is a float32 buffer (gates, state, gradients of them).
# The depth-2 kernels add y, dq and dk into float32 sums (the parts' shares); the counter of their in-kernel wait is
# int32.
INPUT_DTYPE_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "dy_ptr"}
INPUT_DTYPE_POINTERS_DEPTH1 = {"y_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
INT_POINTERS = {"counter_ptr"}
# RAM-Net: slot indices are int64; its float scalar arguments
INT64_POINTERS = {"write_index_ptr", "read_index_ptr"}
FLOAT_SCALARS = {"gamma", "eps", "decay_floor", "proxy_eps"}
# kernel name -> the phases it runs in one launch (the GPU's form: every chunk, every phase)
KERNELS = {
    1: {"_forward_depth1_kernel": None, "_backward_depth1_kernel": None},
    2: {"_forward_depth2_kernel": 0b011, "_backward_depth2_kernel": 0b111},
}


def signature(kernel, input_type: str) -> tuple[dict[str, str], list[str]]:
    """Triton's signature of a kernel (pointer and integer arguments; constexprs marked) and its parameter names."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
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
            in_input_dtype = name in INPUT_DTYPE_POINTERS or ("depth1" in kernel.fn.__name__
                                                              and name in INPUT_DTYPE_POINTERS_DEPTH1)
            types[name] = f"*{input_type}" if in_input_dtype else "*fp32"
        else:
            types[name] = "i32"
    return types, names


def resources(kernel, constants: dict, num_warps: int, num_stages: int, input_type: str = "bf16") -> dict:
    """Compile ``kernel`` for an H100 and return its registers per thread, stack bytes, shared memory bytes and
    compile seconds (on this machine, bypassing Triton's cache)."""
    types, names = signature(kernel, input_type)
    constants = {name: value for name, value in constants.items() if name in types}
    source = ASTSource(fn=kernel, signature=types, constexprs={(names.index(k),): v for k, v in constants.items()})
    start = time.perf_counter()
    # a cold cache, so that the compile time is real
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as cache, _environment("TRITON_CACHE_DIR", cache):
        warnings.simplefilter("ignore")  # Triton's notice about its FP-fusion default
        compiled = triton.compile(source, target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))
    seconds = time.perf_counter() - start
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        sys.exit(f"error: {cuobjdump} not found; this needs the Triton wheel from PyPI, which ships the NVIDIA tools")
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return {"registers": int(found["REG"]), "stack_bytes": int(found["STACK"]),
            "shared_bytes": int(compiled.metadata.shared), "compile_seconds": seconds}


def ramnet_rows(top_k: int, chunk_size: int, value_dim: int) -> None:
    """Print the resources of the RAM-Net kernels at the blocks their launchers pick (float32 tensors)."""
    chunk = _compilable_kernels("memorycore.kernels.ramnet.chunk")
    scan = _compilable_kernels("memorycore.kernels.ramnet.triton")
    block_c, block_k, block_d = chunk.chunk_blocks(top_k, value_dim, chunk_size)
    print(f"RAM-Net, top_k {top_k}, chunk {chunk_size} ({block_c * block_k} (token, slot) pairs per chunk), "
          f"value dim {value_dim}, float32")
    print(f"{'kernel':<28} {'warps':>5} {'registers':>9} {'stack B':>8} {'shared KB':>9} {'compile s':>9}")
    kernels = [(chunk, "_pdma_chunk_forward_kernel", {"SAVE": True}), (chunk, "_pdma_chunk_backward_kernel", {}),
               (scan, "_pdma_forward_kernel", {"SAVE": True}), (scan, "_pdma_backward_kernel", {})]
    for module, name, extra in kernels:
        constants = dict(K=top_k, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_D=block_d, **extra)
        used = resources(getattr(module, name), constants, module.NUM_WARPS, 1, input_type="fp32")
        print(f"{name.strip('_'):<28} {module.NUM_WARPS:>5} {used['registers']:>9} {used['stack_bytes']:>8} "
              f"{used['shared_bytes'] / 1024:>9.0f} {used['compile_seconds']:>9.1f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--warps", type=int, nargs="+", default=[nm.NUM_WARPS])
    parser.add_argument("--block-hidden", type=int, nargs="+", default=[nm.BLOCK_HIDDEN],
                        help="hidden-layer columns per tile (depth 2)")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 4],
                        help="programs per (batch, head) along the hidden units (depth 2; more than 1 compiles the "
                             "in-kernel wait)")
    parser.add_argument("--stages", type=int, default=nm.NUM_STAGES)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--ramnet", action="store_true",
                        help="the RAM-Net kernels instead (chunk form and scan; --top-k, --ramnet-chunk)")
    parser.add_argument("--top-k", type=int, default=8, help="RAM-Net slots per token")
    parser.add_argument("--ramnet-chunk", type=int, default=16, help="RAM-Net tokens per chunk (RAMNet's default)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.ramnet_chunk < 1:
        parser.error("--top-k and --ramnet-chunk must be positive")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.ramnet:
        ramnet_rows(args.top_k, args.ramnet_chunk, value_dim=64)
        return

    print(f"Triton {triton.__version__}, target sm_90 (H100), bf16 inputs, head dim {args.head_dim}, "
          f"chunk {args.chunk}, expansion {args.expansion}, {args.stages} stage(s)")
    print(f"{'kernel':<26} {'warps':>5} {'parts':>5} {'tile':>5} {'registers':>9} {'stack B':>8} {'shared KB':>9} "
          f"{'compile s':>9}")
    hidden = args.head_dim * args.expansion
    for depth in args.depth:
        for warps in args.warps:
            for parts in (args.parts if depth == 2 else [1]):
                for block in (args.block_hidden if depth == 2 else [None]):
                    if depth == 2 and (hidden % parts or hidden // parts < block):
                        continue  # a part narrower than one tile
                    for name, phases in KERNELS[depth].items():
                        constants = dict(D=args.head_dim, CHUNK=args.chunk, MM=tl.bfloat16, HIDDEN=hidden,
                                         BLOCK_HIDDEN=block, PARTS=parts, PHASES=phases, SYNC=parts > 1)
                        used = resources(getattr(nm, name), constants, warps, args.stages)
                        print(f"{name.strip('_'):<26} {warps:>5} {parts if depth == 2 else '-':>5} "
                              f"{block or '-':>5} {used['registers']:>9} {used['stack_bytes']:>8} "
                              f"{used['shared_bytes'] / 1024:>9.0f} {used['compile_seconds']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
