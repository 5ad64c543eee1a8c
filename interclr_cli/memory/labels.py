"""Online pseudo-labels for InterCLR: cluster ids that follow the memory bank step by step.

InterCLR (arXiv 2008.11702, "pseudo-label maintenance") compares *offline* labels (k-means over
the whole data set once per epoch, DeepCluster-style) with *online* labels that are updated
every iteration from the memory bank, and finds the online ones converge faster and work better.
The online scheme is the one of ODC (Zhan et al., "Online Deep Clustering", arXiv 2006.10645):

1. every iteration, the batch's samples are re-assigned to the nearest centroid,
   ``y_i = argmax_k  v_i . c_k`` (``v_i`` the freshly updated bank row);
2. every ``centroid_update_every`` iterations, every centroid is recomputed as the mean of its
   members' bank rows (an empty cluster keeps its centroid);
3. every iteration, clusters with fewer than ``min_cluster_size`` members are dissolved (their
   members go to the nearest remaining centroid) and each freed id is re-used by splitting the
   currently largest cluster in two with a 2-means on its members.

What the released code does (open-mmlab/mmselfsup, branch 0.x: ``InterCLRMemory`` in
``models/memories/interclr_memory.py``, ``InterCLRHook`` in ``core/hooks/interclr_hook.py``,
config ``interclr-moco_resnet50_8xb32-coslr-200e_in1k``), which this module follows:

* step 1 runs inside the forward pass (``update_samples_memory``), right after the bank rows
  of the all-gathered batch were replaced, on those new rows; the change ratio is the fraction
  of the gathered batch whose label changed;
* steps 2 and 3 run in ``after_train_iter`` in that order: centroids when
  ``(iter + 1) % 10 == 0`` (``centroids_update_interval=10``), then small clusters every
  iteration (``deal_with_small_clusters_interval=1``), with ``min_cluster=20``, K = 10000;
* centroids are plain means of the (L2-normalised) member rows, **not** renormalised, and the
  assignment is ``argmax`` of the dot product with them (so tight clusters, whose mean has a norm
  near 1, attract a little more). We keep exactly that;
* dissolving uses the current centroids of the non-small clusters; the receiving clusters'
  centroids are not refreshed until the next periodic update; freed ids are refilled in
  increasing id order, each time splitting the cluster with the most members (first id on ties)
  with a 2-means (sklearn ``KMeans(n_clusters=2, max_iter=20)``), the second sub-cluster taking
  the freed id, and then the two centroids are recomputed as member means. If 2-means leaves one
  side empty it falls back to a random half split. We use our own seeded Lloyd 2-means (below)
  and, one deliberate change, rebalance the split so both parts keep ``min_cluster_size`` members
  (the reference may create a part below the minimum, which is dissolved again at the next
  iteration). With that, after every call no cluster is below the minimum as long as the largest
  cluster has at least ``2 * min_cluster_size`` members, which ``N >= 2 K min_cluster_size``
  guarantees.

Counts are kept in a buffer (``counts == bincount(labels, minlength=K)`` at all times) so the
small-cluster test costs O(K), not O(N).

Host syncs: :meth:`relabel`, :meth:`recompute_centroids` and a steady-state :meth:`step` have
none: whether clusters are small is copied to the host without waiting and read one step later,
so a cluster that becomes small is dissolved at the next iteration (the reference checks on the
host every iteration). :meth:`fix_small_clusters`, when it runs, reads the dissolved ids, the
member lists (``nonzero``) and the largest cluster id: that control flow is data-dependent by
nature (the reference does the same on the host). Everything is computed from the tensors
on every rank identically, so ranks that see identical inputs and generator states stay identical
without any broadcast.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..runtime import dist
from . import _rng
from .bank import last_occurrence, run_starts

# Rows per chunk when a pass touches the whole bank or many members at once.
_CHUNK = 1 << 17


def two_means(
    x: torch.Tensor, generator: Optional[torch.Generator], iters: int = 10, min_size: int = 1
) -> torch.Tensor:
    """Split the rows of ``x`` [n, D] (n >= 2) in two with Lloyd's algorithm (squared L2).

    Initialisation: two distinct rows drawn with ``generator``; then ``iters`` assignment/update
    rounds (fixed count, no convergence test). If a side ends up empty (e.g. all rows identical)
    the split falls back to a random half, like the reference. Then, unlike the reference, the
    split is rebalanced so that both parts have at least ``min_size`` rows (when n >= 2 min_size;
    else the parts are n // 2 and n - n // 2): the rows move across in order of their 2-means
    margin ``||x - c_0||^2 - ||x - c_1||^2``, so the cut stays perpendicular to the 2-means axis.
    The reference lets a part be smaller than the minimum and dissolves it at the next iteration.

    Returns a bool [n] mask, True for the second sub-cluster. Deterministic given the generator
    state and ``x`` (reads one scalar to the host when ``min_size > 1``).
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError("two_means needs at least 2 rows")
    x = x.float()
    u = _rng.rand((2,), generator, x.device, torch.float64)
    i0 = (u[0] * n).long().clamp_max(n - 1)
    i1 = (i0 + 1 + (u[1] * (n - 1)).long().clamp_max(n - 2)) % n  # distinct from i0
    c = x[torch.stack([i0, i1])]  # [2, D]
    margin = torch.zeros(n, device=x.device)
    for _ in range(iters + 1):
        # argmin ||x - c_j||^2 == argmax (x . c_j - ||c_j||^2 / 2); margin > 0 -> second
        score = x @ c.t() - 0.5 * (c * c).sum(1)  # [n, 2]
        margin = score[:, 1] - score[:, 0]
        second = margin > 0
        w = torch.stack([~second, second], 0).float()  # [2, n]
        sizes = w.sum(1, keepdim=True)  # [2, 1]
        c = torch.where(sizes > 0, (w @ x) / sizes.clamp_min(1.0), c)  # an empty side keeps its centre
    n2 = second.sum()
    degenerate = (n2 == 0) | (n2 == n)
    # random half split (always drawn, so the generator advances the same way on every rank)
    keys = _rng.rand((n,), generator, x.device)
    half = torch.zeros(n, dtype=torch.bool, device=x.device)
    half[torch.argsort(keys)[: n - n // 2]] = True
    second = torch.where(degenerate, half, second)
    if min_size > 1:
        lo = min(min_size, n // 2)
        n2 = int(second.sum())  # host sync (callers already sync)
        target = min(max(n2, lo), n - lo)
        if target != n2:
            order = torch.argsort(torch.where(degenerate, keys, margin), descending=True, stable=True)
            second = torch.zeros(n, dtype=torch.bool, device=x.device)
            second[order[:target]] = True
    return second


class OnlineLabels(nn.Module):
    """Buffers ``labels`` [N] int64, ``centroids`` [K, D] float32, ``counts`` [K] int64.

    All are registered buffers: they are saved and restored with the owning module's
    ``state_dict``. Until :meth:`init`, every sample is in cluster 0.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    counts: torch.Tensor

    def __init__(
        self,
        num_samples: int,
        num_clusters: int,
        dim: int,
        min_cluster_size: int = 20,
        centroid_update_every: int = 10,
        device: Optional[torch.device | str] = None,
        split_iters: int = 10,
    ):
        super().__init__()
        if num_clusters < 1 or num_clusters > num_samples:
            raise ValueError(f"num_clusters must be in [1, {num_samples}], got {num_clusters}")
        self.num_samples = int(num_samples)
        self.num_clusters = int(num_clusters)
        self.dim = int(dim)
        self.min_cluster_size = int(min_cluster_size)
        self.centroid_update_every = int(centroid_update_every)
        self.split_iters = int(split_iters)
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long, device=device))
        self.register_buffer("centroids", torch.zeros(num_clusters, dim, device=device))
        counts = torch.zeros(num_clusters, dtype=torch.long, device=device)
        counts[0] = num_samples
        self.register_buffer("counts", counts)
        # the number of small clusters after the last step, copied to the host without waiting and
        # read one step later (see step); None until the first step after construction or resume
        self._small_host = torch.zeros(1, dtype=torch.long, pin_memory=torch.cuda.is_available())
        self._small_view = self._small_host.numpy()  # the host value, read without a tensor call
        self._small_event: Optional[torch.cuda.Event] = None
        self._small_known = False
        # clusters dissolved this step (a buffer, so it moves with the module; not saved)
        self.register_buffer("_fixed", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    # -- whole-bank operations -----------------------------------------------------------------
    def _member_sums(self, bank_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[K, D] float32 sums of the rows of each cluster (chunked; bf16 rows upcast)."""
        sums = torch.zeros(self.num_clusters, bank_features.shape[1], device=bank_features.device)
        for s in range(0, bank_features.shape[0], _CHUNK):
            sums.index_add_(0, labels[s : s + _CHUNK], bank_features[s : s + _CHUNK].float())
        return sums

    @torch.no_grad()
    def init(self, labels: torch.Tensor, features: torch.Tensor) -> None:
        """Start from given labels [N] (e.g. k-means) and the bank rows ``features`` [N, D].

        Centroids are the member means of ``features`` as they are (the bank rows are already
        L2-normalised; the means are not renormalised, as in the reference). Empty clusters get
        a zero centroid (and are refilled by :meth:`fix_small_clusters`). With several ranks the
        centroids are then rank 0's (one broadcast of K x D): float sums need not agree to the
        last bit across ranks (CUDA's ``index_add_`` adds in no fixed order), and every later
        label step must start from identical state.
        """
        labels = labels.to(self.labels.device, torch.long)
        if labels.shape != self.labels.shape:
            raise ValueError(f"labels must have shape {tuple(self.labels.shape)}")
        self.labels.copy_(labels)
        self.counts.copy_(torch.bincount(labels, minlength=self.num_clusters))
        self._small_known = False
        self.centroids.zero_()
        self.recompute_centroids(features)
        if dist.is_dist():
            dist.broadcast_(self.centroids, 0)

    @torch.no_grad()
    def recompute_centroids(self, bank_features: torch.Tensor) -> None:
        """``c_k = mean of the bank rows labelled k``; an empty cluster keeps its centroid. No sync."""
        sums = self._member_sums(bank_features, self.labels)
        cnt = self.counts.unsqueeze(1)
        self.centroids.copy_(torch.where(cnt > 0, sums / cnt.clamp_min(1), self.centroids))

    # -- per-step operations -------------------------------------------------------------------
    @torch.no_grad()
    def relabel(self, indices: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Assign the samples ``indices`` [B] to their nearest centroid, ``argmax(feats @ C^T)``.

        ``feats`` [B, D]: the samples' (just updated) bank rows. Updates ``labels`` and ``counts``
        consistently; duplicate indices: the last occurrence wins (as in the bank). Returns the
        fraction of the B entries whose label changed (float32 scalar tensor, no host sync).
        """
        indices = indices.to(self.labels.device)
        new = torch.argmax(feats.float() @ self.centroids.t(), dim=1)  # [B]
        changed = (new != self.labels[indices]).float().mean()
        idx, pos = last_occurrence(indices)  # [B] sorted, repeats resolved to the last one
        old, new = self.labels[idx], new[pos]
        once = run_starts(idx).long()  # a repeated sample moves once
        self.counts.index_add_(0, old, -once)
        self.counts.index_add_(0, new, once)
        self.labels.index_copy_(0, idx, new)  # repeats write the same label
        return changed

    @torch.no_grad()
    def fix_small_clusters(self, bank_features: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
        """Dissolve clusters smaller than ``min_cluster_size`` and refill their ids by splits.

        1. members of every small cluster move to the nearest centroid among the clusters that are
           not small (vectorised over all members at once);
        2. for each freed id (ascending; a Python loop over the few dissolved ids, not over
           samples): the currently largest cluster is split with :func:`two_means` on its members'
           bank rows, the second part takes the freed id, and both centroids become member means.

        Returns the number of dissolved clusters (0 when nothing was small). Needs host syncs
        (see module doc). If every cluster is small (N < K * min_cluster_size) nothing can be
        fixed and nothing is done.
        """
        if self.min_cluster_size <= 0:
            return 0
        small = self.counts < self.min_cluster_size  # [K]
        n_small = int(small.sum())  # host sync: the rest is data-dependent control flow
        if n_small == 0 or n_small == self.num_clusters:
            return 0
        keep_ids = torch.nonzero(~small).squeeze(1)  # [K']
        members = torch.nonzero(small.index_select(0, self.labels)).squeeze(1)  # [n] samples of small clusters
        if members.numel() > 0:
            keep_c = self.centroids[keep_ids]  # [K', D]
            target = torch.empty_like(members)
            for s in range(0, members.numel(), 4096):
                m = members[s : s + 4096]
                rows = bank_features.index_select(0, m).float()
                target[s : s + 4096] = keep_ids[torch.argmax(rows @ keep_c.t(), dim=1)]
            ones = torch.ones_like(members)
            self.counts.index_add_(0, self.labels[members], -ones)
            self.counts.index_add_(0, target, ones)
            self.labels[members] = target
        for e in torch.nonzero(small).squeeze(1).tolist():  # freed ids, ascending
            largest = int(torch.argmax(self.counts))  # first id among ties
            mem = torch.nonzero(self.labels == largest).squeeze(1)  # ascending sample order
            if mem.numel() < 2:
                break
            x = bank_features.index_select(0, mem).float()
            second = two_means(x, generator, self.split_iters, self.min_cluster_size)
            n2 = second.sum()
            self.labels[mem[second]] = e
            self.counts[e] = n2
            self.counts[largest] -= n2
            w = torch.stack([~second, second], 0).float()  # [2, n]
            self.centroids[torch.tensor([largest, e], device=w.device)] = (w @ x) / w.sum(1, keepdim=True)
        return n_small

    @torch.no_grad()
    def step(
        self,
        iteration: int,
        indices: torch.Tensor,
        feats: torch.Tensor,
        bank_features: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """One iteration of online label maintenance, in the released order.

        ``iteration``: 0-based global step; ``indices`` [B] / ``feats`` [B, D]: the (gathered)
        batch and its freshly updated bank rows; ``bank_features`` [N, D]: the whole bank (after
        the update). Relabel the batch; if ``(iteration + 1) % centroid_update_every == 0``
        recompute all centroids; then fix small clusters when the previous step ended with some
        (read from a host copy staged one step earlier: no host sync in a steady-state step; a
        cluster that a relabelling makes small is fixed at the next step, one iteration later than
        the reference, which checks every iteration on the host). Returns stat tensors: ``label_change``
        (fraction of the batch relabelled), ``empty_clusters``, ``min_cluster_size``,
        ``max_cluster_size``, ``small_clusters_fixed`` (clusters dissolved and refilled this step).
        """
        small = self._small_after_last_step()  # the state the previous step left
        change = self.relabel(indices, feats)
        if self.centroid_update_every > 0 and (iteration + 1) % self.centroid_update_every == 0:
            self.recompute_centroids(bank_features)
            if bank_features.is_cuda and dist.is_dist():
                # CUDA's float index_add_ sums in no fixed order, so ranks could drift apart by
                # rounding: take rank 0's centroids (K x D, ~5 MB every centroid_update_every steps)
                dist.broadcast_(self.centroids, 0)
        self._fixed.zero_()
        if small:
            self._fixed.fill_(self.fix_small_clusters(bank_features, generator))
        self._stage_small_count()
        return {**self.stats(change), "small_clusters_fixed": self._fixed.clone()}

    def _small_after_last_step(self) -> bool:
        """Were clusters small after the previous step (= at the start of this one)? Read from the
        host copy that step staged (its CUDA copy is a step old: the event has long completed), so a
        steady-state step never waits for the device; the first step after construction, resume or
        :meth:`init` counts directly. A function of the label state: every rank takes the same branch."""
        if self.min_cluster_size <= 0:
            return False
        if not self._small_known:
            return bool((self.counts < self.min_cluster_size).any())  # once, not in steady state
        if self._small_event is not None:
            self._small_event.synchronize()
        return int(self._small_view[0]) > 0

    def _stage_small_count(self) -> None:
        if self.min_cluster_size <= 0:
            return
        n_small = (self.counts < self.min_cluster_size).sum().view(1)
        self._small_host.copy_(n_small, non_blocking=self.counts.is_cuda)
        if self.counts.is_cuda:
            self._small_event = torch.cuda.Event()
            self._small_event.record()
        self._small_known = True

    def stats(self, label_change: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Scalar tensors ``empty_clusters``, ``min_cluster_size``, ``max_cluster_size`` (from
        ``counts``; no host sync), preceded by ``label_change`` when given."""
        out = {
            "empty_clusters": (self.counts == 0).sum(),
            "min_cluster_size": self.counts.min(),
            "max_cluster_size": self.counts.max(),
        }
        if label_change is not None:
            out = {"label_change": label_change, **out}
        return out

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, num_clusters={self.num_clusters}, dim={self.dim}, "
            f"min_cluster_size={self.min_cluster_size}, centroid_update_every={self.centroid_update_every}"
        )


__all__ = ["OnlineLabels", "two_means"]
