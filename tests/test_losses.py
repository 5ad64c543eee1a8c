"""MarginNCE / InfoNCE against direct float64 hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from interclr_cli.losses import info_nce, margin_nce, margin_positive_logit, queue_cosines

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_phi(c: float, m: float, kind: str) -> float:
    if kind == "additive":
        return c - m
    if m == 0:
        return c
    theta = math.acos(c)
    if m > 0 and c <= math.cos(math.pi - m):  # theta + m beyond pi
        return c - m * math.sin(m)
    if m < 0 and c >= math.cos(m):  # theta + m below 0
        return c + m * math.sin(m)
    return math.cos(theta + m)


def _hand_loss(pos, neg, tau, m, kind):
    total = 0.0
    for i in range(len(pos)):
        p = math.exp(_hand_phi(pos[i], m, kind) / tau)
        z = p + sum(math.exp(c / tau) for c in neg[i])
        total += -math.log(p / z)
    return total / len(pos)


# Positive cosines include both fallback regions of the angular margin (c <= cos(pi - 0.5) =
# -0.878 for m = +0.5, c >= cos(0.5) = 0.878 for m = -0.5) and ordinary values.
POS = [0.95, 0.6, 0.1, -0.3, -0.95]


@pytest.mark.parametrize("kind", ["additive", "angular"])
@pytest.mark.parametrize("m", [-0.5, 0.0, 0.5])
def test_margin_nce_matches_hand_computation(kind, m):
    g = torch.Generator().manual_seed(0)
    neg = (torch.rand(len(POS), 7, generator=g, dtype=torch.float64) * 2 - 1).tolist()
    tau = 0.2
    got = margin_nce(torch.tensor(POS), torch.tensor(neg), tau, m, kind)
    want = _hand_loss(POS, neg, tau, m, kind)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_margin_nce_signs():
    """A positive margin makes the loss larger, a negative one smaller (both margin types)."""
    pos, neg = torch.tensor([0.5, 0.2]), torch.tensor([[0.1, 0.3], [0.0, -0.2]])
    for kind in ("additive", "angular"):
        lo, mid, hi = (margin_nce(pos, neg, 0.2, m, kind).item() for m in (-0.5, 0.0, 0.5))
        assert lo < mid < hi


def test_angular_margin_is_stable_at_the_ends():
    c = torch.tensor([1.0, -1.0, 0.999999, -0.999999, 0.0], requires_grad=True)
    for m in (-0.5, 0.5):
        phi = margin_positive_logit(c, m, "angular")
        (g,) = torch.autograd.grad(phi.sum(), c)
        assert torch.isfinite(phi).all() and torch.isfinite(g).all()
    # monotone in c (the fallbacks keep the positive logit increasing with the cosine)
    grid = torch.linspace(-1, 1, 2001)
    for m in (-0.5, 0.5):
        phi = margin_positive_logit(grid, m, "angular")
        assert (phi[1:] >= phi[:-1] - 1e-6).all()


def test_neg_valid_drops_entries():
    pos = torch.tensor([0.3, 0.4])
    neg = torch.tensor([[0.1, 0.9, -0.2], [0.5, 0.2, 0.0]])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    got = margin_nce(pos, neg, 0.1, 0.0, neg_valid=valid)
    want = 0.5 * (margin_nce(pos[:1], neg[:1, [0, 2]], 0.1) + margin_nce(pos[1:], neg[1:], 0.1))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("m", [0.0, 0.3])
def test_info_nce_matches_direct_moco_computation(m):
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    k = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    queue = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    tau = 0.2
    # MoCo Eq. 1, as in the MoCo pseudo-code: logits = [l_pos, l_neg] / T, CE with label 0
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1) - m
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    want = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / tau, torch.zeros(6, dtype=torch.long))
    got = info_nce(q, k, queue, tau, margin=m)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_info_nce_gradient_flows_to_the_query_only():
    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(10, 8), dim=1)
    info_nce(q, k, queue, 0.2).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_queue_logits_are_float32_under_bf16_autocast():
    """MoCo's [B, 1 + K] logits: float32 inside a CPU bf16 autocast region, equal to a float64
    computation from the same inputs; the loss equals the one computed without autocast."""
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    k = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    queue = F.normalize(torch.randn(300, 32, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pos, neg = queue_cosines(q, k, queue)
        loss = info_nce(q, k, queue, 0.2)
        plain = q @ queue.t()  # what an unguarded matmul gives here
    assert plain.dtype == torch.bfloat16  # the region really is autocast
    assert pos.dtype == neg.dtype == loss.dtype == torch.float32
    assert torch.allclose(neg.double(), q.double() @ queue.double().t(), atol=1e-6)
    assert torch.allclose(pos.double(), (q.double() * k.double()).sum(1), atol=1e-6)
    assert loss.item() == pytest.approx(info_nce(q, k, queue, 0.2).item(), rel=1e-6)
    assert (plain.double() - q.double() @ queue.double().t()).abs().max() > 1e-4  # bf16 would be visibly off
