"""Learning-rate schedule and optimizers."""

import math

import pytest
import torch

from interclr_cli.config.schema import OptimConfig
from interclr_cli.training.optim import LARS, build_optimizer, lr_factor, scaled_lr, set_lr


def test_cosine_with_warmup_matches_formula():
    c = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=1)
    spe, total = 10, 100
    assert lr_factor(c, 0, spe, total) == pytest.approx(0.1)
    assert lr_factor(c, 9, spe, total) == pytest.approx(1.0)
    for s in (10, 37, 99):
        t = (s - 10) / 90
        assert lr_factor(c, s, spe, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))


def test_step_schedule_and_min_lr():
    c = OptimConfig(lr=30, schedule="step", milestones=[60, 80], gamma=0.1)
    assert [lr_factor(c, e * 5, 5, 500) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    c2 = OptimConfig(lr=0.1, schedule="cosine", min_lr=0.01)
    assert lr_factor(c2, 100, 10, 100) == pytest.approx(0.1)


def test_linear_scaling_rule():
    assert scaled_lr(OptimConfig(lr=0.03, reference_batch=256), 512) == pytest.approx(0.06)
    assert scaled_lr(OptimConfig(lr=0.03, reference_batch=0), 512) == pytest.approx(0.03)


def test_head_multiplier_groups():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = build_optimizer(
        OptimConfig(lr=0.01), [{"params": a.parameters()}, {"params": b.parameters(), "lr_mult": 100}], 0.01
    )
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.5])


def test_lars_trust_ratio_step():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.001)
    w.grad = torch.tensor([[0.0, 2.0]])  # ||g|| = 2
    b.grad = torch.tensor([0.5])
    opt.step()
    trust = 0.001 * 5 / 2
    assert torch.allclose(w, torch.tensor([[3.0, 4.0 - 2.0 * trust]]))
    assert torch.allclose(b, torch.tensor([0.5]))  # 1-d params: plain SGD
