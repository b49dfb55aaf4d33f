"""The k-mer baseline every neural DNA classifier here must beat (REFERENCES.md section 6), and the same linear model
as a classifier to save and use (``genomics fit --model kmer``)."""

from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler
from sklearn.utils.validation import check_is_fitted

from genomics.data import decode, encode
from memorycore.checkpoint import load_checkpoint, save_checkpoint
from memorycore.errors import CheckpointError, InputError
from memorycore.validation import POSITIVE, POSITIVE_INT, Interval, check_params


def kmer_logistic_regression(*, k_min: int = 3, k_max: int = 6, scale: bool = False, C: float = 1.0,
                             max_iter: int = 100, random_state: int | None = 0) -> Pipeline:
    """Counts of every k-mer (k_min..k_max, case-insensitive) fed to a logistic regression.

    With the defaults this is the recipe measured in REFERENCES.md (scikit-learn's default logistic regression on
    raw character 3-6-mer counts). ``scale=True`` divides each k-mer count by its maximum over the training set,
    which puts short and long k-mers on one scale and usually helps with a smaller ``C``.

    Parameters
    ----------
    k_min, k_max : int
        Shortest and longest k-mer counted.
    scale : bool
        Max-abs scale the counts.
    C : float
        Inverse regularisation strength of the logistic regression.
    max_iter : int
        Iterations of the lbfgs solver (the default 100 may stop before convergence on raw counts, as in the
        reference recipe).
    random_state : int or None

    Returns
    -------
    sklearn.pipeline.Pipeline
        Takes a list of DNA strings; ``fit``, ``predict``, ``predict_proba``, ``score``.

    Examples
    --------
    >>> baseline = kmer_logistic_regression().fit(["ACGTACGT", "TTTTAAAA"], [1, 0])
    >>> baseline.predict(["ACGTACGA"]).tolist()
    [1]
    """
    steps = [("kmers", CountVectorizer(analyzer="char", ngram_range=(k_min, k_max), lowercase=True))]
    if scale:
        steps.append(("scale", MaxAbsScaler()))
    steps.append(("classify", LogisticRegression(C=C, max_iter=max_iter, random_state=random_state)))
    return Pipeline(steps)


KMER_CHECKPOINT_CLASS = "KmerClassifier"


