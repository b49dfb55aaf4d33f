"""Peak memory of one NeuralMemory layer, forward + backward, measured on a CPU: ours vs titans-pytorch.

Issue 3 asks for a peak memory at 1 x 32768 tokens below titans-pytorch's. Without a GPU this measures what each
implementation allocates and keeps for the backward:

- ours: the layer through the Triton path with the kernel launches skipped. Every buffer the path allocates (the
  chunk-boundary states it keeps for the backward, the gate coefficients, the gradients, the fp32 sums of the split)
  is allocated exactly as on a GPU; only the arithmetic inside the kernels, which allocates nothing, is missing, so
  the outputs are meaningless but the memory is not.
- titans: titans-pytorch's NeuralMemory with the same sizes, run as it is (needs the optional ``bench`` extra).

The figure is the rise of the process's peak resident memory (``ru_maxrss``) over one forward + backward in float32,
each implementation in a fresh process. On a GPU, ``bench/neural_memory.py`` reports torch.cuda.max_memory_allocated
for the real runs (bf16 autocast there, so both sides are smaller).

    python bench/neural_memory_footprint.py                 # 1 x 32768 (issue 3's target), heads 8 x 64, depth 2, x4
    python bench/neural_memory_footprint.py --time 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench._arguments import add_threads, apply_threads, positive, writable_path  # noqa: E402
from memorycore.files import write_text_atomic  # noqa: E402


def peak_gib() -> float:
    """The process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _SkippedLaunch:
    """Stands for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def our_layer() -> torch.nn.Module:
    """Our NeuralMemory layer wired to the Triton path with every kernel launch skipped."""
    import memorycore.kernels.neural_memory.triton as triton_path
    import memorycore.neural_memory as layer_module
    from neural_memory import DIM, EXPANSION, HEAD_DIM, HEADS, CHUNK

    for name in ("_forward_depth1_kernel", "_backward_depth1_kernel", "_forward_depth2_kernel",
                 "_backward_depth2_kernel"):
        setattr(triton_path, name, _SkippedLaunch())
    # the kernels write every buffer they are given; untouched pages would not count in the resident memory
    triton_path._empty = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    layer_module.neural_memory = triton_path.neural_memory_triton
    return layer_module.NeuralMemory(DIM, heads=HEADS, head_dim=HEAD_DIM, depth=2, expansion=EXPANSION,
                                     chunk_size=CHUNK)


def measure_one(which: str, batch: int, time_steps: int) -> dict:
    """Build one layer, then run one forward + backward; report the rise of the peak RSS."""
    from neural_memory import DIM, titans_layer

    torch.manual_seed(0)
    layer = our_layer() if which == "ours" else titans_layer()
    x = torch.randn(batch, time_steps, DIM, requires_grad=True)
    base, start = peak_gib(), time.perf_counter()
    y = layer(x)[0]
    after_forward = peak_gib()
    y.float().square().mean().backward()
    return {"implementation": which, "batch": batch, "time": time_steps, "peak_rise_gib": peak_gib() - base,
            "after_forward_gib": after_forward - base, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive(int), default=1)
    parser.add_argument("--time", type=positive(int), default=32768)
    parser.add_argument("--implementations", default="ours,titans", help="comma list of ours,titans")
    parser.add_argument("--one", choices=["ours", "titans"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=writable_path,
                        default=Path(__file__).parent / "results" / "neural_memory_footprint.json")
    add_threads(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args.batch, args.time)))
        return []

    chosen = args.implementations.split(",")
    unknown = sorted(set(chosen) - {"ours", "titans"})
    if unknown:
        parser.error(f"unknown --implementations {', '.join(unknown)}: use ours and/or titans")
    rows = []
    print(f"NeuralMemory layer, heads 8 x 64, depth 2, x4, chunk 64, float32 on CPU: peak RSS rise over one forward + "
          f"backward at {args.batch} x {args.time}")
    for which in chosen:
        if which == "titans" and importlib.util.find_spec("titans_pytorch") is None:
            print("titans   not installed (pip install -e '.[bench]')")
            continue
        done = subprocess.run([sys.executable, __file__, "--one", which, "--batch", str(args.batch), "--time",
                               str(args.time)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{which} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{which:<8} {row['peak_rise_gib']:6.2f} GiB (after the forward {row['after_forward_gib']:.2f}), "
              f"{row['seconds']:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
