"""Throughput and peak memory of one NeuralMemory layer, forward and forward+backward.

    python bench/neural_memory.py            # the issue's shapes (GPU): (8, 2048), (2, 8192), (1, 32768)
    python bench/neural_memory.py --quick    # small shapes that finish in about a minute on a CPU
    python bench/neural_memory.py --check --memory-op   # GPU: Triton == reference first, then time the memory op alone
    python bench/neural_memory.py --check-coverage      # GPU: every application's memory shape, kernel or reference

Each implementation runs the whole layer (projections, convolution, gates, memory, output) with heads 8 x 64, depth 2,
expansion 4, chunk 64. Prints a table and writes JSON (default bench/results/neural_memory.json).

Backends: ``torch`` (the chunk-wise PyTorch reference), ``triton`` (the fused kernels), and two peers measured in the
same run: ``sdpa`` (PyTorch scaled_dot_product_attention, causal, 8 heads of 64: flash attention on an H100) and
``titans`` (titans-pytorch's NeuralMemory with the same sizes, when the optional ``bench`` extra is installed).
MFU is model FLOPs per second over ``--peak-tflops`` (989: H100 SXM dense bf16); the model FLOPs count the layer's
matmuls once (no recomputation) and take the backward as twice the forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._arguments import add_threads, apply_threads, positive, writable_path  # noqa: E402
from memorycore.kernels.neural_memory import neural_memory, neural_memory_reference  # noqa: E402
from memorycore import NeuralMemory  # noqa: E402
from memorycore.files import write_text_atomic  # noqa: E402

FULL_SHAPES = [(8, 2048), (2, 8192), (1, 32768)]
QUICK_SHAPES = [(2, 256), (1, 1024)]
DIM, HEADS, HEAD_DIM, EXPANSION, CHUNK = 512, 8, 64, 4, 64


def memory_flops_per_token(backward: bool) -> float:
    """Model FLOPs per token of the memory operation alone (all heads): see layer_flops_per_token."""
    d, hidden, c = HEAD_DIM, HEAD_DIM * EXPANSION, CHUNK
    forward = 2 * (11 * c * d * hidden + 2 * c * c * (hidden + d)) / c * HEADS
    return 3 * forward if backward else forward


def layer_flops_per_token(backward: bool) -> float:
    """Model FLOPs per token of the NeuralMemory layer (heads 8 x 64, depth 2, expansion 4, chunk 64).

    Memory, per chunk of C tokens and head (d head dim, H hidden): the key MLP and its error backprop (3 C d H),
    retrieval through the per-token weights (4 C d H + 2 C^2 (H + d)) and the weight and momentum updates (4 C d H).
    Projections: q/k/v, gates, output gate and output.
    """
    projection_macs = DIM * (3 * HEADS * HEAD_DIM + 3 * HEADS + 2 * HEADS * HEAD_DIM)
    forward = memory_flops_per_token(False) + 2 * projection_macs
    return 3 * forward if backward else forward


def attention_flops_per_token(time_steps: int, backward: bool) -> float:
    """Causal attention, 8 heads of 64: QK^T and PV over half the square; backward 2.5 times the forward."""
    forward = 2 * 2 * HEADS * HEAD_DIM * time_steps / 2
    return 3.5 * forward if backward else forward


# How the depth-2 Triton kernels share out one (batch, head) (memorycore/kernels/neural_memory/triton.py, _split): "default" (what
# a user gets), "p1" (one program per (batch, head)), "split" (on a GPU several programs split its hidden units and
# wait for each other inside one launch) and "launch" (that split, with one launch per chunk and phase instead).
BACKENDS = ("torch", "triton", "sdpa", "titans")  # --backends: our reference, our kernels, flash attention, titans
SPLITS = {"default": {}, "p1": {"MEMORYCORE_NM_PARTS": "1"}, "split": {"MEMORYCORE_NM_PARTS": "auto"},
          "launch": {"MEMORYCORE_NM_PARTS": "auto", "MEMORYCORE_NM_SYNC": "launch"}}


@contextmanager
def environment(**variables: str):
    """Set environment variables (the kernel backend, the split) for the duration of a measurement."""
    old = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def titans_layer() -> torch.nn.Module:
    """titans-pytorch's NeuralMemory with our sizes (raises ImportError when the bench extra is not installed)."""
    from titans_pytorch import NeuralMemory as TitansNeuralMemory

    return TitansNeuralMemory(dim=DIM, chunk_size=CHUNK, heads=HEADS, dim_head=HEAD_DIM,
                              default_model_kwargs=dict(depth=2, expansion_factor=EXPANSION))


