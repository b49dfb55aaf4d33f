"""RAM-Net training throughput as the number of slots grows: per-token work must not depend on it.

One RAMNet layer (H heads of value_dim 64, K = 8, M = d_p^U slots per head), forward + backward on [batch, time,
dim] inputs, tokens per second for M = 2^10 ... 2^20. The slots grow in one of two ways: by adding factors of d_p = 4
(`--grow factors`, the default: U = 5 ... 10), which also adds to the decoder's O(U K^2) beam merge and widens the
keys, or by widening the 5 factors (`--grow factor-size`: d_p = 4, 5, 6, 8, 12, 16, from 2^10 to 2^20 through
5^5 ... 12^5), which keeps U K^2 and changes only the key width (U d_p) and the factor softmaxes. Before timing, the
layer on the default backend (Triton on CUDA) is checked against the PyTorch reference on a small input.

The time includes everything a training step of the layer does. The layer runs on the slots the batch touches
(at most 2 t K per sequence and head) and, as the returned state is not read here, never builds the O(M d_v) state,
so the work per token is O(K d_v + U K^2) whatever M; what still changes with M is how many distinct rows are touched
(up to 2 t K), i.e. the working set.

    python bench/ramnet_throughput.py                   # GPU: 8 x 2048 tokens, 4 heads, M = 2^10 .. 2^20
    python bench/ramnet_throughput.py --kernel chunk    # the same with the chunk-form Triton kernel
    python bench/ramnet_throughput.py --quick           # CPU: small sizes, PyTorch reference
    python bench/ramnet_throughput.py --pieces 8        # stream each sequence in 8 pieces, carrying the state
    python bench/ramnet_throughput.py --grow factor-size  # 5 factors throughout, each wider
    python bench/ramnet_throughput.py --plot runs/ramnet_throughput.png   # also draw tokens/s against slots
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench._arguments import add_threads, apply_threads, positive, writable_path  # noqa: E402
from memorycore.kernels.ramnet import TRAINING_KERNELS, training_kernel  # noqa: E402
from memorycore import RAMNet  # noqa: E402
from memorycore.files import pyplot, save_figure  # noqa: E402
from mqar import write_json  # noqa: E402  (bench/ is on sys.path when this script runs)

GROWN_FACTOR_SIZES = (4, 5, 6, 8, 12, 16)  # with 5 factors: 2^10, 2^11.6, 2^12.9, 2^15, 2^17.9, 2^20 slots


def slot_layouts(grow: str, max_factors: int) -> list[tuple[int, int]]:
    """(factors, factor_size) per measured point, up to 4^max_factors slots: more factors of 4, or 5 wider ones."""
    if grow == "factors":
        return [(factors, 4) for factors in range(5, max_factors + 1)]
    return [(5, size) for size in GROWN_FACTOR_SIZES if size**5 <= 4**max_factors]


def check_against_reference(device: torch.device) -> float:
    """Largest relative difference of output and gradients between the requested backend and the reference."""
    torch.manual_seed(0)
    layer = RAMNet(64, heads=2, factors=3, factor_size=4, top_k=8).to(device)
    x = torch.randn(2, 100, 64, device=device)

    def output_and_grads(backend: str):
        os.environ["MEMORYCORE_BACKEND"] = backend
        layer.zero_grad()
        y, _ = layer(x)
        y.square().mean().backward()
        return [y.detach()] + [p.grad.clone() for p in layer.parameters()]

    previous = os.environ.get("MEMORYCORE_BACKEND", "auto")
    try:
        default, reference = output_and_grads(previous), output_and_grads("torch")
    finally:
        os.environ["MEMORYCORE_BACKEND"] = previous
    return max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(default, reference))


def tokens_per_second(layer: RAMNet, batch: int, time_steps: int, device: torch.device, repeats: int,
                      pieces: int = 1) -> float:
    """Forward + backward tokens/s; with ``pieces`` > 1 the sequence streams through in pieces that carry the state
    (detached between pieces, as in truncated back-propagation through time)."""
    x = torch.randn(batch, time_steps, layer.dim, device=device, requires_grad=True)

    def step():
        state = None
        for part in x.chunk(pieces, dim=1):
            y, state = layer(part, state)
            y.sum().backward()
            state = state.detach()

    step()  # compile / warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * time_steps * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU run")
    add_threads(parser)
    parser.add_argument("--batch", type=positive(int), default=None)
    parser.add_argument("--time", type=positive(int), default=None)
    parser.add_argument("--heads", type=positive(int), default=4)
    parser.add_argument("--repeats", type=positive(int), default=None)
    parser.add_argument("--max-factors", type=positive(int), default=None,
                        help="at most 4^U slots; default U = 7 with --quick, 10 otherwise")
    parser.add_argument("--grow", choices=("factors", "factor-size"), default="factors",
                        help="add factors of 4 (default) or widen 5 factors")
    parser.add_argument("--pieces", type=positive(int), default=1,
                        help="stream each sequence in this many pieces, carrying the state (default 1: one call)")
    parser.add_argument("--kernel", choices=TRAINING_KERNELS, default=None,
                        help="Triton training kernel (default: MEMORYCORE_RAMNET_KERNEL, else scan)")
    parser.add_argument("--out", type=writable_path,
                        default=Path(__file__).parent / "results" / "ramnet_throughput.json",
                        help="JSON file for the results (written atomically)")
    parser.add_argument("--plot", type=writable_path, default=None,
                        help="also draw tokens/s against slots into this PNG")
    args = parser.parse_args(argv)
    if args.pieces < 1:
        parser.error(f"--pieces must be at least 1, got {args.pieces}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    apply_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    time_steps = args.time or (128 if args.quick else 2048)
    repeats = args.repeats or (2 if args.quick else 5)
    max_factors = args.max_factors or (7 if args.quick else 10)
    layouts = slot_layouts(args.grow, max_factors)  # 2^10 .. 2^14 slots quick, .. 2^20 full
    if args.kernel:
        os.environ["MEMORYCORE_RAMNET_KERNEL"] = args.kernel
    kernel = training_kernel()

    backend = os.environ.get("MEMORYCORE_BACKEND", "auto")
    print(f"RAM-Net throughput on {device} (backend {backend}; Triton kernel on CUDA: {kernel}): "
          f"batch {batch} x {time_steps} tokens in {args.pieces} piece(s), "
          f"{args.heads} heads x value_dim 64, top_k 8, forward + backward")
    difference = check_against_reference(device)
    print(f"check against the PyTorch reference: max relative difference {difference:.2e}")
    print(f"{'slots M':>10} {'factors':>8} {'factor size':>12} {'state MB/seq':>13} {'tokens/s':>12}")
    rows = []
    for factors, factor_size in layouts:
        torch.manual_seed(0)
        layer = RAMNet(64 * args.heads, heads=args.heads, factors=factors, factor_size=factor_size, top_k=8).to(device)
        speed = tokens_per_second(layer, batch, time_steps, device, repeats, args.pieces)
        state_mb = layer.state_size()["total"] * 4 / 2**20
        print(f"{layer.slots:>10,d} {factors:>8d} {factor_size:>12d} {state_mb:>13.1f} {speed:>12,.0f}", flush=True)
        rows.append({"slots": layer.slots, "factors": factors, "factor_size": factor_size,
                     "state_mb_per_sequence": state_mb, "tokens_per_s": speed})
        write_json(args.out, {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "backend": backend, "kernel": kernel, "batch": batch, "time": time_steps,
                              "heads": args.heads, "pieces": args.pieces, "grow": args.grow,
                              "reference_difference": difference, "rows": rows})
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {args.out}")
    if args.plot:
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        plot_throughput(rows, f"RAMNet forward + backward, {where}, {batch} x {time_steps} tokens, "
                              f"{args.heads} heads, K = 8, {args.pieces} piece(s), slots grown by {args.grow}",
                        args.plot)
        print(f"wrote {args.plot}")


def plot_throughput(rows: list[dict], title: str, path: Path) -> None:
    """Tokens/s against slots per head (log scale), each point labelled with the state it stands for, beside the
    flat line that the per-token cost promises."""
    slots = [row["slots"] for row in rows]
    speed = [row["tokens_per_s"] for row in rows]
    figure, axis = pyplot().subplots(figsize=(6.4, 3.6))
    axis.plot(slots, speed, marker="o", color="tab:blue", label="measured")
    axis.axhline(speed[0], color="grey", linestyle="--", linewidth=0.8, label="flat (the speed at the fewest slots)")
    for row in rows:
        state = row["state_mb_per_sequence"]
        label = f"{state / 1024:.1f} GB" if state >= 1024 else f"{state:.0f} MB"
        axis.annotate(label, (row["slots"], row["tokens_per_s"]), textcoords="offset points", xytext=(0, 7),
                      ha="center", fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_ylim(0, max(speed) * 1.2)
    axis.set_xlabel("slots per head (labels: state per sequence)")
    axis.set_ylabel("training tokens / s")
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    save_figure(figure, path)


if __name__ == "__main__":
    main()
