"""Inter-image positive and negative sampling for InterCLR (arXiv 2008.11702, "sampling strategy").

Positives: a bank entry drawn uniformly from the query's own pseudo-label cluster (the query's
own entry included, as in the released code). Negatives: entries with *another* label, chosen by
one of the four strategies the paper compares (the released model uses ``semihard``):

==========  ========================================================================  ============
mode        negatives (all with a label different from the query's)                   draw
==========  ========================================================================  ============
semihard    uniform from the pool of the P entries most similar to the query          no repl.
hard        the M most similar entries                                                deterministic
random      uniform over the whole bank                                               with repl.
semieasy    uniform from the pool of the P entries least similar to the query         no repl.
==========  ========================================================================  ============

The released code (mmselfsup 0.x ``InterCLRMoCo.contrast_inter``): pool = ``topk(sim, P,
sorted=False)`` over the whole bank, ``torch.multinomial(ones, M)`` (default: **without**
replacement) inside it, then own-label picks are redrawn until none is left (the redraws can
repeat entries); ``random`` uses alias-method draws **with** replacement, redrawing own-label
hits; ``hard`` takes ``topk(M + largest cluster size)`` and drops own-label entries. We keep those
designs, vectorised, with fixed shapes and no host sync:

* **exact pool** (``threshold="exact"``): ``topk(P, sorted=False)`` gives the pool (a selection,
  not a sort of the bank, and without the copy of the row that ``kthvalue`` makes); own-label
  members are masked out of the pool *before* drawing; then a uniform M-subset without
  replacement = the M smallest of uniform random keys over the pool (``topk`` on [B, P]).
* **sampled pool** (``threshold="sampled"``): the P-th largest similarity of each row is estimated
  from the same ``sample_size`` random columns for every row (S values per row; quantile of a
  sample), the pool is ``{sim >= t} and other label`` (a [B, N] mask), and a uniform M-subset
  without replacement of the pool is drawn on its *ranks*: the M smallest random keys over
  ``[0, cap)`` (ranks beyond the row's pool size disabled), mapped to bank indices with a
  ``cumsum`` + ``searchsorted`` over the mask. ``cap`` (:func:`sampled_pool_cap`) is a static
  8-sigma bound on the pool size, so shapes are fixed; a pool larger than ``cap`` (only with
  massive similarity ties) draws over ``[0, cap)`` and spreads the ranks by ``|pool| / cap``.
  This skips the O(N) selection per row of the exact mode.
* ``random``: i.i.d. uniform draws (with replacement) over ``{other label}`` via the same
  cumulative count.

Sampled against exact pool: both are upper (lower) sets of the same row, so they are nested. The
relative size error of a sample-quantile threshold does not depend on the similarity
distribution, only on S and P/N (barring ties): its std is ~= sqrt((1 - p) / (p S)), p = P/N;
tests check 6 sd on small banks. Measurements: benchmarks/README.md, section "Sampled vs exact
pool".

Graceful edge cases: P >= N makes the pool the whole bank; fewer admissible entries than M
(tiny banks, huge own cluster) are topped up with repeats of admissible ones (with replacement);
a query with no admissible entry at all gets ``valid == False`` for all its slots (the loss drops
them, see :func:`interclr_cli.losses.margin_nce`).

Positives use a label index (labels sorted once per call, stable, so members stay in index
order): ``offset + floor(u * count)``; pass a prebuilt :class:`LabelIndex` to share the sort.

CPU choices (they shape the code): ``index_select`` instead of advanced indexing for large
gathers, int32 labels for the [B, N] comparison and the sort, ``copy_`` + in-place ``cumsum_``
instead of ``cumsum(dtype=int32)``, ranks sorted before ``searchsorted``, reusable [B, N] buffers
(``workspace``; no page faults), and the repeat-filling pass skipped on CPU when nothing needs
filling. On GPUs every path is fixed-shape and sync-free. The exact pool's cost is dominated by
``topk(P)`` over the bank, which is what ``threshold="sampled"`` avoids. Measurements:
benchmarks/README.md, section "Negative sampling on the CPU".

Random numbers come from the ``generator`` argument (see ``_rng``): same generator state and
inputs give the same draws.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, get_args

import torch

from ..config.schema import NegSampling, PoolThreshold
from . import _rng

# The allowed values are declared once, in the config schema; these guard direct calls.
NEG_MODES: tuple[str, ...] = get_args(NegSampling)
THRESHOLDS: tuple[str, ...] = get_args(PoolThreshold)


class LabelIndex(NamedTuple):
    """CSR-like view of the labels: ``sorted_labels`` [N] (int32) ascending and ``order`` [N]
    (int64) with ``labels[order] == sorted_labels`` (stable: each cluster's members in index order)."""

    sorted_labels: torch.Tensor
    order: torch.Tensor

    @classmethod
    def build(cls, labels: torch.Tensor) -> "LabelIndex":
        """The index of ``labels`` [N] (any integer dtype; ids must be < 2^31): one stable sort."""
        # int32 keys sort faster than int64 on CPU
        sorted_labels, order = torch.sort(labels.to(torch.int32), stable=True)
        return cls(sorted_labels, order)


class Negatives(NamedTuple):
    """``indices`` [B, M] int64 bank rows; ``valid`` [B, M] bool (False only for queries that have
    no admissible negative at all)."""

    indices: torch.Tensor
    valid: torch.Tensor


def sample_positives(
    labels: torch.Tensor,
    query_labels: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    index: Optional[LabelIndex] = None,
) -> torch.Tensor:
    """One bank index per query, uniform over the members of the query's cluster.

    Args:
        labels: [N] int64 pseudo-labels of the bank.
        query_labels: [B] the queries' labels (each must occur in ``labels``; it does when the
            query is itself a bank entry).
        generator: random source.
        index: optional prebuilt :class:`LabelIndex` of ``labels``.

    Returns: [B] int64. Cost: one stable sort of N (skipped with ``index``) + O(B log N).
    """
    idx = index if index is not None else LabelIndex.build(labels)
    ql = query_labels.to(labels.device, idx.sorted_labels.dtype)
    start = torch.searchsorted(idx.sorted_labels, ql, right=False)
    count = torch.searchsorted(idx.sorted_labels, ql, right=True) - start  # [B] cluster sizes
    u = _rng.rand(ql.shape, generator, labels.device, torch.float64)
    offset = torch.minimum((u * count).long(), (count - 1).clamp_min(0))
    return idx.order[(start + offset).clamp_max(labels.numel() - 1)]


def pool_threshold(
    sim: torch.Tensor,
    pool_size: int,
    largest: bool = True,
    generator: Optional[torch.Generator] = None,
    sample_size: int = 16384,
) -> torch.Tensor:
    """Estimated P-th largest (``largest``) or P-th smallest similarity of each row [B].

    The same ``sample_size`` random columns (drawn with replacement) are read in every row and
    the matching order statistic of the sample is returned: ``k = round(S * P / N)``-th largest
    (smallest). Cost O(B * S) + one ``kthvalue`` on [B, S].
    """
    n = sim.shape[1]
    s = max(1, min(int(sample_size), n))
    cols = _rng.randint(n, (s,), generator, sim.device)
    vals = sim.index_select(1, cols)  # [B, S]
    k = min(max(1, round(s * pool_size / n)), s)
    return torch.kthvalue(vals, s - k + 1 if largest else k, dim=1).values


def _buffer(workspace: Optional[dict], name: str, shape, dtype, device) -> torch.Tensor:
    """A reusable uninitialised tensor from ``workspace`` (a dict the caller keeps between steps),
    or a fresh one. Reusing the [B, N] temporaries saves the page faults of allocating ~200 MB per
    step at ImageNet scale."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    t = workspace.get(name)
    if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != torch.device(device):
        t = workspace[name] = torch.empty(shape, dtype=dtype, device=device)
    return t


def _cumsum_int32(mask: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-wise cumulative count of a bool [B, N] mask as int32 (copy + in-place cumsum: on CPU
    faster than ``cumsum(mask, dtype=int32)``, which converts element by element)."""
    out = torch.empty(mask.shape, dtype=torch.int32, device=mask.device) if out is None else out
    return out.copy_(mask).cumsum_(dim=1)


def _fill_invalid(idx: torch.Tensor, ok: torch.Tensor, m: int, generator: Optional[torch.Generator]) -> Negatives:
    """Return [B, m] from ``idx`` [B, k] (k <= m): admissible slots (``ok`` [B, k]) are kept, the
    others (and the k..m-1 missing ones) get a uniform pick among the row's admissible slots
    (i.e. repeats: draws with replacement for rows short of admissible entries). ``valid`` is
    False for rows without any admissible slot. Fixed shapes, O(B m), the same work whatever the
    data (no host read to skip the common all-admissible case)."""
    b, k = idx.shape
    if k < m:  # pad with copies flagged inadmissible, so they are redrawn
        reps = -(-m // k)
        idx = idx.repeat(1, reps)[:, :m]
        ok = torch.cat([ok, ok.new_zeros(b, m - k)], dim=1)
    csum = _cumsum_int32(ok)  # [B, m]
    c = csum[:, -1:].long()  # [B, 1] admissible slots
    u = _rng.rand((b, m), generator, idx.device, torch.float64)
    rank = torch.minimum((u * c).long(), (c - 1).clamp_min(0))
    pos = torch.searchsorted(csum, (rank + 1).to(torch.int32)).clamp_max(m - 1)
    return Negatives(torch.where(ok, idx, idx.gather(1, pos)), (c > 0).expand(b, m))


def _draw_from_mask(
    mask: torch.Tensor,
    m: int,
    generator: Optional[torch.Generator],
    replacement: bool,
    cap: int = 0,
    workspace: Optional[dict] = None,
) -> Negatives:
    """Draw m column indices per row among the True entries of ``mask`` [B, N].

    Draws are made on the admissible *ranks* ``[0, c)`` of each row (c = its True count) and
    mapped to columns by ``searchsorted`` in the row's cumulative count. ``replacement=True``:
    i.i.d. uniform ranks. ``replacement=False``: a uniform m-subset of ranks = the m smallest of
    random keys over ``[0, cap)`` (keys of ranks >= c disabled); a row with c > cap draws its
    subset over ``[0, cap)`` and spreads it by ``floor(r * c / cap)`` (still distinct, uniform to
    within 1/cap). Rows with c < m are topped up with repeats.
    """
    b, n = mask.shape
    csum = _cumsum_int32(mask, _buffer(workspace, "csum", (b, n), torch.int32, mask.device))  # [B, N]
    c = csum[:, -1].long()  # [B] admissible entries per row
    if replacement:
        u = _rng.rand((b, m), generator, mask.device, torch.float64)
        rank = torch.minimum((u * c.unsqueeze(1)).long(), (c.unsqueeze(1) - 1).clamp_min(0))
        valid = (c > 0).unsqueeze(1).expand(b, m)
    else:
        cap = min(n, max(int(cap), m))
        keys = _rng.rand((b, cap), generator, mask.device)
        keys.masked_fill_(torch.arange(cap, device=mask.device).unsqueeze(0) >= c.unsqueeze(1), 2.0)
        kept, rank = torch.topk(keys, min(m, cap), dim=1, largest=False, sorted=False)
        over = (c > cap).unsqueeze(1)
        spread = (rank.double() * (c.unsqueeze(1).double() / cap)).long()
        rank, valid = _fill_invalid(torch.where(over, spread, rank), kept < 1.5, m, generator)
    # ascending ranks make the binary searches cache-friendly (faster on CPU); the order of a
    # row's negatives is immaterial (the loss is a sum over them)
    rank = torch.sort((rank + 1).to(torch.int32), dim=1).values
    cols = torch.searchsorted(csum, rank).clamp_max(n - 1)
    return Negatives(cols, valid)


def sampled_pool_cap(num_samples: int, pool_size: int, sample_size: int) -> int:
    """Static bound on the size of a sampled pool: ``P (1 + 8 sd) + 8`` with
    ``sd = sqrt((1 - p) / (p S))``, p = P/N, the std of its relative size error (8 sigma)."""
    n, p = int(num_samples), min(int(pool_size), int(num_samples))
    frac = p / n
    s = max(1, min(int(sample_size), n))
    sd = ((1.0 - frac) / (frac * s)) ** 0.5
    return min(n, int(p * (1.0 + 8.0 * sd)) + 8)


def sample_negatives(
    sim: Optional[torch.Tensor],
    labels: torch.Tensor,
    query_labels: torch.Tensor,
    mode: str = "semihard",
    num_negatives: int = 16384,
    pool_size: int = 128000,
    generator: Optional[torch.Generator] = None,
    threshold: str = "exact",
    sample_size: int = 16384,
    workspace: Optional[dict] = None,
) -> Negatives:
    """Draw ``num_negatives`` M bank indices per query, none carrying the query's label.

    Args:
        sim: [B, N] float similarities of the (detached) queries to the bank; unused (may be
            None) for ``mode="random"``.
        labels: [N] int64 bank pseudo-labels.
        query_labels: [B] the queries' labels.
        mode: ``semihard`` | ``hard`` | ``random`` | ``semieasy`` (module doc).
        num_negatives: M.
        pool_size: P, the semihard/semieasy pool (clamped to N).
        generator: random source.
        threshold: ``exact`` (top-P selection) or ``sampled`` (threshold estimated from
            ``sample_size`` columns; see the module doc for how the two pools differ).
        sample_size: S for ``threshold="sampled"``.
        workspace: optional dict kept by the caller between calls; large temporaries are reused
            from it (same results, fewer allocations).

    Returns: :class:`Negatives` (``indices`` [B, M] int64, ``valid`` [B, M] bool).
    """
    if mode not in NEG_MODES:
        raise ValueError(f"negative sampling mode must be one of {NEG_MODES}, got {mode!r}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"pool threshold must be one of {THRESHOLDS}, got {threshold!r}")
    n = labels.numel()
    m = int(num_negatives)
    ql = query_labels.to(labels.device).unsqueeze(1)  # [B, 1]

    b = ql.shape[0]
    if mode == "random":
        other = _buffer(workspace, "other", (b, n), torch.bool, labels.device)
        torch.ne(labels.to(torch.int32).unsqueeze(0), ql.to(torch.int32), out=other)  # [B, N] other label
        return _draw_from_mask(other, m, generator, replacement=True, workspace=workspace)

    if sim is None:
        raise ValueError(f"mode {mode!r} needs the similarity matrix")
    if mode == "hard":
        # the M most similar entries with another label: own label -> -inf, then top-M
        masked = sim.masked_fill(labels.unsqueeze(0) == ql, float("-inf"))
        vals, idx = torch.topk(masked, min(m, n), dim=1, largest=True, sorted=True)
        # rows short of admissible entries are topped up with repeats of them
        return _fill_invalid(idx, torch.isfinite(vals), m, generator)

    largest = mode == "semihard"
    p = min(int(pool_size), n)
    if threshold == "sampled":
        pool = _buffer(workspace, "other", (b, n), torch.bool, labels.device)
        torch.ne(labels.to(torch.int32).unsqueeze(0), ql.to(torch.int32), out=pool)  # [B, N] other label
        if p < n:
            t = pool_threshold(sim, p, largest, generator, sample_size).unsqueeze(1)
            near = _buffer(workspace, "near", (b, n), torch.bool, sim.device)
            (torch.ge if largest else torch.le)(sim, t, out=near)
            pool.logical_and_(near)
        cap = sampled_pool_cap(n, p, sample_size)
        return _draw_from_mask(pool, m, generator, replacement=False, cap=cap, workspace=workspace)

    # exact pool: the P most (least) similar entries, own label masked out, then a uniform
    # M-subset without replacement = the M smallest random keys (inadmissible keys = 2 > 1)
    pool_val = _buffer(workspace, "pool_val", (b, p), sim.dtype, sim.device)
    pool_idx = _buffer(workspace, "pool_idx", (b, p), torch.long, sim.device)
    torch.topk(sim, p, dim=1, largest=largest, sorted=False, out=(pool_val, pool_idx))  # [B, P]
    bad = labels.index_select(0, pool_idx.view(-1)).view(b, p) == ql  # [B, P] own label
    keys = _rng.rand((b, p), generator, sim.device).masked_fill_(bad, 2.0)
    kept, pos = torch.topk(keys, min(m, p), dim=1, largest=False, sorted=False)  # [B, min(M, P)]
    return _fill_invalid(pool_idx.gather(1, pos), kept < 1.5, m, generator)


__all__ = [
    "LabelIndex",
    "NEG_MODES",
    "Negatives",
    "THRESHOLDS",
    "pool_threshold",
    "sampled_pool_cap",
    "sample_negatives",
    "sample_positives",
]
