"""The InterCLR memory bank: one L2-normalised feature row per training image.

InterCLR (arXiv 2008.11702) keeps a bank of the momentum encoder's features of all N images: it
is the pool the inter-image positives and negatives are drawn from, and the data the online
pseudo-labels are computed on. After every step the rows of the batch's images are refreshed::

    v_i  <-  normalize( (1 - m) * v_i + m * normalize(k_i) )          (m = bank momentum)

``m = 1`` (the released InterCLR setting) replaces the row by the new key; NPID-style banks use
``m = 0.5`` (Wu et al., arXiv 1805.01978, Eq. 8 with their ``lambda = 1 - m``).

Duplicate indices in one update (sampling with replacement draws the same image twice, and
all-gathered batches from several ranks can collide) are resolved deterministically: **the
last occurrence wins**, and it is applied to the row as it was before the update (the earlier
occurrences are dropped, not chained). "Last" is the order of ``indices`` as given (after an
all-gather: rank order, then batch order). The resolution uses a stable sort and
``index_copy_`` on unique indices, so the result is bit-identical on CPU and GPU (plain
``bank[idx] = rows`` with duplicate ``idx`` is unspecified on CUDA).

Storage precision: ``dtype=torch.bfloat16`` halves the memory (ImageNet, D=128: 656 MB ->
328 MB) and the bytes read by the similarity pass; arithmetic (momentum mix, normalisation,
similarities) is always done in float32 and only the stored rows are rounded. bf16 keeps an
8-bit mantissa, so each stored coordinate has a relative error <= 2^-9 and a cosine between a
query and a row is off by at most ~4e-3 (about 3 significant digits; measurements:
benchmarks/README.md, section "bf16 memory bank"). Near-ties in the similarity ranking (semi-hard
pool boundary, hard negatives) can therefore reorder; labels and sampling are otherwise
unaffected. Rows are renormalised in float32 before every use, so the stored norm error (~2^-9)
does not accumulate.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# Row chunk for passes over the whole bank (fill, bf16 similarity on CPU): 2^18 rows x 128 x 4 B
# = 128 MB of float32 temporaries at most.
_CHUNK = 1 << 18


def _weighted_row_sum(features: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j weights[b, j] * features[idx[b, j]]`` -> [B, D] float32.

    float32 banks: one ``embedding_bag`` (no [B, M, D] temporary). bf16 banks: chunks of rows
    upcast to float32 (``embedding_bag`` would accumulate in bf16 on CPU).
    """
    if features.dtype == torch.float32:
        return F.embedding_bag(idx, features, per_sample_weights=weights.float(), mode="sum")
    out = torch.zeros(idx.shape[0], features.shape[1], device=features.device)
    for s in range(0, idx.shape[1], 2048):
        part = idx[:, s : s + 2048]
        rows = features.index_select(0, part.reshape(-1)).view(*part.shape, -1).float()  # [B, c, D]
        out += torch.bmm(weights[:, s : s + 2048].float().unsqueeze(1), rows).squeeze(1)
    return out


class _BankCosine(torch.autograd.Function):
    """``cos[b, j] = q_b . v_{idx[b, j]}`` with the gradient flowing to ``q`` only (the bank is a
    buffer). Forward reads ``sim`` when given (the similarities already computed for sampling);
    backward is a weighted row sum of the bank."""

    @staticmethod
    def forward(ctx, q, features, idx, sim):
        ctx.save_for_backward(idx)
        ctx.features = features
        if sim is not None:
            return sim.gather(1, idx)
        out = torch.empty(idx.shape, device=q.device, dtype=torch.float32)
        qf = q.detach().float().unsqueeze(2)  # [B, D, 1]
        for s in range(0, idx.shape[1], 2048):
            part = idx[:, s : s + 2048]
            rows = features.index_select(0, part.reshape(-1)).view(*part.shape, -1).float()  # [B, c, D]
            out[:, s : s + 2048] = torch.bmm(rows, qf).squeeze(2)
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad_q = None
        if ctx.needs_input_grad[0]:
            grad_q = _weighted_row_sum(ctx.features, idx, grad)
        return grad_q, None, None, None


