"""InterCLR: intra-image (MoCo v2 or NPID) plus inter-image invariance learning.

Xie, Zhan, Liu, Ong, Loy, "Delving into Inter-Image Invariance for Unsupervised Visual
Representations", arXiv 2008.11702 (IJCV 2022); released code: open-mmlab/mmselfsup 0.x
(``InterCLRMoCo``, ``InterCLRMemory``, ``InterCLRHook``; config
``interclr-moco_resnet50_8xb32-coslr-200e_in1k``). The paper's three studied components map to
config keys: pseudo-label maintenance (``inter.labels`` online/offline), sampling strategy
(``inter.neg_sampling``, ``inter.pool_*``), decision boundary design (``inter.margin``,
``inter.margin_type``).

One step (B = batch, D = 128, N = data set size, M = negatives, P = pool; shapes in brackets):

    q = normalize(f_q(x_q))                                     [B, D]   query (gradient)
  intra, kind = moco (MoCo v2, He et al. arXiv 1911.05722):
    k = normalize(f_k(x_k))                                     [B, D]   momentum key
    L_intra = MarginNCE(q.k, q.queue; tau = 0.2, m = intra.margin)  (MoCo Eq. 1 when m = 0)
  intra, kind = npid (Wu et al. arXiv 1805.01978; no key encoder):
    L_intra = MarginNCE(q.v_i, q.v_j for M' random bank rows; tau = npid_temperature)
  inter (InterCLR):
    s = q.detach() @ V^T                                        [B, N]   similarities to the bank
    p_b ~ U{ j : y_j = y_{i_b} }                                [B]      positive from own cluster
    n_b ~ neg_sampling(s_b, y != y_{i_b}, P)                    [B, M]   e.g. semi-hard
    L_inter = MarginNCE(q.v_p, q.v_n; tau = inter.temperature, m = inter.margin, margin_type)
  L = intra.weight * L_intra + inter.weight * L_inter     (L = L_intra during inter.warmup_epochs,
                                                            intra weight 1 as in InterCLRHook)
      + cld.weight * L_CLD(group features of both views)   (the CLD add-on, methods/cld.py)
  after the optimizer step, on the batch all-gathered over ranks:
    theta_k <- m theta_k + (1 - m) theta_q; enqueue k           (MoCo Eq. 2; moco only)
    v_i <- normalize((1 - m_b) v_i + m_b normalize(k_i))         (bank; NPID: the query instead)
    online labels: relabel the batch, centroids every 10 steps, fix small clusters

State: the bank (``bank.features``), labels, centroids and counts (``labels.*``) and
``labels_epoch`` are registered buffers, so they are saved and restored with the module's
``state_dict``; the two random generators are in :meth:`extra_state`. With several ranks every
rank applies the same all-gathered (indices, keys) update and the same label step with an
identically seeded generator, so banks, labels and centroids stay identical without ever
broadcasting the bank (only the initial k-means labels, N int64, are broadcast once).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..eval.clustering import kmeans
from ..losses import fp32, margin_nce
from ..memory import LabelIndex, MemoryBank, OnlineLabels, _rng, sample_negatives, sample_positives
from ..models.split_bn import split_batchnorm
from ..runtime import dist
from .base import TrainContext
from .mocov2 import MoCoV2
from .npid import npid_loss, update_bank


def effective_num_clusters(num_clusters: int, num_samples: int, min_cluster_size: int, online: bool) -> int:
    """K actually used: ``num_clusters`` clamped so clusters can be populated.

    Online labels dissolve clusters below ``min_cluster_size``; keeping ``N >= 2 K min`` leaves
    room for the split that refills each dissolved id (see ``OnlineLabels``), so
    ``K <= N // (2 * min_cluster_size)``. Offline labels: ``K <= N // 2``. At least 1.
    ImageNet (N = 1.28M, min 20) is far from the bound; tiny data sets get fewer clusters.
    """
    bound = num_samples // (2 * max(1, min_cluster_size)) if online else num_samples // 2
    return max(1, min(int(num_clusters), bound))


def effective_pool_size(pool_size: int, pool_fraction: float, num_samples: int) -> int:
    """P: ``pool_fraction * N`` when the fraction is > 0, else ``min(pool_size, N)``."""
    p = round(pool_fraction * num_samples) if pool_fraction > 0 else pool_size
    return max(1, min(int(p), num_samples))


class InterCLR(MoCoV2):
    def __init__(self, cfg: Config, num_samples: int):
        super().__init__(cfg, num_samples)
        mc = cfg.method
        intra, inter = mc.intra, mc.inter
        self.intra_cfg, self.inter_cfg = intra, inter
        self.npid = intra.kind == "npid"
        if self.npid:  # NPID needs no key encoder (no key BatchNorm to protect) and no queue
            split_batchnorm(self.encoder_q, 1)
            self.key_bn, self.bn_groups = "none", 1
            del self.encoder_k
            del self.queue
            del self.queue_ptr
        dim = cfg.model.embed_dim
        self.online = inter.labels == "online"
        self.num_clusters = effective_num_clusters(inter.num_clusters, num_samples, inter.min_cluster_size, self.online)
        self.pool_size = effective_pool_size(inter.pool_size, inter.pool_fraction, num_samples)
        self.bank = MemoryBank(num_samples, dim, dtype=getattr(torch, inter.bank_dtype))
        self.labels = OnlineLabels(
            num_samples,
            self.num_clusters,
            dim,
            min_cluster_size=inter.min_cluster_size if self.online else 0,
            centroid_update_every=inter.centroid_update_every if self.online else 0,
        )
        # epoch the current (offline or initial) k-means labels were computed for; -1 = none yet
        self.register_buffer("labels_epoch", torch.full((), -1, dtype=torch.long))
        self._gens: dict[str, torch.Generator] = {}
        self._workspace: dict[str, torch.Tensor] = {}  # reused [B, N] sampling temporaries
        self._pending_bank: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._label_stats: dict[str, torch.Tensor] = {}

    # -- random generators (extra_state) ---------------------------------------------------------
    def _gen(self, name: str) -> torch.Generator:
        """Two generators on the bank's device:

        * ``sample``: reseeded every step from :func:`~interclr_cli.memory._rng.step_seed` of
          (seed, step, rank), and used for positives, negatives and NPID negatives, so ranks draw
          independent samples and a resumed run redraws the same ones (nothing to save);
        * ``label`` (identical on every rank): small-cluster splits (the label step must stay
          identical across ranks); it advances identically on every rank, so the checkpoint
          (written by rank 0) restores every rank exactly.
        """
        if name not in self._gens:
            g = torch.Generator(device=self.bank.features.device)
            g.manual_seed(self.cfg.seed * 1000 + {"sample": 29, "label": 7}[name])
            self._gens[name] = g
        return self._gens[name]

    def _next_sample_gen(self, step: int) -> torch.Generator:
        """Reseed the sampling generator for this step (Python integers only: no tensor is read)."""
        g = self._gen("sample")
        g.manual_seed(_rng.step_seed(self.cfg.seed, step, dist.rank()))
        return g

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The label generator's and the key shuffle's states (uint8 tensors)."""
        return {**super().extra_state(), "label_generator": self._gen("label").get_state()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(tensors)
        state = tensors.get("label_generator")
        if state is None:
            return
        g = self._gen("label")
        try:
            g.set_state(state.cpu().to(torch.uint8))
        except RuntimeError:  # saved on another device type: a fresh stream seeded from it
            g.manual_seed(int(state.to(torch.int64).sum()))

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def _cluster(self, feats: torch.Tensor, epoch: int, log: Callable[[str], None]) -> torch.Tensor:
        """k-means labels [N] of L2-normalised features, computed on rank 0 and broadcast."""
        it = self.inter_cfg
        labels = torch.zeros(self.num_samples, dtype=torch.long, device=feats.device)
        if dist.is_main():
            labels = kmeans(
                feats,
                self.num_clusters,
                iters=it.kmeans_iters,
                seed=self.cfg.seed + epoch,
                use_gpu=it.kmeans_gpu,
                log=log,
            ).labels
            labels = labels.to(feats.device)
            sizes = torch.bincount(labels, minlength=self.num_clusters)
            log(
                f"k-means: {self.num_clusters} clusters, sizes {int(sizes.min())}..{int(sizes.max())}, "
                f"{int((sizes == 0).sum())} empty"
            )
        return dist.broadcast_(labels, 0)

    def _extract(self, ctx: TrainContext) -> torch.Tensor:
        """Normalised query embeddings [N, D] of every image, extracted in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return F.normalize(ctx.extract(lambda x: F.normalize(self.encoder_q(x).float(), dim=1)).float(), dim=1)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def initialize_from_features(self, feats: torch.Tensor, epoch: int = 0, log: Callable[[str], None] = print) -> None:
        """Fill the bank with ``feats`` [N, D] and start the labels from their k-means."""
        feats = F.normalize(feats.float(), dim=1).to(self.bank.features.device)
        labels = self._cluster(feats, epoch, log)
        self.bank.fill(feats)
        self.labels.init(labels, self.bank.features)
        if self.online:  # the reference requires non-empty clusters; dissolve/refill small ones
            self.labels.fix_small_clusters(self.bank.features, self._gen("label"))
        self.labels_epoch.fill_(epoch)

    def on_train_start(self, ctx: TrainContext) -> None:
        super().on_train_start(ctx)
        if self.num_clusters != self.inter_cfg.num_clusters:
            ctx.log(
                f"interclr: {self.num_clusters} clusters instead of {self.inter_cfg.num_clusters} "
                f"for {self.num_samples} images (at most N / (2 x min_cluster_size))"
            )
        if ctx.resumed:
            return  # bank, labels and centroids come back with the state_dict
        feats = self._extract(ctx)
        self.initialize_from_features(feats, 0, ctx.log)

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        """Offline labels: re-cluster freshly extracted features every ``recluster_every`` epochs
        (the bank keeps its rows; only the labels change, as in the reference's offline mode)."""
        it = self.inter_cfg
        if self.online or epoch == 0 or it.recluster_every <= 0 or epoch % it.recluster_every:
            return
        if int(self.labels_epoch) == epoch:  # already done (resumed inside this epoch)
            return
        feats = self._extract(ctx)
        labels = self._cluster(feats, epoch, ctx.log)
        self.labels.init(labels, self.bank.features)
        self.labels_epoch.fill_(epoch)

    # -- the step ------------------------------------------------------------------------------
    def inter_loss(self, q: torch.Tensor, idx: torch.Tensor, sim: Optional[torch.Tensor]) -> torch.Tensor:
        """MarginNCE of the queries against a same-cluster positive and sampled negatives."""
        it = self.inter_cfg
        gen = self._gen("sample")  # reseeded for this step in training_step
        labels = self.labels.labels
        ql = labels[idx]  # [B]
        pos = sample_positives(labels, ql, gen, LabelIndex.build(labels))  # [B]
        neg = sample_negatives(
            sim,
            labels,
            ql,
            it.neg_sampling,
            it.num_negatives,
            self.pool_size,
            gen,
            it.pool_threshold,
            it.pool_sample,
            self._workspace,
        )  # [B, M]
        pos_cos = (q * self.bank.rows(pos)).sum(1)  # [B]    q . v_p
        neg_cos = self.bank.cosine(q, neg.indices, sim)  # [B, M] q . v_n (gradient to q only)
        return margin_nce(pos_cos, neg_cos, it.temperature, it.margin, it.margin_type, neg.valid)

    def npid_loss(self, q: torch.Tensor, idx: torch.Tensor, sim: Optional[torch.Tensor]) -> torch.Tensor:
        """NPID as InfoNCE: positive = the sample's own bank row, negatives = uniform bank rows."""
        ic = self.intra_cfg  # the one NPID loss (methods/npid.py)
        return npid_loss(self.bank, q, idx, ic.npid_negatives, ic.npid_temperature, self._gen("sample"), sim, ic.margin)

    def training_step(self, batch, step, epoch):
        idx = batch["index"]
        if self.cld is not None:  # the CLD add-on (methods/cld.py): view 1's group features too
            z, g1 = self.cld.encode(self.encoder_q, batch["view1"])
        else:
            z = self.encoder_q(batch["view1"])
        q = F.normalize(z.float(), dim=1)  # [B, D] float32
        warmup = epoch < self.inter_cfg.warmup_epochs
        use_inter = not warmup and self.inter_cfg.weight != 0
        self._next_sample_gen(step)  # per-rank sampling seed for this step
        if not self.npid:  # MoCo v2 intra branch, exactly as MoCoV2 (under the engine's autocast)
            k = self.compute_keys(batch["view2"])  # [B, D]
            l_intra = self.intra_loss(q, k)
            self._pending_keys = k
            bank_keys = k
        # the bank side in float32 (similarities, sampling, MarginNCE), whatever the precision
        with fp32(q.device):
            need_sim = (use_inter and self.inter_cfg.neg_sampling != "random") or self.npid
            sim = self.bank.scratch_similarity(q) if need_sim else None  # [B, N]
            if self.npid:
                l_intra = self.npid_loss(q, idx, sim)
                bank_keys = q.detach()
            logs = {"loss_intra": l_intra.detach()}
            if use_inter:
                l_inter = self.inter_loss(q, idx, sim)
                logs["loss_inter"] = l_inter.detach()
                loss = self.intra_cfg.weight * l_intra + self.inter_cfg.weight * l_inter
            else:  # warm-up: intra only with weight 1, as InterCLRHook sets it
                loss = l_intra if warmup else self.intra_cfg.weight * l_intra
        if self.cld is not None:  # + lambda L_CLD; view 2 is encoded for the group branch only
            l_cld, cld_logs = self.cld.loss(g1, self.cld.encode(self.encoder_q, batch["view2"])[1])
            loss = loss + self.cld.weight * l_cld
            logs.update(cld_logs)
        self._pending_bank = (idx, bank_keys)
        logs.update(self._label_stats)  # from the previous step's label maintenance
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if not self.npid:
            super().after_optimizer_step(step)  # MoCo Eq. 2 momentum update + enqueue
        if self._pending_bank is None:
            return
        idx, keys = self._pending_bank
        self._pending_bank = None
        momentum = self.intra_cfg.npid_bank_momentum if self.npid else self.inter_cfg.bank_momentum
        idx = update_bank(self.bank, idx, keys, momentum)  # [W*B] gathered, rank order
        if self.online:
            self._label_stats = self.labels.step(step, idx, self.bank.rows(idx), self.bank.features, self._gen("label"))
