"""KV-cache presses on a trained attention LM: full cache, H2O, L2 and NAMM at cache budgets, and NAMM's transfer.

A small attention language model (the MemoryLM ``attention`` variant, byte ids) is trained on a long-context retrieval
mixture (passkey and needle-in-a-haystack, half each: memorycore.tasks), or read from ``--model``. NAMM scorers are
evolved on it with CMA-ES (``fit_namm``): one that decides the cache size itself (score >= 0, as the paper) and one
per ``--evolve-at`` budget that ranks the entries a press of that budget keeps. Then, on held-out examples, every press
at every budget: the share of answer tokens predicted, the cache it ends with (share of the full cache) and tokens/s
reading the examples and decoding after them. Transfer: the scorers applied unchanged to a deeper attention model and
to a MAC model trained the same way. Writes a table, JSON, and a plot of the evolutions' fitness curves.

    python bench/namm.py --quick                            # CPU, small sizes (docs/namm.md has its table)
    python bench/namm.py --seq-len 1024 --interval 128 --steps 3000 --generations 50 --population 32
    python bench/namm.py --model lm.safetensors --no-transfer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._arguments import positive, writable_path  # noqa: E402
from memorycore.devices import resolve_device  # noqa: E402
from memorycore.errors import TrainingError  # noqa: E402
from memorycore.files import pyplot, save_figure, write_text_atomic  # noqa: E402
from memorycore.lm import MemoryLM  # noqa: E402
from memorycore.lm.model import TitansLM  # noqa: E402
from memorycore.lm.tokenizer import ByteTokenizer  # noqa: E402
from memorycore.namm import AnswerTask, BAMScorer, H2OPress, L2NormPress, NAMMPress, fit_namm  # noqa: E402
from memorycore.namm.evaluation import check_pressable, compare_presses  # noqa: E402
from memorycore.tasks import needle_batch, passkey_batch  # noqa: E402
from memorycore.training import fit_model  # noqa: E402

VOCAB = 256  # byte ids: the model is a MemoryLM file that `lm namm` commands read (--task-vocab of them in use)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a MemoryLM file to press (default: train one)")
    parser.add_argument("--dim", type=positive(int), default=64)
    parser.add_argument("--depth", type=positive(int), default=2)
    parser.add_argument("--heads", type=positive(int), default=4)
    parser.add_argument("--seq-len", type=positive(int), default=512, help="tokens per example (train and test)")
    parser.add_argument("--task-vocab", type=positive(int), default=64,
                        help="token ids the tasks draw from (the model has 256; fewer values learn faster)")
    parser.add_argument("--interval", type=positive(int), default=64, help="tokens between evictions")
    parser.add_argument("--steps", type=positive(int), default=1500, help="training steps of each model")
    parser.add_argument("--train-batch", type=positive(int), default=16)
    parser.add_argument("--lr", type=positive(float), default=3e-3)
    parser.add_argument("--budgets", default="0.5,0.25,0.1", help="kept shares of the cache, comma-separated")
    parser.add_argument("--evolve-at", default=None, help="budgets a scorer is evolved at (default: every budget); "
                                                          "the others use the nearest")
    parser.add_argument("--generations", type=positive(int), default=30)
    parser.add_argument("--population", type=positive(int), default=32)
    parser.add_argument("--sigma0", type=positive(float), default=0.065)
    parser.add_argument("--hidden", type=positive(int), default=32, help="the BAM scorer's width")
    parser.add_argument("--evolution-batch", type=positive(int), default=8, help="examples per generation")
    parser.add_argument("--test-examples", type=positive(int), default=64)
    parser.add_argument("--decode-tokens", type=positive(int), default=32)
    parser.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                        help="also a deeper attention model and a MAC model (trained here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a CPU run: dim 64, 128 tokens, interval 32, 600 steps, 6 generations of 8, scorer "
                             "hidden 8, one budgeted scorer (0.25); 37 min on 2 busy cores, nearly all training "
                             "(--no-transfer: one model, about 7 min)")
    parser.add_argument("--out", type=writable_path, default=Path("bench/results/namm.json"))
    parser.add_argument("--plot", type=writable_path, default=Path("bench/results/namm.png"))
    parser.add_argument("--save-dir", type=Path, default=Path("bench/results/namm"),
                        help="where the trained models and scorers go")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.seq_len, args.interval, args.steps = 64, 128, 32, min(args.steps, 600)
        args.generations, args.population, args.hidden = min(args.generations, 6), min(args.population, 8), 8
        args.evolution_batch, args.test_examples, args.decode_tokens = 4, min(args.test_examples, 32), 16
        args.evolve_at = args.evolve_at or "0.25"
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
        args.evolve_at = args.budgets if args.evolve_at is None else [float(b) for b in args.evolve_at.split(",")]
        assert all(0 < b <= 1 for b in args.budgets + args.evolve_at)
    except (ValueError, AssertionError):
        parser.error("--budgets and --evolve-at take shares in (0, 1] separated by commas")
    return args


def mixture_batch(num_examples: int, seq_len: int, vocab_size: int,
                  random_state: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half passkey, half needle-in-a-haystack examples (4-token values), in random order."""
    half = num_examples // 2
    parts = [passkey_batch(half, seq_len, value_len=4, vocab_size=vocab_size, random_state=random_state)] if half \
        else []
    parts.append(needle_batch(num_examples - half, seq_len, vocab_size=vocab_size, random_state=random_state))
    inputs, labels = (torch.cat(tensors) for tensors in zip(*parts))
    order = torch.randperm(num_examples, generator=random_state)
    return inputs[order], labels[order]


