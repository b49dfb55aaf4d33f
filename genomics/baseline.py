"""The k-mer baseline every neural DNA classifier here must beat (REFERENCES.md section 6)."""

from __future__ import annotations

from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler


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
