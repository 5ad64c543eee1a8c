"""NPID (methods/npid.py): the loss against float64 hand computations, the bank update, the shared
part with InterCLR's NPID branch, exact mid-epoch resume, metrics and --json, downstream commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_cli
from safetensors.torch import load_file

from interclr_cli.commands.pretrain import run_pretrain
from interclr_cli.config import load_config
from interclr_cli.memory import MemoryBank, _rng
from interclr_cli.methods import TrainContext, build_method
from interclr_cli.methods import npid as npid_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def _bank(n=10, d=6, seed=0) -> MemoryBank:
    bank = MemoryBank(n, d)
    bank.fill(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))
    return bank


def _queries(b=4, d=6, seed=1) -> torch.Tensor:
    return F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _hand_loss(q, rows, idx, neg_idx, tau):
    """float64: -log exp(q.v_i/tau) / (exp(q.v_i/tau) + sum_m exp(q.v_m/tau)), or the softmax over
    every row when neg_idx is None; looped sample by sample."""
    total = 0.0
    for b in range(q.shape[0]):
        pos = math.exp(float(q[b] @ rows[idx[b]]) / tau)
        if neg_idx is None:
            den = sum(math.exp(float(q[b] @ rows[j]) / tau) for j in range(rows.shape[0]))
        else:
            den = pos + sum(math.exp(float(q[b] @ rows[j]) / tau) for j in neg_idx[b].tolist())
        total += -math.log(pos / den)
    return total / q.shape[0]


@pytest.mark.parametrize("negatives,via_sim", [(0, False), (7, False), (7, True)], ids=["full", "gathered", "via-sim"])
def test_npid_loss_and_gradient_match_float64_hand_computation(negatives, via_sim):
    bank, q64 = _bank(), _queries()
    idx = torch.tensor([3, 0, 9, 3])
    rows = bank.features.double()
    neg_idx = None
    if negatives:
        neg_idx = _rng.randint(10, (4, negatives), torch.Generator().manual_seed(5), torch.device("cpu"))
    q = q64.float().requires_grad_(True)
    sim = bank.similarity(q.detach()) if via_sim else None
    loss = npid_mod.npid_loss(bank, q, idx, negatives, 0.07, torch.Generator().manual_seed(5), sim)
    assert abs(float(loss.detach()) - _hand_loss(q64, rows, idx, neg_idx, 0.07)) < 1e-4
    # the gradient to the queries, against float64 autograd of the same formula
    qd = q64.clone().requires_grad_(True)
    logits = qd @ rows.t() / 0.07  # [B, N]
    if neg_idx is None:
        ref = (torch.logsumexp(logits, 1) - logits.gather(1, idx[:, None]).squeeze(1)).mean()
    else:
        cols = torch.cat([idx[:, None], neg_idx], 1)
        sel = logits.gather(1, cols)
        ref = (torch.logsumexp(sel, 1) - sel[:, 0]).mean()
    loss.backward()
    ref.backward()
    assert torch.allclose(q.grad.double(), qd.grad, atol=1e-4)


def test_bank_update_momentum_half_by_hand():
    bank = _bank()
    old = bank.features.double().clone()
    keys = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    npid_mod.update_bank(bank, torch.tensor([2, 5, 2]), keys, 0.5)
    k = F.normalize(keys.double(), dim=1)
    want = old.clone()
    want[5] = F.normalize(0.5 * old[5] + 0.5 * k[1], dim=0)
    want[2] = F.normalize(0.5 * old[2] + 0.5 * k[2], dim=0)  # a repeated index: the last one wins
    assert torch.allclose(bank.features.double(), want, atol=1e-6)


LIGHT = ["model.arch=resnet18", "model.small_stem=false", "model.head_hidden=32", "model.embed_dim=16"]


def _ctx(n):
    return TrainContext(torch.device("cpu"), n, 6, False, None, lambda s: None)


def _batch(step, n=24, b=8):
    g = torch.Generator().manual_seed(100 + step)
    return {
        "view1": torch.randn(b, 3, 16, 16, generator=g),
        "view2": torch.randn(b, 3, 16, 16, generator=g),
        "index": torch.randperm(n, generator=g)[:b],
        "label": torch.full((b,), -1),
    }


def test_step_logs_the_loss_and_writes_the_queries_into_the_bank():
    torch.manual_seed(0)
    m = build_method(load_config("npid-r18-cifar", LIGHT + ["method.npid.num_negatives=5"]), 24)
    m.train()
    m.on_train_start(_ctx(24))
    assert torch.allclose(m.bank.features.norm(dim=1), torch.ones(24), atol=1e-5)  # random unit rows
    batch = _batch(0)
    before = m.bank.features.clone()
    loss, logs = m.training_step(batch, 0, 0)
    assert set(logs) == {"loss_npid"} and torch.equal(loss.detach(), logs["loss_npid"])
    q = F.normalize(m.encoder_q(batch["view1"]).detach(), dim=1)  # same weights: no step taken
    m.after_optimizer_step(0)
    i = batch["index"]
    assert torch.allclose(m.bank.features[i], F.normalize(0.5 * before[i] + 0.5 * q, dim=1), atol=1e-5)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[i] = False
    assert torch.equal(m.bank.features[untouched], before[untouched])


def test_interclr_npid_branch_uses_the_same_npid_loss(monkeypatch):
    from interclr_cli.methods import interclr as interclr_mod

    assert interclr_mod.npid_loss is npid_mod.npid_loss  # one copy, imported
    calls = []
    real = npid_mod.npid_loss
    monkeypatch.setattr(interclr_mod, "npid_loss", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = load_config(
        "r18-cifar",
        LIGHT
        + [
            "method.intra.kind=npid",
            "method.intra.npid_negatives=6",
            "method.inter.num_clusters=2",
            "method.inter.min_cluster_size=2",
            "method.inter.num_negatives=4",
            "method.inter.kmeans_iters=2",
        ],
    )
    torch.manual_seed(0)
    m = build_method(cfg, 24)
    m.train()
    images = torch.randn(24, 3, 16, 16)
    ctx = TrainContext(
        torch.device("cpu"), 24, 3, False, lambda fn: torch.cat([fn(images[:12]), fn(images[12:])]), print
    )
    m.on_train_start(ctx)
    loss, logs = m.training_step(_batch(0), 0, 0)
    assert len(calls) == 1 and calls[0][0] is m.bank and calls[0][3] == 6  # the bank, M' = npid_negatives
    assert torch.isfinite(loss)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim.", "method."))}


def mid_epoch_resume(preset: str, data: Path, tmp: Path, extra: list[str]) -> dict:
    """A 2-epoch run, and the same run stopped at step 3 then resumed: identical final tensors
    (weights, optimizer, bank, tables, generators). Returns the uninterrupted run's summary."""
    common = dict(force=False, show_progress=False)
    ov = [f"data.root={data / 'train'}", "train.epochs=2", *TINY, *extra]
    ref = run_pretrain(preset, ov, out=str(tmp / "ref"), resume=None, **common)
    part = run_pretrain(preset, ov + ["train.max_steps=3"], out=str(tmp / "p"), resume=None, **common)
    assert part["steps"] == 3
    done = run_pretrain(None, ["train.max_steps=0"], out=str(tmp / "p"), resume="__latest__", **common)
    assert done["steps"] == ref["steps"] == 12
    a, b = _tensors(Path(ref["checkpoint"])), _tensors(Path(done["checkpoint"]))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    return ref


