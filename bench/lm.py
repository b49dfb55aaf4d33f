"""Tiny Shakespeare, character level: each Titans variant and a nanoGPT-style full-attention transformer at equal size.

Every variant trains with :class:`memorycore.lm.MemoryLM` on nanoGPT's 90/10 split (bytes: the text is ASCII, so one
byte is one character) at about the parameter count of the attention baseline of width ``--dim`` (the others' width
is the one that comes closest; printed), with the same steps, batch, windows and learning rate. Reported: the loss
on the whole validation split (windows of ``--block-size``, nats per character), training seconds, and while
generating 1k, 8k and 64k tokens from the carried state: tokens per second and the memory decoding holds (the
state's tensors on CPU; peak allocated memory on CUDA). A memory model's state stays flat, full attention's grows.

    python bench/lm.py --quick                                   # minutes on CPU
    python bench/lm.py --variants mag,attention --threads 1      # the CPU target setting (nanoGPT's CPU size)
    python bench/lm.py --dim 384 --depth 6 --heads 6 --block-size 256 --batch-size 64 --steps 5000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._arguments import add_threads, apply_threads, comma_list, positive, writable_path  # noqa: E402
from memorycore.devices import resolve_device  # noqa: E402
from memorycore.errors import TrainingError  # noqa: E402
from memorycore.files import write_text_atomic  # noqa: E402
from memorycore.lm import MemoryLM  # noqa: E402
from memorycore.lm.estimator import LM_VARIANTS  # noqa: E402
from memorycore.lm.model import TitansLM, sample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "tiny_shakespeare" / "input.txt"
ORDER = ("attention", "mag", "mac", "mal", "lmm", "ramnet", "swa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a text file (default: Tiny Shakespeare)")
    parser.add_argument("--variants", type=comma_list(str, ORDER, "variant"), default=list(ORDER),
                        help="comma-separated, from " + ", ".join(ORDER))
    parser.add_argument("--dim", type=positive(int), default=128, help="width of the attention baseline")
    parser.add_argument("--depth", type=positive(int), default=4)
    parser.add_argument("--heads", type=positive(int), default=4)
    parser.add_argument("--window", type=positive(int), default=64, help="sliding window (mag, mal, swa)")
    parser.add_argument("--segment", type=positive(int), default=32, help="MAC's segment")
    parser.add_argument("--memory-chunk", type=positive(int), default=16)
    parser.add_argument("--block-size", type=positive(int), default=64)
    parser.add_argument("--batch-size", type=positive(int), default=16)
    parser.add_argument("--steps", type=positive(int), default=2000)
    parser.add_argument("--eval-interval", type=positive(int), default=250)
    parser.add_argument("--lr", type=positive(float), default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--generate", type=comma_list(int), default=[1000, 8000, 64000],
                        help="generation lengths (tokens)")
    add_threads(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a short CPU run: 150 steps, generate 256/1024/4096")
    parser.add_argument("--out", type=writable_path, default=Path("bench/results/lm.json"))
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"--data {args.data} is not a file")
    if args.quick:
        args.steps, args.eval_interval, args.generate = min(args.steps, 150), 50, [256, 1024, 4096]
    return args


def estimator(args: argparse.Namespace, variant: str, dim: int) -> MemoryLM:
    return MemoryLM(variant=variant, dim=dim, depth=args.depth, heads=args.heads, window=args.window,
                    segment_len=args.segment, memory_chunk=args.memory_chunk, block_size=args.block_size,
                    batch_size=args.batch_size, max_steps=args.steps, eval_interval=args.eval_interval, lr=args.lr,
                    dropout=args.dropout, random_state=args.seed, device=args.device, verbose=True)


def parameters(model: MemoryLM) -> int:
    return sum(p.numel() for p in TitansLM(256, model.network_config()).parameters())


def matched_width(args: argparse.Namespace, variant: str, target: int) -> int:
    """The width (a multiple of 2 x heads, for the rotary embedding) whose parameter count is closest to
    ``target``."""
    step = 2 * args.heads
    widths = range(step, 2 * args.dim + step, step)
    return min(widths, key=lambda dim: abs(parameters(estimator(args, variant, dim)) - target))


def state_bytes(state, seen: set | None = None) -> int:
    """Bytes of the tensors a decoding state holds (each storage once)."""
    seen = set() if seen is None else seen
    if isinstance(state, torch.Tensor):
        key = state.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return state.untyped_storage().nbytes()
    if isinstance(state, dict):
        return sum(state_bytes(v, seen) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(v, seen) for v in state)
    if hasattr(state, "__dict__"):
        return sum(state_bytes(v, seen) for v in vars(state).values())
    if hasattr(state, "__slots__"):
        return sum(state_bytes(getattr(state, name, None), seen) for name in state.__slots__)
    return 0


@torch.inference_mode()
def generation(model: MemoryLM, prompt: bytes, lengths: list[int], device: torch.device) -> dict[int, dict]:
    """Decode ``max(lengths)`` tokens from the carried state; at each length: tokens/s so far and the memory held."""
    network = model.network_.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logits, state = network(torch.as_tensor(model.tokenizer_.encode(prompt), device=device)[None])
    results, start = {}, time.perf_counter()
    for index in range(1, max(lengths) + 1):
        token = sample(logits[:, -1], temperature=1.0, generator=generator)
        logits, state = network(token.view(1, 1), state)
        if index in lengths:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else state_bytes(state)
            results[index] = {"tokens_per_s": index / seconds, "memory_mib": memory / 2**20}
    network.to("cpu")
    return results


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.threads = apply_threads(args.threads)
    device = resolve_device(args.device)
    text = args.data.read_bytes()
    cut = int(len(text) * 0.9)
    target = parameters(estimator(args, "attention", args.dim))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    run = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
           "cpus": os.cpu_count(), "device": str(device), "threads": args.threads,
           "load_at_start": load, "settings": settings, "results": {}}
    print(f"{args.data.name}: {cut} training / {len(text) - cut} validation characters; {device}, "
          f"{args.threads} thread(s), load average {load:.1f} on {os.cpu_count()} CPUs", flush=True)
    for variant in args.variants:
        dim = args.dim if variant == "attention" else matched_width(args, variant, target)
        model = estimator(args, variant, dim)
        print(f"\n{variant}: dim {dim}, {parameters(model):,} parameters", flush=True)
        model.fit(text)
        scores = model.evaluate(text[cut:])
        try:
            generated = generation(model, b"\n", args.generate, device)
        except TrainingError as error:  # a state that diverges while decoding is a result, not a crash of the run
            print(f"{variant}: generation failed: {error}", flush=True)
            generated = {}
        run["results"][variant] = {"dim": dim, "parameters": model.n_parameters_, "val_loss": scores["loss"],
                                   "bits_per_byte": scores["bits_per_byte"], "train_seconds": model.history_.seconds,
                                   "steps": args.steps, "val_curve": model.history_.val_loss,
                                   "generation": generated, "load_after": os.getloadavg()[0]}
        print(row(variant, run["results"][variant], args.generate), flush=True)
        write_text_atomic(args.out, json.dumps(run, indent=1))
    print("\n" + table(run, args.generate))
    print(f"written to {args.out}")


def row(variant: str, result: dict, lengths: list[int]) -> str:
    speeds = result["generation"]
    generated = " | ".join(f"{speeds[n]['tokens_per_s']:.0f} / {speeds[n]['memory_mib']:.2f}" if n in speeds
                           else "failed (NaN)" for n in lengths)
    return (f"| {variant} | {result['dim']} | {result['parameters'] / 1e6:.2f}M | {result['val_loss']:.4f} | "
            f"{result['train_seconds'] / 60:.1f} | {generated} |")


def table(run: dict, lengths: list[int]) -> str:
    """The results as a markdown table."""
    head = " | ".join(f"{n:,} tokens: tok/s / MiB" for n in lengths)
    lines = [f"| variant | dim | params | val loss | train min | {head} |",
             "|" + "---|" * (5 + len(lengths))]
    return "\n".join(lines + [row(v, r, lengths) for v, r in run["results"].items()])


if __name__ == "__main__":
    main()
