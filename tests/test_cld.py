"""CLD (methods/cld.py): the batch k-means and the cross-level loss against float64 hand
computations, the normalised group head, the add-on in npid / mocov2 / interclr (loss terms,
exact mid-epoch resume, --json), the K check, and 2-rank gloo runs (gathered k-means with
gradient, rank-identical banks, tables and weights for npid + CLD, mocov2 + CLD and invp)."""

from __future__ import annotations

import math
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_clean_error, make_tree, run_cli, scratch
from safetensors.torch import load_file
from test_distributed import spawn
from test_npid import mid_epoch_resume

from interclr_cli.config import load_config
from interclr_cli.methods import TrainContext, build_method
from interclr_cli.methods.cld import NormedLinear, batch_kmeans, cross_level_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_kmeans(x: list[list[float]], k: int, iters: int):
    """Lloyd from the first k points, float64 lists; an empty cluster's centroid is 0."""
    c = [list(p) for p in x[:k]]
    labels = []
    for _ in range(iters):
        labels = [min(range(k), key=lambda j: sum((a - b) ** 2 for a, b in zip(p, c[j]))) for p in x]
        c = []
        for j in range(k):
            mem = [p for p, lab in zip(x, labels) if lab == j]
            c.append([sum(v) / len(mem) for v in zip(*mem)] if mem else [0.0] * len(x[0]))
    return labels, c


