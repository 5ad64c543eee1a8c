"""MoCo v2: momentum contrast with an MLP head and strong augmentation.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(arXiv 1911.05722); Chen et al., "Improved Baselines with Momentum Contrastive Learning",
arXiv 2003.04297. This is InterCLR's intra-image branch.

One step (B = batch, D = embedding dim 128, K = queue size):
    q = normalize(f_q(x_q))                  [B, D]   query, with gradient
    k = normalize(f_k(x_k))                  [B, D]   key, momentum encoder, no gradient
    L = InfoNCE(q, k, queue) with temperature tau (MoCo Eq. 1; logits [B, 1 + K])
    theta_k <- m * theta_k + (1 - m) * theta_q        (MoCo Eq. 2)
    queue <- enqueue(k gathered over ranks), dequeue the oldest
  with the CLD add-on (method.cld.weight > 0, methods/cld.py; :meth:`MoCoV2.cld_step`):
    L = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2 + cld.weight * L_CLD(g1, g2); k2 is enqueued
q and k are normalised in float32 and the [B, 1 + K] logits are float32 under any autocast.

Key BatchNorm (``method.key_bn``, MoCo Sec. 3.3; see :func:`key_bn_mode`): ``split`` runs both
encoders' BatchNorm in G groups and the key batch in a shuffled order (G devices emulated on one);
``shuffle`` sends the key images to random ranks (shuffle-BN); ``sync`` synchronises the key
encoder's BatchNorm; ``none`` leaves per-device BatchNorm, with which a query and its key share
batch statistics. The shuffle permutations come from a CPU generator seeded identically on every
rank and saved with the method (:meth:`MoCoV2.extra_state`): no broadcast, exact resume.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..losses import info_nce
from ..models import Encoder
from ..models.split_bn import split_batchnorm, split_groups
from ..runtime import dist
from ..runtime.device import host_to_device
from .base import Method
from .cld import build_cld


def key_bn_mode(key_bn: str, world: int) -> str:
    """How the key encoder's BatchNorm runs on ``world`` processes: ``shuffle`` needs several
    processes and runs as ``split`` on one; ``sync`` on one process is plain BatchNorm (``none``)."""
    if world == 1 and key_bn == "shuffle":
        return "split"
    if world == 1 and key_bn == "sync":
        return "none"
    return key_bn


def build_encoder(cfg: Config) -> Encoder:
    """The query encoder of ``cfg.model`` (arch, stem, head width, embedding dim)."""
    m = cfg.model
    return Encoder(m.arch, m.small_stem, m.head_hidden, m.embed_dim)


class MoCoV2(Method):
    """MoCo v2 (module doc): query encoder ``encoder_q``, frozen momentum copy ``encoder_k`` and the
    key queue buffer ``queue`` [K, D] (random unit rows at start) with its pointer ``queue_ptr``."""

    def __init__(self, cfg: Config, num_samples: int):
        super().__init__(cfg, num_samples)
        mc = cfg.method
        self.momentum = mc.momentum
        self.temperature = mc.intra.temperature
        self.margin = mc.intra.margin
        self.encoder_q = build_encoder(cfg)
        self.key_bn = key_bn_mode(mc.key_bn, dist.world_size())
        self.bn_groups = split_groups(cfg.train.batch_size, mc.key_bn_groups) if self.key_bn == "split" else 1
        if self.bn_groups > 1:  # G devices emulated: the query's BatchNorm in groups too
            split_batchnorm(self.encoder_q, self.bn_groups)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        dim = cfg.model.embed_dim
        # queue of K past keys, one per row [K, D]; MoCo initialises it with random unit vectors
        self.register_buffer("queue", F.normalize(torch.randn(mc.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None
        self.cld = build_cld(cfg, self.encoder_q)  # the CLD add-on (methods/cld.py); None when its weight is 0
        self._shuffle_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 41)  # CPU, same on every rank

    def on_train_start(self, ctx) -> None:
        if self.key_bn == "split" and self.bn_groups == 1:
            ctx.log(
                f"key_bn=split: {self.cfg.train.batch_size} images per process are too few to split BatchNorm into "
                "groups of 16, so a query and its key share batch statistics (use a batch of 32 or more)"
            )

    # -- Eq. 2: momentum update ------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` over the parameters (MoCo Eq. 2)."""
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, self.momentum)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - self.momentum)
        # BatchNorm running statistics of the key encoder are its own (updated by its forward)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys [B, D] at the pointer, wrapping around the end of the queue."""
        K = self.queue.shape[0]
        if K == 0:
            return
        keys = keys[-K:] if keys.shape[0] > K else keys
        ptr = self.queue_ptr
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % K
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((ptr + keys.shape[0]) % K)

    @torch.no_grad()
    def compute_keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """Keys [B, D] (float32, unit rows) from the momentum encoder, with the key BatchNorm of
        ``key_bn`` (module doc): ``shuffle`` across ranks, ``split`` in groups over a shuffled order."""
        b = x_k.shape[0]
        if self.key_bn == "shuffle" and dist.world_size() > 1:
            from ..runtime.shuffle_bn import shuffled_forward

            perm = torch.randperm(b * dist.world_size(), generator=self._shuffle_gen)  # CPU: no sync
            return F.normalize(shuffled_forward(self.encoder_k, x_k, perm).float(), dim=1)
        if self.bn_groups > 1:
            perm = host_to_device(torch.randperm(b, generator=self._shuffle_gen), x_k.device)  # [B]
            y = self.encoder_k(x_k[perm])  # image perm[j] sits at row j: its group is j mod G
            return F.normalize(torch.empty_like(y).index_copy_(0, perm, y).float(), dim=1)  # back in order
        return F.normalize(self.encoder_k(x_k).float(), dim=1)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The key-shuffle generator's state (uint8)."""
        return {"shuffle_generator": self._shuffle_gen.get_state()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        state = tensors.get("shuffle_generator")
        if state is not None:
            self._shuffle_gen.set_state(state.cpu().to(torch.uint8))

    def intra_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries ``q`` [B, D] against keys ``k`` [B, D] and the queue (scalar):
        MoCo Eq. 1, ``-log exp(q.k/tau) / (exp(q.k/tau) + sum_queue exp(q.n/tau))``, with the
        configured intra margin."""
        return info_nce(q, k, self.queue.clone().detach(), self.temperature, self.margin)

    def training_step(self, batch, step, epoch):
        if self.cld is not None:
            return self.cld_step(batch)
        q = F.normalize(self.encoder_q(batch["view1"]).float(), dim=1)  # [B, D] float32
        k = self.compute_keys(batch["view2"])  # [B, D]
        loss = self.intra_loss(q, k)
        self._pending_keys = k
        return loss, {"loss_intra": loss.detach()}

    def cld_step(self, batch):
        """MoCo v2 + CLD (methods/cld.py): both views are queries, each against the other view's key,
        ``L = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2 + lambda L_CLD(g1, g2)``; k2 is enqueued."""
        (z1, g1), (z2, g2) = (self.cld.encode(self.encoder_q, batch[v]) for v in ("view1", "view2"))
        q1, q2 = (F.normalize(z.float(), dim=1) for z in (z1, z2))  # [B, D] float32 each
        k1, k2 = self.compute_keys(batch["view1"]), self.compute_keys(batch["view2"])  # [B, D]
        l_intra = 0.5 * (self.intra_loss(q1, k2) + self.intra_loss(q2, k1))
        l_cld, logs = self.cld.loss(g1, g2)
        self._pending_keys = k2
        return l_intra + self.cld.weight * l_cld, {"loss_intra": l_intra.detach(), **logs}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.momentum_update()
        if self._pending_keys is not None:
            self.enqueue(dist.all_gather_cat(self._pending_keys.float()))
            self._pending_keys = None
