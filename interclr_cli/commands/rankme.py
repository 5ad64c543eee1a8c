"""`interclr rankme`: RankMe (Garrido et al., ICML 2023) of the embeddings and of the backbone
features on up to ``monitor.rankme_samples`` (25,600) images: a label-free way to compare runs.

The subset is the same seeded random subset the pretraining monitor uses, so the numbers agree
with ``rankme``/``rankme_backbone`` in a pretrain run's metrics for the same images and settings.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..eval.rankme import rankme
from ..runtime.device import process_device
from ..runtime.progress import Reporter
from ..training.features import extract_with_config, subset_index
from ..training.rundir import MetricsLog, file_log
from .common import close_run, open_run, prepare_backbone, refuse_early, resolve_config, single_folder
from .loading import load_backbone

log = logging.getLogger("interclr")


def run_rankme(
    checkpoint: str,
    preset: Optional[str],
    overrides: list[str],
    *,
    out: Optional[str],
    force: bool,
    show_progress: bool = True,
) -> dict:
    """RankMe of ``checkpoint``'s embeddings and backbone features on a seeded subset of
    ``data.root``; the JSON-ready result: ``rankme_embedding`` (None without a head),
    ``rankme_backbone``, ``num_images``, ``run_dir`` ..."""
    refuse_early("rankme", out, force)
    backbone, head, info = load_backbone(checkpoint)
    cfg = resolve_config("rankme", preset, overrides, info)
    index = single_folder(cfg)
    n = len(index)
    perm = np.random.default_rng(cfg.seed + 12345).permutation(n)  # as the pretraining monitor
    subset = subset_index(index, np.sort(perm[: min(n, cfg.monitor.rankme_samples)]))
    device = process_device(cfg.device)
    backbone = prepare_backbone(backbone, cfg, device)
    if head is not None:
        head = head.to(device).eval()
    run_dir = open_run("rankme", cfg, out, force, {"source": info.source, "arch": info.description})

    def both(x):
        f = backbone(x)
        return (f, head(f)) if head is not None else f

    with file_log(run_dir / "train.log"), Reporter(enabled=show_progress) as reporter:
        feats, _ = extract_with_config(both, subset, cfg, device, reporter, "features")
    if head is None:
        log.warning("%s has no projection head: rankme_embedding is null", info.source)
    result = {
        "rankme_embedding": rankme(feats[1]) if head is not None else None,
        "rankme_backbone": rankme(feats[0]),
        "num_images": len(subset),
        "embedding_dim": int(feats[1].shape[1]) if head is not None else None,
        "feature_dim": int(feats[0].shape[1]),
        "source": info.source,
        "arch": info.description,
        "run_dir": str(run_dir),
    }
    MetricsLog(run_dir / "metrics.jsonl").write(
        {"type": "rankme", "rankme_embedding": result["rankme_embedding"], "rankme_backbone": result["rankme_backbone"]}
    )
    close_run(run_dir, result)
    return result
