import math

import pytest
import torch

from interclr_cli.errors import UserError
from interclr_cli.eval.knn import knn_classify, knn_top1


def brute_force(train, train_y, test, k, T, num_classes):
    """Direct NPID/DINO weighted kNN, one test sample at a time."""
    preds = []
    for q in test:
        sims = [float((q @ t) / (q.norm() * t.norm())) for t in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / T)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


def toy(seed=0, n_train=120, n_test=37, d=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g)
    train_y = torch.randint(0, classes, (n_train,), generator=g)
    test_y = torch.randint(0, classes, (n_test,), generator=g)
    train = centers[train_y] + 0.8 * torch.randn(n_train, d, generator=g)
    test = centers[test_y] + 0.8 * torch.randn(n_test, d, generator=g)
    return train * 3.0, train_y, test, test_y  # unnormalised on purpose


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_matches_brute_force(T):
    train, train_y, test, _ = toy()
    ks = [1, 5, 20]
    got = knn_classify(train, train_y, test, ks, temperature=T, num_classes=4, chunk_size=8)
    for k in ks:
        want = brute_force(train.double(), train_y, test.double(), k, T, 4)
        assert torch.equal(got[k], want), k


def test_chunking_does_not_change_results_and_inputs_untouched():
    train, train_y, test, _ = toy(seed=3)
    before = train.clone()
    a = knn_classify(train, train_y, test, [10], chunk_size=1)
    b = knn_classify(train, train_y, test, [10], chunk_size=1000)
    assert torch.equal(a[10], b[10])
    assert torch.equal(train, before)


def test_small_temperature_does_not_overflow():
    train, train_y, test, _ = toy(seed=4)
    got = knn_classify(train, train_y, test, [20], temperature=0.001)
    assert got[20].shape == (test.shape[0],)
    want = brute_force(train.double(), train_y, test.double(), 1, 1.0, 4)  # T -> 0: nearest neighbour wins
    assert torch.equal(got[20], want)


def test_top1_percent_on_separable_data():
    train, train_y, test, test_y = toy(seed=1)
    acc = knn_top1(train, train_y, test + 0.0, test_y, ks=[1, 10])
    assert set(acc) == {1, 10}
    assert all(0.0 <= v <= 100.0 for v in acc.values())
    # perfectly separated classes
    centers = torch.eye(4) * 10
    tr_y = torch.arange(4).repeat(10)
    te_y = torch.arange(4).repeat(3)
    tr = centers[tr_y] + 0.1 * torch.randn(40, 4)
    te = centers[te_y] + 0.1 * torch.randn(12, 4)
    assert knn_top1(tr, tr_y, te, te_y, ks=[5])[5] == 100.0


def test_bad_inputs():
    train, train_y, test, test_y = toy()
    with pytest.raises(UserError, match="exceeds"):
        knn_classify(train, train_y, test, [1000])
    with pytest.raises(UserError, match="dimension"):
        knn_classify(train, train_y, test[:, :3], [1])
    with pytest.raises(UserError, match="labels"):
        knn_top1(train, train_y, test, test_y[:-1], [1])
