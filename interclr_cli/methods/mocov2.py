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
Batch norm is per device (no shuffle) on one device; shuffle-BN is a multi-GPU option.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..losses import info_nce
from ..models import Encoder
from ..runtime import dist
from .base import Method


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
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        dim = cfg.model.embed_dim
        # queue of K past keys, one per row [K, D]; MoCo initialises it with random unit vectors
        self.register_buffer("queue", F.normalize(torch.randn(mc.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None

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
        """Keys [B, D] from the momentum encoder (shuffle-BN across ranks when configured)."""
        if self.cfg.method.key_bn == "shuffle" and dist.is_dist():
            from ..runtime.shuffle_bn import shuffled_forward

            return F.normalize(shuffled_forward(self.encoder_k, x_k), dim=1)
        return F.normalize(self.encoder_k(x_k), dim=1)

    def intra_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries ``q`` [B, D] against keys ``k`` [B, D] and the queue (scalar):
        MoCo Eq. 1, ``-log exp(q.k/tau) / (exp(q.k/tau) + sum_queue exp(q.n/tau))``, with the
        configured intra margin."""
        return info_nce(q, k, self.queue.clone().detach(), self.temperature, self.margin)

    def training_step(self, batch, step, epoch):
        q = F.normalize(self.encoder_q(batch["view1"]), dim=1)  # [B, D]
        k = self.compute_keys(batch["view2"])  # [B, D]
        loss = self.intra_loss(q, k)
        self._pending_keys = k
        return loss, {"loss_intra": loss.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.momentum_update()
        if self._pending_keys is not None:
            self.enqueue(dist.all_gather_cat(self._pending_keys.float()))
            self._pending_keys = None
