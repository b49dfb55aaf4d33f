"""``MemoryLM``: a scikit-learn-style language model around :class:`~memorycore.lm.model.TitansLM`.

The orchestrator only: tokenizers in tokenizer.py, text and windows in data.py, the network and its sampling in
model.py, the training loop in :mod:`memorycore.training`. Measurements and recipes: docs/lm.md.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import TensorDataset

from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.config import config_from_params
from memorycore.devices import resolve_device, torch_threads, uses_threads
from memorycore.errors import CheckpointError, InputError
from memorycore.lm.data import RandomWindows, TextData, read_text, tiled_windows
from memorycore.lm.model import TitansLM
from memorycore.lm.tokenizer import TOKENIZERS, TextStream, as_bytes, make_tokenizer, tokenizer_from_dict
from memorycore.titans import VARIANTS, TitansConfig
from memorycore.training import TrainingHistory, fit_model, predict_batches, resolve_seed, seeded
from memorycore.validation import (FRACTION, NON_NEGATIVE, POSITIVE_INT, TRAINING_CONSTRAINTS, Interval, Options,
                                   check_params)

CHECKPOINT_CLASS = "MemoryLM"
LM_VARIANTS = (*VARIANTS, "ramnet")  # "ramnet": the RAM-Net memory alone (TitansConfig variant "lmm")


def next_token_loss(model: TitansLM, batch: tuple[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of each window's next tokens (the fit loop's ``loss_fn``)."""
    (windows,) = batch
    logits, _ = model(windows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


class MemoryLM(BaseEstimator):
    """A language model on a Titans backbone: byte or BPE tokens, an embedding, ``depth`` blocks of ``variant`` and
    a head tied to the embedding.

    Parameters
    ----------
    variant : {"mac", "mag", "mal", "lmm", "swa", "attention", "ramnet"}, default "mal"
        The backbone (:class:`memorycore.titans.TitansModel`); "attention" is a nanoGPT-style full-attention
        transformer, "ramnet" the RAM-Net memory alone. "mal" had the lowest validation loss on Tiny Shakespeare
        and retrieved needles at 4x its training length (docs/lm.md, docs/titans.md).
    tokenizer : {"byte", "bpe"}, default "byte"
        256 byte ids, or a byte-level BPE of ``vocab_size`` ids trained on the training text.
    vocab_size : int, default 512
        BPE vocabulary size (unused by "byte").
    dim, depth, heads : int, default 128, 4, 4
        Width, blocks and attention (and memory) heads.
    window, segment_len, persistent_tokens : int, default 64, 32, 4
        Sliding window (mag, mal, swa), MAC segment, learned persistent key/value pairs.
    memory_depth, memory_chunk : int, default 2, 16
        NeuralMemory's MLP depth and chunk.
    mlp_expansion : int, default 4
        Hidden width of each block's gated MLP, as a multiple of ``dim``.
    dropout : float, default 0.0
    block_size : int, default 64
        Tokens per training window (and per evaluation window).
    batch_size : int, default 16
    max_steps : int, default 1000
        Optimiser steps (rounded up to a multiple of ``eval_interval``).
    eval_interval : int, default 250
        Steps between validation losses (the fit loop's "epochs").
    eval_windows : int, default 256
        Validation windows scored at each evaluation during training (spread over the validation text).
    lr, weight_decay : float, default 2e-3, 0.1
    patience : int or None, default None
        Evaluations without a better validation loss before stopping (None: train ``max_steps``).
    validation_fraction : float, default 0.1
        The end of the text held out for validation (nanoGPT's 90/10); 0 trains on everything.
    random_state : int or None, default 0
    device : str, default "auto"
    n_threads : int or None, default None
        Torch CPU threads while fitting and predicting; None applies memorycore's rule
        (:func:`memorycore.devices.resolve_threads`).
    verbose : bool, default True

    Attributes
    ----------
    network_ : TitansLM
    tokenizer_ : ByteTokenizer or BPETokenizer
    history_ : TrainingHistory or None
        None after :meth:`load`.
    n_parameters_ : int

    Examples
    --------
    >>> lm = MemoryLM(max_steps=50, eval_interval=25, verbose=False).fit("To be, or not to be " * 200)
    >>> text = lm.generate("To be", 20, seed=0)
    >>> sorted(lm.evaluate("To be, or not to be " * 20))
    ['bits_per_byte', 'loss', 'perplexity', 'tokens']
    """

    def __init__(self, *, variant: str = "mal", tokenizer: str = "byte", vocab_size: int = 512, dim: int = 128,
                 depth: int = 4, heads: int = 4, window: int = 64, segment_len: int = 32, persistent_tokens: int = 4,
                 memory_depth: int = 2, memory_chunk: int = 16, mlp_expansion: int = 4, dropout: float = 0.0,
                 block_size: int = 64, batch_size: int = 16, max_steps: int = 1000, eval_interval: int = 250,
                 eval_windows: int = 256, lr: float = 2e-3, weight_decay: float = 0.1, patience: int | None = None,
                 validation_fraction: float = 0.1, random_state: int | None = 0, device: str = "auto",
                 n_threads: int | None = None, verbose: bool = True) -> None:
        self.variant = variant
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.window = window
        self.segment_len = segment_len
        self.persistent_tokens = persistent_tokens
        self.memory_depth = memory_depth
        self.memory_chunk = memory_chunk
        self.mlp_expansion = mlp_expansion
        self.dropout = dropout
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.eval_interval = eval_interval
        self.eval_windows = eval_windows
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose

    _parameter_constraints = {
        **TRAINING_CONSTRAINTS,
        **{name: [POSITIVE_INT] for name in ("dim", "depth", "heads", "window", "segment_len", "memory_depth",
                                              "memory_chunk", "mlp_expansion", "block_size", "max_steps",
                                              "eval_interval", "eval_windows")},
        "variant": [Options(*LM_VARIANTS)],
        "tokenizer": [Options(*TOKENIZERS)],
        "vocab_size": [Interval(numbers.Integral, 257)],
        "persistent_tokens": [Interval(numbers.Integral, 0)],
        "validation_fraction": [FRACTION],
        "n_threads": [POSITIVE_INT, None],
    }

    def _check_params(self) -> None:
        check_params(self.get_params(), self._parameter_constraints)
        self.network_config()  # the backbone's own checks (heads dividing dim, segments and chunks)

    def network_config(self, **overrides) -> TitansConfig:
        """The backbone's configuration built from the parameters."""
        ramnet = self.variant == "ramnet"
        return config_from_params(TitansConfig, {**self.get_params(), **overrides},
                                  variant="lmm" if ramnet else self.variant, memory="ramnet" if ramnet else "neural")

    # ------------------------------------------------------------------------------------------------ training
    @uses_threads
    def fit(self, data: TextData, y=None, *, checkpoint: str | os.PathLike | None = None,
            resume: bool = False) -> "MemoryLM":
        """Train on ``data``: text, a path or a list of paths (:func:`memorycore.lm.data.read_text`).

        The last ``validation_fraction`` of the text is the validation split; training draws random contiguous
        windows of ``block_size`` tokens from the rest. ``checkpoint``/``resume``: see
        :func:`memorycore.training.fit_model` (a resumed run ends with the weights of an uninterrupted one).
        """
        self._check_params()
        raw = read_text(data)
        cut = int(len(raw) * (1 - self.validation_fraction))  # nanoGPT's split: data[:int(n * 0.9)]
        tokenizer = make_tokenizer(self.tokenizer, raw[:cut], self.vocab_size)
        train_tokens = tokenizer.encode(raw[:cut])
        if len(train_tokens) <= self.block_size:
            raise InputError(f"the training text is too short: {len(train_tokens)} tokens, and a training window "
                             f"needs block_size + 1 = {self.block_size + 1}; give more text or a smaller block_size")
        val_data = None
        if self.validation_fraction:
            val_tokens = tokenizer.encode(raw[cut:])
            windows, _ = tiled_windows(val_tokens, self.block_size, self.eval_windows)
            if not len(windows):
                raise InputError(f"the validation text (the last {self.validation_fraction:.0%}) holds "
                                 f"{len(val_tokens)} tokens, fewer than one window of block_size + 1 = "
                                 f"{self.block_size + 1}; give more text, or validation_fraction=0")
            val_data = TensorDataset(windows)
        seed, device = resolve_seed(self.random_state), resolve_device(self.device)
        with seeded(seed, device):
            self.network_ = TitansLM(tokenizer.vocab_size, self.network_config())
            interval = min(self.eval_interval, self.max_steps)
            self.history_: TrainingHistory | None = fit_model(
                self.network_, next_token_loss, RandomWindows(train_tokens, self.block_size), val_data,
                epochs=math.ceil(self.max_steps / interval), max_steps_per_epoch=interval,
                batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, patience=self.patience,
                device=device, random_state=seed, verbose=self.verbose, description="lm fit",
                checkpoint=checkpoint, resume=resume)
        self.network_.to("cpu").eval()
        self.tokenizer_ = tokenizer
        self.n_parameters_ = sum(p.numel() for p in self.network_.parameters())
        return self

    # ------------------------------------------------------------------------------------------------ generating
    def generate(self, prompt: str | bytes, max_new_tokens: int = 256, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stream: bool = False) -> str | Iterator[str]:
        """The text sampled after ``prompt`` (without the prompt), or with ``stream=True`` an iterator of its
        pieces as they are produced (a character split over several tokens comes out whole).

        Decoding carries the network's state: the prompt is read once, then each token is one step.
        ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` restrict sampling to the most likely tokens.

        Raises
        ------
        InputError
            An empty prompt, a prompt holding bytes the training text never had (the model has no learnt
            embedding for them), or sampling settings out of range.
        """
        check_is_fitted(self, "network_")
        check_params({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                      "top_p": top_p, "seed": seed},
                     {"max_new_tokens": [Interval(numbers.Integral, 0)], "temperature": [NON_NEGATIVE],
                      "top_k": [POSITIVE_INT, None], "top_p": [Interval(numbers.Real, 0, 1, "right"), None],
                      "seed": [Interval(numbers.Integral, 0), None]})
        raw = as_bytes(prompt)
        if not raw:
            raise InputError("the prompt is empty; give at least one character (e.g. a newline)")
        unseen = sorted({b for b in raw if not self.tokenizer_.seen[b]})
        if unseen:
            shown = ", ".join(f"0x{b:02x} ({bytes([b]).decode('latin-1')!r})" for b in unseen[:5])
            raise InputError(f"the prompt holds {len(unseen)} byte value(s) the training text never had ({shown}); "
                             "the model cannot map them: use characters of its training text")
        pieces = self._stream(raw, max_new_tokens, temperature, top_k, top_p, seed)
        return pieces if stream else "".join(pieces)

    def _stream(self, prompt: bytes, max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int | None) -> Iterator[str]:
        device = resolve_device(self.device)
        generator = torch.Generator().manual_seed(resolve_seed(seed))
        tokens = torch.as_tensor(self.tokenizer_.encode(prompt), device=device)[None]
        text = TextStream(self.tokenizer_)
        # the thread rule holds while the pieces are drawn, also when a caller iterates them later (stream=True)
        with torch_threads(self.n_threads):
            try:
                for token in self.network_.to(device).generate(tokens, max_new_tokens, temperature=temperature,
                                                               top_k=top_k, top_p=top_p, generator=generator):
                    piece = text.push(token)
                    if piece:
                        yield piece
                tail = text.flush()
                if tail:
                    yield tail
            finally:
                self.network_.to("cpu")

    # ------------------------------------------------------------------------------------------------ scoring
    @uses_threads
    def evaluate(self, data: TextData) -> dict[str, float]:
        """Next-token loss of ``data`` (text or paths) in windows of ``block_size`` tokens, as in training.

        Returns
        -------
        dict
            ``loss`` (nats per token), ``bits_per_byte`` (comparable across tokenizers), ``perplexity``
            (``exp(loss)``) and ``tokens`` (how many were predicted: all but the first).
        """
        check_is_fitted(self, "network_")
        raw = read_text(data)
        nll, tokens, n_bytes = self._negative_log_likelihood(self.tokenizer_.encode(raw))
        loss = nll / tokens
        return {"loss": loss, "bits_per_byte": nll / math.log(2) / n_bytes, "perplexity": math.exp(loss),
                "tokens": tokens}

    @uses_threads
    def score(self, text: TextData) -> float:
        """Log-likelihood (nats) of every token of ``text`` after the first, in windows of ``block_size``."""
        check_is_fitted(self, "network_")
        raw = read_text(text)
        return -self._negative_log_likelihood(self.tokenizer_.encode(raw))[0]

    def _negative_log_likelihood(self, tokens: np.ndarray) -> tuple[float, int, int]:
        """Summed next-token NLL of ``tokens``, the number of tokens predicted and their bytes."""
        if len(tokens) < 2:
            raise InputError(f"the text holds {len(tokens)} token(s); scoring needs at least 2")
        windows, tail = tiled_windows(tokens, self.block_size)
        device = resolve_device(self.device)
        network = self.network_.to(device).eval()

        def token_nll(batch: tuple[torch.Tensor]) -> torch.Tensor:
            logits, _ = network(batch[0][:, :-1])
            return F.cross_entropy(logits.float().transpose(1, 2), batch[0][:, 1:], reduction="none").double()

        try:
            nll = predict_batches(token_nll, TensorDataset(windows), batch_size=4 * self.batch_size,
                                  device=device).sum().item()
            if len(tail) > 1:
                nll += predict_batches(token_nll, TensorDataset(tail[None]), batch_size=1, device=device).sum().item()
        finally:
            self.network_.to("cpu")
        lengths = np.array([len(piece) for piece in self.tokenizer_.token_bytes()])
        return nll, len(tokens) - 1, int(lengths[tokens[1:]].sum())

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model, tokenizer included, to one ``.safetensors`` file (weights + JSON; never pickle)."""
        check_is_fitted(self, "network_")
        config = {"class": CHECKPOINT_CLASS,
                  "params": {k: (str(v) if k == "device" else v) for k, v in self.get_params().items()},
                  "tokenizer": self.tokenizer_.to_dict(), "vocab_size": self.network_.vocab_size}
        return save_checkpoint(path, self.network_.state_dict(), config)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> "MemoryLM":
        """Read a model written by :meth:`save`; ``device`` overrides the saved one.

        Raises
        ------
        CheckpointError
            A missing file, not a safetensors file, not a MemoryLM (another model), or a corrupt one.
        """
        tensors, config = load_checkpoint(path, CHECKPOINT_CLASS)
        try:
            model = cls(**{**config["params"], **({} if device is None else {"device": device})})
            tokenizer = tokenizer_from_dict(config["tokenizer"])
            network = TitansLM(int(config["vocab_size"]), model.network_config())
            network.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, InputError) as error:
            raise CheckpointError(f"{path} is a corrupt MemoryLM file ({str(error).splitlines()[0][:200]})") \
                from None
        model.network_, model.tokenizer_, model.history_ = network.eval(), tokenizer, None
        model.n_parameters_ = sum(p.numel() for p in network.parameters())
        return model
