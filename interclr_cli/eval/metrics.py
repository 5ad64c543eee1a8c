"""Clustering metrics of predicted cluster ids against ground-truth classes.

All metrics are fractions in [0, 1] (ARI and AMI can be slightly negative) and match
scikit-learn's defaults, including its special cases: NMI and AMI with the arithmetic mean of
the entropies (Vinh, Epps, Bailey, "Information Theoretic Measures for Clusterings
Comparison", JMLR 2010), ARI of Hubert and Arabie (J. Classification 1985).

Everything works on the sparse contingency table (at most N non-zero cells), so N of ~1.3M with
thousands of classes and clusters is fine. Limits: :func:`hungarian_accuracy` builds a dense
[#classes, #clusters] table (10k x 10k is 800 MB and slow; 1k x 10k is fine), and the expected
mutual information of :func:`ami` is summed over distinct pairs of cluster sizes (see
:func:`expected_mutual_information`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from ..errors import UserError

#: Above this many summed terms :func:`expected_mutual_information` gives up and AMI is NaN.
EMI_MAX_TERMS = 300_000_000
_EMI_CHUNK = 1 << 21


@dataclass(frozen=True)
class Contingency:
    """Sparse contingency table: ``counts[k]`` samples of class ``rows[k]`` in cluster ``cols[k]``."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    class_sizes: np.ndarray
    cluster_sizes: np.ndarray


def contingency(labels_true, labels_pred) -> Contingency:
    """The sparse contingency table of two labelings (any integer ids, -1 included)."""
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise UserError(f"cluster labels must be 1-D arrays, got shapes {t.shape} and {p.shape}")
    if t.shape[0] != p.shape[0]:
        raise UserError(
            f"{t.shape[0]} true labels but {p.shape[0]} cluster assignments; score the same samples"
        )
    if t.shape[0] == 0:
        raise UserError("no samples to score: the label arrays are empty")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    ti = ti.astype(np.int64).ravel()
    pi = pi.astype(np.int64).ravel()
    n_classes = int(ti.max()) + 1
    n_clusters = int(pi.max()) + 1
    cells, counts = np.unique(ti * n_clusters + pi, return_counts=True)
    return Contingency(
        n=int(t.shape[0]),
        rows=cells // n_clusters,
        cols=cells % n_clusters,
        counts=counts.astype(np.int64),
        class_sizes=np.bincount(ti, minlength=n_classes).astype(np.int64),
        cluster_sizes=np.bincount(pi, minlength=n_clusters).astype(np.int64),
    )


def _entropy(sizes: np.ndarray, n: int) -> float:
    s = sizes[sizes > 0].astype(np.float64)
    return float(math.log(n) - (s * np.log(s)).sum() / n)


def _mutual_info(c: Contingency) -> float:
    nij = c.counts.astype(np.float64)
    log_terms = np.log(nij) + math.log(c.n) - np.log(c.class_sizes[c.rows].astype(np.float64)) - np.log(
        c.cluster_sizes[c.cols].astype(np.float64)
    )
    return max(float((nij * log_terms).sum() / c.n), 0.0)


def _single_cluster_each(c: Contingency) -> bool:
    # Neither labeling splits the data: a perfect match by scikit-learn's convention.
    return len(c.class_sizes) == 1 and len(c.cluster_sizes) == 1


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, MI / mean(H(true), H(pred)) (arithmetic mean)."""
    return _nmi(contingency(labels_true, labels_pred))


def _nmi(c: Contingency) -> float:
    if _single_cluster_each(c):
        return 1.0
    mi = _mutual_info(c)
    if mi == 0.0:
        return 0.0
    return mi / ((_entropy(c.class_sizes, c.n) + _entropy(c.cluster_sizes, c.n)) / 2.0)


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert and Arabie 1985), exact in integer arithmetic."""
    return _ari(contingency(labels_true, labels_pred))