# The memories the applications build: (label, head dim, hidden width, chunk, depth), before padding to tiles
APPLICATION_MEMORIES = [
    ("forecaster (d_model 64, 4 heads, x2)", 16, 32, 8, 2),
    ("forecaster estimator (2 heads, x2)", 32, 64, 8, 2),
    ("DNA classifier (dim 64, 4 heads, x4)", 16, 64, 16, 2),
    ("MQAR (dim 64-256, head 64, x4)", 64, 256, 16, 2),
    ("LM dim 128, 4 heads, chunk 16", 32, 128, 16, 2),
    ("LM dim 384, 8 heads, chunk 32", 48, 192, 32, 2),
    ("LM dim 384, 6 heads, chunk 64", 64, 256, 64, 2),
    ("LM dim 384, 4 heads, chunk 64", 96, 384, 64, 2),
    ("depth 3, head 16, x2, chunk 16", 16, 32, 16, 3),
    ("depth 3, head 64, x2, chunk 64", 64, 128, 64, 3),
]


def memory_inputs(batch: int, time_steps: int, device: torch.device, dtype: torch.dtype, requires_grad: bool,
                  depth: int = 2, heads: int = HEADS, head_dim: int = HEAD_DIM,
                  hidden: int = HEAD_DIM * EXPANSION) -> list:
    """Random inputs of the memory operation: normalised q/k, random gates and initial state."""
    shape = (batch, heads, time_steps, head_dim)
    q, k = (F.normalize(torch.randn(shape, device=device), dim=-1).to(dtype) for _ in range(2))
    v = torch.randn(shape, device=device).to(dtype)
    gate_shape = (batch, heads, time_steps)
    lr = 0.05 * torch.rand(gate_shape, device=device)  # small enough that the memory does not diverge over 32k tokens
    log_eta = F.logsigmoid(torch.randn(gate_shape, device=device) + 2.0)
    log_keep = F.logsigmoid(torch.randn(gate_shape, device=device) + 4.0)
    widths = [head_dim] + [hidden] * (depth - 1) + [head_dim]
    weights = tuple(torch.randn(batch, heads, i, o, device=device) / i**0.5 for i, o in zip(widths, widths[1:]))
    momentum = tuple(0.01 * torch.randn_like(w) for w in weights)
    tensors = [q, k, v, lr, log_eta, log_keep]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
        weights, momentum = (tuple(w.requires_grad_() for w in group) for group in (weights, momentum))
    return tensors + [weights, momentum]


