"""The firing-rate invariance score of a layer's units over sets of related images.

Goodfellow, Le, Saxe, Lee & Ng, "Measuring Invariances in Deep Networks" (NeurIPS 2009), as used
by Purushwalkam & Gupta, "Demystifying Contrastive Self-Supervised Learning: Invariances,
Augmentations and Dataset Biases" (NeurIPS 2020, arXiv 2007.13916) to show that MoCo/PIRL learn
occlusion invariance but little viewpoint or category-instance invariance. A *set* is a group of
images that differ only by the transformation measured (the views of one object, the augmented
copies of one image, the instances of one category); sets may carry a class (e.g. the category).

Equations and code, features ``h`` [N, D] (N images, D units), ``set_of`` [N] (the set of each
image, 0..S-1), ``class_of`` [S] (the class of each set, 0..C-1; one class when there are none):

1. Threshold and firing. ``t_i`` is the ``floor((1 - p) N)``-th smallest value (0-based) of unit
   i over all N images, and unit i *fires* on image x when ``h_i(x) >= t_i``: it fires on the
   fraction p (``firing_rate``, default 5%) of all images whose activation is highest::

       t = kthvalue(h, floor((1 - p) N) + 1, dim=0)          # [D]
       f = h >= t                                            # [N, D] bool

2. Global firing rate ``G(i) = mean_x f_i(x)`` [D]. It is p (up to one image) for a unit with
   distinct values; a unit tied at its threshold (a ReLU unit that is zero on more than 1 - p of
   the images, a constant unit) fires on every tied image, so G(i) > p, up to 1, never 0 (the
   unit's maximum always fires): no division by zero, and such a degenerate unit scores about 1.

3. Local firing rate. For set s and unit i, ``n_s(i)`` members fire out of ``|s|``. Over the sets
   of class c on which unit i fires at least once, L_c(i) is the mean fraction of the set's
   members on which it fires (0 when it fires on no set of the class)::

       n = zeros(S, D).index_add_(0, set_of, f)              # [S, D] firing members per set
       frac = n / |s|                                        # [S, D]
       L_c(i) = sum_{s in c, n_s(i) > 0} frac_s(i) / #{s in c: n_s(i) > 0}     # [C, D]

4. Invariance ``I_c(i) = L_c(i) / G(i)`` [C, D]: how much more often the unit keeps firing within
   a set than it fires on a random image. A unit that ignores the transformation fires on whole
   sets (L = 1, I = 1 / G = 20 at p = 5%); one that follows it fires on part of each set.

5. Score: per class the mean of the ``top_k`` largest I_c(i) (the paper's 25 by default), then the
   mean over classes; the per-unit distribution is ``I(i) = mean_c I_c(i)`` [D], reported as its
   quartiles.

What the paper's released code does (read for these facts: github.com/senthilps8/demystifyssl,
``measure_invariances.py``) and what is implemented here: the threshold rule (the value at index
``floor(0.95 N)`` of the ascending sort, firing at ``>=``), the local rate over the sets with at
least one firing member, the per-class averaging (classes are the sets' categories) and the
top-k mean (k = 10 and 25; we default to 25) are the same. The released code uses
``p = max(5%, 1/C)`` and skips sets of fewer than 3 images; here p is a parameter (default 5%)
and a set needs 2 images (the flip and grayscale families have 2 views). Its printed number is
``I x 100 p`` (= 100 L on an exact p); :func:`invariance_scores` returns I and that value as
``score_percent``. It also counts a unit as firing *below* its 5% lower quantile, choosing per set
the sign with more firing members; here a unit fires on its high side only, as in Goodfellow et
al. (for the pooled ReLU features of the default layer the two agree: the lower tail is a tie at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

#: The paper's number of top units (Purushwalkam & Gupta report the top 10 and top 25).
DEFAULT_TOP_K = 25
DEFAULT_FIRING_RATE = 0.05


@dataclass
class InvarianceResult:
    """One layer's invariance over one family of sets.

    ``score``: mean over classes of the top-k mean of I_c(i); ``score_percent``: ``100 p score``,
    the number the paper's code prints; ``per_unit`` [D] float64: I(i) = mean_c I_c(i);
    ``quartiles``: (25%, 50%, 75%) of ``per_unit``; ``global_rate`` [D]: G(i); ``local_rate``
    [C, D]: L_c(i); ``degenerate_units``: units with G(i) > 2p (tied at their threshold)."""

    score: float
    score_percent: float
    top_k: int
    firing_rate: float
    per_unit: torch.Tensor
    quartiles: tuple[float, float, float]
    global_rate: torch.Tensor
    local_rate: torch.Tensor
    num_sets: int
    num_classes: int
    degenerate_units: int

    def to_dict(self) -> dict:
        """The JSON-ready summary (no per-unit tensors)."""
        return {
            "score": self.score,
            "score_percent": self.score_percent,
            "quartiles": list(self.quartiles),
            "top_k": self.top_k,
            "firing_rate": self.firing_rate,
            "num_sets": self.num_sets,
            "num_classes": self.num_classes,
            "num_units": int(self.per_unit.numel()),
            "degenerate_units": self.degenerate_units,
        }


def firing(h: torch.Tensor, firing_rate: float) -> torch.Tensor:
    """``f`` [N, D] bool: unit i fires on image x when ``h[x, i] >= t_i``, ``t_i`` the
    ``floor((1 - firing_rate) N)``-th smallest value (0-based) of column i (step 1)."""
    n = h.shape[0]
    k = min(n - 1, int((1.0 - firing_rate) * n))  # 0-based index into the ascending order
    t = torch.kthvalue(h, k + 1, dim=0).values  # [D]
    return h >= t


def _check(h: torch.Tensor, set_of: torch.Tensor, firing_rate: float, top_k: int) -> None:
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise UserError(f"invariance needs features [N, D] with N, D > 0; got shape {tuple(h.shape)}")
    if set_of.shape != (h.shape[0],):
        raise UserError(f"one set id per image: {h.shape[0]} images but {set_of.numel()} set ids")
    if not 0.0 < firing_rate < 1.0:
        raise UserError(f"the firing rate must be in (0, 1), e.g. 0.05; got {firing_rate}")
    if top_k < 1:
        raise UserError(f"top-k must be at least 1; got {top_k}")
    if not torch.isfinite(h).all():
        raise UserError("the features hold NaN or inf values; the checkpoint is damaged or the inputs are broken")


def invariance_scores(
    h: torch.Tensor,
    set_of: torch.Tensor,
    class_of: torch.Tensor | None = None,
    *,
    firing_rate: float = DEFAULT_FIRING_RATE,
    top_k: int = DEFAULT_TOP_K,
) -> InvarianceResult:
    """The invariance score of the D units of ``h`` [N, D] over the sets ``set_of`` [N] (ids
    0..S-1, every id used; each set at least 2 images), grouped into classes by ``class_of`` [S]
    (ids 0..C-1; None: one class). Vectorised (no loop over images, sets or units); computed in
    float64 on ``h``'s device. Steps 1-5 of the module docstring; ``top_k`` is capped at D."""
    _check(h, set_of, firing_rate, top_k)
    h = h.detach().to(torch.float64)
    set_of = set_of.to(h.device, torch.long)
    num_sets = int(set_of.max()) + 1
    size = torch.bincount(set_of, minlength=num_sets).to(torch.float64)  # [S]
    if bool((size < 2).any()):
        raise UserError(f"set {int(torch.nonzero(size < 2)[0])} has fewer than 2 images; a set needs at least 2")
    if class_of is None:
        class_of = torch.zeros(num_sets, dtype=torch.long, device=h.device)
    class_of = class_of.to(h.device, torch.long)
    if class_of.shape != (num_sets,):
        raise UserError(f"one class per set: {num_sets} sets but {class_of.numel()} classes")
    num_classes = int(class_of.max()) + 1
    if bool((torch.bincount(class_of, minlength=num_classes) == 0).any()):
        raise UserError("every class id 0..C-1 needs at least one set; renumber the classes densely")
    d = h.shape[1]

    f = firing(h, firing_rate).to(torch.float64)  # [N, D]
    g = f.mean(0)  # [D] G(i) > 0: the maximum always fires
    n = torch.zeros(num_sets, d, dtype=torch.float64, device=h.device).index_add_(0, set_of, f)  # [S, D]
    frac = n / size[:, None]  # [S, D]
    active = (n > 0).to(torch.float64)  # [S, D]
    lsum = torch.zeros(num_classes, d, dtype=torch.float64, device=h.device).index_add_(0, class_of, frac)
    lcnt = torch.zeros(num_classes, d, dtype=torch.float64, device=h.device).index_add_(0, class_of, active)
    local = torch.where(lcnt > 0, lsum / lcnt.clamp_min(1.0), torch.zeros_like(lsum))  # [C, D]
    inv = local / g[None, :]  # [C, D]
    k = min(top_k, d)
    per_class = inv.topk(k, dim=1).values.mean(1)  # [C]
    score = float(per_class.mean())
    per_unit = inv.mean(0)  # [D]
    q = torch.quantile(per_unit, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=h.device))
    return InvarianceResult(
        score=score,
        score_percent=100.0 * firing_rate * score,
        top_k=k,
        firing_rate=float(firing_rate),
        per_unit=per_unit.cpu(),
        quartiles=(float(q[0]), float(q[1]), float(q[2])),
        global_rate=g.cpu(),
        local_rate=local.cpu(),
        num_sets=num_sets,
        num_classes=num_classes,
        degenerate_units=int((g > 2 * firing_rate).sum()),
    )
