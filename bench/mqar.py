"""MQAR (Zoology) benchmark: 2-layer models built from RAMNet, NeuralMemory and softmax attention.

Each model is trained on the Zoology mixture (sequence length, key-value pairs) = (64,4), (128,8), (256,16),
(256,32), (256,64) with fresh sequences every step (one setting per batch), AdamW (weight decay 0.1), warmup +
cosine schedule, then scored on the 7 test settings (64,4) (64,8) (64,16) (128,32) (256,64) (512,128) (1024,256).
It prints the accuracy of every setting, their mean, and the state each model keeps per sequence:

- state total: floats of recurrent state per sequence, summed over layers (attention: its KV cache at 1024 tokens);
- state/token: floats of that state one token reads or writes (RAM-Net: K read + K written rows per head; the other
  layers touch all of it).

    python bench/mqar.py                 # GPU: V = 8192, d_model 64 / 128 / 256, 1000 test sequences per setting
    python bench/mqar.py --quick         # CPU: V = 256, L <= 128, 2^6 slots as 8^2, K = 4, slot balance 0.1, d_model 64
    python bench/mqar.py --models ramnet --dims 128 --steps 3000 --plot runs/mqar.png   # + accuracy per setting
    python bench/mqar.py --from a.json b.json --labels "8^4" "4^5" --plot runs/both.png   # earlier runs, drawn

Training longer than one sitting (the GPU machine takes commands of at most 10 minutes): ``--checkpoint-dir DIR``
saves each model's training state (weights, AdamW moments, the data generator, steps and seconds done) there every
``--checkpoint-every`` seconds, and ``--call-seconds S`` ends the call's training after S seconds, saved. The same
command run again resumes where it stopped, on the same schedule, and scores the model once its training is done:

    python bench/mqar.py --models ramnet --dims 128 --steps 40000 --checkpoint-dir runs/mqar --call-seconds 420
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._arguments import add_threads, apply_threads, positive, writable_path  # noqa: E402
from memorycore import CheckpointError, NeuralMemory, RAMNet  # noqa: E402
from memorycore.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from memorycore.devices import resolve_device  # noqa: E402
from memorycore.files import pyplot, save_figure, write_text_atomic  # noqa: E402
from memorycore.mqar import (  # noqa: E402
    IGNORE_INDEX, ZOOLOGY_TEST_SETTINGS, ZOOLOGY_TRAIN_MIXTURE, mqar_accuracy, mqar_batch,
)

QUICK_TRAIN_MIXTURE = ((32, 2), (32, 4), (64, 4), (64, 8))
QUICK_TEST_SETTINGS = ((32, 2), (32, 4), (64, 4), (64, 8), (128, 8))
MODEL_NAMES = {"ramnet": "RAM-Net", "neural_memory": "NeuralMemory", "attention": "attention"}  # --models, and labels


class CausalAttention(nn.Module):
    """Softmax attention with rotary positions, the reference mixer (its state is the KV cache: 2 x time x dim).

    Recall needs to know which token follows a key; the memory layers see that through their short convolution,
    attention needs positions. Zoology gives its attention learned absolute positions; rotary ones also cover the
    test lengths (512, 1024) that training never shows. (On ``--quick`` it scores ~1 / pairs after 1000 steps, with
    or without positions, and 1.000 in every setting after 4000.)
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, dim = x.shape
        q, k, v = self.to_qkv(x).view(batch, time, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        return self.to_out(out.transpose(1, 2).reshape(batch, time, dim))


def rotary(x: Tensor) -> Tensor:
    """Rotary position embedding of [batch, heads, time, head_dim]: rotate pairs of features by position x frequency."""
    time, dim = x.shape[-2:]
    frequencies = 10_000.0 ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.arange(time, device=x.device, dtype=torch.float32)[:, None] * frequencies
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class StatefulMixer(nn.Module):
    """Adapts a memorycore layer (``y, state = layer(x)``) to ``y = mixer(x)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)[0]


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer_norm, self.mixer = nn.LayerNorm(dim), mixer
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class RecallModel(nn.Module):
    """Embedding, two blocks (mixer + MLP), output head tied to the embedding.

    Tying matters for MQAR: the memory returns (a projection of) the value's embedding, and a tied head scores
    it against the same vectors; untied, the model must also learn the inverse map (CPU check: 0.88 vs 0.22
    accuracy after 400 steps at V = 256). Embeddings start at std 1/sqrt(dim) so the first logits are O(1).
    """

    def __init__(self, vocab_size: int, dim: int, mixers: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        self.blocks = nn.ModuleList(Block(dim, mixer) for mixer in mixers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def ramnet_layers(dim: int, args: argparse.Namespace) -> list[nn.Module]:
    """Two RAM-Net layers of 2^slots_exponent slots per head, value_dim 64, from the command line's settings.

    The slots are ``factor_size ** factors``: ``--ramnet-factor-size`` (d_p) and as many factors (U) as 2^exponent
    slots need. ``--ramnet-cape first`` gives the first layer relative (CAPE) addressing as the paper does in shallow
    layers; the second layer always addresses by content, which recall needs. Balance, read normalisation and
    temperature are RAMNet's options.
    """
    heads = max(1, dim // 64)
    return [
        StatefulMixer(RAMNet(dim, heads=heads, factors=ramnet_factors(args.slots_exponent, args.ramnet_factor_size),
                             factor_size=args.ramnet_factor_size,
                             top_k=args.top_k, cape=cape, gamma=1.0, balance=args.ramnet_balance,
                             normalize_reads=args.ramnet_normalize_reads, temperature=args.ramnet_temperature))
        for cape in (args.ramnet_cape == "first", False)
    ]


def ramnet_factors(slots_exponent: int, factor_size: int) -> int:
    """U such that factor_size ** U = 2 ** slots_exponent, for a power-of-2 factor_size (parse_args checks that
    log2(factor_size) divides the exponent)."""
    return slots_exponent // (factor_size.bit_length() - 1)


def build_model(kind: str, vocab_size: int, dim: int, args: argparse.Namespace) -> tuple[nn.Module, dict[str, int]]:
    """The model and its state size: total floats per sequence, floats touched per token."""
    heads = max(1, dim // 64)
    if kind == "ramnet":
        mixers = ramnet_layers(dim, args)
        sizes = [m.layer.state_size() for m in mixers]
        state = {"total": sum(s["total"] for s in sizes), "per_token": sum(s["per_token"] for s in sizes)}
    elif kind == "neural_memory":
        mixers = [StatefulMixer(NeuralMemory(dim, heads=heads, depth=2, chunk_size=16)) for _ in range(2)]
        floats = 2 * sum(w.numel() for m in mixers for w in m.layer.initial_weights)  # weights + momentum
        state = {"total": floats, "per_token": floats}
    elif kind == "attention":
        mixers = [CausalAttention(dim, heads) for _ in range(2)]
        state = {"total": 2 * 2 * 1024 * dim, "per_token": 2 * 2 * 1024 * dim}
    else:
        raise ValueError(f"unknown model {kind!r}; use ramnet, neural_memory or attention")
    return RecallModel(vocab_size, dim, mixers), state


def learning_rate(base: float, progress: float) -> float:
    """5% linear warmup, then cosine decay to 0, as a function of the fraction of training done."""
    if progress < 0.05:
        return base * (progress + 1e-3) / 0.05
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - 0.05) / 0.95)))


@dataclass
class Progress:
    """How far a model's training has come, over every call that trained it."""

    steps: int = 0
    seconds: float = 0.0
    finished: bool = False


# the settings that shape a training run: a checkpoint resumes only a run made with the same ones
RUN_SETTINGS = ("quick", "vocab_size", "steps", "batch_size", "lr", "weight_decay", "max_train_seconds", "seed",
                "slots_exponent", "top_k", "ramnet_cape", "ramnet_balance", "ramnet_normalize_reads",
                "ramnet_temperature", "ramnet_factor_size")
CHECKPOINT_CLASS = "MQARTraining"


def run_fingerprint(args: argparse.Namespace, kind: str, dim: int) -> dict:
    return {"model": kind, "d_model": dim, **{name: getattr(args, name) for name in RUN_SETTINGS}}


def checkpoint_path(args: argparse.Namespace, kind: str, dim: int) -> Path | None:
    return None if args.checkpoint_dir is None else args.checkpoint_dir / f"mqar_{kind}_d{dim}.safetensors"


def save_training(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                  progress: Progress, fingerprint: dict) -> None:
    """Weights, AdamW moments and the data generator in one safetensors file; the rest in its JSON (atomic)."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    for index, state in optimizer_state["state"].items():
        tensors.update({f"optimizer.{index}.{key}": value for key, value in state.items()})
    tensors["generator"] = generator.get_state()
    save_checkpoint(path, tensors, {"class": CHECKPOINT_CLASS, "run": fingerprint, "progress": asdict(progress),
                                    "param_groups": optimizer_state["param_groups"]})


def load_training(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                  fingerprint: dict) -> Progress:
    """Restore what :func:`save_training` wrote; CheckpointError if the file is not ours or from another run."""
    tensors, config = load_checkpoint(path, CHECKPOINT_CLASS)
    saved = config["run"]
    different = [f"{name} {saved.get(name)!r} there, {value!r} here" for name, value in fingerprint.items()
                 if saved.get(name) != value]
    if different:
        raise CheckpointError(f"{path} is the training state of another run ({'; '.join(different)}); run with "
                              "its settings, or give another --checkpoint-dir to start afresh")
    model.load_state_dict({name[len("model."):]: value for name, value in tensors.items()
                           if name.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".")
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": config["param_groups"]})
    generator.set_state(tensors["generator"])
    return Progress(**config["progress"])


def train(model: nn.Module, args: argparse.Namespace, mixture, device: torch.device, *,
          checkpoint: Path | None = None, fingerprint: dict | None = None, deadline: float | None = None) -> Progress:
    """Fresh MQAR batches from the mixture until ``steps`` or ``max_train_seconds``; returns the progress made.

    The schedule follows whichever budget is used up first, so a time-capped run still ends its cosine decay.
    With a ``checkpoint`` path, training resumes from it if it exists (made by a run with the same ``fingerprint``),
    and is saved there every ``args.checkpoint_every`` seconds, at the end, and when ``time.perf_counter()`` passes
    ``deadline`` (which returns the progress so far, unfinished).
    """
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    progress = Progress()
    if checkpoint is not None and checkpoint.exists():
        progress = load_training(checkpoint, model, optimizer, generator, fingerprint)
        print(f"    resumed from {checkpoint}: {progress.steps} steps, {progress.seconds:.0f} s of training done"
              + (" (finished)" if progress.finished else ""), file=sys.stderr, flush=True)
    if progress.finished:
        return progress

    def save() -> None:
        if checkpoint is not None:
            save_training(checkpoint, model, optimizer, generator, progress, fingerprint)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    start = last_save = time.perf_counter()
    seconds_before = progress.seconds
    while True:
        now = time.perf_counter()
        progress.seconds = seconds_before + now - start
        done = progress.steps / args.steps
        if args.max_train_seconds:
            done = max(done, progress.seconds / args.max_train_seconds)
        if done >= 1:
            break
        if deadline is not None and now >= deadline:
            save()
            return progress
        if checkpoint is not None and now - last_save >= args.checkpoint_every:
            save()
            last_save = now
        loss, seq_len, inputs = training_step(model, optimizer, args, mixture, generator, device, autocast, done)
        if args.verbose and progress.steps % 100 == 0:
            hits = "".join(f"  layer {i} reads finding a write {share:.0%}"
                           for i, share in enumerate(reads_finding_writes(model, inputs[:4])))
            print(f"    step {progress.steps:5d}  progress {done:.2f}  L={seq_len:4d}  loss {loss.item():.4f}{hits}",
                  file=sys.stderr, flush=True)
        progress.steps += 1
    progress.finished = True
    save()
    return progress


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace, mixture,
                  generator: torch.Generator, device: torch.device, autocast,
                  done: float) -> tuple[Tensor, int, Tensor]:
    """One AdamW step on a fresh batch of one mixture setting; returns the loss, the length and the inputs.

    The loss stays a tensor: reading it every step would wait for the GPU every step.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(args.lr, done)
    seq_len, pairs = mixture[int(torch.randint(len(mixture), (), generator=generator))]
    # keep the tokens per batch about constant across settings
    batch = max(1, args.batch_size * mixture[0][0] // seq_len)
    inputs, labels = mqar_batch(batch, seq_len, pairs, vocab_size=args.vocab_size, random_state=generator)
    inputs, labels = inputs.to(device), labels.to(device)
    with autocast:
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach(), seq_len, inputs


@torch.no_grad()
def reads_finding_writes(model: nn.Module, inputs: Tensor) -> list[float]:
    """Per RAM-Net layer, the share of tokens whose read slots include one written earlier (or by the token itself).

    A layer whose reads stop finding its writes returns zeros, and no gradient leads its addresses back: on
    ``--quick`` with 4000 steps (lr 3e-3, weight decay 0.1, seed 0) RAM-Net's second layer fell from 22-35% to 1%
    near step 2900 and never recovered (mean accuracy 0.009; with --quick's slot balance, 0.1, the same run scores
    0.995).
    """
    layers = [module for module in model.modules() if isinstance(module, RAMNet)]
    layer_inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda _, args, i=i: layer_inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    model(inputs)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    shares = []
    for i, layer in enumerate(layers):
        found = layer.addresses(layer_inputs[i])
        batch, heads, time, top_k = found["write_slots"].shape
        token_time = torch.arange(time, device=inputs.device).view(1, 1, time, 1).expand(batch, heads, time, top_k)
        # the first time each slot is written (time if never): O(slots) per sequence and head, not O(slots x time)
        first_write = torch.full((batch, heads, layer.slots), time, device=inputs.device)
        first_write.scatter_reduce_(-1, found["write_slots"].flatten(2), token_time.flatten(2), reduce="amin")
        read_first_write = first_write.gather(-1, found["read_slots"].flatten(2)).view(batch, heads, time, top_k)
        shares.append((read_first_write <= token_time).any(-1).float().mean().item())
    return shares


@torch.no_grad()
def evaluate(model: nn.Module, args: argparse.Namespace, settings, device: torch.device) -> list[float]:
    model.eval()
    accuracies = []
    for index, (seq_len, pairs) in enumerate(settings):
        inputs, labels = mqar_batch(args.test_examples, seq_len, pairs, vocab_size=args.vocab_size,
                                    random_state=10_000 + index)
        correct = total = 0
        for start in range(0, args.test_examples, args.eval_batch_size):
            part = slice(start, start + args.eval_batch_size)
            logits = model(inputs[part].to(device)).float().cpu()
            mask = labels[part] != IGNORE_INDEX
            correct += mqar_accuracy(logits, labels[part]) * int(mask.sum())
            total += int(mask.sum())
        accuracies.append(correct / total)
    return accuracies


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked, with the defaults of --quick or of the full run filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU run (V=256, short sequences, small RAM-Net)")
    add_threads(parser)
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help=f"comma-separated, of: {', '.join(MODEL_NAMES)} (default all)")
    parser.add_argument("--dims", default=None, help="comma-separated d_model values (default 64,128,256; 64 with "
                                                     "--quick)")
    parser.add_argument("--steps", type=positive(int), default=None, help="optimiser steps per model (default 4000)")
    parser.add_argument("--batch-size", type=positive(int), default=None,
                        help="sequences per batch at the shortest length (default 128; 32 with --quick)")
    parser.add_argument("--lr", type=positive(float), default=None,
                        help="peak learning rate (default 3e-4; 3e-3 with --quick). RAM-Net at d_model 128 learnt "
                             "best at 3e-3 (docs/ramnet.md)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1, Zoology's)")
    parser.add_argument("--max-train-seconds", type=float, default=None, help="also stop training after this long")
    parser.add_argument("--slots-exponent", type=positive(int), default=None,
                        help="RAM-Net slots per head = 2**this, a multiple of log2(--ramnet-factor-size) (default 12: "
                             "8^4; 6 with --quick: 8^2)")
    parser.add_argument("--top-k", type=positive(int), default=None,
                        help="RAM-Net slots per token (default 8; 4 with --quick)")
    parser.add_argument("--ramnet-factor-size", type=int, default=None,
                        help="d_p, the width of each softmax of RAM-Net's product address, a power of 2: the slots "
                             "are d_p**U, U = slots-exponent / log2(d_p) (default 8). At d_model 128, 64^2 slots learnt"
                             " little where 8^4 and 4^5 learnt, 8^4 best (docs/ramnet.md)")
    parser.add_argument("--ramnet-cape", choices=("none", "first"), default="none",
                        help="CAPE relative addressing in RAM-Net's first layer (default: content addressing in both)")
    parser.add_argument("--ramnet-balance", type=float, default=None,
                        help="RAMNet's slot-balance regulariser (default 0, the paper's layer; 0.1 with --quick)")
    parser.add_argument("--ramnet-normalize-reads", action="store_true",
                        help="RAMNet's reads weigh their top-K slots by weights that sum to 1 (normalize_reads)")
    parser.add_argument("--ramnet-temperature", type=float, default=1.0,
                        help="initial value of RAMNet's learned q/k temperature (default 1.0)")
    parser.add_argument("--vocab-size", type=positive(int), default=None, help="V (default 8192; 256 with --quick)")
    parser.add_argument("--test-examples", type=positive(int), default=None,
                        help="test sequences per setting (default 1000; 100 with --quick)")
    parser.add_argument("--eval-batch-size", type=positive(int), default=50,
                        help="sequences per scoring batch (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--verbose", action="store_true", help="print the training loss every 100 steps (stderr)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="save each model's training state here and resume from it when the same command runs "
                             "again (the settings that shape training must match)")
    parser.add_argument("--checkpoint-every", type=float, default=None,
                        help="seconds between saves of the training state (default 60; needs --checkpoint-dir)")
    parser.add_argument("--call-seconds", type=float, default=None,
                        help="end this call's training after this long, saved, and score only models whose training "
                             "is done (needs --checkpoint-dir); run the same command again to go on")
    parser.add_argument("--out", type=writable_path, default=Path(__file__).parent / "results" / "mqar.json",
                        help="JSON file for the results (written atomically)")
    parser.add_argument("--plot", type=writable_path, default=None,
                        help="also draw the accuracy of every test setting, one line per model, into this PNG")
    parser.add_argument("--from", dest="from_results", type=Path, nargs="+", default=None, metavar="JSON",
                        help="train nothing: draw --plot from these results of earlier runs (their --out files)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="with --from: one legend label per file instead of the settings read from it")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models.split(",") if name not in MODEL_NAMES]
    if unknown:
        parser.error(f"--models: unknown {', '.join(map(repr, unknown))}; use some of: {', '.join(MODEL_NAMES)}")
    if args.from_results is not None and args.plot is None:
        parser.error("--from draws earlier results; say where with --plot PATH.png")
    if args.labels is not None and len(args.labels) != len(args.from_results or ()):
        parser.error(f"--labels needs one label per --from file: got {len(args.labels)} labels for "
                     f"{len(args.from_results or ())} files")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.ramnet_balance is not None and not 0 <= args.ramnet_balance < math.inf:
        parser.error(f"--ramnet-balance must be a finite number >= 0, got {args.ramnet_balance}")
    if not 0 < args.ramnet_temperature < math.inf:
        parser.error(f"--ramnet-temperature must be a finite number > 0, got {args.ramnet_temperature}")
    for name in ("call_seconds", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and args.checkpoint_dir is None:
            parser.error(f"--{name.replace('_', '-')} needs --checkpoint-dir (where the training state is saved)")
        if value is not None and not 0 < value < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be a number of seconds > 0, got {value}")
    if args.checkpoint_dir is not None and args.checkpoint_dir.exists() and not args.checkpoint_dir.is_dir():
        parser.error(f"--checkpoint-dir {args.checkpoint_dir} is a file, not a folder; give a folder for the "
                     "training state")
    args.checkpoint_every = args.checkpoint_every or 60.0
    quick = args.quick
    args.dims = args.dims or ("64" if quick else "64,128,256")
    if not all(d.strip().isdigit() and int(d) > 0 for d in args.dims.split(",")):
        parser.error(f"--dims takes comma-separated positive integers (e.g. 64,128), got {args.dims}")
    args.steps = args.steps or 4000  # --quick: at 1000 steps attention had not learnt recall yet (~1 / pairs)
    args.lr = args.lr or (3e-3 if quick else 3e-4)
    args.batch_size = args.batch_size or (32 if quick else 128)
    args.vocab_size = args.vocab_size or (256 if quick else 8192)
    args.slots_exponent = args.slots_exponent or (6 if quick else 12)
    args.top_k = args.top_k or (4 if quick else 8)
    if args.ramnet_factor_size is None:  # not `or`: 0 is a bad value to report, not a default
        args.ramnet_factor_size = 8
    size = args.ramnet_factor_size
    if size < 2 or size & (size - 1):
        parser.error(f"--ramnet-factor-size must be a power of 2 >= 2, got {size}")
    bits = size.bit_length() - 1  # log2 of a power of 2
    if args.slots_exponent < 1 or args.slots_exponent % bits:
        parser.error(f"--slots-exponent {args.slots_exponent} must be a positive multiple of {bits}, "
                     f"log2(--ramnet-factor-size {size}): 2**exponent slots = factor_size**factors")
    if args.ramnet_balance is None:
        args.ramnet_balance = 0.1 if quick else 0.0
    args.test_examples = args.test_examples or (100 if quick else 1000)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_results is not None:
        try:
            curves = [curve for index, path in enumerate(args.from_results)
                      for curve in result_curves(path, args.labels[index] if args.labels else None)]
        except ValueError as error:
            print(f"mqar.py: error: {error}", file=sys.stderr)
            sys.exit(2)
        plot_accuracy(curves, args.plot)
        print(f"wrote {args.plot}")
        return
    quick = args.quick
    mixture = QUICK_TRAIN_MIXTURE if quick else ZOOLOGY_TRAIN_MIXTURE
    settings = QUICK_TEST_SETTINGS if quick else ZOOLOGY_TEST_SETTINGS
    device = resolve_device(args.device)
    apply_threads(args.threads)

    print(f"MQAR on {device}: V={args.vocab_size}, up to {args.steps} steps of {args.batch_size} x "
          f"{mixture[0][0]} tokens, lr {args.lr}, {args.test_examples} test sequences per setting (L/N), "
          f"RAM-Net 2^{args.slots_exponent} slots per head as "
          f"{args.ramnet_factor_size}^{ramnet_factors(args.slots_exponent, args.ramnet_factor_size)}, "
          f"CAPE in layer 1: {args.ramnet_cape == 'first'}, "
          f"slot balance {args.ramnet_balance}, temperature {args.ramnet_temperature}")
    header = "model          d_model  state total  state/token  " + "  ".join(
        f"{f'{n}/{p}':>8}" for n, p in settings) + "     mean  steps  train s"
    print(header)
    rows = []
    deadline = None if args.call_seconds is None else time.perf_counter() + args.call_seconds
    runs = [(int(dim), kind) for dim in args.dims.split(",") for kind in args.models.split(",")]
    for index, (dim, kind) in enumerate(runs):
        torch.manual_seed(args.seed)
        model, state = build_model(kind, args.vocab_size, dim, args)
        model.to(device)
        try:
            progress = train(model, args, mixture, device, checkpoint=checkpoint_path(args, kind, dim),
                             fingerprint=run_fingerprint(args, kind, dim), deadline=deadline)
        except CheckpointError as error:
            print(f"mqar.py: error: {error}", file=sys.stderr)
            sys.exit(2)
        row = {"model": kind, "d_model": dim, "state_total": state["total"], "state_per_token": state["per_token"],
               "steps": progress.steps, "train_seconds": progress.seconds}
        if not progress.finished:
            left = ", ".join(f"{k} d_model {d}" for d, k in runs[index:])
            print(f"{kind:14s} {dim:7d}  paused after {progress.steps} of {args.steps} steps "
                  f"({progress.seconds:.0f} s of training), saved in {args.checkpoint_dir}; run the same command "
                  f"again to go on with: {left}", flush=True)
            rows.append({**row, "status": "paused"})
            write_json(args.out, report(args, device, rows))
            break
        accuracies = evaluate(model, args, settings, device)
        cells = "  ".join(f"{a:8.3f}" for a in accuracies)
        mean = sum(accuracies) / len(accuracies)
        print(f"{kind:14s} {dim:7d} {state['total']:12,d} {state['per_token']:12,d}  {cells}  "
              f"{mean:7.3f} {progress.steps:6d}  {progress.seconds:7.1f}", flush=True)
        row.update(status="done", mean_accuracy=mean,
                   accuracy={f"{n}/{p}": a for (n, p), a in zip(settings, accuracies)})
        if kind == "ramnet":  # a layer near 0% has collapsed (see reads_finding_writes)
            seq_len, pairs = settings[-1]
            inputs, _ = mqar_batch(4, seq_len, pairs, vocab_size=args.vocab_size, random_state=0)
            row["reads_finding_writes"] = reads_finding_writes(model, inputs.to(device))
            shares = ", ".join(f"{share:.0%}" for share in row["reads_finding_writes"])
            print(f"    reads finding a written slot, per layer, on {seq_len}/{pairs}: {shares}", flush=True)
        rows.append(row)
        write_json(args.out, report(args, device, rows))
    print(f"wrote {args.out}")
    if args.plot is not None and any(row["status"] == "done" for row in rows):  # paused runs are drawn when done
        plot_accuracy(result_curves(args.out), args.plot)
        print(f"wrote {args.plot}")


def report(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> dict:
    """The JSON of a run: its settings as numbers, flags and strings (paths as strings), the device, the rows."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"settings": settings, "device": str(device), "rows": rows}


def write_json(path: Path, payload: dict) -> None:
    """Write through a temporary file and a rename, so a killed run never leaves half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2))


def result_curves(path: Path, label: str | None = None) -> list[tuple[str, dict[str, float]]]:
    """(legend label, accuracy per test setting) for every finished model in one results file of this script.

    The label names the model, d_model and, for RAM-Net, its slots (factor size ^ factors), then the seed and the
    steps trained; ``label`` replaces those (followed by the model's name when the file holds several). It ends with
    the mean accuracy.
    """
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give the JSON a run of bench/mqar.py wrote (its --out)")
    try:
        payload = json.loads(path.read_text())
        settings = payload["settings"]
        done = [row for row in payload["rows"] if row.get("status") == "done"]  # a paused run has no scores yet
        curves = [(curve_label(settings, row, label, several=len(done) > 1), dict(row["accuracy"])) for row in done]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a results file of bench/mqar.py (its --out JSON): {error!r}") from None
    if not curves:
        raise ValueError(f"{path} holds no finished run to draw (a paused run is scored when it ends)")
    return curves


def curve_label(settings: dict, row: dict, label: str | None, several: bool) -> str:
    model = MODEL_NAMES.get(row["model"], row["model"])
    if label is not None:
        name = f"{label}, {model}" if several else label
    else:
        name = f"{model}, d_model {row['d_model']}"
        if row["model"] == "ramnet" and settings.get("ramnet_factor_size"):
            size, exponent = int(settings["ramnet_factor_size"]), int(settings["slots_exponent"])
            name += f", {size}^{ramnet_factors(exponent, size)} slots"
        name += f", seed {settings.get('seed', '?')}, {row['steps']} steps"
    return f"{name}: mean {row['mean_accuracy']:.3f}"


def plot_accuracy(curves: list[tuple[str, dict[str, float]]], path: Path) -> None:
    """Accuracy against the test settings (L/N, ordered by length then pairs), one line per curve, into a PNG."""
    def length_then_pairs(setting: str) -> tuple[int, ...]:
        return tuple(int(part) for part in setting.split("/"))

    settings = sorted({setting for _, accuracy in curves for setting in accuracy}, key=length_then_pairs)
    figure, axis = pyplot().subplots(figsize=(7.2, 4.0))
    for label, accuracy in curves:
        shown = [s for s in settings if s in accuracy]
        axis.plot([settings.index(s) for s in shown], [accuracy[s] for s in shown], marker="o", label=label)
    axis.set_xticks(range(len(settings)), settings)
    axis.set_ylim(-0.02, 1.02)  # a line at 0 stays visible
    axis.set_xlabel("test setting: sequence length / key-value pairs")
    axis.set_ylabel("accuracy")
    axis.set_title("MQAR recall per test setting", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    save_figure(figure, path)


if __name__ == "__main__":
    main()
