import itertools
import math
import time
from collections import Counter

import numpy as np
import pytest
from sklearn import metrics as skm

from interclr_cli.errors import UserError
from interclr_cli.eval.metrics import ami, ari, cluster_report, contingency, hungarian_accuracy, nmi, purity

# ----------------------------------------------------------------------------- direct formulas


def direct_mi(t, p):
    n = len(t)
    ct, cp, joint = Counter(t), Counter(p), Counter(zip(t, p))
    return sum(c / n * math.log(n * c / (ct[a] * cp[b])) for (a, b), c in joint.items())


def direct_entropy(x):
    n = len(x)
    return -sum(c / n * math.log(c / n) for c in Counter(x).values())


def direct_nmi(t, p):
    return direct_mi(t, p) / ((direct_entropy(t) + direct_entropy(p)) / 2)


def direct_emi(t, p):
    """E[MI] as the average over every permutation of the predicted labels (the definition)."""
    perms = list(itertools.permutations(p))
    return sum(direct_mi(t, q) for q in perms) / len(perms)


def direct_ami(t, p):
    emi = direct_emi(t, p)
    return (direct_mi(t, p) - emi) / ((direct_entropy(t) + direct_entropy(p)) / 2 - emi)


def direct_ari(t, p):
    """From pair counts over all unordered pairs of samples."""
    tp = fp = fn = tn = 0
    for i, j in itertools.combinations(range(len(t)), 2):
        same_t, same_p = t[i] == t[j], p[i] == p[j]
        tp += same_t and same_p
        fn += same_t and not same_p
        fp += same_p and not same_t
        tn += not same_t and not same_p
    return 2 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def direct_hungarian(t, p):
    classes, clusters = sorted(set(t)), sorted(set(p))
    best = 0
    if len(clusters) >= len(classes):
        for chosen in itertools.permutations(clusters, len(classes)):
            m = dict(zip(chosen, classes))
            best = max(best, sum(m.get(b) == a for a, b in zip(t, p)))
    else:
        for chosen in itertools.permutations(classes, len(clusters)):
            m = dict(zip(clusters, chosen))
            best = max(best, sum(m[b] == a for a, b in zip(t, p)))
    return best / len(t)


CASES = [
    ([0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 2, 2, 2]),
    ([0, 0, 1, 1, 2, 2, 2], [5, 5, 5, 7, 7, -1, -1]),
    ([0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]),
    ([3, 3, 3, 3, 1, 1], [0, 1, 0, 1, 0, 1]),
]


@pytest.mark.parametrize("t,p", CASES)
def test_against_direct_formulas(t, p):
    tn, pn = np.array(t), np.array(p)
    assert nmi(tn, pn) == pytest.approx(direct_nmi(t, p), abs=1e-12)
    assert ari(tn, pn) == pytest.approx(direct_ari(t, p), abs=1e-12)
    assert ami(tn, pn) == pytest.approx(direct_ami(t, p), abs=1e-9)
    assert hungarian_accuracy(tn, pn) == pytest.approx(direct_hungarian(t, p))


def test_contingency_table():
    c = contingency(np.array([0, 0, 1, 1, 2, 2, 2]), np.array([5, 5, 5, 7, 7, -1, -1]))
    assert c.n == 7 and c.class_sizes.tolist() == [2, 2, 3] and c.cluster_sizes.tolist() == [2, 3, 2]
    cells = {(int(r), int(k)): int(v) for r, k, v in zip(c.rows, c.cols, c.counts)}
    assert cells == {(0, 1): 2, (1, 1): 1, (1, 2): 1, (2, 0): 2, (2, 2): 1}  # ids -1, 5, 7 -> 0, 1, 2


def test_matches_sklearn_on_random_labelings_with_arbitrary_ids():
    rng = np.random.default_rng(3)
    for n, classes, k in ((30, 3, 4), (500, 10, 25), (5000, 50, 40)):
        t = rng.integers(0, classes, n) * 7 - 3  # non-contiguous, negative ids
        p = np.where(rng.random(n) < 0.5, t, rng.integers(-1, k, n))
        r = cluster_report(t, p)
        assert r["nmi"] == pytest.approx(skm.normalized_mutual_info_score(t, p), abs=1e-12)
        assert r["ari"] == pytest.approx(skm.adjusted_rand_score(t, p), abs=1e-12)
        assert r["ami"] == pytest.approx(skm.adjusted_mutual_info_score(t, p), abs=1e-12)
        assert all(type(r[key]) is float for key in ("nmi", "ami", "ari", "purity", "hungarian_accuracy"))