class KmerClassifier(ClassifierMixin, BaseEstimator):
    """The k-mer linear model as a classifier to fit, save and use like :class:`genomics.DNAClassifier`
    (``genomics fit --model kmer``).

    Counts of every k-mer of length ``k_min``..``k_max`` (bases as :func:`genomics.encode` reads them: lowercase
    upper-cased, IUPAC codes as N), each divided by its largest count in the training set, then a logistic
    regression. With the defaults it is the 2-7-mer row of docs/genomics.md: the default DNAClassifier's test
    accuracy on human_nontata_promoters in seconds. A sequence is counted whole, whatever its length.

    Parameters
    ----------
    k_min, k_max : int, default 2, 7
        Shortest and longest k-mer counted.
    C : float, default 0.1
        Inverse regularisation strength.
    max_iter : int, default 1000
        Iterations of the lbfgs solver.
    random_state : int or None, default 0

    Attributes
    ----------
    classes_ : ndarray
    max_length_ : int
        The longest training sequence: the window a genome scan uses by default.

    Examples
    --------
    >>> clf = KmerClassifier().fit(["ACGTTGCA" * 8, "TTTTAAAA" * 8] * 5, [1, 0] * 5)
    >>> clf.predict(["ACGTTGCA" * 8]).tolist()
    [1]
    """

    _parameter_constraints = {
        "k_min": [Interval(numbers.Integral, 1, 12)], "k_max": [Interval(numbers.Integral, 1, 12)],
        "C": [POSITIVE], "max_iter": [POSITIVE_INT],
    }

    def __init__(self, *, k_min: int = 2, k_max: int = 7, C: float = 0.1, max_iter: int = 1000,
                 random_state: int | None = 0) -> None:
        self.k_min = k_min
        self.k_max = k_max
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, sequences: Sequence[str], labels: Sequence) -> "KmerClassifier":
        """Count the k-mers of ``sequences`` and fit the logistic regression to ``labels``."""
        check_params(self.get_params(), self._parameter_constraints)
        if self.k_min > self.k_max:
            raise InputError(f"k_min={self.k_min} must not exceed k_max={self.k_max}")
        texts = _bases(sequences)
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(texts):
            raise InputError(f"got {len(texts)} sequences but {labels.size} labels; give one label per sequence")
        self.classes_ = np.unique(labels)
        if len(self.classes_) < 2:
            raise InputError(f"need at least two classes to train, got only {self.classes_.tolist()}")
        model = kmer_logistic_regression(k_min=self.k_min, k_max=self.k_max, scale=True, C=self.C,
                                         max_iter=self.max_iter, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # measured as is (docs/genomics.md)
            model.fit(texts, labels)
        logistic = model.named_steps["classify"]
        self.vocabulary_ = model.named_steps["kmers"].get_feature_names_out().tolist()
        self.max_abs_ = model.named_steps["scale"].max_abs_
        self.coef_, self.intercept_ = logistic.coef_, logistic.intercept_
        self.max_length_ = max(len(t) for t in texts)
        return self

    def predict_proba(self, sequences: Sequence[str]) -> np.ndarray:
        """Class probabilities ``[n, n_classes]`` (columns in ``classes_`` order)."""
        check_is_fitted(self, "coef_")
        counts = self._vectorizer().transform(_bases(sequences))
        scale = np.where(self.max_abs_ > 0, self.max_abs_, 1.0)
        logits = np.asarray(counts.multiply(1.0 / scale).tocsr() @ self.coef_.T) + self.intercept_
        if logits.shape[1] == 1:  # two classes: sklearn keeps the second class's logit only
            logits = np.hstack([np.zeros_like(logits), logits])
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, sequences: Sequence[str]) -> np.ndarray:
        """The most probable class of each sequence."""
        return self.classes_[self.predict_proba(sequences).argmax(axis=1)]

    def _vectorizer(self) -> CountVectorizer:
        return CountVectorizer(analyzer="char", ngram_range=(self.k_min, self.k_max), lowercase=True,
                               vocabulary=self.vocabulary_)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model to one ``.safetensors`` file (weights; k-mers and classes as JSON; never pickle)."""
        check_is_fitted(self, "coef_")
        tensors = {"coef": torch.as_tensor(self.coef_), "intercept": torch.as_tensor(self.intercept_),
                   "max_abs": torch.as_tensor(self.max_abs_)}
        config = {"class": KMER_CHECKPOINT_CLASS, "params": self.get_params(), "vocabulary": self.vocabulary_,
                  "classes": [c.item() if isinstance(c, np.generic) else c for c in self.classes_],
                  "max_length": self.max_length_}
        return save_checkpoint(path, tensors, config)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KmerClassifier":
        """Read a model written by :meth:`save` (CheckpointError when it is not one)."""
        tensors, config = load_checkpoint(path, KMER_CHECKPOINT_CLASS)
        try:
            model = cls(**config["params"])
            model.vocabulary_, model.classes_ = list(config["vocabulary"]), np.asarray(config["classes"])
            model.coef_, model.intercept_ = tensors["coef"].numpy(), tensors["intercept"].numpy()
            model.max_abs_, model.max_length_ = tensors["max_abs"].numpy(), int(config["max_length"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path} is a corrupt KmerClassifier: {str(error).splitlines()[0][:200]}") from None
        if model.coef_.shape[1] != len(model.vocabulary_) or model.max_abs_.shape != (len(model.vocabulary_),):
            raise CheckpointError(f"{path} is a corrupt KmerClassifier: its weights do not fit its k-mer list")
        return model


def _bases(sequences: Sequence[str]) -> list[str]:
    """The sequences as the tokenizer reads them (checked; IUPAC codes as N), as upper-case strings."""
    if isinstance(sequences, str):
        raise InputError("expected a list of DNA strings, got a single string; wrap it in a list")
    texts = [decode(encode(sequence, record=f"sequence {i}")) for i, sequence in enumerate(sequences)]
    if not texts:
        raise InputError("no sequences given")
    return texts
