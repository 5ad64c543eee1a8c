"""Invariance Propagation (InvP): positives found by propagating over a k-nearest-neighbour graph.

Wang, Zhao, Luo, Tian, Huang, "Unsupervised Learning by Invariance Propagation", NeurIPS 2020
(arXiv 2010.11694); official code WangFeng18/InvariancePropagation (``objective.py``,
``main.py``). One step, one view (B = batch, D = 128, N = data set size, n_b = 4,096 background
rows, C = k + k^2 + ... + k^L candidates, P = n_pos):

    q = normalize(f(x))                                          [B, D]   query (gradient)
    s = q.detach() V^T                                           [B, N]   similarities to the bank
    Bg = topk(s, n_b)                                            [B, n_b] "background": nearest rows
    L_ins = -log  exp(q.v_i / tau) / sum_{j in Bg} exp(q.v_j / tau)           (hard-negative NPID)
    Cand = propagate(i, L) over the neighbour table (memory.neighbours)  [B, C] duplicates kept
    Pos = the P candidates with the lowest s (the hardest positives)          [B, P]
    L_inv = -log  sum_{p in Pos} exp(q.v_p / tau) / sum_{j in Bg, j != i} exp(q.v_j / tau)
    L = L_ins + lambda * r(epoch) * L_inv      (lambda 0.6; r: binary ramp, 0 for 30 epochs)
  after the optimizer step, on the batch all-gathered over ranks:
    table[i] <- the k nearest of Bg other than i                 (computed before the bank update)
    v_i <- normalize((1 - m) v_i + m q_i), m = 0.5               (the NPID bank, methods/npid.py)

As the official code: tau = 0.2 in its commands, the table starts at 0 and a row is written when
its image is seen, duplicates among the candidates are kept (its README calls the concatenation
an approximation of breadth-first search; ``invp.dedup=true`` removes them: the P hardest are then
P distinct images, and a row with fewer distinct candidates uses them all), and L_ins's
denominator is the background as it is (the image's own row is in it when it is among the
nearest). One difference: the official L_inv denominator subtracts exp(s_ii / tau) from the
background sum even when row i is not in it; here row i is masked out of the background, which
is the same when it is there and stays positive when it is not.

Vectorised on the device, no host sync (top-k, gathers; the weights r(epoch) are Python floats).
Memory at N = 1,281,167 and B = 256: bank 656 MB (float32; 328 MB bf16), neighbour table 41 MB
(k = 4), the [B, N] similarities 1.31 GB (reused between steps), the top-k [B, 4096] 8 MB.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..errors import UserError
from ..losses import fp32
from ..memory import MemoryBank
from ..memory.neighbours import NeighbourTable, exclusive_neighbours
from ..runtime import dist
from .base import Method, TrainContext
from .mocov2 import build_encoder
from .npid import random_bank, update_bank


def ramp(kind: str, epoch: int, ramp_epochs: int) -> float:
    """r(epoch), epoch 0-based (the official code's epochs count from 1): ``binary`` 0 for the first
    ``ramp_epochs`` epochs, then 1; ``gaussian`` exp(-5 max(1 - (epoch + 1) / ramp_epochs, 0)^2);
    ``none`` 1."""
    if kind == "none" or ramp_epochs <= 0:
        return 1.0
    if kind == "binary":
        return float(epoch >= ramp_epochs)
    return math.exp(-5.0 * max(1.0 - (epoch + 1) / ramp_epochs, 0.0) ** 2)


def hardest_positives(sim: torch.Tensor, candidates: torch.Tensor, n_pos: int, dedup: bool):
    """The ``n_pos`` candidates [B, C] of lowest similarity ``sim`` [B, N] -> (indices [B, P],
    valid [B, P]); ``dedup``: repeated candidates count once (invalid slots when fewer remain)."""
    cand_sim = sim.gather(1, candidates)  # [B, C]
    if dedup:
        srt, order = candidates.sort(dim=1, stable=True)
        rep = torch.zeros_like(srt, dtype=torch.bool)
        rep[:, 1:] = srt[:, 1:] == srt[:, :-1]  # later copies of a value
        cand_sim = cand_sim.masked_fill(torch.zeros_like(rep).scatter_(1, order, rep), float("inf"))
    vals, pick = torch.topk(cand_sim, min(n_pos, candidates.shape[1]), dim=1, largest=False, sorted=True)
    return candidates.gather(1, pick), torch.isfinite(vals)


def invp_losses(
    bank: MemoryBank,
    q: torch.Tensor,
    idx: torch.Tensor,
    sim: torch.Tensor,
    background: torch.Tensor,
    positives: torch.Tensor,
    pos_valid: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ins, L_inv) of the module doc for unit queries ``q`` [B, D] (gradient) of the images
    ``idx`` [B], their similarities ``sim`` [B, N] (detached), background indices [B, n_b] and
    positives [B, P] (``pos_valid`` [B, P])."""
    t = temperature
    own = bank.cosine(q, idx.unsqueeze(1), sim).squeeze(1) / t  # [B]
    bg = bank.cosine(q, background, sim) / t  # [B, n_b]
    l_ins = (torch.logsumexp(bg, dim=1) - own).mean()
    others = bg.masked_fill(background == idx.unsqueeze(1), float("-inf"))  # [B, n_b] without row i
    pos = (bank.cosine(q, positives, sim) / t).masked_fill(~pos_valid, float("-inf"))  # [B, P]
    l_inv = (torch.logsumexp(others, dim=1) - torch.logsumexp(pos, dim=1)).mean()
    return l_ins, l_inv


class InvP(Method):
    """InvP (module doc): ``encoder_q``, the bank ``bank`` and the neighbour table ``neighbours``."""

    def __init__(self, cfg: Config, num_samples: int):
        super().__init__(cfg, num_samples)
        ic = cfg.method.invp
        self.invp_cfg = ic
        if cfg.method.cld.weight != 0:
            raise UserError("method.cld.weight applies to mocov2, npid and interclr, not invp; set it to 0")
        if ic.num_background < ic.k + 1 or ic.num_background > num_samples:
            raise UserError(
                f"method.invp.num_background={ic.num_background} must be in [k + 1, N] = [{ic.k + 1}, {num_samples}]"
            )
        if ic.depth < 1 or ic.n_pos < 1 or ic.k < 1:
            raise UserError("method.invp needs k >= 1, depth >= 1 and n_pos >= 1")
        self.encoder_q = build_encoder(cfg)
        self.bank = MemoryBank(num_samples, cfg.model.embed_dim, dtype=getattr(torch, ic.bank_dtype))
        self.neighbours = NeighbourTable(num_samples, ic.k)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def on_train_start(self, ctx: TrainContext) -> None:
        if not ctx.resumed:  # a resumed bank and table come back with the state_dict
            random_bank(self.bank, self.cfg.seed * 1000 + 67)

    def training_step(self, batch, step, epoch):
        ic = self.invp_cfg
        idx = batch["index"]
        z = self.encoder_q(batch["view1"])
        with fp32(idx.device):
            q = F.normalize(z.float(), dim=1)  # [B, D]
            sim = self.bank.scratch_similarity(q)  # [B, N]
            background = torch.topk(sim, ic.num_background, dim=1, sorted=True).indices  # [B, n_b]
            cand = self.neighbours.propagate(idx, ic.depth)  # [B, C]
            pos, valid = hardest_positives(sim, cand, ic.n_pos, ic.dedup)  # [B, P]
            l_ins, l_inv = invp_losses(self.bank, q, idx, sim, background, pos, valid, ic.temperature)
            loss = l_ins + ic.weight * ramp(ic.ramp, epoch, ic.ramp_epochs) * l_inv
        self._pending = (idx, q.detach(), exclusive_neighbours(background, idx, ic.k))
        return loss, {"loss_ins": l_ins.detach(), "loss_inv": l_inv.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if self._pending is None:
            return
        idx, keys, nbrs = self._pending
        self._pending = None
        self.neighbours.update(dist.all_gather_cat(idx), dist.all_gather_cat(nbrs))
        update_bank(self.bank, idx, keys, self.invp_cfg.bank_momentum)


__all__ = ["InvP", "hardest_positives", "invp_losses", "ramp"]