def test_batch_kmeans_matches_hand_lloyd_iterations():
    pts = [[0.0, 0.0], [0.2, 0.1], [5.0, 5.0], [5.2, 4.9], [0.1, 0.3], [4.8, 5.1], [2.4, 2.6]]
    x = torch.tensor(pts, dtype=torch.float64)
    for k, iters in ((2, 1), (2, 5), (3, 5)):
        labels, c = batch_kmeans(x, k, iters)
        want_l, want_c = _hand_kmeans(pts, k, iters)
        assert labels.tolist() == want_l
        assert torch.allclose(c, torch.tensor(want_c, dtype=torch.float64))
    # the two first points start in one place: the second centroid's cluster empties -> 0
    dup = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    labels, c = batch_kmeans(dup, 2, 1)
    assert labels.tolist() == [0, 0, 0] and torch.equal(c[1], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least K rows"):
        batch_kmeans(dup, 4, 1)


def test_cross_level_loss_and_centroid_gradient_match_float64():
    g = torch.Generator().manual_seed(0)
    f1 = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    f2 = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    k, iters, tau = 3, 5, 0.2
    loss, acc = cross_level_loss(f1, f2, k, iters, tau)
    lab1, _ = _hand_kmeans(f1.detach().tolist(), k, iters)
    lab2, _ = _hand_kmeans(f2.detach().tolist(), k, iters)

    def means(f, lab):  # centroids as differentiable means (the official scatter_add / count)
        return torch.stack([f[[i for i, v in enumerate(lab) if v == j]].mean(0) for j in range(k)])

    c1, c2 = means(f1, lab1), means(f2, lab2)
    want = 0.0
    for a, c, lab in ((f1, c2, lab2), (f2, c1, lab1)):
        for i in range(10):
            logits = [float((a[i] @ c[j]).detach()) / tau for j in range(k)]
            want += -(logits[lab[i]] - math.log(sum(math.exp(v) for v in logits))) / 20
    assert abs(float(loss.detach()) - want) < 1e-9
    pred = (f1 @ c2.t()).argmax(1).tolist()
    assert math.isclose(float(acc), sum(p == t for p, t in zip(pred, lab2)) / 10, rel_tol=1e-6)
    # the gradient flows into both views' features, through the centroids too
    ref = 0.5 * (
        F.cross_entropy(f1 @ c2.t() / tau, torch.tensor(lab2)) + F.cross_entropy(f2 @ c1.t() / tau, torch.tensor(lab1))
    )
    g1, g2 = torch.autograd.grad(loss, (f1, f2))
    r1, r2 = torch.autograd.grad(ref, (f1, f2))
    assert torch.allclose(g1, r1) and torch.allclose(g2, r2)
    no_centroid_grad = torch.autograd.grad(
        F.cross_entropy(f1 @ c2.detach().t() / tau, torch.tensor(lab2)) / 2, f2, allow_unused=True
    )[0]
    assert no_centroid_grad is None and g2.abs().sum() > 0


def test_normed_linear_is_cosines_to_its_columns():
    layer = NormedLinear(5, 3)
    x = torch.randn(4, 5)
    w = layer.weight.detach()
    want = torch.stack([torch.stack([F.cosine_similarity(x[i], w[:, j], dim=0) for j in range(3)]) for i in range(4)])
    assert torch.allclose(layer(x), want, atol=1e-6)


LIGHT = [
    "model.arch=resnet18",
    "model.small_stem=false",
    "model.head_hidden=32",
    "model.embed_dim=16",
    "train.batch_size=8",
]


def _batch(n=24, b=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(b, 3, 16, 16, generator=g),
        "view2": torch.randn(b, 3, 16, 16, generator=g),
        "index": torch.randperm(n, generator=g)[:b],
        "label": torch.full((b,), -1),
    }


@pytest.mark.parametrize("preset", ["cld-npid-r18-cifar", "cld-mocov2-r18-cifar"])
def test_step_adds_weight_times_cld_and_trains_the_group_head(preset):
    cfg = load_config(preset, LIGHT + ["method.cld.num_clusters=3", "method.queue_size=16"])
    torch.manual_seed(0)
    m = build_method(cfg, 24)
    m.train()
    m.on_train_start(TrainContext(torch.device("cpu"), 24, 3, False, None, print))
    loss, logs = m.training_step(_batch(), 0, 0)
    inst = logs["loss_npid"] if "loss_npid" in logs else logs["loss_intra"]
    assert {"loss_cld", "cld_acc"} <= set(logs)
    assert torch.allclose(loss.detach(), inst + cfg.method.cld.weight * logs["loss_cld"], atol=1e-5)
    loss.backward()
    assert m.cld.head.weight.grad is not None and m.cld.head.weight.grad.abs().sum() > 0
    assert isinstance(m.cld.head, NormedLinear) == cfg.method.cld.normlinear


def test_num_clusters_above_the_global_batch_is_a_one_line_error(tiny_data, tmp_path):
    res = run_cli(
        "pretrain", "--preset", "cld-npid-r18-cifar", f"data.root={tiny_data / 'train'}", *TINY,
        "method.cld.num_clusters=9", "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert_clean_error(res, 2, "exceeds the global batch")
    assert not (tmp_path / "a").exists()


CLD = ["method.cld.num_clusters=4"]


@pytest.mark.parametrize(
    "preset,extra,terms",
    [
        ("cld-npid-r18-cifar", [], {"loss", "loss_npid", "loss_cld"}),
        ("cld-mocov2-r18-cifar", ["method.queue_size=16"], {"loss", "loss_intra", "loss_cld"}),
    ],
    ids=["npid", "mocov2"],
)
def test_mid_epoch_resume_and_json_loss_terms(tiny_data, tmp_path, preset, extra, terms):
    ref = mid_epoch_resume(preset, tiny_data, tmp_path, CLD + extra)
    assert set(ref["losses"]) == terms
    assert "model.cld.head.weight" in load_file(ref["checkpoint"])


def test_interclr_with_cld(tiny_data, tmp_path):
    extra = [
        "method.cld.weight=0.5",
        "method.queue_size=16",
        "method.inter.num_clusters=2",
        "method.inter.min_cluster_size=4",
        "method.inter.num_negatives=6",
        "method.inter.pool_fraction=0.5",
        "method.inter.kmeans_iters=3",
        "method.inter.kmeans_gpu=false",
    ]
    ref = mid_epoch_resume("r18-cifar", tiny_data, tmp_path, CLD + extra)
    assert set(ref["losses"]) == {"loss", "loss_intra", "loss_inter", "loss_cld"}


# -- 2 ranks --------------------------------------------------------------------------------------


def _gather_worker() -> dict:
    """Each rank holds 6 of 12 group-feature rows; the gathered L_CLD and its gradient."""
    from interclr_cli.config import load_config as load
    from interclr_cli.methods.cld import CLDPart
    from interclr_cli.runtime import dist

    cfg = load("cld-npid-r18-cifar", ["method.cld.num_clusters=4"])
    part = CLDPart(cfg, 8)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    r = dist.rank()
    mine_a, mine_b = (
        a[6 * r : 6 * r + 6].clone().requires_grad_(True),
        b[6 * r : 6 * r + 6].clone().requires_grad_(True),
    )
    loss, _ = part.loss(mine_a, mine_b)
    loss.backward()
    return {"loss": loss.detach(), "grad_a": mine_a.grad, "grad_b": mine_b.grad, "a": a, "b": b}


STATE = ("bank.features", "neighbours.table", "queue", "cld.head.weight", "encoder_q.backbone.conv1.weight")


def _runs_worker(root: str, data: str) -> dict:
    """npid + CLD, mocov2 + CLD and invp on 2 ranks: uninterrupted, and stopped at step 3 then resumed."""
    from interclr_cli.commands.pretrain import run_pretrain
    from interclr_cli.training import pretraining

    built = []
    build = pretraining.build_method
    pretraining.build_method = lambda cfg, n: built.append(build(cfg, n)) or built[-1]
    base = [f"data.root={data}", "train.epochs=2", *TINY, "train.batch_size=4", "train.keep_last=10"]
    runs = {
        "npid": ("cld-npid-r18-cifar", ["method.cld.num_clusters=6"]),
        "mocov2": ("cld-mocov2-r18-cifar", ["method.cld.num_clusters=6", "method.queue_size=16"]),
        "invp": (
            "invp-r18-cifar",
            ["method.invp.num_background=8", "method.invp.n_pos=3", "method.invp.ramp_epochs=1"],
        ),
    }
    out: dict = {}
    common = dict(force=False, show_progress=False)
    for name, (preset, extra) in runs.items():
        ov = base + extra
        ref = run_pretrain(preset, ov, out=f"{root}/{name}-ref", resume=None, **common)
        ref_state = {k: v.clone() for k, v in built[-1].state_dict().items() if k in STATE}
        run_pretrain(preset, ov + ["train.max_steps=3"], out=f"{root}/{name}-p", resume=None, **common)
        done = run_pretrain(None, ["train.max_steps=0"], out=f"{root}/{name}-p", resume="__latest__", **common)
        out[name] = {
            "ref": ref_state,
            "resumed": {k: v.clone() for k, v in built[-1].state_dict().items() if k in STATE},
            "losses": ref["losses"],
            "steps": done["steps"],
        }
    pretraining.build_method = build
    return out


def _all_worker(root: str, data: str) -> dict:
    return {"gather": _gather_worker(), "runs": _runs_worker(root, data)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Iterator[list]:
    with scratch(tmp_path_factory, "cld-dist") as tmp:
        data = make_tree(tmp / "data" / "train", 4)  # 16 images: 2 global batches of 8
        yield spawn(tmp, _all_worker, str(tmp / "runs"), str(data))


def test_two_ranks_gathered_cld_equals_one_process(ranks):
    r0, r1 = ranks[0]["gather"], ranks[1]["gather"]
    assert torch.equal(r0["loss"], r1["loss"])
    from interclr_cli.config import load_config as load
    from interclr_cli.methods.cld import CLDPart

    cfg = load("cld-npid-r18-cifar", ["method.cld.num_clusters=4"])
    part = CLDPart(cfg, 8)
    a, b = r0["a"].clone().requires_grad_(True), r0["b"].clone().requires_grad_(True)
    loss, _ = part.loss(a, b)
    loss.backward()
    assert torch.allclose(loss.detach(), r0["loss"], atol=1e-6)
    # every rank's loss is the global one, so each rank's rows receive W x its gradient; DDP's
    # averaging of the parameter gradients divides by W again
    got_a = torch.cat([r0["grad_a"], r1["grad_a"]]) / 2
    got_b = torch.cat([r0["grad_b"], r1["grad_b"]]) / 2
    assert torch.allclose(got_a, a.grad, atol=1e-6) and torch.allclose(got_b, b.grad, atol=1e-6)


@pytest.mark.parametrize("name", ["npid", "mocov2", "invp"])
def test_two_ranks_stay_identical_and_resume_exactly(ranks, name):
    a, b = ranks[0]["runs"][name], ranks[1]["runs"][name]
    assert a["steps"] == 4
    for key, value in a["ref"].items():
        assert torch.equal(value, b["ref"][key]), f"{name}: {key} differs between ranks"
        assert torch.equal(value, a["resumed"][key]), f"{name}: {key} differs after resume"
    assert len(a["ref"]) >= 3
