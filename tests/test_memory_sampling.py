"""Positive / negative sampling: label constraints, pools, uniformity, edge cases, determinism."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from interclr_cli.memory import NEG_MODES, LabelIndex, pool_threshold, sample_negatives, sample_positives
from interclr_cli.memory.sampling import sampled_pool_cap

pytestmark = pytest.mark.usefixtures("one_thread")


def _chi2_ok(counts: torch.Tensor, p: float = 1e-4) -> bool:
    """Counts over equally likely cells pass a chi-square goodness-of-fit test at level p."""
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    stat = ((counts - expected) ** 2 / expected).sum().item()
    return stat < chi2.ppf(1 - p, counts.numel() - 1)


def _setup(n=3000, b=6, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    sim = torch.rand(b, n, generator=g) * 2 - 1
    ql = labels[:b]
    return sim, labels, ql, g


def _rank_in_row(sim: torch.Tensor, idx: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """0-based rank of sim[b, idx[b, j]] among sim[b] (0 = most similar if ``largest``)."""
    order = torch.argsort(sim, dim=1, descending=largest)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(sim.shape[1]).expand_as(order).contiguous())
    return ranks.gather(1, idx)


# -- positives -------------------------------------------------------------------------------------


def test_positives_share_the_label_and_are_uniform():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, 1, 2, 2, 1, 0, 2, 2, 1])  # cluster 2 = rows 0, 3, 4, 7, 8
    ql = torch.tensor([2, 1, 0]).repeat(4000)
    pos = sample_positives(labels, ql, g)
    assert torch.equal(labels[pos], ql)
    draws = pos[ql == 2]
    counts = torch.bincount(draws, minlength=10)[[0, 3, 4, 7, 8]]
    assert counts.sum() == 4000 and _chi2_ok(counts)
    # sharing a prebuilt index gives the same draws
    again = sample_positives(labels, ql, torch.Generator().manual_seed(0), LabelIndex.build(labels))
    assert torch.equal(pos, again)


# -- negatives: label constraint, every mode ------------------------------------------------------


@pytest.mark.parametrize("threshold", ["exact", "sampled"])
@pytest.mark.parametrize("mode", NEG_MODES)
def test_no_negative_carries_the_query_label(mode, threshold):
    sim, labels, ql, g = _setup()
    neg = sample_negatives(sim, labels, ql, mode, 200, 600, g, threshold, 1000)
    assert neg.indices.shape == (6, 200) and neg.indices.dtype == torch.long
    assert neg.valid.all()
    assert (labels[neg.indices] != ql.unsqueeze(1)).all()


# -- semihard / semieasy ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["semihard", "semieasy"])
def test_exact_pool_draws_only_from_the_nearest_p_and_without_replacement(mode):
    sim, labels, ql, g = _setup()
    p, m = 500, 200
    neg = sample_negatives(sim, labels, ql, mode, m, p, g, "exact")
    ranks = _rank_in_row(sim, neg.indices, largest=(mode == "semihard"))
    assert (ranks < p).all()
    for row in neg.indices:
        assert row.unique().numel() == m  # distinct


def test_exact_semihard_is_uniform_over_the_admissible_pool():
    sim, labels, ql, _ = _setup(n=400, b=1, k=4)
    p, m = 60, 10
    pool = torch.topk(sim[0], p).indices
    admissible = pool[labels[pool] != ql[0]]
    g = torch.Generator().manual_seed(1)
    hits = torch.zeros(400, dtype=torch.long)
    for _ in range(600):
        neg = sample_negatives(sim, labels, ql, "semihard", m, p, g, "exact")
        hits += torch.bincount(neg.indices[0], minlength=400)
    assert hits.sum() == hits[admissible].sum()  # nothing outside the admissible pool
    assert _chi2_ok(hits[admissible])


def test_sampled_pool_within_documented_bound():
    n, p, s = 20000, 2000, 4096
    sim, labels, ql, g = _setup(n=n, b=16, k=50)
    frac = p / n
    sd = ((1 - frac) / (frac * s)) ** 0.5  # documented std of the relative pool-size error
    t = pool_threshold(sim, p, True, g, s)
    size = (sim >= t.unsqueeze(1)).sum(1).double()
    assert ((size / p - 1).abs() < 6 * sd).all(), (size / p - 1, sd)
    assert sampled_pool_cap(n, p, s) >= p * (1 + 6 * sd)
    neg = sample_negatives(sim, labels, ql, "semihard", 500, p, g, "sampled", s)
    ranks = _rank_in_row(sim, neg.indices)
    assert (ranks < p * (1 + 6 * sd)).all()
    for row in neg.indices:
        assert row.unique().numel() == 500
    # semieasy: from the least similar end
    neg = sample_negatives(sim, labels, ql, "semieasy", 500, p, g, "sampled", s)
    assert (_rank_in_row(sim, neg.indices, largest=False) < p * (1 + 6 * sd)).all()


def test_sampled_semihard_is_uniform_over_its_pool():
    sim, labels, ql, _ = _setup(n=500, b=1, k=4)
    g = torch.Generator().manual_seed(2)
    hits = torch.zeros(500, dtype=torch.long)
    for _ in range(400):
        state = g.get_state()
        t = pool_threshold(sim, 100, True, g, 400)  # the draw below re-reads the same columns
        g.set_state(state)
        neg = sample_negatives(sim, labels, ql, "semihard", 10, 100, g, "sampled", 400)
        pool = (sim[0] >= t[0]) & (labels != ql[0])
        assert pool[neg.indices[0]].all()  # only from this draw's pool
        assert neg.indices[0].unique().numel() == 10
        hits += torch.bincount(neg.indices[0], minlength=500)
    # rows in the pool at every draw (the top 40; the pool is 100 +- 10) are hit equally often
    core = (sim[0] >= torch.topk(sim[0], 40).values.min()) & (labels != ql[0])
    assert _chi2_ok(hits[core])


# -- hard / random --------------------------------------------------------------------------------


def test_hard_is_exactly_the_nearest_m_of_another_label():
    sim, labels, ql, g = _setup()
    m = 150
    neg = sample_negatives(sim, labels, ql, "hard", m, 0, g)
    for b in range(sim.shape[0]):
        order = torch.argsort(sim[b], descending=True)
        brute = order[labels[order] != ql[b]][:m]
        assert neg.indices[b].tolist() == brute.tolist()


def test_random_is_uniform_over_other_labels():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 5)
    ql = torch.tensor([0])
    g = torch.Generator().manual_seed(3)
    neg = sample_negatives(None, labels, ql, "random", 20000, 0, g)
    assert (labels[neg.indices] != 0).all()
    counts = torch.bincount(neg.indices[0], minlength=20)[10:]
    assert _chi2_ok(counts)
    assert neg.indices[0].unique().numel() < 20000  # with replacement


# -- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", ["exact", "sampled"])
def test_pool_larger_than_the_bank(threshold):
    sim, labels, ql, g = _setup(n=300)
    neg = sample_negatives(sim, labels, ql, "semihard", 50, 10**6, g, threshold)
    assert neg.valid.all() and (labels[neg.indices] != ql.unsqueeze(1)).all()


@pytest.mark.parametrize("threshold", ["exact", "sampled"])
@pytest.mark.parametrize("mode", NEG_MODES)
def test_fewer_admissible_entries_than_m(mode, threshold):
    labels = torch.zeros(40, dtype=torch.long)
    labels[[3, 17, 29]] = 1  # only 3 rows carry another label than the query's 0
    sim = torch.linspace(-1, 1, 40).unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    neg = sample_negatives(sim, labels, torch.tensor([0]), mode, 10, 40, g, threshold)
    assert neg.valid.all()
    assert set(neg.indices[0].tolist()) <= {3, 17, 29}
    if mode != "random":
        assert set(neg.indices[0].tolist()) == {3, 17, 29}
    # no admissible entry at all: every slot flagged invalid
    neg = sample_negatives(sim, torch.zeros(40, dtype=torch.long), torch.tensor([0]), mode, 10, 40, g, threshold)
    assert not neg.valid.any()


@pytest.mark.parametrize("threshold", ["exact", "sampled"])
@pytest.mark.parametrize("mode", NEG_MODES)
def test_same_seed_same_draws(mode, threshold):
    sim, labels, ql, _ = _setup()
    a = sample_negatives(sim, labels, ql, mode, 100, 400, torch.Generator().manual_seed(9), threshold, 512)
    b = sample_negatives(sim, labels, ql, mode, 100, 400, torch.Generator().manual_seed(9), threshold, 512)
    assert torch.equal(a.indices, b.indices)
    ws: dict = {}  # reused temporaries give the same draws, call after call
    for _ in range(2):
        w = sample_negatives(sim, labels, ql, mode, 100, 400, torch.Generator().manual_seed(9), threshold, 512, ws)
        assert torch.equal(a.indices, w.indices)
    if mode != "hard":
        c = sample_negatives(sim, labels, ql, mode, 100, 400, torch.Generator().manual_seed(10), threshold, 512)
        assert not torch.equal(a.indices, c.indices)
