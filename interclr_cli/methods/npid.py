"""NPID: non-parametric instance discrimination with a memory bank (and its shared parts).

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018 (arXiv 1805.01978); official code zhirongw/lemniscate.pytorch. One step (B = batch,
D = 128, N = data set size, M = negatives):

    q = normalize(f(x))                                           [B, D]   query (gradient)
    P(i | q) = exp(q.v_i / tau) / sum_j exp(q.v_j / tau)          the non-parametric softmax (Eq. 2)
    L = -log  exp(q.v_i / tau) / (exp(q.v_i / tau) + sum_{m=1..M} exp(q.v_m / tau))
        with M rows v_m drawn uniformly from the bank (the paper estimates the N-term denominator
        from M = 4096 noise samples, Eq. 6; we use the softmax cross-entropy over them, as the
        lemniscate repository's updated model and InterCLR's NPID branch do), or with M = 0 the
        exact softmax over all N rows (the CLD code's ``nce_k = 0``)
    v_i <- normalize((1 - m) v_i + m q_i)  after the step        (Eq. 8, lambda = 1 - m = 0.5)

The bank starts as random unit rows (seeded; the official code draws uniform rows of norm about
1). ``npid_loss`` and ``update_bank`` are also InterCLR's NPID intra branch (one copy).
With ``method.cld.weight > 0`` both views are encoded, L is the mean over the two views and
each view updates the bank in turn (as the CLD code), plus ``weight * L_CLD`` (:mod:`.cld`).
Bank logits are float32 under any autocast. Several ranks: the batch's (index, query) pairs are
all-gathered and every rank applies the same bank update, so banks stay identical.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..losses import fp32, margin_nce
from ..memory import MemoryBank, _rng
from ..runtime import dist
from .base import Method, TrainContext
from .cld import build_cld
from .mocov2 import build_encoder


def npid_loss(
    bank: MemoryBank,
    q: torch.Tensor,
    idx: torch.Tensor,
    num_negatives: int,
    temperature: float,
    generator: Optional[torch.Generator],
    sim: Optional[torch.Tensor] = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """NPID loss (module doc) of unit queries ``q`` [B, D] (float32, gradient) for the images
    ``idx`` [B]: positive = the own bank row, negatives = ``num_negatives`` uniform rows drawn
    from ``generator`` (0: every row). ``sim``: the [B, N] similarities if already computed."""
    if num_negatives <= 0:  # the exact softmax over the N rows
        logits = q @ bank.features.float().t()  # [B, N]
        pos = logits.gather(1, idx.unsqueeze(1))  # [B, 1]
        logits = logits.scatter(1, idx.unsqueeze(1), pos - margin) / temperature
        return (torch.logsumexp(logits, dim=1) - (pos.squeeze(1) - margin) / temperature).mean()
    neg_idx = _rng.randint(bank.num_samples, (q.shape[0], num_negatives), generator, q.device)  # [B, M]
    pos_cos = bank.cosine(q, idx.unsqueeze(1), sim).squeeze(1)  # [B]
    neg_cos = bank.cosine(q, neg_idx, sim)  # [B, M]
    return margin_nce(pos_cos, neg_cos, temperature, margin)


@torch.no_grad()
def update_bank(bank: MemoryBank, idx: torch.Tensor, keys: torch.Tensor, momentum: float) -> torch.Tensor:
    """All-gather (indices [B], keys [B, D]) over ranks, then ``bank.update`` on every rank.
    Returns the gathered indices [W*B] (rank order), for what follows the update."""
    idx = dist.all_gather_cat(idx.to(bank.features.device))  # [W*B] rank order
    keys = dist.all_gather_cat(F.normalize(keys.float(), dim=1))  # [W*B, D]
    bank.update(idx, keys, momentum)
    return idx


@torch.no_grad()
def random_bank(bank: MemoryBank, seed: int) -> None:
    """Fill ``bank`` with uniform random rows, normalised (identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    bank.fill(torch.rand(bank.num_samples, bank.dim, generator=g) * 2 - 1)


class NPID(Method):
    """NPID (module doc): ``encoder_q``, the bank ``bank``, optionally the CLD part ``cld``."""

    def __init__(self, cfg: Config, num_samples: int):
        super().__init__(cfg, num_samples)
        nc = cfg.method.npid
        self.npid_cfg = nc
        self.encoder_q = build_encoder(cfg)
        self.bank = MemoryBank(num_samples, cfg.model.embed_dim, dtype=getattr(torch, nc.bank_dtype))
        self.cld = build_cld(cfg, self.encoder_q)
        self._gen: Optional[torch.Generator] = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, ctx: TrainContext) -> None:
        if not ctx.resumed:  # a resumed bank comes back with the state_dict
            random_bank(self.bank, self.cfg.seed * 1000 + 61)

    def _step_generator(self, step: int) -> torch.Generator:
        """The negatives' generator on the bank's device, seeded from (seed, step, rank) in pure
        Python: ranks draw independent samples, a resumed run the same ones, and nothing is saved
        or read from a tensor."""
        device = self.bank.features.device
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        return self._gen.manual_seed(_rng.step_seed(self.cfg.seed * 1000 + 53, step, dist.rank()))

    def _encode(self, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projections (and group features with CLD) of view1, and of view2 with CLD."""
        if self.cld is None:
            return [self.encoder_q(batch["view1"])], []
        (z1, g1), (z2, g2) = (self.cld.encode(self.encoder_q, batch[v]) for v in ("view1", "view2"))
        return [z1, z2], [g1, g2]

    def _loss(self, q: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The NPID loss of one view. A bank of at most 16 M rows is read through the [B, N]
        similarities (one matrix product) instead of gathering B x M rows (on 2 CPU cores, N = 5,000,
        B = 64, M = 4,096: 59 ms against 887 ms forward + backward); a static choice, no sync."""
        nc = self.npid_cfg
        small = 0 < nc.num_negatives and self.num_samples <= 16 * nc.num_negatives
        sim = self.bank.similarity(q) if small else None  # [B, N] or None
        return npid_loss(self.bank, q, idx, nc.num_negatives, nc.temperature, gen, sim)

    def training_step(self, batch, step, epoch):
        idx = batch["index"]
        gen = self._step_generator(step)
        zs, gs = self._encode(batch)
        with fp32(idx.device):
            qs = [F.normalize(z.float(), dim=1) for z in zs]  # [B, D] each
            l_npid = sum(self._loss(q, idx, gen) for q in qs) / len(qs)
            loss, logs = l_npid, {"loss_npid": l_npid.detach()}
            if self.cld is not None:
                l_cld, cld_logs = self.cld.loss(gs[0], gs[1])
                loss = loss + self.cld.weight * l_cld
                logs.update(cld_logs)
        self._pending = [(idx, q.detach()) for q in qs]
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for idx, keys in self._pending:  # view 1, then view 2 (CLD)
            update_bank(self.bank, idx, keys, self.npid_cfg.bank_momentum)
        self._pending = []


__all__ = ["NPID", "npid_loss", "random_bank", "update_bank"]