def test_npid_mid_epoch_resume_metrics_and_json(tiny_data, tmp_path):
    ref = mid_epoch_resume("npid-r18-cifar", tiny_data, tmp_path, ["method.npid.num_negatives=16"])
    assert "model.bank.features" in _tensors(Path(ref["checkpoint"]))
    assert set(ref["losses"]) == {"loss", "loss_npid"} and ref["method"] == "npid"
    steps = [json.loads(ln) for ln in (Path(ref["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "step"]
    assert steps and all(math.isclose(r["loss"], r["loss_npid"], rel_tol=1e-5) for r in steps)


def test_downstream_commands_accept_an_npid_checkpoint(tiny_data, tmp_path):
    ov = [f"data.root={tiny_data / 'train'}", "train.epochs=1", "train.max_steps=1", *TINY]
    res = run_pretrain("npid-r18-cifar", ov, out=str(tmp_path / "run"), resume=None, force=False, show_progress=False)
    ckpt = res["checkpoint"]
    small = ["data.image_size=16", "data.eval_resize=16", "data.num_workers=0", "device=cpu"]
    knn = run_cli(
        "knn", ckpt, f"data.root={tiny_data}", *small, "--k", "5", "--json", "-q", "--out", str(tmp_path / "k")
    )
    assert knn.returncode == 0, knn.stderr
    assert 0 <= json.loads(knn.stdout)["top1"]["5"] <= 100
    lin = run_cli(
        "linear-eval", ckpt, "--preset", "linear-r18-cifar", f"data.root={tiny_data}", *small,
        "train.batch_size=8", "train.epochs=1", "--cached-features", "--json", "-q", "--out", str(tmp_path / "l"),
    )  # fmt: skip
    assert lin.returncode == 0, lin.stderr
    exp = run_cli("export", ckpt, "-o", str(tmp_path / "r18.safetensors"), "--json", "-q")
    assert exp.returncode == 0, exp.stderr
    exported = load_file(str(tmp_path / "r18.safetensors"))
    own = load_file(ckpt)
    assert torch.equal(exported["conv1.weight"], own["model.encoder_q.backbone.conv1.weight"])


NEW_PRESETS = {
    "npid-r18-cifar": ("npid", 0.0),
    "npid-r50-imagenet": ("npid", 0.0),
    "invp-r18-cifar": ("invp", 0.0),
    "invp-r50-imagenet": ("invp", 0.0),
    "cld-mocov2-r18-cifar": ("mocov2", 0.8),
    "cld-npid-r18-cifar": ("npid", 1.0),
    "cld-mocov2-r50-imagenet": ("mocov2", 0.25),
}


def test_presets_list_the_new_methods_with_a_line_each():
    res = run_cli("presets", "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    for name, (method, cld_weight) in NEW_PRESETS.items():
        assert listed.get(name), f"{name} is not listed with a description"
        cfg = load_config(name)
        assert cfg.method.name == method and cfg.method.cld.weight == cld_weight


def test_bank_logits_are_float32_under_bf16_autocast(monkeypatch):
    seen = []
    real = npid_mod.npid_loss

    def spy(bank, q, *a, **k):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(bank, q, *a, **k)

    monkeypatch.setattr(npid_mod, "npid_loss", spy)
    torch.manual_seed(0)
    m = build_method(load_config("npid-r18-cifar", LIGHT + ["method.npid.num_negatives=5"]), 24)
    m.train()
    m.on_train_start(_ctx(24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_step(_batch(0), 0, 0)
    assert seen == [(torch.float32, False)] and loss.dtype == torch.float32
