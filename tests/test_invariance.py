"""`interclr invariance`: the firing-rate score on hand-made features, the set file's errors, the
augmentation views, the bar chart and the command end to end on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUILTIN, assert_clean_error, make_tree, run_cli
from PIL import Image

from interclr_cli.commands.bar_chart import (
    BAR_WIDTH,
    PALETTE,
    PLOT_HEIGHT,
    TOP,
    bar_boxes,
    grouped_bar_chart,
    nice_ceiling,
)
from interclr_cli.commands.invariance import StagePool, run_invariance, short_name
from interclr_cli.commands.loading import load_backbone
from interclr_cli.config.loader import apply_overrides, config_from_mapping, load_preset_mapping
from interclr_cli.data import eval_transform, index_source
from interclr_cli.data.invariance import FAMILIES, family_views, read_set_file, view_seed, view_transform
from interclr_cli.errors import UserError
from interclr_cli.eval.invariance import firing, invariance_scores
from interclr_cli.training.features import extract, subset_index

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data.image_size=16", "data.eval_resize=16", "data.num_workers=0", "device=cpu"]


# --- the score: an independent float64 transcription of the definition (loops) ------------------


def reference(h: np.ndarray, set_of: np.ndarray, class_of, p: float, k: int):
    """Per-unit I_c(i) and the score, by loops over units, classes and sets."""
    n, d = h.shape
    num_sets = set_of.max() + 1
    class_of = np.zeros(num_sets, int) if class_of is None else np.asarray(class_of)
    num_classes = class_of.max() + 1
    inv = np.zeros((num_classes, d))
    for i in range(d):
        t = np.sort(h[:, i])[min(n - 1, int((1 - p) * n))]
        fires = h[:, i] >= t
        g = fires.mean()
        for c in range(num_classes):
            fracs = []
            for s in range(num_sets):
                if class_of[s] != c:
                    continue
                members = fires[set_of == s]
                if members.any():
                    fracs.append(members.mean())
            inv[c, i] = (np.mean(fracs) if fracs else 0.0) / g
    top = np.sort(inv, axis=1)[:, ::-1][:, : min(k, d)]
    return inv, float(top.mean(axis=1).mean())


def test_small_case_by_hand():
    # 10 images in 5 sets of 2; p = 0.2: each unit fires on its 2 largest values
    set_of = torch.arange(5).repeat_interleave(2)  # sets (0,1), (2,3), ...
    u0 = torch.arange(10.0)  # its 2 largest (8, 9) are set 4: the whole set fires
    u1 = torch.tensor([0.0, 9, 1, 2, 3, 4, 5, 6, 7, 8])  # 9 in set 0, 8 in set 4: half of each
    res = invariance_scores(torch.stack([u0, u1], 1), set_of, firing_rate=0.2, top_k=1)
    # G = 2/10; L(u0) = 1 (one set, all of it), L(u1) = (1/2 + 1/2) / 2; I = L / G
    assert res.global_rate.tolist() == pytest.approx([0.2, 0.2])
    assert res.per_unit.tolist() == pytest.approx([5.0, 2.5])
    assert res.score == pytest.approx(5.0) and res.top_k == 1
    assert res.score_percent == pytest.approx(100 * 0.2 * 5.0)
    two = invariance_scores(torch.stack([u0, u1], 1), set_of, firing_rate=0.2, top_k=2)
    assert two.score == pytest.approx((5.0 + 2.5) / 2)
    assert two.quartiles == pytest.approx(tuple(np.quantile([2.5, 5.0], [0.25, 0.5, 0.75])))


def test_a_unit_that_ignores_the_transformation_scores_higher_than_one_that_follows_it():
    g = torch.Generator().manual_seed(0)
    sets, views = 200, 6
    set_of = torch.arange(sets).repeat(views)  # view-major, as the command builds it
    identity = torch.randn(sets, generator=g)[set_of]  # the same value on every view of an image
    follows = torch.randn(sets * views, generator=g)  # a new value on every view
    partly = identity + 0.5 * torch.randn(sets * views, generator=g)
    res = invariance_scores(torch.stack([identity, partly, follows], 1), set_of, firing_rate=0.05, top_k=3)
    inv = res.per_unit
    assert inv[0] > inv[1] > inv[2]
    # a unit constant within sets fires on whole sets: L = 1, I = 1 / G
    assert inv[0].item() == pytest.approx(1.0 / res.global_rate[0].item())
    assert res.local_rate[0, 0].item() == pytest.approx(1.0)


def test_a_constant_unit_and_a_tied_relu_unit_are_finite():
    set_of = torch.arange(20).repeat(3)
    h = torch.zeros(60, 3)
    h[:, 0] = 7.0  # constant: every image ties at the threshold
    h[:2, 1] = torch.tensor([1.0, 2.0])  # zero on 58 of 60 images (> 95%: a sparse ReLU unit)
    h[:, 2] = torch.randn(60, generator=torch.Generator().manual_seed(1))
    res = invariance_scores(h, set_of, firing_rate=0.05, top_k=3)
    assert torch.isfinite(res.per_unit).all() and math.isfinite(res.score)
    # the constant unit fires on everything: G = 1, L = 1, I = 1 (chance level, not a division by zero)
    assert res.global_rate[0].item() == 1.0 and res.per_unit[0].item() == pytest.approx(1.0)
    assert res.global_rate[1].item() == 1.0  # the zeros tie at its threshold
    assert res.degenerate_units == 2


@pytest.mark.parametrize("with_classes", [False, True])
def test_matches_the_loop_reference_with_ties_and_classes(with_classes):
    rng = np.random.default_rng(3)
    sizes = rng.integers(2, 6, size=40)
    set_of = np.repeat(np.arange(40), sizes)
    rng.shuffle(set_of)
    h = np.round(rng.normal(size=(len(set_of), 12)), 1)  # rounding makes ties at thresholds
    h[:, 3] = np.maximum(h[:, 3], 0.8)  # many ties at the bottom
    class_of = rng.integers(0, 3, size=40) if with_classes else None
    if with_classes:
        class_of[:3] = [0, 1, 2]
    inv, score = reference(h, set_of, class_of, 0.1, 4)
    res = invariance_scores(
        torch.tensor(h),
        torch.tensor(set_of),
        None if class_of is None else torch.tensor(class_of),
        firing_rate=0.1,
        top_k=4,
    )
    assert res.score == pytest.approx(score, rel=1e-12)
    assert res.per_unit.numpy() == pytest.approx(inv.mean(0), rel=1e-12)
    assert res.num_sets == 40 and res.num_classes == (3 if with_classes else 1)


def test_firing_fraction_is_the_rate_on_distinct_values():
    h = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    assert firing(h, 0.05).float().mean(0).tolist() == pytest.approx([0.05] * 8)


@pytest.mark.parametrize(
    "h, set_of, kw, fragment",
    [
        (torch.zeros(4, 2), torch.tensor([0, 0, 1, 2]), {}, "fewer than 2 images"),
        (torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), {"firing_rate": 1.0}, "firing rate"),
        (torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), {"top_k": 0}, "top-k"),
        (torch.full((4, 2), float("nan")), torch.tensor([0, 0, 1, 1]), {}, "NaN"),
        (torch.zeros(4, 2), torch.tensor([0, 0, 1]), {}, "one set id per image"),
    ],
)
def test_bad_score_inputs_are_user_errors(h, set_of, kw, fragment):
    with pytest.raises(UserError, match=fragment):
        invariance_scores(h, set_of, **kw)


# --- set files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = make_tree(tmp_path_factory.mktemp("inv-img") / "img", 4, classes=2)
    return sorted(d.rglob("*.jpg"))


def _write(tmp_path: Path, text: str, name: str = "sets.csv") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_set_file_parses_header_labels_and_relative_paths(tmp_path, images):
    rel = [Path("..") / p.relative_to(p.parents[2]) for p in images[:4]]
    sub = images[0].parents[2] / "lists"  # beside the images' folder: ../img/<class>/<file>
    sub.mkdir(exist_ok=True)
    text = "path,set_id,label\n" + "".join(
        f"{r},{s},{lab}\n" for r, s, lab in zip(rel, ["b", "b", "a", "a"], ["dog", "dog", "cat", "cat"])
    )
    sf = read_set_file(_write(sub, "# a comment\n" + text))
    assert sf.paths == [str(p) for p in images[:4]]
    assert sf.set_of.tolist() == [0, 0, 1, 1] and sf.set_names == ["b", "a"]
    assert sf.classes == ["cat", "dog"] and sf.class_of.tolist() == [1, 0]
    plain = read_set_file(_write(tmp_path, "".join(f"{p},{i // 2}\n" for i, p in enumerate(images[:4]))))
    assert plain.class_of is None and plain.set_of.tolist() == [0, 0, 1, 1]


def test_set_file_errors(tmp_path, images):
    a, b, c = (str(p) for p in images[:3])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    cases = [
        (f"{a}\n{b}\n", "line 1: expected path,set_id"),
        (f"{a},0\n{b},0\n{c},1\n", "line 3: set '1' has one image"),
        (f"{a},0\n{bad},0\n", f"line 2: {bad} cannot be read"),
        (f"{a},0\n{tmp_path / 'gone.jpg'},0\n", "does not exist"),
        (f"{a},0,x\n{b},0\n", "line 2: no label"),
        (f"{a},0,x\n{b},0,y\n", "has the labels 'x' and 'y'"),
        (f"{a},0,x,extra\n{b},0,x\n", "got 4 column(s)"),
        ("path,set_id\n", "lists no images"),
    ]
    for text, fragment in cases:
        with pytest.raises(UserError, match=None) as e:
            read_set_file(_write(tmp_path, text))
        assert fragment in str(e.value) and "\n" not in str(e.value), (fragment, str(e.value))
    with pytest.raises(UserError, match="cannot read set file"):
        read_set_file(str(tmp_path / "missing.csv"))


def test_set_file_error_from_the_cli_is_one_line(tmp_path, images):
    path = _write(tmp_path, f"{images[0]},0\n{images[1]},1\n")
    res = run_cli("invariance", "random:resnet18", "--sets", path, "--preset", "linear-r18-cifar", *SMALL)
    assert_clean_error(res, 2, "has one image")


# --- the views -----------------------------------------------------------------------------------


def _data_cfg(*over: str):
    return config_from_mapping(apply_overrides(load_preset_mapping("linear-r18-cifar"), [*SMALL, *over])).data


def _seeded(transform, img: Image.Image, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


def test_views_are_seeded_and_do_what_their_family_says():
    cfg = _data_cfg()
    img = Image.open(next((BUILTIN / "train").rglob("*.jpg"))).convert("RGB")
    base = view_transform(None, cfg)(img)
    assert torch.equal(base, eval_transform(cfg)(img))
    assert torch.equal(view_transform("flip", cfg)(img), base.flip(-1))
    gray = view_transform("grayscale", cfg)(img)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    raw = gray * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)
    for family in ("crop", "occlusion", "colour", "blur", "rotation"):
        t = view_transform(family, cfg)
        x, y = _seeded(t, img, 5), _seeded(t, img, 5)
        assert torch.equal(x, y), family  # the same seed gives the same view
        assert not torch.equal(x, _seeded(t, img, 6)), family
        assert not torch.equal(x, base), family
    assert family_views("flip", 8) == 2 and family_views("crop", 8) == 8
    assert len({view_seed(0, f, v) for f in FAMILIES for v in range(4)}) == 4 * len(FAMILIES)


# --- the chart -----------------------------------------------------------------------------------


def test_bar_chart_bars_have_the_heights_of_their_values(tmp_path):
    values = [[1.0, 3.0, None], [2.0, 4.0, 0.5]]
    assert nice_ceiling(4.0) == 5.0 and nice_ceiling(19.9) == 20.0 and nice_ceiling(0.3) == 0.5
    w, h = grouped_bar_chart(["a", "b", "c"], ["x", "y"], values, tmp_path / "c.png", title="t")
    img = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    assert img.shape == (h, w, 3)
    boxes = bar_boxes(values, 5.0)
    base = TOP + PLOT_HEIGHT
    for j, row in enumerate(values):
        for g, v in enumerate(row):
            if v is None:
                assert boxes[j][g] is None
                continue
            x0 = boxes[j][g][0]
            column = img[:, x0 + BAR_WIDTH // 2]
            filled = np.all(column == PALETTE[j], axis=1)
            filled[base + 1 :] = False  # below the plot: the legend may share the column
            assert filled.sum() == round(v / 5.0 * PLOT_HEIGHT), (j, g)
            assert filled[base - 1] and not filled[base]  # standing on the baseline
    with pytest.raises(ValueError):
        grouped_bar_chart(["a"], ["x", "y"], [[1.0]], tmp_path / "d.png")


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("inv-data") / "train", 6, classes=3)


def _direct(spec: str, tree: Path, family: str, n_images: int, views: int, layer: str = "backbone", top_k: int = 25):
    """The score of one family computed here from the parts (extraction, views, score)."""
    model = load_backbone(spec)
    cfg = config_from_mapping(apply_overrides(load_preset_mapping("linear-r18-cifar"), SMALL))
    index = index_source(str(tree))
    pos = np.sort(np.random.default_rng(cfg.seed + 777).permutation(len(index))[:n_images])
    sub = subset_index(index, pos)
    fn = model.backbone if layer == "backbone" else StagePool(model.backbone, int(layer[-1]))
    cpu = torch.device("cpu")
    feats = [extract(fn, sub, view_transform(None, cfg.data), device=cpu, num_workers=0)[0][0]]
    for v in range(1, family_views(family, views)):
        t = view_transform(family, cfg.data)
        feats.append(extract(fn, sub, t, device=cpu, num_workers=0, aug_seed=view_seed(cfg.seed, family, v))[0][0])
    set_of = torch.arange(len(sub)).repeat(len(feats))
    return invariance_scores(torch.cat(feats), set_of, firing_rate=0.05, top_k=top_k)


def test_run_invariance_end_to_end(tmp_path, tree, images):
    sets = _write(tmp_path, "".join(f"{p},{i // 2},{(i // 2) % 2}\n" for i, p in enumerate(images[:4] * 2)))
    over = [f"data.root={tree}", *SMALL, "invariance.augment=crop,flip", "invariance.images=12"]
    over += ["invariance.views=3", f"invariance.sets={sets}"]
    res = run_invariance(
        ["random:resnet18", "random:resnet34"],
        "linear-r18-cifar",
        over,
        out=str(tmp_path / "r"),
        force=False,
        show_progress=False,
    )
    assert res["families"] == ["crop", "flip", "sets"] and res["num_images"] == 12
    assert set(res["scores"]["crop"]) == {"random:resnet18", "random:resnet34"}
    for family in ("crop", "flip"):
        direct = _direct("random:resnet18", tree, family, 12, 3)
        assert res["scores"][family]["random:resnet18"] == pytest.approx(direct.score, rel=1e-9), family
    rows = {(r["checkpoint"], r["family"]): r for r in res["results"]}
    assert rows[("random:resnet18", "crop")]["num_images"] == 36 and rows[("random:resnet18", "flip")]["num_sets"] == 12
    assert rows[("random:resnet34", "sets")]["num_classes"] == 2
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert saved["scores"] == res["scores"]
    assert Image.open(res["png"]).size[0] > 0
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x.get("type") == "invariance") == 6
    # one checkpoint alone: the same images and views, so the same score
    alone = run_invariance(
        ["random:resnet18"], "linear-r18-cifar", over, out=str(tmp_path / "r1"), force=False, show_progress=False
    )
    assert alone["scores"]["crop"]["random:resnet18"] == res["scores"]["crop"]["random:resnet18"]


def test_intermediate_layer_and_cli_json(tmp_path, tree):
    res = run_cli(
        "invariance", "random:resnet18", f"data.root={tree}", *SMALL, "--preset", "linear-r18-cifar",
        "--augment", "rotation", "--views", "3", "--images", "10", "--layer", "layer1", "--top-k", "5",
        "--out", str(tmp_path / "c"), "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    row = out["results"][0]
    assert out["layer"] == "layer1" and row["num_units"] == 64 and row["top_k"] == 5
    direct = _direct("random:resnet18", tree, "rotation", 10, 3, layer="layer1", top_k=5)
    assert row["score"] == pytest.approx(direct.score, rel=1e-9)
    assert row["quartiles"] == pytest.approx(list(direct.quartiles), rel=1e-9)


def test_command_errors_are_one_line(tmp_path, tree):
    base = ["--preset", "linear-r18-cifar", f"data.root={tree}", *SMALL]
    assert_clean_error(run_cli("invariance", "random:resnet18", *base, "--augment", "zoom"), 2, "invariance.augment")
    assert_clean_error(run_cli("invariance", "random:resnet18", *base, "--views", "1"), 2, "invariance.views")
    assert_clean_error(run_cli("invariance", "random:resnet18", *base, "--firing-rate", "0"), 2, "firing_rate")
    assert_clean_error(run_cli("invariance", "random:resnet18", "random:resnet18", *base), 2, "named twice")
    assert_clean_error(run_cli("invariance", "random:vgg", *base), 2, "unknown random backbone")


def test_short_names():
    assert short_name("random:resnet18") == "random:resnet18"
    assert short_name("/x/runs/quick/checkpoints/ckpt-e0012.safetensors") == "quick/ckpt-e0012"
    assert short_name("/x/exports/r18.safetensors") == "exports/r18"


def test_layers_measured():
    from interclr_cli.commands.invariance import layer_fn
    from interclr_cli.commands.loading import LoadedModel

    model = load_backbone("random:resnet18")
    cfg = config_from_mapping(apply_overrides(load_preset_mapping("linear-r18-cifar"), SMALL))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = model.backbone.layer3.register_forward_hook(lambda m, i, o: seen.setdefault("layer3", o))
    with torch.no_grad():
        full = model.backbone(x)
        got = layer_fn(model, "layer3", cfg, torch.device("cpu"))(x)
        emb = layer_fn(model, "embedding", cfg, torch.device("cpu"))(x)
        assert torch.allclose(layer_fn(model, "backbone", cfg, torch.device("cpu"))(x), full, atol=1e-5)
    hook.remove()
    assert torch.allclose(got, seen["layer3"].mean(dim=(2, 3)), atol=1e-5) and got.shape == (2, 256)
    assert torch.allclose(emb, model.head(full), atol=1e-5) and emb.shape == (2, 128)
    with pytest.raises(UserError, match="no projection head"):
        layer_fn(LoadedModel(model.backbone, None, model.info), "embedding", cfg, torch.device("cpu"))
