"""Throughput and peak memory of one NeuralMemory layer, forward and forward+backward.

    python bench/neural_memory.py            # the issue's shapes (GPU): (8, 2048), (2, 8192), (1, 32768)
    python bench/neural_memory.py --quick    # small shapes that finish in about a minute on a CPU

Each implementation runs the whole layer (projections, convolution, gates, memory, output) with heads 8 x 64, depth 2,
expansion 4, chunk 64. Prints a table and writes JSON (default bench/results/neural_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memorycore import NeuralMemory  # noqa: E402

FULL_SHAPES = [(8, 2048), (2, 8192), (1, 32768)]
QUICK_SHAPES = [(2, 256), (1, 1024)]


@contextmanager
def backend(name: str):
    """Force the kernel backend (MEMORYCORE_BACKEND) for the duration of a measurement."""
    old = os.environ.get("MEMORYCORE_BACKEND")
    os.environ["MEMORYCORE_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MEMORYCORE_BACKEND", None)
        else:
            os.environ["MEMORYCORE_BACKEND"] = old


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds per call of ``step`` and its peak memory in MiB (CUDA: allocator peak; CPU: not measured)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def bench_layer(batch: int, time_steps: int, *, device: torch.device, dtype: torch.dtype, backward: bool,
                repeats: int, warmup: int, chunk_size: int = 64) -> dict:
    torch.manual_seed(0)
    layer = NeuralMemory(512, heads=8, head_dim=64, depth=2, expansion=4, chunk_size=chunk_size).to(device)
    x = torch.randn(batch, time_steps, 512, device=device, requires_grad=backward)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            y, _ = layer(x)
        if backward:
            y.float().square().mean().backward()
        else:
            return y

    with torch.set_grad_enabled(backward):
        seconds, peak = measure(step, device, repeats, warmup)
    return {"batch": batch, "time": time_steps, "pass": "fwd+bwd" if backward else "fwd",
            "tokens_per_s": batch * time_steps / seconds, "seconds": seconds, "peak_mib": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes for a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backends", default=None, help="comma list of torch,triton (default: torch, +triton on CUDA)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "neural_memory.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = (args.backends or ("torch,triton" if device.type == "cuda" else "torch")).split(",")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 5)

    rows = []
    print(f"NeuralMemory layer: heads 8 x 64, depth 2, expansion 4, chunk 64, {dtype}, {device}")
    print(f"{'backend':>8} {'batch x time':>13} {'pass':>8} {'tokens/s':>12} {'peak MiB':>9}")
    for name in backends:
        for batch, time_steps in shapes:
            for backward in (False, True):
                with backend(name):
                    try:
                        row = bench_layer(batch, time_steps, device=device, dtype=dtype, backward=backward,
                                          repeats=repeats, warmup=1)
                    except torch.OutOfMemoryError:
                        row = {"batch": batch, "time": time_steps, "pass": "fwd+bwd" if backward else "fwd",
                               "tokens_per_s": float("nan"), "seconds": float("nan"), "peak_mib": float("inf")}
                        torch.cuda.empty_cache()
                row["backend"] = name
                rows.append(row)
                print(f"{name:>8} {f'{batch} x {time_steps}':>13} {row['pass']:>8} "
                      f"{row['tokens_per_s'] / 1e6:>11.3f}M {row['peak_mib']:>9.0f}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
