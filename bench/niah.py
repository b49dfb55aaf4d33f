"""Needle-in-a-haystack across the Titans variants: train on short contexts, retrieve at 1x-16x that length.

Each variant (MAC, MAG, MAL, the memory alone, sliding-window attention, full attention) is built at about the same
parameter count (printed), trained with the shared fit loop on a mixture of contexts up to ``--train-length``
(shorter ones left-padded), then asked for the needle in haystacks of 1x, 2x, 4x, 8x (and 16x with ``--multiples``)
that length, the needle's depth spread evenly. Beside the accuracy: forward tokens/s at each length and the floats of
state one sequence holds after reading it. Writes a table, JSON and a plot of accuracy against context length.

    python bench/niah.py --quick                       # a few minutes on CPU
    python bench/niah.py --variants mac,mag,swa --steps 2000 --out runs/niah.json --plot runs/niah.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._arguments import add_threads, apply_threads, comma_list, open_fraction, positive, writable_path  # noqa: E402
from memorycore.devices import resolve_device  # noqa: E402
from memorycore.files import pyplot, save_figure, write_text_atomic  # noqa: E402
from memorycore.lm.model import TitansLM  # noqa: E402
from memorycore.tasks import answer_accuracy, needle_batch  # noqa: E402
from memorycore.titans import VARIANTS, TitansConfig  # noqa: E402
from memorycore.training import fit_model  # noqa: E402

TASKS = {"s-niah": {"num_needles": 1}, "mk-niah": {"num_needles": 4}, "passkey": {"fixed_key": True,
                                                                                    "filler": "repeat"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=comma_list(str, VARIANTS, "variant"), default=list(VARIANTS),
                        help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--memory", choices=["neural", "ramnet"], default="neural", help="the long-term memory")
    parser.add_argument("--task", choices=list(TASKS), default="s-niah")
    parser.add_argument("--dim", type=positive(int), default=64, help="width of the largest variant")
    parser.add_argument("--depth", type=positive(int), default=2)
    parser.add_argument("--heads", type=positive(int), default=4)
    parser.add_argument("--window", type=positive(int), default=16, help="sliding window (mag, mal, swa)")
    parser.add_argument("--segment", type=positive(int), default=16,
                        help="MAC's segment length (default the window's: MAC's attention spans what MAG's does)")
    parser.add_argument("--memory-chunk", type=positive(int), default=16)
    parser.add_argument("--value-norm", action="store_true", help="the neural memory writes RMS-normalised values")
    parser.add_argument("--memory-forgetting", type=open_fraction, default=TitansConfig.memory_forgetting,
                        help="the neural memory's initial forgetting per token")
    parser.add_argument("--memory-max-lr", type=positive(float),
                        help="the neural memory's max_lr (default: TitansConfig's)")
    parser.add_argument("--train-length", type=positive(int), default=128)
    parser.add_argument("--multiples", type=comma_list(int), default=[1, 2, 4, 8],
                        help="test lengths as multiples of --train-length")
    parser.add_argument("--vocab-size", type=positive(int), default=64)
    parser.add_argument("--value-len", type=positive(int), default=2, help="tokens of each needle's value")
    parser.add_argument("--steps", type=positive(int), default=1500)
    parser.add_argument("--batch-size", type=positive(int), default=16)
    parser.add_argument("--lr", type=positive(float), default=3e-3)
    parser.add_argument("--test-examples", type=positive(int), default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a short CPU run: 150 steps, train length 64")
    add_threads(parser)
    parser.add_argument("--out", type=writable_path, default=Path("bench/results/niah.json"))
    parser.add_argument("--plot", type=writable_path, default=Path("bench/results/niah.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_length, args.test_examples = min(args.steps, 150), 64, min(args.test_examples, 50)
    return args


def config(args: argparse.Namespace, variant: str, dim: int) -> TitansConfig:
    return TitansConfig(dim=dim, depth=args.depth, variant=variant, heads=args.heads, window=args.window,
                        segment_len=args.segment, memory=args.memory, memory_chunk=args.memory_chunk,
                        memory_value_norm=args.value_norm, memory_max_lr=args.memory_max_lr,
                        memory_forgetting=args.memory_forgetting)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_dim(args: argparse.Namespace, variant: str, target: int) -> int:
    """The width (a multiple of 2 * heads, for rotary pairs) whose parameter count comes closest to ``target``."""
    step = 2 * args.heads
    widths = range(step, 4 * args.dim + 1, step)
    return min(widths, key=lambda d: abs(parameters(TitansLM(args.vocab_size, config(args, variant, d))) - target))


def training_data(args: argparse.Namespace, examples: int, generator: torch.Generator) -> TensorDataset:
    """Needles in contexts of 1/2, 3/4 and all of the training length, left-padded with token 0 to that length."""
    inputs, labels = [], []
    for index, share in enumerate((0.5, 0.75, 1.0)):
        count = examples // 3 + (index < examples % 3)
        length = max(int(args.train_length * share), 16)
        x, y = needle_batch(count, length, vocab_size=args.vocab_size, value_len=args.value_len,
                            random_state=generator, **TASKS[args.task])
        shuffle = torch.randperm(count, generator=generator)  # depths are spread in order: mix them
        pad = args.train_length - length
        inputs.append(F.pad(x[shuffle], (pad, 0), value=0))
        labels.append(F.pad(y[shuffle], (pad, 0), value=-100))
    return TensorDataset(torch.cat(inputs), torch.cat(labels))


def loss_fn(model: TitansLM, batch) -> torch.Tensor:
    inputs, labels = batch
    logits, _ = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def state_floats(state) -> int:
    """Floats one sequence's state holds (tensors anywhere inside it), batch of one."""
    if isinstance(state, torch.Tensor):
        return state.numel()
    if hasattr(state, "slots") and hasattr(state, "normaliser"):  # RAM-Net's lazily built memory
        return sum(state_floats(part) for part in (state.slots, state.normaliser, state.conv))
    if hasattr(state, "keys") and hasattr(state, "values") and hasattr(state, "valid"):  # a KV cache
        return state.keys.numel() + state.values.numel()
    if isinstance(state, (tuple, list)):
        return sum(state_floats(part) for part in state)
    return 0


