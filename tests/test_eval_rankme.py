import math

import numpy as np
import pytest
import torch

from interclr_cli.eval.rankme import rankme


def numpy_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_matches_numpy():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
    x[:, 20:] *= 0.05  # an uneven spectrum
    assert rankme(x) == pytest.approx(numpy_rankme(x.numpy()), rel=1e-9)


def test_rank_one_is_one():
    u = torch.randn(200, 1, dtype=torch.float64)
    v = torch.randn(1, 64, dtype=torch.float64)
    assert rankme(u @ v) == pytest.approx(1.0, abs=1e-3)


def test_orthonormal_rows_give_n():
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    rows = q.T  # 16 orthonormal rows of dimension 64: all singular values are 1
    assert rankme(rows) == pytest.approx(16.0, rel=1e-4)
    assert rankme(rows.float()) == pytest.approx(16.0, rel=1e-4)


def test_subsampling_is_seeded_and_bounded():
    x = torch.randn(500, 8)
    a = rankme(x, max_samples=100, seed=1)
    assert a == rankme(x, max_samples=100, seed=1)
    assert 1.0 <= a <= 8.0 + 1e-3


def test_degenerate_inputs():
    assert math.isnan(rankme(torch.zeros(10, 4)))
    bad = torch.randn(10, 4)
    bad[0, 0] = float("nan")
    assert math.isnan(rankme(bad))
    with pytest.raises(ValueError):
        rankme(torch.randn(10))
