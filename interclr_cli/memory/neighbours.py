"""The neighbour table of Invariance Propagation: each image's k nearest bank rows.

Wang, Zhao, Luo, Tian, Huang, "Unsupervised Learning by Invariance Propagation", NeurIPS 2020
(arXiv 2010.11694), Sec. 3.2; official code WangFeng18/InvariancePropagation (``objective.py``).
The graph ``G`` has an edge ``i -> j`` for each of the k rows ``j`` most similar to image i's
query, recorded when i was last seen (so the table costs no extra pass over the bank)::

    table[i] = the k most similar bank rows to q_i, i itself excluded        [N, k] int64

    propagate(i, L) = [ N(i) ; N(N(i)) ; ... ; N^L(i) ]                       [k + k^2 + ... + k^L]

``propagate`` is the official approximation of a breadth-first search of depth L: the
neighbours of every node of a layer are concatenated, duplicates (and i itself, reached back
through a neighbour) included; column order is the official one (layer by layer, each node's
neighbours in table order). Vectorised: one gather per layer, no loop over samples.

Rows start at 0 (every neighbour is image 0, as the official code starts) until the image is
seen; with the official binary ramp the invariance loss starts after 30 epochs, when every
row has been written. Memory: N x k int64, 41 MB for N = 1,281,167 and k = 4.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bank import last_occurrence


def exclusive_neighbours(background: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """The first k columns of ``background`` [B, >= k+1] (rows sorted by decreasing similarity)
    without the query's own index ``indices`` [B]: a column holding it takes the (k+1)-th entry
    instead (the official ``update_nn``). -> [B, k] int64."""
    if background.shape[1] < k + 1:
        raise ValueError(f"need at least k + 1 = {k + 1} background columns, got {background.shape[1]}")
    near = background[:, : k + 1]  # [B, k+1]
    own = near == indices.to(near.device).unsqueeze(1)  # [B, k+1]
    spare = near[:, k : k + 1].expand_as(near)  # [B, k+1]  the (k+1)-th nearest
    return torch.where(own, spare, near)[:, :k]


class NeighbourTable(nn.Module):
    """``table``: [N, k] int64 buffer (saved with the module's state_dict), see the module doc."""

    table: torch.Tensor

    def __init__(self, num_samples: int, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.register_buffer("table", torch.zeros(num_samples, k, dtype=torch.long))

    def propagate(self, indices: torch.Tensor, depth: int) -> torch.Tensor:
        """Candidates [B, k + k^2 + ... + k^depth] reached from ``indices`` [B] (module doc)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        b = indices.shape[0]
        layer = self.table.index_select(0, indices)  # [B, k]
        layers = [layer]
        for _ in range(depth - 1):
            layer = self.table.index_select(0, layer.reshape(-1)).view(b, -1)  # [B, k^(l+1)]
            layers.append(layer)
        return torch.cat(layers, dim=1)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, neighbours: torch.Tensor) -> None:
        """``table[indices[b]] = neighbours[b]`` ([B], [B, k]); a repeated index keeps its last
        row (as :meth:`MemoryBank.update`), identical on every device. No host sync."""
        idx, pos = last_occurrence(indices.to(self.table.device))
        self.table.index_copy_(0, idx, neighbours.to(self.table.device, torch.long)[pos])

    def extra_repr(self) -> str:
        return f"num_samples={self.table.shape[0]}, k={self.k}"


__all__ = ["NeighbourTable", "exclusive_neighbours"]