def triton_errors(inputs: list, chunk_size: int, device: torch.device) -> list[float]:
    """Relative errors of the Triton path against the float64 reference: y, the final state, every gradient."""
    as_double = [tuple(w.detach().double().requires_grad_() for w in x) if isinstance(x, tuple)
                 else x.detach().double().requires_grad_() for x in inputs]
    results = []
    for fn, args in ((neural_memory_reference, as_double), (neural_memory, inputs)):
        with environment(MEMORYCORE_BACKEND="triton" if fn is neural_memory else "torch"):
            y, weights, momentum = fn(*args, chunk_size)
        leaves = [t for x in args for t in (x if isinstance(x, tuple) else (x,))]
        generator = torch.Generator(device).manual_seed(0)
        loss = sum((out.double() * torch.randn(out.shape, device=device, generator=generator,
                                               dtype=torch.float64)).sum()
                   for out in (y, *weights, *momentum))
        results.append([y, *weights, *momentum, *torch.autograd.grad(loss, leaves)])
    return [((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(results[1], results[0])]


def check_triton(device: torch.device, splits: list[str]) -> float:
    """Largest relative error of the Triton path against the float64 reference: outputs, state and every gradient.

    Depth 2 is checked under every split setting in ``splits`` (keys of SPLITS), printed before it runs (so a hang
    shows where).
    """
    worst = 0.0
    for depth, split, dtype in [(1, "default", dtype) for dtype in (torch.bfloat16, torch.float16)] + [
            (2, split, dtype) for split in splits for dtype in (torch.bfloat16, torch.float16)]:
        print(f"check depth {depth} {dtype} split {split}: ", end="", flush=True)
        with environment(**SPLITS[split]):
            torch.manual_seed(depth)
            errors = triton_errors(memory_inputs(2, 200, device, dtype, True, depth=depth), CHUNK, device)
            print(f"max relative error {max(errors):.2e} over y, state and {len(errors) - 1 - 2 * depth} gradients")
            worst = max(worst, max(errors))
    return worst


def check_coverage(device: torch.device) -> float:
    """Every application's memory (APPLICATION_MEMORIES) in bf16 and fp32: does it run the kernels, and how far
    from the float64 reference? Returns the largest relative error of those that ran the kernels."""
    from memorycore.kernels.neural_memory.triton import unsupported_reason

    worst = 0.0
    for label, head_dim, hidden, chunk, depth in APPLICATION_MEMORIES:
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            inputs = memory_inputs(2, 3 * chunk + 5, device, dtype, True, depth=depth, heads=2, head_dim=head_dim,
                                   hidden=hidden)
            reason = unsupported_reason(inputs[0], inputs[6], chunk)
            errors = triton_errors(inputs, chunk, device)
            ran = "reference (" + reason + ")" if reason else "kernels"
            print(f"{label:<40} {str(dtype):<15} {ran}: max relative error {max(errors):.2e}", flush=True)
            if reason is None:
                worst = max(worst, max(errors))
    return worst


def sdpa_forward(batch: int, time_steps: int, device: torch.device, dtype: torch.dtype, backward: bool):
    """Causal flash attention on 8 heads of 64 (q, k, v drawn once)."""
    q, k, v = (torch.randn(batch, HEADS, time_steps, HEAD_DIM, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_layer(batch: int, time_steps: int, *, device: torch.device, dtype: torch.dtype, backward: bool,
                repeats: int, warmup: int, chunk_size: int = CHUNK, implementation: str = "layer") -> dict:
    torch.manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if implementation == "sdpa":
        forward = sdpa_forward(batch, time_steps, device, dtype, backward)
        flops = attention_flops_per_token(time_steps, backward)
    elif implementation == "op":
        inputs = memory_inputs(batch, time_steps, device, dtype, backward)

        def forward():
            return neural_memory(*inputs, chunk_size)[0]

        flops = memory_flops_per_token(backward)
    else:
        if implementation == "titans":
            layer = titans_layer().to(device)
        else:
            layer = NeuralMemory(DIM, heads=HEADS, head_dim=HEAD_DIM, depth=2, expansion=EXPANSION,
                                 chunk_size=chunk_size).to(device)
        x = torch.randn(batch, time_steps, DIM, device=device, requires_grad=backward)

        def forward():
            with autocast:
                return layer(x)[0]

        flops = layer_flops_per_token(backward)

    def step():
        y = forward()
        if backward:
            y.float().square().mean().backward()
        else:
            return y

    with torch.set_grad_enabled(backward):
        seconds, peak = measure(step, device, repeats, warmup)
    tokens_per_s = batch * time_steps / seconds
    return {"batch": batch, "time": time_steps, "pass": "fwd+bwd" if backward else "fwd",
            "tokens_per_s": tokens_per_s, "seconds": seconds, "peak_mib": peak,
            "model_tflops_per_s": tokens_per_s * flops / 1e12}


def tokens_per_second(value: float) -> str:
    """Human units: 0.55k on a CPU, 10.3M on a GPU."""
    if value != value:  # nan: not measured
        return "n/a"
    return f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.2f}k"


def measured(value: float, spec: str) -> str:
    """``value`` formatted by ``spec``, or "n/a" where it was not measured (NaN: CPU memory and MFU)."""
    return "n/a" if value != value else format(value, spec)


def finite_or_none(value):
    """JSON has no NaN or infinity: write what was not measured as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes for a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backends", default=None,
                        help="comma list of torch,triton,sdpa,titans (default: torch on CPU; all four on CUDA, "
                             "titans only when titans-pytorch is installed)")
    parser.add_argument("--memory-op", action="store_true",
                        help="time the memory operation alone (q/k/v/gates in, y and state out) instead of the layer")
    parser.add_argument("--check", action="store_true", help="first compare the Triton path with the reference")
    parser.add_argument("--check-coverage", action="store_true",
                        help="only check every application's memory shape, bf16 and fp32, against the reference")
    parser.add_argument("--check-only", action="store_true",
                        help="compare the Triton path with the reference, then stop")
    parser.add_argument("--triton-splits", default=None,
                        help="comma list of how the depth-2 kernels share out a (batch, head), each checked and timed "
                             "as its own backend: default (what a user gets), p1 (one program per batch and head), "
                             "split (several per batch and head, waiting inside one launch) and launch (that split, "
                             "one launch per chunk and phase); default: p1,split on CUDA, default on CPU")
    parser.add_argument("--peak-tflops", type=positive(float), default=989.0,
                        help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--repeats", type=positive(int), default=None)
    parser.add_argument("--out", type=writable_path, default=Path(__file__).parent / "results" / "neural_memory.json")
    add_threads(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"unknown --device {args.device}: use cpu, cuda or cuda:N")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = (args.backends or ("torch,triton,sdpa" + (",titans" if _titans_installed() else "")
                                  if device.type == "cuda" else "torch")).split(",")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 5)

    splits = (args.triton_splits or ("p1,split" if device.type == "cuda" else "default")).split(",")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        parser.error(f"unknown --triton-splits {', '.join(unknown)}: use {', '.join(SPLITS)}")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown --backends {', '.join(unknown)}: use {', '.join(BACKENDS)}")
    if args.check_coverage:
        worst = check_coverage(device)
        if not worst <= 2e-2:  # NaN fails too
            raise SystemExit(f"a kernel differs from the reference (relative error {worst:.2e})")
        return []
    if args.check or args.check_only:
        worst = check_triton(device, splits)
        if not worst <= 2e-2:  # NaN fails too
            raise SystemExit(f"the Triton path differs from the reference (relative error {worst:.2e})")
        if args.check_only:
            return []
    # the Triton backend once per split setting: "triton" (default), "triton-p1", "triton-split", "triton-launch"
    variants = [(name, split) for name in backends for split in (splits if name == "triton" else ["default"])]

    rows = []
    print(f"NeuralMemory {'memory op' if args.memory_op else 'layer'}: heads 8 x 64, depth 2, expansion 4, chunk 64, "
          f"{dtype}, {device}")
    print(f"{'backend':>13} {'batch x time':>13} {'pass':>8} {'tokens/s':>12} {'peak MiB':>9} {'MFU':>6}")
    for name, split in variants:
        label = name if split == "default" else f"{name}-{split}"
        for batch, time_steps in shapes:
            for backward in (False, True):
                implementation = name if name in ("sdpa", "titans") else ("op" if args.memory_op else "layer")
                kernel_backend = name if name in ("torch", "triton") else "auto"
                with environment(MEMORYCORE_BACKEND=kernel_backend, **SPLITS[split]):
                    try:
                        row = bench_layer(batch, time_steps, device=device, dtype=dtype, backward=backward,
                                          repeats=repeats, warmup=2, implementation=implementation)
                    except torch.OutOfMemoryError:
                        row = {"batch": batch, "time": time_steps, "pass": "fwd+bwd" if backward else "fwd",
                               "tokens_per_s": float("nan"), "seconds": float("nan"), "peak_mib": float("inf"),
                               "model_tflops_per_s": float("nan")}
                        torch.cuda.empty_cache()
                row["backend"] = label
                row["mfu"] = row["model_tflops_per_s"] / args.peak_tflops if device.type == "cuda" else float("nan")
                rows.append(row)
                print(f"{label:>13} {f'{batch} x {time_steps}':>13} {row['pass']:>8} "
                      f"{tokens_per_second(row['tokens_per_s']):>12} {measured(row['peak_mib'], '9.0f'):>9} "
                      f"{measured(row['mfu'], '6.1%'):>6}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "scope": "memory op" if args.memory_op else "layer",
            "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_text_atomic(args.out, json.dumps(finite_or_none({"meta": meta, "rows": rows}), indent=2))
    print(f"wrote {args.out}")
    return rows


def _titans_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("titans_pytorch") is not None


if __name__ == "__main__":
    main()
