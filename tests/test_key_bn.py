"""Key BatchNorm without the leak (MoCo Sec. 3.3): split BatchNorm, the key shuffle, the modes.

* ``SplitBatchNorm2d`` equals BatchNorm computed group by group (float64, by hand), keeps
  BatchNorm's names and is plain BatchNorm in eval mode; ``split_groups`` picks the group count;
* the leak itself: with a probe network whose output is the mean of the images it was normalised
  with, only BatchNorm statistics can tell a query's key from other batches' keys. With
  ``key_bn=none`` the key is found almost always; with ``split`` (and ``shuffle``, which runs as
  split on one process) hardly more often than chance;
* the key shuffle returns keys in the batch's order and is restored exactly by extra_state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from interclr_cli.config import load_config
from interclr_cli.methods import build_method, mocov2
from interclr_cli.models.split_bn import SplitBatchNorm2d, split_batchnorm, split_groups


@pytest.mark.parametrize(
    "batch, groups, want", [(256, 8, 8), (64, 8, 4), (48, 8, 3), (512, 32, 32), (40, 8, 2), (31, 8, 1), (256, 1, 1)]
)
def test_split_groups(batch, groups, want):
    assert split_groups(batch, groups) == want


def test_split_batchnorm_equals_batchnorm_per_group():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    names = list(bn.state_dict())
    net = split_batchnorm(nn.Sequential(bn), 2)
    assert isinstance(net[0], SplitBatchNorm2d) and list(net[0].state_dict()) == names
    x = torch.randn(64, 3, 4, 5)  # 64 images, 2 groups of 32: group j holds the images n with n % 2 == j
    y = net(x)
    x64 = x.double()
    want = torch.empty_like(x64)
    run_mean, run_var = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for j in range(2):
        g = x64[j::2]
        mu = g.mean(dim=(0, 2, 3))
        var = g.var(dim=(0, 2, 3), unbiased=False)
        want[j::2] = (g - mu.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + bn.eps)
        run_mean += 0.1 * mu / 2
        run_var += (0.9 + 0.1 * g.var(dim=(0, 2, 3), unbiased=True)) / 2
    want = want * bn.weight.double().view(1, 3, 1, 1) + bn.bias.double().view(1, 3, 1, 1)
    assert torch.allclose(y.double(), want, atol=1e-5)
    assert torch.allclose(bn.running_mean.double(), run_mean, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), run_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    net.eval()  # evaluation: the running statistics, exactly as nn.BatchNorm2d
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(bn.state_dict())
    ref.eval()
    assert torch.equal(net(x), ref(x))


class _Probe(nn.Module):
    """Output [B, C] ~= the mean of the set its BatchNorm normalised x with: with eps = 1e8,
    bn(x) = (x - m) / sqrt(v + eps) ~= (x - m) / 1e4, so x - 1e4 bn(x) ~= m."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=1e8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 1e4 * self.bn(x)).flatten(1)


def _key_found_rate(monkeypatch, key_bn: str) -> float:
    """Fraction of queries whose own key scores above every key of another batch, through the
    method's real training step (spying on the (q, k) it hands to InfoNCE)."""
    c, b = 16, 4096
    monkeypatch.setattr(mocov2, "build_encoder", lambda cfg: _Probe(c))
    cfg = load_config(
        "mocov2-r18-cifar",
        [f"method.key_bn={key_bn}", "method.key_bn_groups=64", f"train.batch_size={b}", f"model.embed_dim={c}"],
    )
    method = build_method(cfg, 10 * b)
    method.train()
    seen = []
    real = mocov2.info_nce
    monkeypatch.setattr(mocov2, "info_nce", lambda q, k, *a: seen.append((q, k)) or real(q, k, *a))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two batches; each image's two views share its content c_i
        content = torch.randn(b, c, 1, 1, generator=g)
        views = [content + 0.1 * torch.randn(b, c, 1, 1, generator=g) for _ in range(2)]
        with torch.no_grad():
            method.training_step({"view1": views[0], "view2": views[1], "index": torch.arange(b)}, 0, 0)
    (q0, k0), (q1, k1) = seen
    found = []
    for q, k, other in ((q0, k0, k1), (q1, k1, k0)):
        pos = (q * k).sum(1)  # [B]
        found.append(pos > (q @ other.t()).max(1).values)
    return torch.cat(found).float().mean().item()


def test_only_batch_statistics_tell_the_key_and_split_hides_them(monkeypatch):
    leak = _key_found_rate(monkeypatch, "none")
    assert leak > 0.9, leak  # per-device BatchNorm: the key shares the query's batch statistics
    # 64 groups of 64: another batch offers 64 distinct keys (one per group), so chance is 1/65;
    # a query's group and its key's group share only ~1/64 + 64/4096 of their images
    for mode in ("split", "shuffle"):  # shuffle runs as split on one process
        rate = _key_found_rate(monkeypatch, mode)
        assert rate < 3 / 65, (mode, rate)


def _moco(overrides=()):
    cfg = load_config("mocov2-r18-cifar", ["train.batch_size=32", "model.arch=resnet18", *overrides])
    torch.manual_seed(0)
    return build_method(cfg, 64)


def test_modes_and_groups_follow_the_config():
    m = _moco()
    assert m.key_bn == "split" and m.bn_groups == 2  # batch 32: 2 groups of 16
    assert all(mod.groups == 2 for mod in m.modules() if isinstance(mod, SplitBatchNorm2d))
    assert sum(isinstance(mod, SplitBatchNorm2d) for mod in m.encoder_k.modules()) == 20
    assert _moco(["method.key_bn=shuffle"]).key_bn == "split"  # one process
    none = _moco(["method.key_bn=none"])
    assert none.bn_groups == 1 and not any(isinstance(mod, SplitBatchNorm2d) for mod in none.modules())
    assert mocov2.key_bn_mode("shuffle", 8) == "shuffle" and mocov2.key_bn_mode("sync", 1) == "none"


def test_split_keys_come_back_in_batch_order_and_resume_exactly():
    m = _moco()
    m.train()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    state = m.extra_state()
    k1 = m.compute_keys(x)
    # by hand: the same permutation, the encoder on the permuted batch, rows put back
    m.load_extra_state(state)
    perm = torch.randperm(32, generator=torch.Generator().set_state(state["shuffle_generator"]))
    y = m.encoder_k(x[perm])
    want = torch.empty_like(y)
    want[perm] = y
    assert torch.allclose(k1, F.normalize(want, dim=1), atol=1e-6)
    m.load_extra_state(state)
    assert torch.equal(m.compute_keys(x), k1)  # restored generator: the same shuffle
    assert not torch.equal(m.compute_keys(x), k1)  # the next step draws another one
