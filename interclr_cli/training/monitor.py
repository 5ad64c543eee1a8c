"""Training monitors: RankMe (label-free) and a weighted kNN classifier (when labels exist).

RankMe (Garrido et al., ICML 2023) of the 128-d embeddings and of the backbone features on up to
``monitor.rankme_samples`` training images; kNN top-1 (k = ``monitor.knn_k``, temperature 0.07,
Wu et al. 2018) of backbone features of a held-out split against a training subset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..config.schema import Config
from ..data import index_source
from ..data.sources import FileIndex
from ..eval.knn import knn_top1
from ..eval.rankme import rankme
from .features import extract_with_config, subset_index

log = logging.getLogger("interclr")


def holdout_root(train_root: Path) -> Path | None:
    """The labelled split beside a ``train`` folder: ``../val`` or ``../test``."""
    if train_root.name != "train":
        return None
    for name in ("val", "test"):
        cand = train_root.parent / name
        if cand.is_dir():
            return cand
    return None


class Monitor:
    def __init__(
        self, cfg: Config, train_index: FileIndex, train_root: Path | None, device: torch.device, cache_dir: Path | None
    ):
        self.cfg, self.device = cfg, device
        m = cfg.monitor
        rng = np.random.default_rng(cfg.seed + 12345)
        n = len(train_index)
        perm = rng.permutation(n)
        self.rankme_index = subset_index(train_index, np.sort(perm[: min(n, m.rankme_samples)]))
        self.rankme_from_bank = False
        self.knn = None
        if m.knn and train_index.has_labels:
            split = m.knn_split
            val_root = Path(cfg.data.val) if cfg.data.val else (holdout_root(train_root) if train_root else None)
            if split == "auto":
                split = "holdout" if val_root is not None else "train"
            if split == "holdout" and val_root is None:
                log.warning(
                    "monitor.knn_split=holdout but no val/ or test/ folder beside the training data; using a split of the training set"
                )
                split = "train"
            if split == "holdout":
                val = index_source(
                    str(val_root), "imagefolder", cache_path=cache_dir / "file_index_knn_val.txt" if cache_dir else None
                )
                vperm = rng.permutation(len(val))
                val = subset_index(val, np.sort(vperm[: min(len(val), m.knn_max_val)]))
                bank = subset_index(train_index, np.sort(perm[: min(n, m.knn_max_train)]))
                # one extraction pass serves both monitors when the rankme subset fits in the bank
                self.rankme_from_bank = m.rankme_samples <= len(bank)
                self.rankme_pos = torch.as_tensor(np.sort(rng.permutation(len(bank))[: m.rankme_samples]))
            else:
                nval = min(m.knn_max_val, n // 5)
                val = subset_index(train_index, np.sort(perm[:nval]))
                bank = subset_index(train_index, np.sort(perm[nval : nval + m.knn_max_train]))
            self.knn = (bank, val, split)

    def _extract(self, fns, index, reporter, desc):
        return extract_with_config(fns, index, self.cfg, self.device, reporter, desc)

    @torch.no_grad()
    def run(self, method, reporter=None) -> dict[str, float]:
        was_training = method.training
        method.eval()
        out: dict[str, float] = {}
        try:
            m = self.cfg.monitor
            backbone, head = method.backbone(), method.encoder_q.head

            def both(x):
                f = backbone(x)
                return f, head(f)

            bank_feats = None
            if m.rankme:
                if self.rankme_from_bank:
                    (bf, be), bl = self._extract(both, self.knn[0], reporter, "monitor: train features")
                    bank_feats = (bf, bl)
                    pos = self.rankme_pos.to(bf.device)
                    feats, emb = bf[pos], be[pos]
                else:
                    (feats, emb), _ = self._extract(both, self.rankme_index, reporter, "monitor: rankme")
                out["rankme"] = rankme(emb)
                out["rankme_backbone"] = rankme(feats)
            if self.knn is not None:
                bank, val, split = self.knn
                if bank_feats is None:
                    (bf,), bl = self._extract(backbone, bank, reporter, "monitor: knn bank")
                else:
                    bf, bl = bank_feats
                (vf,), vl = self._extract(backbone, val, reporter, "monitor: knn queries")
                k = min(m.knn_k, len(bank))
                res = knn_top1(bf, bl.to(bf.device), vf, vl.to(vf.device), [k], temperature=m.knn_temperature)
                out["knn_top1"] = float(res[k])
        finally:
            method.train(was_training)
        return out
