"""Registers and spilled stack of the neural-memory Triton kernels, compiled for an H100 on any machine (no GPU).

Spills are the first suspect when these kernels run far below the tensor cores' rate (kernels/neural_memory/
PERFORMANCE.md). Triton's NVIDIA backend compiles for a target without a GPU, and its bundled cuobjdump reads the
registers per thread and the stack (spilled values) from the cubin, so a change meant to cut register pressure can be
checked here before it is timed on a GPU. The figures come from the Triton installed here; the GPU machine may run
another version, whose compiler can allocate differently.

    python bench/kernel_resources.py                                  # the launch settings the kernels use
    python bench/kernel_resources.py --warps 4 8 --block-hidden 32 64   # a sweep
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402



def _compilable_kernels():
    """kernels/neural_memory/triton.py loaded with the interpreter off, so its kernels can be compiled even in a
    process (the test suite) that runs them through TRITON_INTERPRET=1."""
    import kernels.neural_memory.triton as module

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec = importlib.util.spec_from_file_location("_neural_memory_kernels_compiled", module.__file__)
        compiled = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compiled)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return compiled


nm = _compilable_kernels()
H100 = GPUTarget("cuda", 90, 32)
# Pointers to tensors in the input dtype; every other pointer is a float32 buffer (gates, state, gradients of them).
INPUT_DTYPE_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "y_ptr", "dy_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
KERNELS = {
    1: ("_forward_depth1_kernel", "_backward_depth1_kernel"),
    2: ("_forward_depth2_kernel", "_backward_depth2_kernel"),
}


def signature(kernel, input_type: str) -> tuple[dict[str, str], list[str]]:
    """Triton's signature of a kernel (pointer and integer arguments; constexprs marked) and its parameter names."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    types = {}
    for name in names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = f"*{input_type}" if name in INPUT_DTYPE_POINTERS else "*fp32"
        else:
            types[name] = "i32"
    return types, names


def resources(kernel, constants: dict, num_warps: int, num_stages: int, input_type: str = "bf16") -> dict:
    """Compile ``kernel`` for an H100 and return its registers per thread, stack bytes and shared memory bytes."""
    types, names = signature(kernel, input_type)
    constants = {name: value for name, value in constants.items() if name in types}
    source = ASTSource(fn=kernel, signature=types, constexprs={(names.index(k),): v for k, v in constants.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton's notice about its FP-fusion default
        compiled = triton.compile(source, target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))
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
            "shared_bytes": int(compiled.metadata.shared)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--warps", type=int, nargs="+", default=[nm.NUM_WARPS])
    parser.add_argument("--block-hidden", type=int, nargs="+", default=[nm.BLOCK_HIDDEN],
                        help="hidden-layer columns per tile (depth 2)")
    parser.add_argument("--stages", type=int, default=nm.NUM_STAGES)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    print(f"Triton {triton.__version__}, target sm_90 (H100), bf16 inputs, head dim {args.head_dim}, chunk {args.chunk}, "
          f"expansion {args.expansion}, {args.stages} stage(s)")
    print(f"{'kernel':<26} {'warps':>5} {'tile':>5} {'registers':>9} {'stack B':>8} {'shared KB':>9}")
    for depth in args.depth:
        for warps in args.warps:
            for block in (args.block_hidden if depth == 2 else [None]):
                constants = dict(D=args.head_dim, CHUNK=args.chunk, MM=tl.bfloat16,
                                 HIDDEN=args.head_dim * args.expansion, BLOCK_HIDDEN=block)
                for name in KERNELS[depth]:
                    used = resources(getattr(nm, name), constants, warps, args.stages)
                    print(f"{name.strip('_'):<26} {warps:>5} {block or '-':>5} {used['registers']:>9} "
                          f"{used['stack_bytes']:>8} {used['shared_bytes'] / 1024:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
