"""Invariance Propagation (methods/invp.py, memory/neighbours.py): propagation over a hand-made
graph, the neighbour update, the hardest positives, both losses against float64 hand
computations, the ramp, a step's state changes, exact mid-epoch resume, and config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_clean_error, run_cli
from test_npid import mid_epoch_resume

from interclr_cli.config import load_config
from interclr_cli.memory import MemoryBank
from interclr_cli.memory.neighbours import NeighbourTable, exclusive_neighbours
from interclr_cli.methods import TrainContext, build_method
from interclr_cli.methods.invp import hardest_positives, invp_losses, ramp

pytestmark = pytest.mark.usefixtures("one_thread")

# a hand-made graph on 6 nodes, k = 2: 0 -> {1, 2}, 1 -> {0, 3}, 2 -> {4, 5}, 3 -> {3, 1}, 4 -> {5, 0}, 5 -> {2, 2}
GRAPH = [[1, 2], [0, 3], [4, 5], [3, 1], [5, 0], [2, 2]]


def _table() -> NeighbourTable:
    t = NeighbourTable(6, 2)
    t.table.copy_(torch.tensor(GRAPH))
    return t


def test_propagation_over_a_hand_made_graph():
    t = _table()
    idx = torch.tensor([0, 5])
    # depth 1: N(i); depth 2: N(i) then N(N(i)) node by node; depth 3: then N of each depth-2 node
    assert t.propagate(idx, 1).tolist() == [[1, 2], [2, 2]]
    assert t.propagate(idx, 2).tolist() == [[1, 2, 0, 3, 4, 5], [2, 2, 4, 5, 4, 5]]
    d3 = t.propagate(idx, 3)
    assert d3.shape == (2, 2 + 4 + 8)
    # node 0's third layer: N(0), N(3), N(4), N(5) = [1,2], [3,1], [5,0], [2,2]
    assert d3[0, 6:].tolist() == [1, 2, 3, 1, 5, 0, 2, 2]
    # node 5's: N(4), N(5), N(4), N(5) (duplicates kept, as the official concatenation)
    assert d3[1, 6:].tolist() == [5, 0, 2, 2, 5, 0, 2, 2]


def test_exclusive_neighbours_and_table_update():
    background = torch.tensor([[3, 7, 1, 9], [2, 3, 4, 8], [5, 6, 7, 1]])  # rows sorted by similarity
    idx = torch.tensor([3, 4, 1])
    got = exclusive_neighbours(background, idx, 2)
    # own index in the first k + 1 -> replaced by the (k+1)-th; row 2 does not hold it there
    assert got.tolist() == [[1, 7], [2, 3], [5, 6]]
    t = NeighbourTable(10, 2)
    t.update(torch.tensor([3, 4, 3]), torch.tensor([[1, 2], [5, 6], [8, 9]]))  # 3 twice: the last wins
    assert t.table[3].tolist() == [8, 9] and t.table[4].tolist() == [5, 6] and t.table[0].tolist() == [0, 0]


def test_hardest_positives_with_and_without_duplicates():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7, 0.2]])
    cand = torch.tensor([[1, 1, 3, 4, 3, 0]])
    idx, valid = hardest_positives(sim, cand, 3, dedup=False)
    assert idx.tolist() == [[1, 1, 3]] and valid.all()  # sims 0.1, 0.1, 0.3: duplicates count twice
    idx, valid = hardest_positives(sim, cand, 3, dedup=True)
    assert idx.tolist() == [[1, 3, 4]] and valid.all()
    idx, valid = hardest_positives(sim, torch.tensor([[1, 1, 1, 3]]), 3, dedup=True)
    assert idx[0, :2].tolist() == [1, 3] and valid.tolist() == [[True, True, False]]


def test_losses_match_float64_hand_computation():
    n, d, tau = 12, 5, 0.2
    bank = MemoryBank(n, d)
    bank.fill(torch.randn(n, d, generator=torch.Generator().manual_seed(0)))
    q64 = F.normalize(torch.randn(3, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=1)
    idx = torch.tensor([2, 7, 11])
    q = q64.float().requires_grad_(True)
    sim = bank.similarity(q.detach())
    background = torch.topk(sim, 6, dim=1).indices
    positives = torch.tensor([[1, 1, 4], [0, 3, 5], [8, 2, 2]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    l_ins, l_inv = invp_losses(bank, q, idx, sim, background, positives, valid, tau)
    rows = bank.features.double()

    def e(b, j):
        return math.exp(float(q64[b] @ rows[j]) / tau)

    want_ins = want_inv = 0.0
    for b in range(3):
        bg = background[b].tolist()
        want_ins += -math.log(e(b, idx[b]) / sum(e(b, j) for j in bg))
        pos = sum(e(b, j) for j, ok in zip(positives[b].tolist(), valid[b].tolist()) if ok)
        want_inv += -math.log(pos / sum(e(b, j) for j in bg if j != idx[b]))
    assert abs(float(l_ins.detach()) - want_ins / 3) < 1e-4
    assert abs(float(l_inv.detach()) - want_inv / 3) < 1e-4
    (l_ins + l_inv).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_ramp():
    assert ramp("binary", 29, 30) == 0.0 and ramp("binary", 30, 30) == 1.0  # the official i_epoch > 30
    assert ramp("none", 0, 30) == 1.0
    assert math.isclose(ramp("gaussian", 0, 30), math.exp(-5 * (1 - 1 / 30) ** 2))
    assert ramp("gaussian", 29, 30) == 1.0 and ramp("gaussian", 50, 30) == 1.0


LIGHT = ["model.arch=resnet18", "model.small_stem=false", "model.head_hidden=32", "model.embed_dim=16"]


def test_step_updates_table_from_the_pre_step_similarities_then_the_bank():
    n = 24
    cfg = load_config("invp-r18-cifar", LIGHT + ["method.invp.num_background=6", "method.invp.n_pos=3"])
    torch.manual_seed(0)
    m = build_method(cfg, n)
    m.train()
    m.on_train_start(TrainContext(torch.device("cpu"), n, 3, False, None, print))
    g = torch.Generator().manual_seed(3)
    batch = {"view1": torch.randn(8, 3, 16, 16, generator=g), "index": torch.randperm(n, generator=g)[:8]}
    bank0 = m.bank.features.clone()
    loss, logs = m.training_step(batch, 0, 0)  # epoch 0 < ramp_epochs: L = L_ins
    assert set(logs) == {"loss_ins", "loss_inv"} and torch.allclose(loss.detach(), logs["loss_ins"])
    q = F.normalize(m.encoder_q(batch["view1"]).detach(), dim=1)
    m.after_optimizer_step(0)
    i = batch["index"]
    sim = q @ bank0.t()  # [B, N], before the bank update
    for b in range(8):
        order = [j for j in torch.argsort(sim[b], descending=True).tolist() if j != int(i[b])]
        assert m.neighbours.table[i[b]].tolist() == order[:4]  # the 4 nearest rows but itself
    assert torch.allclose(m.bank.features[i], F.normalize(0.5 * bank0[i] + 0.5 * q, dim=1), atol=1e-5)
    loss, logs = m.training_step(batch, 1, 30)  # after the ramp: L = L_ins + 0.6 L_inv
    assert torch.allclose(loss.detach(), logs["loss_ins"] + 0.6 * logs["loss_inv"], atol=1e-5)


INVP = ["method.invp.num_background=16", "method.invp.n_pos=5", "method.invp.ramp_epochs=1"]


def test_invp_mid_epoch_resume_metrics_and_json(tiny_data, tmp_path):
    ref = mid_epoch_resume("invp-r18-cifar", tiny_data, tmp_path, INVP)
    assert set(ref["losses"]) == {"loss", "loss_ins", "loss_inv"}
    recs = [json.loads(ln) for ln in (Path(ref["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    # epoch 1: L = L_ins; epoch 2 (past ramp_epochs = 1): L = L_ins + 0.6 L_inv
    assert all(math.isclose(r["loss"], r["loss_ins"], rel_tol=1e-5) for r in steps if r["epoch"] == 1)
    late = [r for r in steps if r["epoch"] == 2]
    assert late and all(math.isclose(r["loss"], r["loss_ins"] + 0.6 * r["loss_inv"], rel_tol=1e-4) for r in late)


def test_config_errors_are_one_line(tiny_data, tmp_path):
    base = ["pretrain", "--preset", "invp-r18-cifar", f"data.root={tiny_data / 'train'}", *TINY]
    res = run_cli(*base, "method.invp.num_background=4096", "--out", str(tmp_path / "a"))
    assert_clean_error(res, 2, "num_background")
    res = run_cli(*base, "method.invp.num_background=16", "method.cld.weight=1", "--out", str(tmp_path / "b"))
    assert_clean_error(res, 2, "not invp")


def test_bank_logits_are_float32_under_bf16_autocast(monkeypatch):
    from interclr_cli.methods import invp as invp_mod

    seen = []
    real = invp_mod.invp_losses

    def spy(bank, q, *a, **k):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(bank, q, *a, **k)

    monkeypatch.setattr(invp_mod, "invp_losses", spy)
    cfg = load_config("invp-r18-cifar", LIGHT + ["method.invp.num_background=6", "method.invp.n_pos=3"])
    torch.manual_seed(0)
    m = build_method(cfg, 24)
    m.train()
    m.on_train_start(TrainContext(torch.device("cpu"), 24, 3, False, None, print))
    batch = {"view1": torch.randn(8, 3, 16, 16), "index": torch.arange(8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_step(batch, 0, 40)
    assert seen == [(torch.float32, False)] and loss.dtype == torch.float32