def last_occurrence(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve repeated ``indices`` [B] to each value's last occurrence, in fixed shapes.

    Returns ``(values [B] ascending, positions [B])``: ``values`` is ``indices`` sorted (repeats
    kept) and ``positions[j]`` the largest batch position holding ``values[j]``, the same for every
    repeat. A scatter of ``data[positions]`` to rows ``values`` therefore writes identical data for
    a repeated row, whatever order the device writes in. One stable sort and a reversed cummin: no
    boolean-mask compaction, so no host sync (the output shape does not depend on the data).
    """
    b = indices.numel()
    values, order = torch.sort(indices, stable=True)  # equal values keep their batch order
    ar = torch.arange(b, device=indices.device)
    is_last = torch.ones_like(values, dtype=torch.bool)
    is_last[:-1] = values[1:] != values[:-1]  # the last of each run of equal values
    end = torch.where(is_last, ar, torch.full_like(ar, b))  # [B] run ends, b elsewhere
    end = torch.flip(torch.cummin(torch.flip(end, (0,)), 0).values, (0,))  # [B] next run end at or after j
    return values, order[end]


def run_starts(values: torch.Tensor) -> torch.Tensor:
    """bool [B], True at the first entry of each run of equal ``values`` (sorted [B]): weights that
    count a repeated value once."""
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    return first


class MemoryBank(nn.Module):
    """``features``: [N, D] buffer of L2-normalised rows (saved with the module's state_dict).

    Rows are zero until :meth:`fill` (as in the reference); :meth:`update` of a zero row with any
    momentum > 0 yields the normalised key.
    """

    features: torch.Tensor

    def __init__(
        self,
        num_samples: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ):
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"bank dtype must be float32 or bfloat16, got {dtype}")
        self.num_samples = int(num_samples)
        self.dim = int(dim)
        self.register_buffer("features", torch.zeros(num_samples, dim, dtype=dtype, device=device))
        self._scratch: Optional[torch.Tensor] = None  # the [B, N] buffer of scratch_similarity

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the rows (float32 or bfloat16)."""
        return self.features.dtype

    @torch.no_grad()
    def fill(self, features: torch.Tensor) -> None:
        """Set every row: ``features`` [N, D] (any float dtype/device) is L2-normalised in fp32."""
        if features.shape != self.features.shape:
            raise ValueError(f"fill expects {tuple(self.features.shape)}, got {tuple(features.shape)}")
        for s in range(0, self.num_samples, _CHUNK):
            chunk = features[s : s + _CHUNK].to(self.features.device, torch.float32)
            self.features[s : s + _CHUNK] = F.normalize(chunk, dim=1).to(self.dtype)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, keys: torch.Tensor, momentum: float) -> None:
        """``v_i <- normalize((1 - m) v_i + m normalize(k_i))`` for the rows ``indices`` [B].

        ``keys``: [B, D] (need not be normalised). ``momentum`` m in (0, 1]; m = 1 replaces the
        rows. Duplicate indices: the last occurrence wins (module doc). No host sync.
        """
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"bank momentum must be in (0, 1], got {momentum}")
        idx, pos = last_occurrence(indices.to(self.features.device))
        new = F.normalize(keys.detach()[pos].to(self.features.device, torch.float32), dim=1)  # [U, D]
        if momentum < 1.0:
            old = self.features.index_select(0, idx).float()
            new = F.normalize((1.0 - momentum) * old + momentum * new, dim=1)
        self.features.index_copy_(0, idx, new.to(self.dtype))

    def cosine(self, queries: torch.Tensor, indices: torch.Tensor, sim: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable ``queries[b] . row[indices[b, j]]`` -> [B, M] float32 (grad to queries).

        ``queries`` [B, D] L2-normalised (with grad); ``indices`` [B, M]. ``sim``: the [B, N]
        similarity matrix of the same (detached) queries, if already computed: the values are
        then read from it instead of gathering B x M x D features (268 MB for B = 32,
        M = 16384, D = 128), and the backward pass is ``sum_j g_bj v_j`` per query
        (``embedding_bag``), so the gradient is exact and the negatives' features are never
        materialised.
        """
        if sim is not None and sim.requires_grad:
            raise ValueError("sim must be computed without gradient (from detached queries)")
        return _BankCosine.apply(queries.float(), self.features, indices, sim)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """float32 copy of the rows ``indices`` (any shape) -> [..., D]."""
        flat = self.features.index_select(0, indices.reshape(-1)).float()
        return flat.view(*indices.shape, self.dim)

    @torch.no_grad()
    def similarity(self, queries: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cosine similarities [B, N] (float32) of L2-normalised ``queries`` [B, D] to every row.

        ``out``: optional preallocated float32 [B, N] buffer (saves the page faults of a fresh
        B x N allocation on every step, which is a noticeable part of the CPU cost). A bf16 bank
        is upcast chunk by chunk and multiplied in float32 (a bf16 product would round the
        similarities to bf16 as well; and CPUs without bf16 matrix units multiply bf16 slower).
        """
        q = queries.detach().to(self.features.device, torch.float32)
        n = self.num_samples
        if out is None:
            out = torch.empty(q.shape[0], n, device=q.device, dtype=torch.float32)
        if self.dtype == torch.float32:
            return torch.mm(q, self.features.t(), out=out)
        for s in range(0, n, _CHUNK):
            out[:, s : s + _CHUNK] = q @ self.features[s : s + _CHUNK].float().t()
        return out

    def scratch_similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """:meth:`similarity` into one [B, N] float32 buffer kept from call to call (allocated again
        when B or the bank's device changes): a training step's similarities without a fresh
        B x N allocation. The next call overwrites the result."""
        shape, device = (queries.shape[0], self.num_samples), self.features.device
        if self._scratch is None or self._scratch.shape != shape or self._scratch.device != device:
            self._scratch = torch.empty(shape, device=device)
        return self.similarity(queries, out=self._scratch)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, dim={self.dim}, dtype={self.dtype}"


__all__ = ["MemoryBank", "last_occurrence", "run_starts"]
