"""DNA sequence classification on Titans neural memory.

- :class:`DNAClassifier`: scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba`` / ``save`` / ``load``).
- Loaders returning :class:`SequenceData`: :func:`load_sequences` (dispatch), :func:`load_genomic_benchmarks`,
  :func:`load_table`, :func:`load_fasta`, :func:`load_bed`; streaming readers :func:`iter_fasta`,
  :func:`iter_bed_sequences`.
- Tokenizer: :func:`encode`, :func:`decode`, :func:`reverse_complement`.
- :func:`kmer_logistic_regression`: the k-mer baseline; :class:`KmerClassifier`: the same, to save and use.
- :func:`genomics.scan.scan`: a classifier's scores along a genome, window by window.
"""

from genomics.baseline import KmerClassifier, kmer_logistic_regression
from genomics.data import (
    SequenceData,
    decode,
    encode,
    iter_bed_sequences,
    iter_fasta,
    load_bed,
    load_fasta,
    load_genomic_benchmarks,
    load_sequences,
    load_table,
    reverse_complement,
)
from genomics.estimator import DNAClassifier
from genomics.model import DNANetwork

__all__ = [
    "DNAClassifier", "DNANetwork", "KmerClassifier", "SequenceData", "kmer_logistic_regression",
    "load_sequences", "load_genomic_benchmarks", "load_table", "load_fasta", "load_bed",
    "iter_fasta", "iter_bed_sequences", "encode", "decode", "reverse_complement",
]
