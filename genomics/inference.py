"""Using a fitted classifier on files: loading either kind of model, streaming classification and evaluation
metrics."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score, matthews_corrcoef,
                             roc_auc_score)
from sklearn.preprocessing import label_binarize

from genomics.baseline import KMER_CHECKPOINT_CLASS, KmerClassifier
from genomics.data import SequenceData, encode, normalize_labels
from genomics.estimator import DNAClassifier
from memorycore.checkpoint import read_config
from memorycore.errors import InputError
from memorycore.training import check_hyperparameters


def load_classifier(path: str | os.PathLike, *, device: str | None = None,
                    n_threads: int | None = None) -> DNAClassifier | KmerClassifier:
    """Read a model written by ``genomics fit``: a :class:`DNAClassifier` (``device`` and ``n_threads`` override its
    own) or a :class:`KmerClassifier` (``--model kmer``), by the class its file names."""
    if read_config(path).get("class") == KMER_CHECKPOINT_CLASS:
        return KmerClassifier.load(path)
    classifier = DNAClassifier.load(path, device=device)
    if n_threads is not None:
        classifier.set_params(n_threads=n_threads)
    return classifier


def classify_records(
    classifier: DNAClassifier,
    records: Iterable[tuple[str, str]],
    *,
    batch_size: int = 512,
    source: str = "input",
) -> Iterator[tuple[list[str], np.ndarray, int]]:
    """Classify ``(id, sequence)`` records batch by batch, so inputs larger than memory can be streamed.

    Parameters
    ----------
    classifier : DNAClassifier or KmerClassifier
        A fitted classifier.
    records : iterable of (id, str)
        E.g. :func:`genomics.iter_fasta`, :func:`genomics.iter_bed_sequences` or (ids that are BedRegions)
        :func:`genomics.data.iter_bed_regions`.
    batch_size : int
        Records held in memory at once.
    source : str
        Name of the input, used in error messages.

    Yields
    ------
    ids : list of str
    proba : ndarray [len(ids), n_classes]
        Columns in ``classifier.classes_`` order.
    n_windowed : int
        How many of these records were longer than the model's ``max_length_`` (classified by averaging windows).
    """
    check_hyperparameters(batch_size=batch_size)
    ids, sequences = [], []
    for record_id, sequence in records:
        name = getattr(record_id, "id", record_id)  # a BedRegion (genomics.data.iter_bed_regions) or a str
        encode(sequence, record=f"{source}: record {name!r}")  # fail with the record's name, not an index
        ids.append(record_id)
        sequences.append(sequence)
        if len(ids) == batch_size:
            yield _classify_batch(classifier, ids, sequences)
            ids, sequences = [], []
    if ids:
        yield _classify_batch(classifier, ids, sequences)


def _classify_batch(classifier, ids: list[str], sequences: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # counted and reported once by the caller instead
        proba = classifier.predict_proba(sequences)
    cuts = isinstance(classifier, DNAClassifier)  # a k-mer model counts a long sequence whole
    return ids, proba, sum(len(s) > classifier.max_length_ for s in sequences) if cuts else 0


def _label_key(label) -> str:
    return str(normalize_labels([label])[0])


@dataclass
class Evaluation:
    """Scores of a classifier on labelled data (F1 is macro-averaged over classes).

    ``auroc`` and ``auprc`` (average precision, scikit-learn's) rank by the predicted probabilities: of
    ``positive`` (the last class) with two classes, one class against the rest averaged over the classes with more;
    NaN where only one class is true.
    """

    n: int
    accuracy: float
    f1: float
    mcc: float
    classes: list
    confusion: np.ndarray
    auroc: float = math.nan
    auprc: float = math.nan

    def _ranked(self) -> str:
        if math.isnan(self.auroc):
            return "  (undefined: only one class is true in these data)"
        if len(self.classes) == 2:
            return f"  (class {self.classes[-1]} against {self.classes[0]})"
        return "  (each class against the rest, macro average)"

    def to_text(self) -> str:
        """A small plain-text report: the scores, then the confusion matrix (rows true, columns predicted)."""
        lines = [f"sequences  {self.n}", f"accuracy   {self.accuracy:.4f}", f"f1_macro   {self.f1:.4f}",
                 f"mcc        {self.mcc:.4f}", f"auroc      {self.auroc:.4f}{self._ranked()}",
                 f"auprc      {self.auprc:.4f}{self._ranked()}"]
        names = [str(c) for c in self.classes]
        absent = [name for name, row in zip(names, self.confusion) if row.sum() == 0]
        if absent:
            lines.append(f"note: no sequence of class {', '.join(absent)} in these data; F1 averages over the "
                         "classes that occur, and MCC is 0 when only one class is true")
        lines.append("confusion matrix (rows: true class, columns: predicted class)")
        width = max(8, *(len(n) for n in names), len(str(self.confusion.max()))) + 2
        lines.append(" " * width + "".join(n.rjust(width) for n in names))
        for name, row in zip(names, self.confusion):
            lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
        return "\n".join(lines)


def evaluate_classifier(classifier: DNAClassifier | KmerClassifier, data: SequenceData) -> Evaluation:
    """Accuracy, macro F1, Matthews correlation, AUROC, AUPRC and the confusion matrix of ``classifier`` on labelled
    ``data``.

    Raises
    ------
    InputError
        The data have no labels, or labels the model has never seen.
    """
    if data.labels is None:
        raise InputError("the evaluation data have no labels")
    classes = classifier.classes_
    # compared as normalize_labels writes them, so "1.0" in a file matches a model fitted on 1 or on "1.0"
    by_name = {_label_key(c): c for c in classes}
    unknown = sorted({_label_key(label) for label in data.labels} - set(by_name))
    if unknown:
        raise InputError(f"labels {unknown} are not classes of the model (it knows {sorted(by_name)}); "
                         f"evaluate on data labelled like the training data")
    truth = np.asarray([by_name[_label_key(label)] for label in data.labels])
    proba = classifier.predict_proba(data.sequences)
    predicted = classes[proba.argmax(axis=1)]
    # F1 averages over the classes that occur (as truth or prediction): a class absent from both has no F1, and
    # counting it as 0 would halve a perfect score on data holding one class. MCC of one-class data is 0 (sklearn).
    seen = set(truth.tolist()) | set(predicted.tolist())
    occurring = [c for c in classes if c in seen]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's notes on undefined F1 / MCC terms; the report says it instead
        f1 = float(f1_score(truth, predicted, average="macro", labels=occurring, zero_division=0))
        mcc = float(matthews_corrcoef(truth, predicted))
    auroc, auprc = ranking_scores(truth, proba, classes)
    return Evaluation(
        n=len(truth),
        accuracy=float(accuracy_score(truth, predicted)),
        f1=f1,
        mcc=mcc,
        classes=[c.item() if isinstance(c, np.generic) else c for c in classes],
        confusion=confusion_matrix(truth, predicted, labels=classes),
        auroc=auroc,
        auprc=auprc,
    )


def ranking_scores(truth: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """AUROC and AUPRC (average precision) of class probabilities ``proba [n, len(classes)]`` against ``truth``: of
    the last class with two classes, one-vs-rest macro averages with more; NaN when only one class is true."""
    if len(set(truth.tolist())) < 2:
        return math.nan, math.nan
    if len(classes) == 2:
        positive = truth == classes[1]
        return float(roc_auc_score(positive, proba[:, 1])), float(average_precision_score(positive, proba[:, 1]))
    present = np.isin(classes, truth)  # a class never true has no ranking to score
    onehot = label_binarize(truth, classes=classes)[:, present]
    return (float(roc_auc_score(onehot, proba[:, present], average="macro")),
            float(average_precision_score(onehot, proba[:, present], average="macro")))
