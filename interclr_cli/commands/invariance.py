"""`interclr invariance`: what a representation is invariant to (firing-rate invariance score).

For each checkpoint and each family of sets, the units of one layer (``invariance.layer``: the
backbone's pooled features by default; ``embedding`` for the projection head's output;
``layer1``..``layer3`` for an intermediate stage, averaged over its spatial positions) are scored
by :func:`~interclr_cli.eval.invariance.invariance_scores` (Goodfellow et al. 2009, as used by
Purushwalkam & Gupta, arXiv 2007.13916; the equations are in that module): each unit fires on the
``invariance.firing_rate`` fraction of all images with its highest activations, and its invariance
is how much more often it keeps firing within a set than on a random image; the score is the mean
over the ``invariance.top_k`` most invariant units (per class of sets, then averaged).

The sets (:mod:`~interclr_cli.data.invariance`): for each ``invariance.augment`` family, the
``invariance.views`` views of each image of a seeded subset of ``invariance.images`` images of
``data.root`` (the same images and views for every checkpoint; all sets in one class); and, with
``invariance.sets``, the user's own ``path,set_id[,label]`` file (its labels are the classes). Outputs in the run folder: ``result.json`` (one score per checkpoint and family, with the
per-unit distribution's quartiles) and ``invariance.png`` (grouped bars: families x checkpoints).
Single process (one GPU or the CPU): the work is a few feature passes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..config.schema import Config
from ..data.invariance import family_views, read_set_file, unreadable, view_seed, view_transform
from ..data.sources import FileIndex
from ..errors import UserError
from ..eval.invariance import invariance_scores
from ..runtime.device import process_device
from ..runtime.progress import Reporter
from ..training.features import extract_with_config, subset_index
from ..training.rundir import MetricsLog, file_log
from .bar_chart import grouped_bar_chart
from .common import (
    close_run,
    default_preset,
    open_run,
    prepare_backbone,
    refuse_early,
    resolve_config,
    single_folder,
    with_head,
)
from .loading import LoadedModel, load_backbone

log = logging.getLogger("interclr")

SETS_FAMILY = "sets"  # the family name of --sets FILE in the result


class StagePool(nn.Module):
    """A torchvision ResNet's output after stage ``layerN`` (N = 1..3), averaged over space: [B, C]."""

    def __init__(self, backbone: nn.Module, stage: int):
        super().__init__()
        self.backbone, self.stage = backbone, int(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        for i in range(1, self.stage + 1):
            x = getattr(b, f"layer{i}")(x)
        return x.mean(dim=(2, 3))


def layer_fn(model: LoadedModel, layer: str, cfg: Config, device: torch.device) -> nn.Module:
    """The module whose output [B, D] is measured, on ``device`` in eval mode."""
    backbone = prepare_backbone(model.backbone, cfg, device)
    if layer == "backbone":
        return backbone
    if layer == "embedding":
        head = model.head.to(device) if model.head is not None else None
        return with_head(backbone, head, model.info, "invariance.layer=embedding").eval()
    return StagePool(backbone, int(layer[len("layer") :])).eval()


def short_name(source: str) -> str:
    """A legend label: ``random:resnet18`` as is; a checkpoint as ``<run folder>/<file stem>``."""
    if source.startswith("random:"):
        return source
    p = Path(source)
    parent = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return f"{parent.name}/{p.stem}" if parent.name else p.stem


def _check_settings(cfg: Config) -> None:
    inv = cfg.invariance
    if not 0.0 < inv.firing_rate < 1.0:
        raise UserError(f"invariance.firing_rate must be in (0, 1), e.g. 0.05; got {inv.firing_rate}")
    for key, low in (("top_k", 1), ("views", 2), ("images", 1)):
        if getattr(inv, key) < low:
            raise UserError(f"invariance.{key} must be at least {low}; got {getattr(inv, key)}")
    if not inv.augment and not inv.sets:
        raise UserError("nothing to measure: give --augment FAMILY (repeatable) or --sets FILE.csv")
    if len(set(inv.augment)) != len(inv.augment):
        raise UserError(f"invariance.augment lists a family twice ({', '.join(inv.augment)}); name each once")


def resolve_all(checkpoints: list[str], preset: Optional[str], overrides: list[str]):
    """Load every checkpoint and resolve its config; all must agree on the data and the
    invariance settings (the same images and views for every checkpoint). Returns (models, cfg)."""
    if not checkpoints:
        raise UserError("give at least one checkpoint (a .safetensors file or random:resnet18)")
    if len(set(checkpoints)) != len(checkpoints):
        raise UserError("a checkpoint is named twice; name each once")
    models, cfgs = [], []
    for spec in checkpoints:
        model = load_backbone(spec)
        # invariance reads the same data settings as rankme: the same default preset
        cfgs.append(resolve_config("invariance", preset or default_preset("rankme", model.info), overrides, model.info))
        models.append(model)
    first = cfgs[0]
    for model, cfg in zip(models[1:], cfgs[1:]):
        for section in ("data", "invariance"):
            if dataclasses.asdict(getattr(cfg, section)) != dataclasses.asdict(getattr(first, section)):
                raise UserError(
                    f"{models[0].info.source} and {model.info.source} resolve to different {section} settings "
                    "(their default presets differ); pass --preset NAME so that every checkpoint sees the same images"
                )
    _check_settings(first)
    if not preset:
        log.info("no --preset given: using %s (the data settings of rankme)", default_preset("rankme", models[0].info))
    return models, first


def augment_images(cfg: Config) -> FileIndex:
    """The seeded subset of ``data.root`` the augmentation families use (unreadable images dropped
    with a warning). Its sets are pooled into one class: what an augmentation changes has nothing
    to do with an image's category, and splitting the sets by class would leave each class too few
    sets for its top-k units to be told apart (they saturate at 1 / G)."""
    index = single_folder(cfg)
    n = len(index)
    perm = np.random.default_rng(cfg.seed + 777).permutation(n)
    subset = subset_index(index, np.sort(perm[: min(n, cfg.invariance.images)]))
    bad = unreadable(subset.paths)
    for p, why in zip(subset.paths, bad):
        if why is not None:
            log.warning("skipping image %s: it %s", p, why)
    keep = [i for i, why in enumerate(bad) if why is None]
    if not keep:
        raise UserError(f"none of the {len(subset)} images chosen from {index.root} can be read; check data.root")
    return subset_index(subset, keep)


def _augment_features(fn, images: FileIndex, family: str, cfg: Config, device, reporter, view0, label: str):
    """Features of every view of ``family`` [V * N, D] (view-major) and the set of each row [V * N]."""
    views = family_views(family, cfg.invariance.views)
    feats = [view0]
    for v in range(1, views):
        (f,), _ = extract_with_config(
            fn,
            images,
            cfg,
            device,
            reporter,
            f"{label} {family} {v}/{views - 1}",
            transform=view_transform(family, cfg.data),
            aug_seed=view_seed(cfg.seed, family, v),
        )
        feats.append(f)
    n = len(images)
    return torch.cat(feats), torch.arange(n, device=device).repeat(views)


def _score(h, set_of, class_of, cfg: Config, device) -> dict:
    cls = torch.as_tensor(class_of, device=device) if class_of is not None else None
    inv = cfg.invariance
    res = invariance_scores(h, set_of, cls, firing_rate=inv.firing_rate, top_k=inv.top_k)
    return {**res.to_dict(), "num_images": int(h.shape[0])}


def measure_checkpoint(model: LoadedModel, cfg: Config, device, reporter, images, set_file, label: str) -> dict:
    """family -> score dict for one checkpoint (the augmentation families, then ``sets``)."""
    fn = layer_fn(model, cfg.invariance.layer, cfg, device)
    out = {}
    if cfg.invariance.augment:
        (view0,), _ = extract_with_config(
            fn, images, cfg, device, reporter, f"{label} images", transform=view_transform(None, cfg.data)
        )
        for family in cfg.invariance.augment:
            h, set_of = _augment_features(fn, images, family, cfg, device, reporter, view0, label)
            out[family] = _score(h, set_of, None, cfg, device)
    if set_file is not None:
        index = FileIndex(set_file.path, set_file.paths, np.full(len(set_file.paths), -1, np.int64), [])
        (h,), _ = extract_with_config(
            fn, index, cfg, device, reporter, f"{label} sets", transform=view_transform(None, cfg.data)
        )
        out[SETS_FAMILY] = _score(h, torch.as_tensor(set_file.set_of, device=device), set_file.class_of, cfg, device)
    return out


def _write_chart(path: Path, families: list[str], sources: list[str], scores: dict, cfg: Config) -> None:
    inv = cfg.invariance
    values = [[scores[f][s]["score"] for f in families] for s in sources]
    grouped_bar_chart(
        families,
        [short_name(s) for s in sources],
        values,
        path,
        title=f"invariance I = L/G: mean of the top {inv.top_k} units, layer {inv.layer}, G = {inv.firing_rate:g}",
        ylabel="I",
    )


def run_invariance(
    checkpoints: list[str],
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    force: bool,
    show_progress: bool = True,
) -> dict:
    """Invariance scores of every checkpoint for every family; the JSON-ready result: ``scores``
    (family -> checkpoint -> score), ``results`` (one row per checkpoint and family: score,
    score_percent, quartiles, num_sets ...), ``png``, ``run_dir`` ..."""
    refuse_early("invariance", out, force)
    models, cfg = resolve_all(checkpoints, preset, overrides)
    inv = cfg.invariance
    set_file = read_set_file(inv.sets) if inv.sets else None
    images = augment_images(cfg) if inv.augment else None
    families = list(inv.augment) + ([SETS_FAMILY] if set_file is not None else [])
    device = process_device(cfg.device)
    sources = [m.info.source for m in models]
    run_dir = open_run("invariance", cfg, out, force, {"checkpoints": sources, "families": families})
    per_ckpt: dict[str, dict] = {}
    with file_log(run_dir / "train.log"), Reporter(enabled=show_progress) as reporter:
        for i, model in enumerate(models):
            label = f"[{i + 1}/{len(models)}]"
            per_ckpt[model.info.source] = measure_checkpoint(model, cfg, device, reporter, images, set_file, label)
    scores = {f: {s: per_ckpt[s][f] for s in sources} for f in families}
    png = run_dir / "invariance.png"
    _write_chart(png, families, sources, scores, cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    rows = [{"checkpoint": s, "family": f, **scores[f][s]} for s in sources for f in families]
    for row in rows:
        metrics.write({"type": "invariance", **row})
    result = {
        "scores": {f: {s: scores[f][s]["score"] for s in sources} for f in families},
        "results": rows,
        "checkpoints": [{"source": m.info.source, "arch": m.info.description, "kind": m.info.kind} for m in models],
        "families": families,
        "layer": inv.layer,
        "top_k": inv.top_k,
        "firing_rate": inv.firing_rate,
        "views": inv.views,
        "num_images": len(images) if images is not None else 0,
        "sets": inv.sets or None,
        "png": str(png),
        "run_dir": str(run_dir),
    }
    close_run(run_dir, result)
    return result