def train(args: argparse.Namespace, variant: str, depth: int, device: torch.device) -> MemoryLM:
    """A MemoryLM of ``variant`` trained on the retrieval mixture at lengths 1/4 to 1 of ``--seq-len``
    (shorter ones left-padded), so that it retrieves at every length it is tested on."""
    lm = MemoryLM(variant=variant, dim=args.dim, depth=depth, heads=args.heads, window=args.seq_len,
                  segment_len=args.seq_len // 2, block_size=args.seq_len, random_state=args.seed, device="cpu")
    generator = torch.Generator().manual_seed(args.seed)
    inputs, labels = [], []
    examples = args.steps * args.train_batch
    for index, share in enumerate((0.25, 0.5, 0.75, 1.0)):
        length = max(int(args.seq_len * share), 32)
        x, y = mixture_batch(examples // 4 + (index < examples % 4), length, args.task_vocab, generator)
        inputs.append(F.pad(x, (args.seq_len - length, 0), value=0))
        labels.append(F.pad(y, (args.seq_len - length, 0), value=-100))
    torch.manual_seed(args.seed)
    network = TitansLM(VOCAB, lm.network_config())

    def loss(model: TitansLM, batch) -> torch.Tensor:
        logits, _ = model(batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), ignore_index=-100)

    history = fit_model(network, loss, TensorDataset(torch.cat(inputs), torch.cat(labels)), epochs=1,
                        batch_size=args.train_batch, lr=args.lr, patience=None, device=device,
                        random_state=args.seed, description=f"train {variant} depth {depth}")
    # every byte id is a task token: none is refused as unseen
    lm.network_, lm.tokenizer_, lm.history_ = network.to("cpu").eval(), ByteTokenizer([True] * 256), history
    lm.n_parameters_ = sum(p.numel() for p in network.parameters())
    return lm


def presses(args: argparse.Namespace, scorers: dict, budget: float) -> dict:
    """The presses compared at one budget; the budgeted NAMM uses the scorer evolved at the nearest budget."""
    nearest = min((b for b in scorers if b is not None), key=lambda b: abs(b - budget), default=None)
    chosen = {"full": None, "h2o": H2OPress(budget, interval=args.interval),
              "l2": L2NormPress(budget, interval=args.interval)}
    if nearest is not None:
        chosen["namm"] = NAMMPress(scorers[nearest], budget=budget, interval=args.interval)
    return chosen


def table(model_name: str, rows: list[dict]) -> str:
    lines = [f"{model_name}: held-out score (share of answer tokens predicted) / cache kept / reading and decoding "
             "tokens/s",
             f"{'budget':>8s} {'press':<16s} {'score':>7s} {'kept':>7s} {'read/s':>8s} {'decode/s':>9s}"]
    for row in rows:
        lines.append(f"{row['budget']:>8s} {row['press']:<16s} {row['score']:7.3f} {row['kept']:7.1%} "
                     f"{row['tokens_per_second']:8.0f} {row['decode_tokens_per_second']:9.1f}")
    return "\n".join(lines)


def measure(args: argparse.Namespace, network: TitansLM, scorers: dict, task: AnswerTask) -> list[dict]:
    """Every press at every budget, and NAMM deciding the size itself, on the same held-out examples."""
    rows = []
    settings = {"interval": args.interval, "examples": args.test_examples, "batch_size": args.evolution_batch,
                "seed": args.seed + 10_000, "decode_tokens": args.decode_tokens}  # seeds no evolution batch uses
    own = {"full": None}
    if scorers.get(None) is not None:
        own["namm (own size)"] = NAMMPress(scorers[None], interval=args.interval)
    for result in compare_presses(network, task, own, **settings):
        rows.append({"budget": "-", "press": result.name, **_numbers(result)})
    for budget in args.budgets:
        chosen = presses(args, scorers, budget)
        del chosen["full"]
        for result in compare_presses(network, task, chosen, **settings):
            rows.append({"budget": f"{budget:.0%}", "press": result.name, **_numbers(result)})
    return rows


def _numbers(result) -> dict:
    return {"score": result.score, "kept": result.kept, "tokens_per_second": result.tokens_per_second,
            "decode_tokens_per_second": result.decode_tokens_per_second}


def plot(curves: dict, path: Path, title: str) -> None:
    figure, axis = pyplot().subplots(figsize=(6.4, 3.8))
    for name, history in curves.items():
        generations = range(1, len(history) + 1)
        line, = axis.plot(generations, [h["best"] for h in history], marker="o", markersize=3,
                          label=f"{name}: best of generation")
        axis.plot(generations, [h["mean"] for h in history], linestyle="--", color=line.get_color(),
                  label=f"{name}: population mean")
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("generation")
    axis.set_ylabel("fitness (pressed / full-cache score)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.save_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"NAMM bench on {device} ({torch.get_num_threads()} threads): {args.seq_len}-token passkey/needle "
          f"mixture, interval {args.interval}, budgets {args.budgets}, evolution {args.generations} generations of "
          f"{args.population} x {args.evolution_batch} examples, scorer hidden {args.hidden}", flush=True)
    if args.model is not None:
        lm = MemoryLM.load(args.model, device="cpu")
    else:
        lm = train(args, "attention", args.depth, device)
        lm.save(args.save_dir / "attention.safetensors")
    network = lm.network_.eval()
    check_pressable(network, str(args.model or "the model"))
    task = AnswerTask(partial(mixture_batch, seq_len=args.seq_len, vocab_size=args.task_vocab))
    scorers, curves, evolution_seconds = {}, {}, {}
    for budget in [None, *args.evolve_at]:
        name = "own size" if budget is None else f"budget {budget:.0%}"
        start = time.perf_counter()
        result = fit_namm(network, task, generations=args.generations, population=args.population,
                          sigma0=args.sigma0, batch_size=args.evolution_batch, scorer=BAMScorer(args.hidden),
                          interval=args.interval, budget=budget, seed=args.seed,
                          out=args.save_dir / f"namm_{'own' if budget is None else int(budget * 100)}.safetensors")
        scorers[budget], curves[name] = result.scorer, result.history
        evolution_seconds[name] = time.perf_counter() - start
        print(f"evolved NAMM ({name}): best fitness {result.best_fitness:.3f} in {evolution_seconds[name]:.0f} s",
              flush=True)
    plot(curves, args.plot, f"NAMM evolution on {args.seq_len}-token retrieval, population {args.population}")
    results = {}

    def write() -> None:  # after every model, so that a long run leaves what it measured
        payload = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "device": str(device), "torch_threads": torch.get_num_threads(),
                   "seconds": time.perf_counter() - began, "evolution_seconds": evolution_seconds,
                   "fitness_curves": curves, "results": results}
        write_text_atomic(args.out, json.dumps(payload, indent=2))

    name = f"{lm.variant} depth {lm.depth}"
    results[name] = measure(args, network, scorers, task)
    print(table(f"{name} (evolved on)", results[name]), flush=True)
    write()
    if args.transfer:
        for variant, depth in (("attention", lm.depth + 1), ("mac", lm.depth)):
            name = f"{variant} depth {depth}"
            try:
                other = train(args, variant, depth, device)
            except TrainingError as error:  # a model that diverges is a result, not the end of the run
                print(f"{name}: training failed, no transfer measured: {error}", flush=True)
                results[name] = {"training_failed": str(error)}
                write()
                continue
            other.save(args.save_dir / f"{variant}_{depth}.safetensors")
            results[name] = measure(args, other.network_.eval(), scorers, task)
            print(table(f"{name} (transfer: scorers unchanged)", results[name]), flush=True)
            write()
    print(f"wrote {args.out} and {args.plot} ({(time.perf_counter() - began) / 60:.1f} min)")


if __name__ == "__main__":
    main()
