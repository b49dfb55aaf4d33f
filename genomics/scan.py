"""Scanning a genome: a classifier's scores on windows along a FASTA's sequences, with chromosome coordinates.

Windows are ``window`` bases wide and start every ``step`` bases (0-based, half-open, as BED); where the sequence's
end falls between two starts, one more window ends exactly at the end (so with ``step <= window`` every base is
scored). A sequence shorter than ``window`` is one window. Windows made only of N (assembly gaps) are skipped. The
FASTA is read through its pyfaidx index a batch of windows at a time, so memory stays constant whatever the genome's
size.
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from genomics.data import check_region, iter_bed, open_indexed_fasta, reverse_complement
from memorycore.validation import POSITIVE_INT, check_params


@dataclass(frozen=True)
class Segment:
    """A stretch ``[start, end)`` of sequence ``chrom`` to scan; ``-``: windows are read reverse-complemented."""

    chrom: str
    start: int
    end: int
    strand: str = "+"


def window_starts(length: int, window: int, step: int) -> Iterator[int]:
    """Window starts (relative to a segment of ``length`` bases), lazily: every ``step``, plus one ending at the end.

    Examples
    --------
    >>> list(window_starts(10, 4, 4))
    [0, 4, 6]
    >>> list(window_starts(3, 4, 2))
    [0]
    """
    if length <= window:
        yield 0
        return
    start = 0
    for start in range(0, length - window + 1, step):
        yield start
    if start + window < length:
        yield length - window


def scan_segments(fasta: str | os.PathLike, bed: str | os.PathLike | None = None) -> list[Segment]:
    """What a scan covers: every sequence of ``fasta`` whole, or the regions of ``bed`` (checked against it).

    Raises
    ------
    InputError
        A BED region on a sequence the FASTA lacks, or past its end.
    """
    with open_indexed_fasta(fasta) as handle:
        lengths = {name: len(record) for name, record in handle.records.items()}
    if bed is None:
        return [Segment(chrom, 0, length) for chrom, length in lengths.items()]
    segments = []
    for region in iter_bed(bed):
        check_region(region, lengths, fasta, bed)
        segments.append(Segment(region.chrom, region.start, region.end, region.strand))
    return segments


@dataclass
class ScanBatch:
    """Scored windows: ``chrom``, ``start``, ``end`` and ``strand`` per window, and ``proba [n, n_classes]``."""

    chrom: list[str]
    start: np.ndarray
    end: np.ndarray
    strand: list[str]
    proba: np.ndarray
    skipped: int  # all-N windows left out of this batch


def scan(
    classifier,
    fasta: str | os.PathLike,
    *,
    window: int,
    step: int,
    bed: str | os.PathLike | None = None,
    batch_size: int = 512,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[ScanBatch]:
    """Score windows along ``fasta`` (or inside the regions of ``bed``) with a fitted classifier.

    Parameters
    ----------
    classifier : DNAClassifier or KmerClassifier
        Anything fitted with ``predict_proba(list of str)`` and ``classes_``.
    fasta : path-like
        An uncompressed FASTA (its index is built in the cache when needed, never beside it).
    window, step : int
        Window width and the distance between window starts, in bases.
    bed : path-like, optional
        Scan only inside these regions; a ``-`` strand region's windows are read reverse-complemented.
    batch_size : int
        Windows read and scored at once (memory is about ``batch_size * (window + step)`` bases).
    on_progress : callable, optional
        Called with the number of bases of the segments covered so far.

    Yields
    ------
    ScanBatch
        In the order of the FASTA's sequences (or of the BED's lines), by start.

    Examples
    --------
    >>> for batch in scan(clf, "genome.fa", window=251, step=251):  # doctest: +SKIP
    ...     print(batch.chrom[0], batch.start[0], batch.proba[0])
    """
    check_params({"window": window, "step": step, "batch_size": batch_size},
                 dict.fromkeys(("window", "step", "batch_size"), [POSITIVE_INT]))
    segments = scan_segments(fasta, bed)
    covered = 0  # bases of the segments already scanned
    with open_indexed_fasta(fasta) as handle:
        for segment in segments:
            length = segment.end - segment.start
            starts = window_starts(length, window, step)
            while chosen := list(itertools.islice(starts, batch_size)):
                low = segment.start + chosen[0]
                high = min(segment.start + chosen[-1] + window, segment.end)
                text = handle[segment.chrom][low:high].seq  # one read per batch of windows
                yield _score(classifier, segment, text, low, chosen, window)
                if on_progress is not None:
                    on_progress(covered + min(chosen[-1] + window, length))
            covered += length


def _score(classifier, segment: Segment, text: str, low: int, starts: list[int], window: int) -> ScanBatch:
    begins = [segment.start + s for s in starts]
    ends = [min(b + window, segment.end) for b in begins]
    pieces = [text[b - low:e - low] for b, e in zip(begins, ends)]
    keep = [i for i, piece in enumerate(pieces) if piece.strip("Nn")]
    if segment.strand == "-":
        pieces = [reverse_complement(piece) for piece in pieces]
    if not keep:
        return ScanBatch([], np.zeros(0, int), np.zeros(0, int), [], np.zeros((0, len(classifier.classes_))),
                         len(pieces))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # windows longer than max_length: the CLI says so once
        proba = classifier.predict_proba([pieces[i] for i in keep])
    return ScanBatch([segment.chrom] * len(keep), np.asarray(begins)[keep], np.asarray(ends)[keep],
                     [segment.strand] * len(keep), proba, len(pieces) - len(keep))