def test_hand_computed_purity_and_hungarian():
    # cluster 1 = {0, 0} (pure), cluster 0 = {0, 1, 1, 1} (majority 3): 5 of 6
    t, p = np.array([0, 0, 0, 1, 1, 1]), np.array([1, 1, 0, 0, 0, 0])
    assert purity(t, p) == pytest.approx(5 / 6)
    assert hungarian_accuracy(t, p) == pytest.approx(5 / 6)
    # over-clustering: purity rewards it, one-to-one matching does not
    t, p = np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])
    assert purity(t, p) == 1.0
    assert hungarian_accuracy(t, p) == 0.5
    # fewer clusters than classes
    t, p = np.array([0, 1, 2, 2]), np.array([0, 0, 0, 0])
    assert hungarian_accuracy(t, p) == 0.5
    assert purity(t, p) == 0.5


def test_special_cases_follow_sklearn():
    one = np.zeros(5, dtype=int)
    assert nmi(one, one) == 1.0 and ami(one, one) == 1.0 and ari(one, one) == 1.0
    single = np.arange(5)
    assert ari(single, single) == 1.0
    assert nmi(one, single) == 0.0 and ami(one, single) == 0.0 and ari(one, single) == 0.0
    assert ami(np.array([1, 1, 2, 2]), np.array([2, 2, 3, 3])) == pytest.approx(1.0)
    assert ari(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1])) == pytest.approx(4 / 7)


def test_published_reference_values():
    # Reference numbers published with scikit-learn's test suite for these labelings.
    a = np.array([1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3])
    b = np.array([1, 1, 1, 1, 2, 1, 2, 2, 2, 2, 3, 1, 3, 3, 3, 2, 2])
    assert direct_emi_formula(a, b) == pytest.approx(0.15042, abs=1e-5)
    assert ami(a, b) == pytest.approx(0.27821, abs=1e-5)
    assert direct_mi(list(a), list(b)) == pytest.approx(0.41022, abs=1e-5)
    assert ami(np.tile(a, 110), np.tile(b, 110)) == pytest.approx(0.38, abs=1e-2)
    one = np.zeros(70000, dtype=int)
    assert ami(one, one) == 1.0


def direct_emi_formula(t, p):
    """E[MI] from Vinh et al. 2010 Eq. 24a, summed over the full n_ij range one term at a time."""
    n = len(t)
    lf = lambda k: math.lgamma(k + 1)  # noqa: E731
    total = 0.0
    for a in Counter(t.tolist()).values():
        for b in Counter(p.tolist()).values():
            for nij in range(max(1, a + b - n), min(a, b) + 1):
                logp = (
                    lf(a)
                    + lf(b)
                    + lf(n - a)
                    + lf(n - b)
                    - lf(n)
                    - lf(nij)
                    - lf(a - nij)
                    - lf(b - nij)
                    - lf(n - a - b + nij)
                )
                total += nij / n * math.log(n * nij / (a * b)) * math.exp(logp)
    return total


def test_report_keys_and_speed():
    rng = np.random.default_rng(0)
    n = 50_000  # ImageNet val with k = 3 x classes
    t = rng.integers(0, 1000, n)
    p = t * 3 + rng.integers(0, 3, n)
    noisy = rng.random(n) < 0.3
    p[noisy] = rng.integers(0, 3000, noisy.sum())
    start = time.perf_counter()
    r = cluster_report(t, p)
    assert time.perf_counter() - start < 20
    assert r["num_samples"] == n and r["num_classes"] == 1000 and r["num_clusters"] == 3000
    for key in ("nmi", "ami", "ari", "purity", "hungarian_accuracy"):
        assert -1.0 <= r[key] <= 1.0
    assert r["purity"] >= r["hungarian_accuracy"]
    assert 0 < r["ami"] < r["nmi"]


def test_bad_inputs():
    with pytest.raises(UserError, match="cluster assignments"):
        nmi(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(UserError, match="empty"):
        cluster_report(np.zeros(0, int), np.zeros(0, int))
    with pytest.raises(UserError, match="1-D"):
        ami(np.zeros((2, 2), int), np.zeros(4, int))
