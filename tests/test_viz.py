"""Seeing results: TensorBoard event files, the HTML report and its PNGs, `interclr runs`, the ETA.

Event files are read back with TensorBoard's own reader (EventAccumulator, which applies the
purge of a resumed session as TensorBoard does) and compared with metrics.jsonl; the PNGs are
opened with PIL; run states come from real runs (finished, failed by a non-finite loss) and from
folders left half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import TINY, assert_clean_error, make_tree, run_cli, scratch
from PIL import Image
from safetensors.torch import load_file

from interclr_cli.commands.plots import COLOURS, HEADER_H, PANEL_H, PANEL_W
from interclr_cli.commands.pretrain import run_pretrain
from interclr_cli.commands.report import run_report
from interclr_cli.commands.runinfo import config_differences, read_records, read_run
from interclr_cli.errors import WorkError
from interclr_cli.runtime.progress import Reporter, _EtaColumn, format_seconds, run_eta
from interclr_cli.training.tblog import open_tensorboard

ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")

INTERCLR = [
    "method.name=interclr",
    "method.inter.num_clusters=4",
    "method.inter.min_cluster_size=4",
    "method.inter.num_negatives=12",
    "method.inter.pool_fraction=0.5",
    "method.inter.kmeans_iters=5",
    "optim.lr=0.001",  # these tests read the records; they need no fast (or risky) learning
]
MONITORS = ["monitor.every=1", "monitor.rankme_samples=40"]
COMMON = dict(force=False, show_progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viz") / "data"
    make_tree(root / "train", 12)
    make_tree(root / "test", 4, split="test")
    return root


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Iterator[Path]:
    with scratch(tmp_path_factory, "runs") as path:
        yield path


@pytest.fixture(scope="module")
def interclr_run(data, runs_dir) -> Path:
    """InterCLR, 2 epochs of 6 steps (48 images, 4 clusters), monitors after every epoch."""
    out = runs_dir / "inter"
    ov = [f"data.root={data / 'train'}", "train.epochs=2", *TINY, *INTERCLR, *MONITORS]
    run_pretrain("r18-cifar", ov, out=str(out), resume=None, **COMMON)
    return out


@pytest.fixture(scope="module")
def moco_run(data, runs_dir) -> Path:
    """MoCo v2, 2 epochs, monitors after every epoch."""
    out = runs_dir / "moco"
    ov = [f"data.root={data / 'train'}", "train.epochs=2", *TINY, *MONITORS]
    run_pretrain("mocov2-r18-cifar", ov, out=str(out), resume=None, **COMMON)
    return out


def _accumulator(run: Path):
    ea = ea_mod.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    return ea


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _numeric(rec: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in rec.items()
        if k not in ("type", "epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# --- TensorBoard -----------------------------------------------------------------------------------


def test_event_files_hold_every_metrics_field_at_its_step(interclr_run):
    ea = _accumulator(interclr_run)
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in _records(interclr_run):
        group = {"step": "train", "epoch": "epoch", "monitor": "epoch"}[rec["type"]]
        for k, v in _numeric(rec).items():
            expected.setdefault(f"{group}/{k}", []).append((rec["step"], v))
    assert set(ea.Tags()["scalars"]) == set(expected)
    for tag in ("train/loss_intra", "train/loss_inter", "train/label_change", "epoch/knn_top1", "epoch/rankme"):
        assert tag in expected
    for tag, pairs in expected.items():
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pairs], tag
        assert np.allclose([v for _, v in got], [v for _, v in pairs], rtol=1e-6), tag  # stored as float32
    assert [s for s, _ in expected["epoch/knn_top1"]] == [0, 6, 12]  # the initial monitors at step 0


def test_cluster_size_histogram_and_epoch_statistics_match_the_labels(interclr_run):
    ea = _accumulator(interclr_run)
    assert ea.Tags()["histograms"] == ["epoch/cluster_size"]
    hist = ea.Histograms("epoch/cluster_size")
    assert [h.step for h in hist] == [6, 12]
    # the final checkpoint holds the labels' member counts after the last step
    tensors = load_file(str(sorted((interclr_run / "checkpoints").glob("*.safetensors"))[-1]))
    counts = [v for k, v in tensors.items() if k.endswith("labels.counts")]
    assert len(counts) == 1
    c = np.sort(counts[0].numpy().astype(np.float64))
    last = hist[-1].histogram_value
    assert (last.num, last.sum, last.min, last.max) == (len(c), 48.0, c[0], c[-1])
    epoch = [r for r in _records(interclr_run) if r["type"] == "epoch"][-1]
    lower_median = c[(len(c) - 1) // 2]
    assert (epoch["cluster_size_min"], epoch["cluster_size_median"], epoch["cluster_size_max"]) == (
        c[0],
        lower_median,
        c[-1],
    )


def test_resumed_run_appends_without_duplicate_steps(data, tmp_path):
    out = tmp_path / "res"
    ov = [f"data.root={data / 'train'}", "train.epochs=3", "train.max_steps=9", *TINY]
    run_pretrain("mocov2-r18-cifar", ov, out=str(out), resume=None, **COMMON)
    # an interruption after the epoch-1 checkpoint (step 6): steps 8 and 9 were logged past it
    ckpts = sorted((out / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in ckpts] == ["ckpt-e0001-s00000006.safetensors", "ckpt-e0001-s00000009.safetensors"]
    ckpts[-1].unlink()
    first = _records(out)
    run_pretrain(None, ["train.max_steps=0"], out=str(out), resume="__latest__", **COMMON)
    files = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # one per session, in the one folder
    # the raw files do hold step 8 twice: the reader must drop the interrupted session's copy
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    raw = [
        e.step for f in files for e in EventFileLoader(str(f)).Load() for v in e.summary.value if v.tag == "train/loss"
    ]
    assert raw.count(8) == 2
    ea = _accumulator(out)
    assert [e.step for e in ea.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [e.step for e in ea.Scalars("epoch/loss")] == [6, 12, 18]
    # what is kept past step 6 is the resumed session's (img/s differs from the first session's)
    final = {r["step"]: r for r in read_records(out / "metrics.jsonl") if r["type"] == "step"}
    assert sorted(final) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    rate8 = [e.value for e in ea.Scalars("train/img_per_s") if e.step == 8][0]
    old8 = [r["img_per_s"] for r in first if r["type"] == "step" and r["step"] == 8][0]
    assert math.isclose(rate8, final[8]["img_per_s"], rel_tol=1e-6) and not math.isclose(rate8, old8, rel_tol=1e-6)


def test_tensorboard_off_by_config_and_without_the_package(data, tmp_path, monkeypatch):
    out = tmp_path / "off"
    ov = [f"data.root={data / 'train'}", "train.epochs=1", "train.max_steps=2", *TINY, "log.tensorboard=false"]
    run_pretrain("mocov2-r18-cifar", ov, out=str(out), resume=None, **COMMON)
    assert not (out / "tensorboard").exists() and (out / "metrics.jsonl").is_file()
    from interclr_cli.runtime import dist
    from interclr_cli.training.runstatus import RunStatus

    monkeypatch.setattr(dist, "is_main", lambda: False)  # another rank: no event files, no status
    assert open_tensorboard(True, tmp_path, 0) is None
    RunStatus(tmp_path, "pretrain", 10, 1).start()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert open_tensorboard(True, tmp_path, 0) is None
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "status.json").exists()


# --- report ----------------------------------------------------------------------------------------


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _has_colour(pixels: np.ndarray, hex_colour: str, tol: int = 8, min_pixels: int = 50) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=2) <= tol).sum()) >= min_pixels


def _size(n_panels: int) -> tuple[int, int]:
    return 2 * PANEL_W, HEADER_H + PANEL_H * math.ceil(n_panels / 2)


def test_report_of_one_run(interclr_run, tmp_path):
    page = tmp_path / "one.html"
    res = run_report([str(interclr_run)], str(page))
    figs = {Path(p).stem: Path(p) for p in res["figures"]}
    # losses: loss, loss_intra, loss_inter, lr; monitors: kNN, RankMe, epoch loss; img/s, data wait;
    # clusters: relabelled, size per step, size per epoch, empty
    panels = {"losses": 4, "monitors": 3, "throughput": 2, "clusters": 4}
    assert set(figs) == set(panels)
    html = page.read_text()
    for stem, path in figs.items():
        assert path.parent == tmp_path / "one_files"
        px = _png(path)
        assert (px.shape[1], px.shape[0]) == _size(panels[stem]), stem
        assert (px < 250).any(axis=2).mean() > 0.02, stem  # not a blank page
        assert _has_colour(px, COLOURS[0]), stem  # the run's lines
        import base64

        assert base64.b64encode(path.read_bytes()).decode() in html  # embedded, byte for byte
    assert "inter" in html and "finished" in html and "r18-cifar" in html
    assert res["report"] == str(page)


def test_report_of_two_runs_overlays_them_and_lists_only_differences(interclr_run, moco_run, tmp_path):
    res = run_report([str(interclr_run), str(moco_run)], str(tmp_path / "two.html"))
    figs = {Path(p).stem: Path(p) for p in res["figures"]}
    for stem in ("losses", "monitors", "throughput"):
        px = _png(figs[stem])
        assert _has_colour(px, COLOURS[0]) and _has_colour(px, COLOURS[1]), stem
    clusters = _png(figs["clusters"])
    assert _has_colour(clusters, COLOURS[0]) and not _has_colour(clusters, COLOURS[1], min_pixels=1)
    diffs = dict(config_differences([read_run(interclr_run), read_run(moco_run)]))
    assert diffs["method.name"] == ["interclr", "mocov2"] and diffs["name"] == ["r18-cifar", "mocov2-r18-cifar"]
    assert "train.batch_size" not in diffs and "data.root" not in diffs  # the same in both
    html = (tmp_path / "two.html").read_text()
    assert "<th>method.name</th><td>interclr</td><td>mocov2</td>" in html
    assert "<th>train.batch_size</th>" not in html


def test_report_of_a_run_still_training(interclr_run, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(interclr_run, live)
    (live / "status.json").unlink()
    text = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(text[:7]) + "\n" + text[7][:25])  # cut mid-record
    res = run_report([str(live)], None)
    assert res["report"] == str(live / "report.html") and len(res["figures"]) >= 3
    assert "running" in (live / "report.html").read_text()


def test_report_without_matplotlib_says_how_to_install(interclr_run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = run_cli("report", str(interclr_run), "-o", str(tmp_path / "r.html"))
    assert_clean_error(res, 2, "pip install 'interclr[viz]'")
    assert not (tmp_path / "r.html").exists()
    monkeypatch.undo()
    assert_clean_error(run_cli("report", str(tmp_path)), 2, "not an interclr run folder")


def test_report_page_in_a_headless_browser(interclr_run, moco_run, tmp_path):
    """The page as a person sees it: Chromium's screenshot shows both runs' colours (the table's
    swatches and the figures). Skipped where no browser is installed (CI)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from screenshot_report import find_browser, screenshot

    if find_browser() is None:
        pytest.skip("no chromium/chrome on PATH (apt-get install chromium)")
    page = tmp_path / "two.html"
    run_report([str(interclr_run), str(moco_run)], str(page))
    shot = screenshot(page, tmp_path / "shot.png", width=1280, height=1600)
    px = _png(shot)
    assert px.shape[:2] == (1600, 1280)
    assert _has_colour(px, COLOURS[0], tol=20) and _has_colour(px, COLOURS[1], tol=20)
    assert (px < 200).any(axis=2).mean() > 0.01  # text and lines, not an empty page