@torch.no_grad()
def evaluate(model: TitansLM, args: argparse.Namespace, length: int, device: torch.device) -> dict:
    inputs, labels = needle_batch(args.test_examples, length, vocab_size=args.vocab_size, value_len=args.value_len,
                                  random_state=args.seed + 1000 + length, **TASKS[args.task])
    correct, seconds = [], 0.0
    for start in range(0, len(inputs), args.batch_size):
        x, y = inputs[start:start + args.batch_size].to(device), labels[start:start + args.batch_size].to(device)
        began = time.perf_counter()
        logits, _ = model(x)
        seconds += time.perf_counter() - began
        correct.append(answer_accuracy(logits, y) * len(x))
    _, state = model(inputs[:1].to(device))
    return {"length": length, "accuracy": sum(correct) / len(inputs), "tokens_per_second": inputs.numel() / seconds,
            "state_floats": state_floats(state)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    largest = max(parameters(TitansLM(args.vocab_size, config(args, v, args.dim))) for v in args.variants)
    print(f"{args.task} on {device}: train length {args.train_length}, {args.steps} steps of {args.batch_size}, "
          f"window {args.window}, segment {args.segment}, memory {args.memory}, about {largest:,} parameters each")
    lengths = [m * args.train_length for m in args.multiples]
    print(f"{'variant':10s} {'dim':>4s} {'params':>8s} {'train s':>8s}  " + "  ".join(f"{n:>7d}" for n in lengths))
    rows = []
    for variant in args.variants:
        dim = matched_dim(args, variant, largest)
        torch.manual_seed(args.seed)
        model = TitansLM(args.vocab_size, config(args, variant, dim))
        generator = torch.Generator().manual_seed(args.seed)
        history = fit_model(model, loss_fn, training_data(args, args.steps * args.batch_size, generator),
                            epochs=1, batch_size=args.batch_size, lr=args.lr, patience=None, device=device,
                            random_state=args.seed, description=f"niah {variant}")
        results = [evaluate(model, args, length, device) for length in lengths]
        print(f"{variant:10s} {dim:4d} {parameters(model):8,d} {history.seconds:8.1f}  "
              + "  ".join(f"{r['accuracy']:7.3f}" for r in results), flush=True)
        rows.append({"variant": variant, "dim": dim, "parameters": parameters(model),
                     "train_seconds": history.seconds, "final_train_loss": history.train_loss[-1],
                     "results": results})
        payload = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "device": str(device), "torch_threads": torch.get_num_threads(), "rows": rows}
        write_text_atomic(args.out, json.dumps(payload, indent=2))
    print(f"{'':10s} {'':>4s} {'':>8s} {'':>8s}  " + "  ".join(f"{'tok/s':>7s}" for _ in lengths))
    for row in rows:
        print(f"{row['variant']:10s} {'':>4s} {'':>8s} {'':>8s}  "
              + "  ".join(f"{r['tokens_per_second']:7.0f}" for r in row["results"]))
    print(f"wrote {args.out}")
    plot(rows, args)
    print(f"wrote {args.plot}")


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    figure, axis = pyplot().subplots(figsize=(6.4, 3.8))
    for row in rows:
        lengths = [r["length"] for r in row["results"]]
        axis.plot(lengths, [r["accuracy"] for r in row["results"]], marker="o",
                  label=f"{row['variant']} ({row['parameters'] / 1e3:.0f}k params)")
    axis.axvline(args.train_length, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("context length (tokens); dotted: the longest training context")
    axis.set_ylabel("needle retrieved (share of sequences)")
    axis.set_title(f"{args.task}: trained up to {args.train_length} tokens, {args.steps} steps", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
