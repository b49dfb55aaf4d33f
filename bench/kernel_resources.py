"""Registers and spilled stack of the Triton kernels, compiled for an H100 on any machine (no GPU).

Spills are the first suspect when these kernels run far below the tensor cores' rate (memorycore/kernels/neural_memory/
PERFORMANCE.md). Triton's NVIDIA backend compiles for a target without a GPU, and its bundled cuobjdump reads the
registers per thread and the stack (spilled values) from the cubin, so a change meant to cut register pressure can be
checked here before it is timed on a GPU; the compile time is printed too (a kernel that takes minutes to compile
costs every training run those minutes). The figures come from the Triton installed here; the GPU machine may run
another version, whose compiler can allocate differently.

    python bench/kernel_resources.py                                  # the launch settings the kernels use
    python bench/kernel_resources.py --warps 4 8 --block-hidden 32 64   # a sweep
    python bench/kernel_resources.py --applications --dtype bf16 fp32 # every application's memory, as dispatched
    python bench/kernel_resources.py --ramnet                         # the RAM-Net kernels (chunk and scan)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from memorycore.kernels.compile import compilable, compile_for, signature  # noqa: E402,F401  (signature: the tests)
from neural_memory import APPLICATION_MEMORIES  # noqa: E402  (bench/neural_memory.py)

_compilable_kernels = compilable
nm = compilable("memorycore.kernels.neural_memory.triton")
# kernel name -> the phases it runs in one launch (the GPU's form: every chunk, every phase)
KERNELS = {
    1: {"_forward_depth1_kernel": None, "_backward_depth1_kernel": None,
        **{name: None for name in nm.TWO_PASS_KERNELS[1]}},  # the two-pass kernels (MEMORYCORE_NM_PASSES)
    2: {"_forward_depth2_kernel": 0b011, "_backward_depth2_kernel": 0b111,
        **{name: None for name in nm.TWO_PASS_KERNELS[2]}},
    3: {"_forward_depth3_kernel": None, "_backward_depth3_kernel": None},
}
H100_SHARED_BYTES = 232_448  # shared memory one program may use on an H100 (227 KB, opt-in)


def resources(kernel, constants: dict, num_warps: int, num_stages: int, input_type: str = "bf16") -> dict:
    """Compile ``kernel`` for an H100 and return its registers per thread, stack bytes, shared memory bytes and
    compile seconds (on this machine, bypassing Triton's cache)."""
    start = time.perf_counter()
    compiled = compile_for(kernel, constants, input_type, 90, num_warps, num_stages, cold_cache=True)
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


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def application_rows(dtypes: list[str], warps: int, stages: int) -> None:
    """Print every kernel of every application's memory at the tiles the GPU dispatch runs, and whether it fits."""
    print(f"Triton {triton.__version__}, target sm_90 (H100), {warps} warps, {stages} stage(s), one program per "
          f"(batch, head); 'fits': shared memory within {H100_SHARED_BYTES} bytes")
    print("| memory | tiles (head, hidden, chunk) | depth | dtype | kernel | registers | stack B | shared KB | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, head_dim, hidden, chunk, depth in APPLICATION_MEMORIES:
        tiles = nm.tile_sizes(head_dim, hidden, chunk, depth, on_gpu=True)
        for dtype in dtypes:
            for name, phases in KERNELS[depth].items():
                constants = nm.kernel_constants(TORCH_DTYPES[dtype], *tiles, interpreted=False)
                constants.update(PHASES=phases, SYNC=False)
                used = resources(getattr(nm, name), constants, warps, stages, input_type=dtype)
                fits = "yes" if used["shared_bytes"] <= H100_SHARED_BYTES else "**no**"
                print(f"| {label} | {tiles} | {depth} | {dtype} | {name.strip('_')} | {used['registers']} | "
                      f"{used['stack_bytes']:,} | {used['shared_bytes'] / 1024:.0f} | {fits} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(TORCH_DTYPES),
                        help="input dtype (fp32 runs tf32 dots with fp32 operands in shared memory)")
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
    parser.add_argument("--applications", action="store_true",
                        help="every application's memory at the tiles the GPU dispatch pads it to (a markdown table)")
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
    if args.applications:
        application_rows(args.dtype, args.warps[0], args.stages)
        return

    print(f"Triton {triton.__version__}, target sm_90 (H100), head dim {args.head_dim}, "
          f"chunk {args.chunk}, expansion {args.expansion}, {args.stages} stage(s)")
    print(f"{'kernel':<26} {'dtype':>5} {'warps':>5} {'parts':>5} {'tile':>5} {'registers':>9} {'stack B':>8} "
          f"{'shared KB':>9} {'compile s':>9}")
    hidden = args.head_dim * args.expansion
    for depth in args.depth:
        for dtype in args.dtype:
            for warps in args.warps:
                for parts in (args.parts if depth == 2 else [1]):
                    for block in (args.block_hidden if depth == 2 else [None]):
                        if depth == 2 and (hidden % parts or hidden // parts < block):
                            continue  # a part narrower than one tile
                        for name, phases in KERNELS[depth].items():
                            if parts > 1 and name in nm.TWO_PASS_KERNELS[2]:
                                continue  # whole tiles, one program per (batch, head): no parts
                            constants = nm.kernel_constants(TORCH_DTYPES[dtype], args.head_dim, hidden, args.chunk,
                                                            parts, interpreted=False)
                            constants.update(BLOCK_HIDDEN=block, PHASES=phases, SYNC=parts > 1)
                            used = resources(getattr(nm, name), constants, warps, args.stages, input_type=dtype)
                            print(f"{name.strip('_'):<26} {dtype:>5} {warps:>5} {parts if depth == 2 else '-':>5} "
                                  f"{block or '-':>5} {used['registers']:>9} {used['stack_bytes']:>8} "
                                  f"{used['shared_bytes'] / 1024:>9.0f} {used['compile_seconds']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
