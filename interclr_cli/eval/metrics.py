"""Clustering metrics of predicted cluster ids against ground-truth classes.

NMI, ARI and AMI are scikit-learn's (``normalized_mutual_info_score``, ``adjusted_rand_score``,
``adjusted_mutual_info_score``) with their defaults and special cases: NMI and AMI normalised by
the arithmetic mean of the two entropies (Vinh, Epps, Bailey, "Information Theoretic Measures for
Clusterings Comparison", JMLR 2010), ARI of Hubert and Arabie (J. Classification 1985). Purity
and Hungarian-matched accuracy (the DeepCluster-style one-to-one accuracy) are computed here from
the sparse contingency table. All are fractions in [0, 1]; ARI and AMI can be slightly negative.

Inputs are validated here (one-line :class:`~interclr_cli.errors.UserError` messages) and
re-coded to 0..C-1 before scikit-learn sees them, so any integer ids (-1 included) work.

Cost at ImageNet scale (``benchmarks/bench_cluster_metrics.py``): everything but AMI is well
under a second at N = 1,281,167 with 1,000 classes and 10,000 clusters; scikit-learn's AMI sums
its expected mutual information over every (class, cluster) pair and takes ~40 s there (~1 s for
ImageNet val, 50,000 / 1,000 / 1,000). :func:`hungarian_accuracy` builds a dense
[#classes, #clusters] table (10k x 10k is 800 MB and slow; 1k x 10k is fine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from ..errors import UserError


@dataclass(frozen=True)
class Contingency:
    """Sparse contingency table: ``counts[k]`` samples of class ``rows[k]`` in cluster ``cols[k]``."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    class_sizes: np.ndarray
    cluster_sizes: np.ndarray


def _codes(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    """Both labelings validated (1-D, same non-zero length) and re-coded to int64 ids 0..C-1."""
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise UserError(f"cluster labels must be 1-D arrays, got shapes {t.shape} and {p.shape}")
    if t.shape[0] != p.shape[0]:
        raise UserError(f"{t.shape[0]} true labels but {p.shape[0]} cluster assignments; score the same samples")
    if t.shape[0] == 0:
        raise UserError("no samples to score: the label arrays are empty")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    return ti.astype(np.int64).ravel(), pi.astype(np.int64).ravel()


def contingency(labels_true, labels_pred) -> Contingency:
    """The sparse contingency table of two labelings (any integer ids, -1 included)."""
    return _table(*_codes(labels_true, labels_pred))


def _table(ti: np.ndarray, pi: np.ndarray) -> Contingency:
    n_classes = int(ti.max()) + 1
    n_clusters = int(pi.max()) + 1
    cells, counts = np.unique(ti * n_clusters + pi, return_counts=True)
    return Contingency(
        n=int(ti.shape[0]),
        rows=cells // n_clusters,
        cols=cells % n_clusters,
        counts=counts.astype(np.int64),
        class_sizes=np.bincount(ti, minlength=n_classes).astype(np.int64),
        cluster_sizes=np.bincount(pi, minlength=n_clusters).astype(np.int64),
    )


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, MI / mean(H(true), H(pred)) (arithmetic mean; scikit-learn)."""
    return _nmi(*_codes(labels_true, labels_pred))


def _nmi(ti: np.ndarray, pi: np.ndarray) -> float:
    return float(normalized_mutual_info_score(ti, pi, average_method="arithmetic"))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert and Arabie 1985; scikit-learn)."""
    return _ari(*_codes(labels_true, labels_pred))


def _ari(ti: np.ndarray, pi: np.ndarray) -> float:
    return float(adjusted_rand_score(ti, pi))


def ami(labels_true, labels_pred) -> float:
    """Adjusted mutual information, (MI - E[MI]) / (mean(H) - E[MI]), arithmetic mean (scikit-learn).

    E[MI] is exact (Vinh et al. 2010, Eq. 24a); its cost grows with #classes x N (~40 s at
    ImageNet-train scale, see the module docstring).
    """
    return _ami(*_codes(labels_true, labels_pred))


def _ami(ti: np.ndarray, pi: np.ndarray) -> float:
    return float(adjusted_mutual_info_score(ti, pi, average_method="arithmetic"))


def purity(labels_true, labels_pred) -> float:
    """Fraction of samples whose class is the majority class of their cluster."""
    return _purity(contingency(labels_true, labels_pred))


def _purity(c: Contingency) -> float:
    best = np.zeros(len(c.cluster_sizes), dtype=np.int64)
    np.maximum.at(best, c.cols, c.counts)
    return float(best.sum() / c.n)


def hungarian_accuracy(labels_true, labels_pred) -> float:
    """Accuracy under the best one-to-one map of clusters to classes (Kuhn-Munkres).

    With more clusters than classes the unmatched clusters count as wrong (and vice versa), so
    over-clustering is not rewarded; :func:`purity` is the many-to-one counterpart.
    """
    return _hungarian(contingency(labels_true, labels_pred))


def _hungarian(c: Contingency) -> float:
    table = np.zeros((len(c.class_sizes), len(c.cluster_sizes)), dtype=np.float64)
    table[c.rows, c.cols] = c.counts
    r, k = linear_sum_assignment(table, maximize=True)
    return float(table[r, k].sum() / c.n)


def cluster_report(labels_true, labels_pred) -> dict:
    """All metrics at once, validating and re-coding the labels once.

    Keys: ``num_samples``, ``num_classes``, ``num_clusters``, ``nmi``, ``ami``, ``ari``,
    ``purity``, ``hungarian_accuracy`` (Python floats / ints).
    """
    ti, pi = _codes(labels_true, labels_pred)
    c = _table(ti, pi)
    return {
        "num_samples": c.n,
        "num_classes": int(len(c.class_sizes)),
        "num_clusters": int(len(c.cluster_sizes)),
        "nmi": _nmi(ti, pi),
        "ami": _ami(ti, pi),
        "ari": _ari(ti, pi),
        "purity": _purity(c),
        "hungarian_accuracy": _hungarian(c),
    }