# --- runs ------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_runs_lists_finished_failed_and_half_written_runs(data, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    ov = [f"data.root={data / 'train'}", "train.epochs=2", *TINY, *MONITORS]
    run_pretrain("mocov2-r18-cifar", ov, out=str(root / "done"), resume=None, **COMMON)
    ckpt = sorted((root / "done" / "checkpoints").glob("*.safetensors"))[-1]
    lin = run_cli(
        "linear-eval", str(ckpt), "--preset", "linear-r18-cifar", f"data.root={data}", "data.image_size=16",
        "data.eval_resize=16", "data.num_workers=0", "device=cpu", "train.batch_size=8", "train.epochs=1",
        "--out", str(root / "lin"), "--json", "-q",
    )  # fmt: skip
    assert lin.returncode == 0, lin.stderr
    ft = run_cli(
        "finetune", str(ckpt), "--preset", "finetune-r18-cifar", f"data.root={data}", "data.image_size=16",
        "data.eval_resize=16", "data.num_workers=0", "device=cpu", "train.batch_size=8", "train.epochs=1",
        "eval.feature_batch_size=64", "data.label_fraction=1.0", "--out", str(root / "ft"), "--json", "-q",
    )  # fmt: skip
    assert ft.returncode == 0, ft.stderr
    # a failed run: the loss becomes NaN in epoch 2
    from interclr_cli.methods.mocov2 import MoCoV2

    orig = MoCoV2.training_step
    monkeypatch.setattr(
        MoCoV2, "training_step", lambda self, b, s, e: (lambda r: (r[0] * float("nan") if s >= 8 else r[0], r[1]))(orig(self, b, s, e))
    )  # fmt: skip
    with pytest.raises(WorkError):
        run_pretrain(
            "mocov2-r18-cifar", ov[:2] + ["train.epochs=3", *TINY], out=str(root / "nan"), resume=None, **COMMON
        )
    monkeypatch.setattr(MoCoV2, "training_step", orig)
    # half-written: killed mid-epoch (status says running, its process is gone; a record cut short)
    killed = root / "killed"
    shutil.copytree(root / "done", killed)
    status = json.loads((killed / "status.json").read_text())
    (killed / "status.json").write_text(json.dumps({**status, "state": "running", "pid": _dead_pid()}))
    (killed / "metrics.jsonl").write_text((killed / "metrics.jsonl").read_text()[:-40])
    for p in (killed / "checkpoints").glob("ckpt-e0002-*"):
        p.unlink()
    # still being written by a live process (this one), before its first epoch ends
    live = root / "group" / "live"
    live.mkdir(parents=True)
    shutil.copy(root / "done" / "config.yaml", live / "config.yaml")
    (live / "status.json").write_text(json.dumps({**status, "state": "running", "pid": os.getpid()}))
    # no status at all (an older run) and nothing written for an hour
    old = root / "old"
    old.mkdir()
    shutil.copy(root / "done" / "config.yaml", old / "config.yaml")
    os.utime(old / "config.yaml", (time.time() - 3600, time.time() - 3600))

    res = run_cli("runs", str(root), "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["runs"]}
    assert set(rows) == {"done", "lin", "ft", "nan", "killed", "group/live", "old"}
    state = {n: r["status"] for n, r in rows.items()}
    assert state == {
        "done": "finished",
        "lin": "finished",
        "ft": "finished",
        "nan": "failed",
        "killed": "failed",
        "group/live": "running",
        "old": "failed",
    }
    assert "loss became nan" in rows["nan"]["reason"] and "ended without finishing" in rows["killed"]["reason"]
    done_epochs = [r for r in _records(root / "done") if r["type"] == "epoch"]
    assert (rows["done"]["epochs_done"], rows["done"]["epochs_planned"]) == (2, 2)
    assert (
        rows["done"]["knn_top1"] == done_epochs[-1]["knn_top1"] and rows["done"]["rankme"] == done_epochs[-1]["rankme"]
    )
    assert (rows["nan"]["epochs_done"], rows["nan"]["epochs_planned"]) == (1, 3)
    assert rows["killed"]["epochs_done"] == 1  # the epoch-2 record was cut short
    assert rows["done"]["method"] == "mocov2" and rows["done"]["preset"] == "mocov2-r18-cifar"
    linear = json.loads(lin.stdout)
    assert rows["done"]["linear_top1"] == linear["top1"] and rows["done"]["linear_run"] == "lin"
    assert rows["lin"]["top1"] == linear["top1"] and rows["lin"]["command"] == "linear-eval"
    # linear-eval and finetune train in the loop: their TensorBoard holds their steps and validation
    for name in ("lin", "ft"):
        tags = _accumulator(root / name).Tags()["scalars"]
        assert {"train/loss", "train/lr", "epoch/top1", "epoch/top5"} <= set(tags), name
    assert "train/head_lr" in _accumulator(root / "ft").Tags()["scalars"]
    assert rows["ft"]["top1"] == json.loads(ft.stdout)["top1"] and rows["ft"]["status"] == "finished"
    # and the report draws them: validation top-1 per epoch, the loss per step
    rep = run_report([str(root / "lin"), str(root / "ft")], str(tmp_path / "eval.html"))
    assert {Path(p).stem for p in rep["figures"]} >= {"losses", "monitors", "throughput"}
    table = run_cli("runs", str(root))
    assert table.returncode == 0 and "group/live" in table.stdout and "finished" in table.stdout
    assert_clean_error(run_cli("runs", str(tmp_path / "nowhere")), 2, "is not a folder")


# --- progress --------------------------------------------------------------------------------------


def test_run_eta_and_its_column():
    assert run_eta(120.0, 40, 360) == pytest.approx(120.0 / 40 * 360)  # 3 s per step, 360 steps left
    assert run_eta(5.0, 0, 10) is None and run_eta(5.0, 10, -3) == 0.0
    assert format_seconds(3725.4) == "1:02:05" and format_seconds(None) == "-:--:--"
    assert format_seconds(float("inf")) == "-:--:--"
    from rich.progress import Progress

    with Progress(_EtaColumn(), disable=True) as p:
        t = p.add_task("run", total=100)
        p.update(t, advance=10, eta=3725.4)
        assert str(_EtaColumn().render(p.tasks[0])) == "eta 1:02:05"
        bare = p.add_task("epoch", total=10)
        assert str(_EtaColumn().render(p.tasks[1])).startswith("eta ")  # rich's own estimate
        assert bare is not None


def test_progress_shows_the_run_bar_and_the_summary_line_the_run_eta(data, tmp_path, monkeypatch):
    shown: list[tuple[str, dict]] = []
    monkeypatch.setattr(Reporter, "task", lambda self, d, total, completed=0: shown.append((d, {"total": total})) or d)
    monkeypatch.setattr(
        Reporter, "update", lambda self, t, advance=0, info=None, **kw: shown.append((t, {"info": info, **kw}))
    )
    monkeypatch.setattr(Reporter, "finish", lambda self, t: None)
    printed: list[str] = []
    monkeypatch.setattr(Reporter, "print", lambda self, m: printed.append(m))
    ov = [f"data.root={data / 'train'}", "train.epochs=2", *TINY]
    run_pretrain("mocov2-r18-cifar", ov, out=str(tmp_path / "p"), resume=None, force=False, show_progress=True)
    assert ("pretrain", {"total": 12}) in shown
    run_updates = [kw for t, kw in shown if t == "pretrain" and "eta" in kw]
    assert len(run_updates) == 12 and run_updates[-1]["eta"] == 0.0  # one per step; none left at the end
    infos = [kw["info"] for t, kw in shown if t == "pretrain" and kw.get("info")]
    assert infos and all(k in infos[0] for k in ("loss ", "lr ", "img/s", "wait "))
    summaries = [m for m in printed if m.startswith("epoch ")]
    assert len(summaries) == 2 and "run eta " in summaries[0] and "run eta" not in summaries[1]
