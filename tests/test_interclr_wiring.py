"""InterCLR's wiring: each test fails when one specific wiring mistake is made.

Each was checked by making the mistake in the code once and watching the test fail:
* query labels taken by batch position (``labels[arange(B)]``) instead of dataset index;
* the bank filled with the query instead of the momentum key;
* the positive replaced by the query's own bank row;
* relabelling before the bank update;
* centroids recomputed before relabelling;
* a hard-coded inter temperature (or margin);
* the bank logits computed under bf16 autocast (no float32 region);
and the ablation presets differ from ``r18-cifar`` in exactly their distinguishing values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_interclr_method import LIGHT, _batch, _method

from interclr_cli.config import load_config
from interclr_cli.config.loader import to_mapping
from interclr_cli.memory import OnlineLabels
from interclr_cli.methods import interclr as interclr_mod
from interclr_cli.methods import mocov2 as mocov2_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(m, batch, step=0):
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.05)
    loss, logs = m.training_step(batch, step, 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    m.after_optimizer_step(step)
    return logs


def _last_occurrence(idx: torch.Tensor) -> dict[int, int]:
    return {int(i): j for j, i in enumerate(idx.tolist())}


class _Spy:
    """Records the arguments and results of a function it replaces."""

    def __init__(self, monkeypatch, module, name):
        self.calls = []
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.append((args, kwargs, out))
            return out

        monkeypatch.setattr(module, name, wrapper)


def test_query_labels_and_positives_follow_the_dataset_index(monkeypatch):
    m = _method(*LIGHT)
    spy = _Spy(monkeypatch, interclr_mod, "sample_positives")
    batch = _batch(0)
    idx = batch["index"]
    assert not torch.equal(m.labels.labels[idx], m.labels.labels[: idx.numel()])  # the mistake would show
    m.training_step(batch, 0, 0)
    (labels, query_labels, *_), _, pos = spy.calls[-1]
    assert torch.equal(query_labels, m.labels.labels[idx])
    assert torch.equal(labels[pos], labels[idx])  # a positive from the query's own cluster


def test_the_bank_gets_the_momentum_key_not_the_query():
    m = _method(*LIGHT, "method.key_bn=none")
    batch = _batch(1)
    with torch.no_grad():  # the step's keys and queries, computed independently beforehand
        k = F.normalize(m.encoder_k(batch["view2"]), dim=1)
        q = F.normalize(m.encoder_q(batch["view1"]), dim=1)
    _step(m, batch)
    for i, j in _last_occurrence(batch["index"]).items():  # bank_momentum = 1: the row is replaced
        assert torch.allclose(m.bank.features[i], k[j], atol=1e-5)
        assert not torch.allclose(m.bank.features[i], q[j], atol=1e-2)


def test_the_positive_is_a_sampled_cluster_mate_not_the_own_row(monkeypatch):
    m = _method(*LIGHT)
    positives = _Spy(monkeypatch, interclr_mod, "sample_positives")
    losses = _Spy(monkeypatch, interclr_mod, "margin_nce")
    queries = _Spy(monkeypatch, mocov2_mod, "info_nce")
    batch = _batch(2)
    bank = m.bank.features.clone()
    m.training_step(batch, 0, 0)
    pos = positives.calls[-1][2]
    pos_cos = losses.calls[-1][0][0]
    q = queries.calls[-1][0][0].detach()
    assert torch.allclose(pos_cos.detach(), (q * bank[pos]).sum(1), atol=1e-5)
    assert (pos != batch["index"]).any()  # not the query's own row (clusters of ~12 members)


@pytest.mark.parametrize("tau, margin", [(0.1, -0.3), (0.35, 0.2)])
def test_inter_temperature_and_margin_come_from_the_config(monkeypatch, tau, margin):
    m = _method(*LIGHT, f"method.inter.temperature={tau}", f"method.inter.margin={margin}")
    losses = _Spy(monkeypatch, interclr_mod, "margin_nce")
    logs = m.training_step(_batch(3), 0, 0)[1]
    (pos_cos, neg_cos, *_), kwargs, _ = losses.calls[-1]
    valid = losses.calls[-1][0][5] if len(losses.calls[-1][0]) > 5 else None
    pos, neg = pos_cos.detach().double() - margin, neg_cos.detach().double()  # additive margin, by hand
    if valid is not None:
        neg = neg.masked_fill(~valid, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], 1) / tau
    want = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    assert logs["loss_inter"].item() == pytest.approx(want.item(), rel=1e-5)


def test_relabelling_uses_the_updated_bank_rows():
    m = _method(*LIGHT, "method.inter.min_cluster_size=0", "method.inter.centroid_update_every=1000")
    batch = _batch(4)
    old = m.bank.features.clone()
    _step(m, batch)
    rows = list(_last_occurrence(batch["index"]))
    new = m.bank.features[rows]
    assert not torch.allclose(new, old[rows])  # the rows changed, so the order matters
    want = torch.argmax(new @ m.labels.centroids.t(), dim=1)
    assert torch.equal(m.labels.labels[rows], want)


def test_centroids_are_recomputed_after_relabelling():
    g = torch.Generator().manual_seed(0)
    n, k, d = 60, 3, 8
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    lab = OnlineLabels(n, k, d, min_cluster_size=0, centroid_update_every=1)
    lab.init(torch.arange(n) % k, bank)
    idx = torch.arange(0, 30)
    bank[idx] = F.normalize(torch.randn(30, d, generator=g), dim=1)  # the batch's new rows
    lab.step(0, idx, bank[idx], bank)  # (0 + 1) % 1 == 0: a centroid update at this step
    labels = lab.labels
    assert not torch.equal(labels, torch.arange(n) % k)  # the relabelling moved samples
    for c in range(k):  # member means under the labels after relabelling, by hand in float64
        want = bank[labels == c].double().mean(0)
        assert torch.allclose(lab.centroids[c].double(), want, atol=1e-6)


@pytest.mark.parametrize("kind", ["moco", "npid"])
def test_bank_logits_are_float32_under_bf16_autocast(monkeypatch, kind):
    """Under bf16 autocast the bank logits are float32 and (bf16 bank included) equal a float64
    computation: a bf16 similarity matrix would be off by ~1e-3."""
    m = _method(*LIGHT, f"method.intra.kind={kind}", "method.inter.bank_dtype=bfloat16")
    losses = _Spy(monkeypatch, interclr_mod, "margin_nce")
    cosines = _Spy(monkeypatch, m.bank, "cosine")  # (queries, indices, sim) -> [B, M]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_step(_batch(5), 0, 0)
    assert loss.dtype == torch.float32
    assert losses.calls and all(a[0].dtype == a[1].dtype == torch.float32 for a, _, _ in losses.calls)
    bank = m.bank.features.double()
    for (queries, indices, *_), _, out in cosines.calls:
        assert out.dtype == torch.float32
        want = torch.einsum("bd,bmd->bm", queries.detach().double(), bank[indices])
        assert torch.allclose(out.detach().double(), want, atol=1e-5)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = v
    return out


ABLATIONS = {
    "r18-cifar-hard": {"method.inter.neg_sampling": "hard"},
    "r18-cifar-margin0": {"method.inter.margin": 0.0},
    "r18-cifar-marginpos": {"method.inter.margin": 0.5},
    "r18-cifar-offline": {"method.inter.labels": "offline"},
    "r18-cifar-random": {"method.inter.neg_sampling": "random"},
    "r18-cifar-semieasy": {"method.inter.neg_sampling": "semieasy"},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_presets_differ_from_r18_cifar_in_exactly_their_values(name):
    base = _flat(to_mapping(load_config("r18-cifar")))
    got = _flat(to_mapping(load_config(name)))
    diff = {k: v for k, v in got.items() if base.get(k) != v and k not in ("name", "description")}
    assert diff == ABLATIONS[name]


def test_every_ablation_preset_is_pinned():
    from interclr_cli.config.loader import list_presets

    assert {p for p in list_presets() if p.startswith("r18-cifar-")} == set(ABLATIONS)