def _pairs(x: np.ndarray) -> int:
    return int((x * (x - 1) // 2).sum())


def _ari(c: Contingency) -> float:
    index = _pairs(c.counts)
    sum_a = _pairs(c.class_sizes)
    sum_b = _pairs(c.cluster_sizes)
    total = c.n * (c.n - 1) // 2
    if total == 0:
        return 1.0
    # (index - expected) / (max - expected) with expected = sum_a * sum_b / total, scaled by 2 * total.
    num = 2 * (index * total - sum_a * sum_b)
    den = (sum_a + sum_b) * total - 2 * sum_a * sum_b
    if den == 0:  # both labelings all singletons or both one cluster: identical partitions
        return 1.0
    return num / den


def expected_mutual_information(class_sizes, cluster_sizes, n: int, *, max_terms: int = EMI_MAX_TERMS) -> float:
    """E[MI] of two random labelings with the given cluster sizes (Vinh et al. 2010, Eq. 24a).

    The sum over cells (i, j) only depends on the pair of sizes (a_i, b_j), so it runs over
    distinct size pairs weighted by their multiplicity (at most sqrt(2N) distinct sizes per
    labeling). For each pair, n_ij runs over the window mean +- (40 sd + 40) of the
    hypergeometric distribution, sd of the dominating binomial: by Hoeffding (1963, Thm. 4) and
    Bernstein's inequality the cells left out have total probability below 1e-24, so the value
    is exact to float64 precision. Terms use log-factorials (scipy.special.gammaln), vectorised
    in chunks. If more than ``max_terms`` terms would be needed (e.g. N in the tens of millions
    with many distinct cluster sizes), it warns and returns NaN.
    """
    ua, ca = np.unique(np.asarray(class_sizes, dtype=np.int64), return_counts=True)
    ub, cb = np.unique(np.asarray(cluster_sizes, dtype=np.int64), return_counts=True)
    a = np.repeat(ua, len(ub))
    b = np.tile(ub, len(ua))
    weight = np.repeat(ca, len(ub)).astype(np.float64) * np.tile(cb, len(ua))
    lo = np.maximum(1, a + b - n)
    hi = np.minimum(a, b)
    p = a / n
    mean = b * p
    half = 40.0 * np.sqrt(b * p * (1.0 - p)) + 40.0
    lo = np.maximum(lo, np.floor(mean - half).astype(np.int64))
    hi = np.minimum(hi, np.ceil(mean + half).astype(np.int64))
    length = hi - lo + 1
    total_terms = int(length.sum())
    if total_terms > max_terms:
        warnings.warn(
            f"expected mutual information needs {total_terms:,} terms (limit {max_terms:,}); AMI skipped",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    log_fact = gammaln(np.arange(n + 1, dtype=np.float64) + 1.0)
    log_n = math.log(n)
    ends = np.cumsum(length)
    emi = 0.0
    start = 0
    while start < len(length):
        # Pairs [start, stop) whose windows add up to about _EMI_CHUNK terms (at least one pair).
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + _EMI_CHUNK, side="right")), start + 1)
        lens = length[start:stop]
        pair = np.repeat(np.arange(stop - start), lens)
        offsets = np.cumsum(lens) - lens
        nij = lo[start:stop][pair] + (np.arange(int(lens.sum())) - offsets[pair])
        ai = a[start:stop][pair]
        bj = b[start:stop][pair]
        log_p = (
            log_fact[ai] + log_fact[bj] + log_fact[n - ai] + log_fact[n - bj] - log_fact[n]
            - log_fact[nij] - log_fact[ai - nij] - log_fact[bj - nij] - log_fact[n - ai - bj + nij]
        )
        nf = nij.astype(np.float64)
        term = nf / n * (np.log(nf) + log_n - np.log(ai.astype(np.float64)) - np.log(bj.astype(np.float64)))
        emi += float((weight[start:stop][pair] * term * np.exp(log_p)).sum())
        start = stop
    return emi


def ami(labels_true, labels_pred) -> float:
    """Adjusted mutual information, (MI - E[MI]) / (mean(H) - E[MI]), arithmetic mean."""
    return _ami(contingency(labels_true, labels_pred))


def _ami(c: Contingency) -> float:
    if _single_cluster_each(c):
        return 1.0
    mi = _mutual_info(c)
    emi = expected_mutual_information(c.class_sizes, c.cluster_sizes, c.n)
    if math.isnan(emi):
        return math.nan
    normalizer = (_entropy(c.class_sizes, c.n) + _entropy(c.cluster_sizes, c.n)) / 2.0
    denominator = normalizer - emi
    # As scikit-learn: keep the sign but avoid 0/0 when the expectation equals the maximum.
    eps = float(np.finfo(np.float64).eps)
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return (mi - emi) / denominator


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
    """All metrics at once from one contingency table.

    Keys: ``num_samples``, ``num_classes``, ``num_clusters``, ``nmi``, ``ami``, ``ari``,
    ``purity``, ``hungarian_accuracy`` (fractions; ``ami`` is NaN past the EMI limit).
    """
    c = contingency(labels_true, labels_pred)
    return {
        "num_samples": c.n,
        "num_classes": int(len(c.class_sizes)),
        "num_clusters": int(len(c.cluster_sizes)),
        "nmi": _nmi(c),
        "ami": _ami(c),
        "ari": _ari(c),
        "purity": _purity(c),
        "hungarian_accuracy": _hungarian(c),
    }
