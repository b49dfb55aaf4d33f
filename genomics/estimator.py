"""``DNAClassifier``: a scikit-learn classifier of DNA sequences on NeuralMemory."""

from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import TensorDataset

from genomics.data import encode, pad_tokens, split_windows
from genomics.model import DNANetConfig, DNANetwork, reverse_complement_batch, upgrade_state_dict
from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.devices import resolve_device, uses_threads
from memorycore.errors import CheckpointError, InputError
from memorycore.training import TrainingHistory, fit_model, predict_batches, resolve_seed, seeded
from memorycore.validation import (FRACTION, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, TRAINING_CONSTRAINTS, Interval,
                                  check_params)

CHECKPOINT_CLASS = "DNAClassifier"


class DNAClassifier(ClassifierMixin, BaseEstimator):
    """Classify DNA sequences with a network of Titans neural-memory blocks.

    Sequences are tokenised per base (A C G T N; lowercase and IUPAC codes accepted), embedded, passed through a
    convolution ``stem_kernel`` bases wide and max-pooled over ``stem_stride`` bases, joined by the averaged
    embeddings of their overlapping k-mers (``kmer_sizes``), read by ``blocks`` NeuralMemory blocks (forward and,
    with ``bidirectional``, backward), mean- and max-pooled and classified together with the sequence's mean
    k-mer embedding (its learned k-mer profile).

    Sequences longer than ``max_length`` are cut into windows of ``max_length`` bases overlapping by half; in ``fit``
    every window is a training example with its sequence's label, in ``predict_proba`` the class probabilities of
    a sequence's windows are averaged. Both warn when it happens.

    Parameters
    ----------
    dim : int, default 64
        Model width.
    blocks : int, default 1
        Number of memory blocks.
    heads : int, default 4
        Memory heads per block (``dim`` must be divisible by it).
    memory_depth : int, default 2
        Depth of each head's memory MLP (1 = linear memory).
    chunk_size : int, default 16
        NeuralMemory chunk: tokens (stem positions) whose gradients share one set of base weights.
    memory_lr : float, default 0.02
        Upper bound of the memory's inner (test-time) step ``theta / (1 - eta)`` (NeuralMemory's ``max_lr``); why
        0.02: docs/genomics.md.
    memory_momentum : float or None, default 0.5
        Upper bound of the memory's momentum eta (NeuralMemory's ``max_momentum``; None: unbounded).
    stem_kernel, stem_stride : int, default 12, 4
        Width (bases) of the stem convolution and the max-pool that shortens the sequence for the memory.
    bidirectional : bool, default True
        Read each sequence in both directions.
    reverse_complement : bool, default False
        Also read the reverse-complement strand with shared weights and average both strands: predictions become
        identical for a sequence and its reverse complement (at twice the cost).
    rc_augment : bool, default True
        During training, replace each sequence by its reverse complement with probability 1/2.
    rc_predict : bool, default False
        At prediction, average the class probabilities of each sequence and its reverse complement (test-time
        augmentation; twice the prediction cost).
    dropout : float, default 0.2
        Dropout on the stem output, inside the blocks and on the pooled features.
    kmer_sizes : tuple of int, default (2, 3, 4, 5, 6, 7, 8)
        Lengths k (1-8) of the overlapping k-mers whose learned embeddings (one table of 4**k rows per k) are added
        to the stem and averaged into the head; () turns them off (their effect: docs/genomics.md).
    max_length : int or None, default None
        Longest input the network reads at once; None uses the longest training sequence.
    epochs : int, default 12
    batch_size : int, default 128
    lr : float, default 4e-3
    weight_decay : float, default 0.05
    validation_fraction : float, default 0.1
        Share of the training sequences held out (stratified) for early stopping; 0 trains on all for ``epochs``.
    patience : int, default 4
        Epochs without a better validation loss before stopping.
    device : str, default "auto"
        "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    n_threads : int or None, default None
        Torch CPU threads while fitting and predicting (the caller's count is restored after); None: the rule of
        :func:`memorycore.devices.resolve_threads`, 1 (fastest for this model size: README, "CPU threads").
    random_state : int or None, default 0
        Seeds the weights, the validation split, the batch order and the augmentation.
    verbose : bool, default True
        Progress bars on stderr.

    Attributes
    ----------
    classes_ : ndarray
        Sorted class labels; column order of :meth:`predict_proba`.
    network_ : DNANetwork
    max_length_ : int
    history_ : TrainingHistory or None
        Losses per epoch, best epoch and training seconds (None after :meth:`load`).

    Examples
    --------
    >>> from genomics import DNAClassifier
    >>> clf = DNAClassifier(epochs=2, verbose=False).fit(["ACGTTGCA" * 8, "TTTTAAAA" * 8] * 20, [1, 0] * 20)
    >>> clf.predict(["ACGTTGCA" * 8]).shape
    (1,)
    """

    def __init__(
        self,
        *,
        dim: int = 64,
        blocks: int = 1,
        heads: int = 4,
        memory_depth: int = 2,
        chunk_size: int = 16,
        memory_lr: float = 0.02,
        memory_momentum: float | None = 0.5,
        stem_kernel: int = 12,
        stem_stride: int = 4,
        bidirectional: bool = True,
        reverse_complement: bool = False,
        rc_augment: bool = True,
        rc_predict: bool = False,
        dropout: float = 0.2,
        kmer_sizes: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8),
        max_length: int | None = None,
        epochs: int = 12,
        batch_size: int = 128,
        lr: float = 4e-3,
        weight_decay: float = 0.05,
        validation_fraction: float = 0.1,
        patience: int = 4,
        device: str = "auto",
        n_threads: int | None = None,
        random_state: int | None = 0,
        verbose: bool = True,
    ) -> None:
        self.dim = dim
        self.blocks = blocks
        self.heads = heads
        self.memory_depth = memory_depth
        self.chunk_size = chunk_size
        self.memory_lr = memory_lr
        self.memory_momentum = memory_momentum
        self.stem_kernel = stem_kernel
        self.stem_stride = stem_stride
        self.bidirectional = bidirectional
        self.reverse_complement = reverse_complement
        self.rc_augment = rc_augment
        self.rc_predict = rc_predict
        self.dropout = dropout
        self.kmer_sizes = kmer_sizes
        self.max_length = max_length
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.device = device
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------------------------------------ training

    @uses_threads
    def fit(self, sequences: Sequence[str], labels: Sequence, *, checkpoint: str | os.PathLike | None = None,
            resume: bool = False) -> "DNAClassifier":
        """Train on DNA strings and their labels.

        Parameters
        ----------
        sequences : sequence of str
        labels : sequence
            One label per sequence, at least two distinct values.
        checkpoint, resume
            A training checkpoint to write, and whether to continue from it (:func:`memorycore.training.fit_model`).

        Returns
        -------
        self
        """
        self._check_params()
        tokens = _encode_all(sequences)
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise InputError(f"labels must be one-dimensional, one per sequence; got an array of shape "
                             f"{list(labels.shape)}")
        if len(labels) != len(tokens):
            raise InputError(f"got {len(tokens)} sequences but {labels.size} labels; give one label per sequence")
        missing = [i for i, label in enumerate(labels.tolist()) if label is None or pd.isna(label)]  # None/NaN/NA
        if missing:
            raise InputError(f"{len(missing)} label(s) are missing (None or NaN), the first of sequence "
                             f"{missing[0]}; drop those sequences or give them a label")
        self.classes_, y = np.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise InputError(f"need at least two classes to train, got only {self.classes_.tolist()}")
        self.max_length_ = int(self.max_length or max(len(t) for t in tokens))
        seed = resolve_seed(self.random_state)

        train_index, val_index = self._validation_split(y, seed)
        self._warn_long(tokens, "fit", "every window becomes a training example with its sequence's label")
        train_data = self._windowed_dataset([tokens[i] for i in train_index], y[train_index])
        val_data = self._windowed_dataset([tokens[i] for i in val_index], y[val_index]) if len(val_index) else None

        device = resolve_device(self.device)
        with seeded(seed, device):
            self.network_ = DNANetwork(DNANetConfig.from_params(self.get_params(), num_classes=len(self.classes_)))
            augment = torch.Generator().manual_seed(seed + 1)
            self.history_: TrainingHistory | None = fit_model(
                self.network_, self._loss_function(augment), train_data, val_data,
                epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                patience=self.patience, device=device, random_state=seed, verbose=self.verbose,
                description="fitting DNAClassifier", checkpoint=checkpoint, resume=resume, generators=[augment],
            )
        self.network_.to("cpu").eval()  # a fitted estimator lives on CPU; predict moves it where it runs
        return self

    _parameter_constraints = {
        **TRAINING_CONSTRAINTS,
        **{name: [POSITIVE_INT] for name in ("dim", "heads", "memory_depth", "chunk_size", "stem_kernel",
                                              "stem_stride")},
        "blocks": [NON_NEGATIVE_INT],  # 0: no memory block
        "memory_lr": [POSITIVE],
        "memory_momentum": [Interval(numbers.Real, 0, 1, "neither"), None],
        "validation_fraction": [FRACTION],
        "max_length": [POSITIVE_INT, None],
        "n_threads": [POSITIVE_INT, None],
    }

    def _check_params(self) -> None:
        check_params(self.get_params(), self._parameter_constraints)
        if self.dim % self.heads:
            raise InputError(f"dim={self.dim} must be divisible by heads={self.heads}")

    def _validation_split(self, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(len(y))
        n_val = int(round(self.validation_fraction * len(y)))
        if n_val == 0:
            return index, index[:0]
        if n_val >= len(y):
            raise InputError(f"validation_fraction={self.validation_fraction} leaves no training sequence")
        counts = np.bincount(y)
        stratify = y if counts.min() >= 2 and n_val >= len(counts) else None
        train, val = train_test_split(index, test_size=n_val, stratify=stratify, random_state=seed)
        return np.sort(train), np.sort(val)

    def _windowed_dataset(self, tokens: list[np.ndarray], y: np.ndarray) -> TensorDataset:
        windows, window_labels = [], []
        for sequence_tokens, label in zip(tokens, y):
            pieces = split_windows(sequence_tokens, self.max_length_)
            windows.extend(pieces)
            window_labels.extend([label] * len(pieces))
        padded, lengths = pad_tokens(windows, self.max_length_)
        return TensorDataset(torch.from_numpy(padded), torch.from_numpy(lengths),
                             torch.as_tensor(window_labels, dtype=torch.long))

    def _loss_function(self, augment: torch.Generator):
        use_augmentation = self.rc_augment

        def loss(model, batch):
            tokens, lengths, y = batch
            if use_augmentation and model.training:
                flip = (torch.rand(len(tokens), generator=augment) < 0.5).to(tokens.device)
                tokens = torch.where(flip[:, None], reverse_complement_batch(tokens, lengths), tokens)
            return torch.nn.functional.cross_entropy(model(tokens, lengths).float(), y)

        return loss

    def _warn_long(self, tokens: list[np.ndarray], where: str, what: str) -> None:
        long = sum(len(t) > self.max_length_ for t in tokens)
        if long:
            warnings.warn(f"{where}: {long} sequence(s) longer than max_length={self.max_length_} are cut into "
                          f"overlapping windows; {what}", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------------ prediction

    @uses_threads
    def predict_proba(self, sequences: Sequence[str]) -> np.ndarray:
        """Class probabilities ``[n, n_classes]`` (columns in ``classes_`` order; rows sum to 1).

        A sequence longer than ``max_length_`` gets the mean probabilities of its overlapping windows.
        """
        check_is_fitted(self, "network_")
        tokens = _encode_all(sequences)
        self._warn_long(tokens, "predict", "their class probabilities are averaged")
        windows, owner = [], []
        for row, sequence_tokens in enumerate(tokens):
            pieces = split_windows(sequence_tokens, self.max_length_)
            windows.extend(pieces)
            owner.extend([row] * len(pieces))
        window_proba = self._window_probabilities(windows)
        owner = np.asarray(owner)
        proba = np.zeros((len(tokens), len(self.classes_)))
        np.add.at(proba, owner, window_proba)
        proba /= np.bincount(owner, minlength=len(tokens))[:, None]
        return proba / proba.sum(axis=1, keepdims=True)

    def _window_probabilities(self, windows: list[np.ndarray]) -> np.ndarray:
        device = resolve_device(self.device)
        network = self.network_.to(device).eval()
        # Sorted by length so each batch pads only to its own longest window; predictions do not depend on batching.
        order = np.argsort([len(w) for w in windows], kind="stable")
        batches = _PaddedBatches([windows[i] for i in order], max(1, self.batch_size * 4))

        def probabilities(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            tokens, lengths = batch
            proba = torch.softmax(network(tokens, lengths).float(), dim=-1)
            if self.rc_predict:
                rc_logits = network(reverse_complement_batch(tokens, lengths), lengths)
                proba = 0.5 * (proba + torch.softmax(rc_logits.float(), dim=-1))
            return proba

        try:
            proba = predict_batches(probabilities, batches, batch_size=None, device=device, autocast=True)
        finally:
            self.network_.to("cpu")
        out = np.zeros((len(windows), len(self.classes_)))
        out[order] = proba.double().numpy()
        return out

    def predict(self, sequences: Sequence[str]) -> np.ndarray:
        """The most probable class of each sequence."""
        check_is_fitted(self, "network_")
        return self.classes_[self.predict_proba(sequences).argmax(axis=1)]

    # ------------------------------------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model to one ``.safetensors`` file (weights + JSON config; never pickle).

        Examples
        --------
        >>> clf.save("model.safetensors")  # doctest: +SKIP
        >>> DNAClassifier.load("model.safetensors").predict(["ACGT" * 50])  # doctest: +SKIP
        """
        check_is_fitted(self, "network_")
        config = {
            "class": CHECKPOINT_CLASS,
            "params": {k: (str(v) if k == "device" else v) for k, v in self.get_params().items()},
            "classes": [c.item() if isinstance(c, np.generic) else c for c in self.classes_],
            "max_length": self.max_length_,
        }
        return save_checkpoint(path, self.network_.state_dict(), config)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> "DNAClassifier":
        """Read a model written by :meth:`save`; ``device`` overrides the saved one.

        Raises
        ------
        CheckpointError
            Missing file, not a safetensors file, not a DNAClassifier, or weights that do not fit the config.
        """
        tensors, config = load_checkpoint(path, CHECKPOINT_CLASS)
        try:
            params = dict(config["params"])
            # JSON gives a list; files written before k-mer embeddings and the momentum bound have neither.
            params["kmer_sizes"] = tuple(params.get("kmer_sizes", ()))
            params.setdefault("memory_momentum", None)
            classes, max_length = list(config["classes"]), int(config["max_length"])
            if device is not None:
                params["device"] = device
            model = cls(**params)
            network = DNANetwork(DNANetConfig.from_params(model.get_params(), num_classes=len(classes)))
            network.load_state_dict(upgrade_state_dict(tensors))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} is a corrupt DNAClassifier: {str(error).splitlines()[0][:200]}") from None
        model.network_ = network.eval()
        model.classes_ = np.asarray(classes)
        model.max_length_ = max_length
        model.history_ = None
        return model


class _PaddedBatches(torch.utils.data.Dataset):
    """Token windows in batches of ``size``, each right-padded to its own longest window: ``(tokens, lengths)``."""

    def __init__(self, windows: list[np.ndarray], size: int) -> None:
        self.windows, self.size = windows, size

    def __len__(self) -> int:
        return -(-len(self.windows) // self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.windows[index * self.size:(index + 1) * self.size]
        padded, lengths = pad_tokens(batch, max(len(w) for w in batch))
        return torch.from_numpy(padded), torch.from_numpy(lengths)


def _encode_all(sequences: Sequence[str]) -> list[np.ndarray]:
    if isinstance(sequences, str):
        raise InputError("expected a list of DNA strings, got a single string; wrap it in a list")
    tokens = [encode(sequence, record=f"sequence {i}") for i, sequence in enumerate(sequences)]
    if not tokens:
        raise InputError("no sequences given")
    return tokens
