"""SSP pruning: keep the hardest (or easiest) examples by distance to their self-supervised prototype.

Ref: Sorscher, Geirhos, Shekhar, Ganguli, Morcos, "Beyond neural scaling laws: beating power law scaling
via data pruning" (NeurIPS 2022). Difficulty of a sample = cosine distance ``1 - <x, c>`` to its nearest
k-means centroid (the "prototype"); larger = harder. The ranking is GLOBAL over all rows the step
sees, as in the paper (one difficulty score per example, one cut), not per cluster. Keep the hardest
when data is abundant (``order="hard"``, the default), the easiest when it is scarce (``"easy"``);
``"random"`` is the matching random baseline. The number kept is ``round(keep_fraction * n)``; ties in
distance go to the lower position. (The paper's k is unverified; it is the clustering's k here.)
"""

from __future__ import annotations

import numpy as np

from core.prune.base import (
    PruneContext,
    Selection,
    budget,
    check_fraction,
    keep_fraction_param,
    order_param,
    register,
    register_reason,
    selection_from_mask,
)

REASONS = {
    "hard": register_reason("ssp:too_easy", "distance {score:.4f} to the centroid: among the easiest"),
    "easy": register_reason("ssp:too_hard", "distance {score:.4f} to the centroid: among the hardest"),
    "random": register_reason("ssp:not_drawn", "not drawn (distance {score:.4f})"),
}


def ssp_keep(dist: np.ndarray, n_keep: int, order: str, seed: int = 0) -> np.ndarray:
    """(n,) bool: the ``n_keep`` rows with the largest (hard) / smallest (easy) distance, or random ones.

    Args:
        dist: (n,) cosine distance to the assigned centroid (larger = harder).
    """
    n = len(dist)
    if order == "random":
        ranked = np.random.default_rng(seed).permutation(n)
    else:
        ranked = np.argsort(-dist if order == "hard" else dist, kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[ranked[:n_keep]] = True
    return keep


@register(
    "ssp",
    summary="keep the hardest (or easiest) rows globally by cosine distance to their cluster centroid",
    paper="Sorscher et al., Beyond neural scaling laws: beating power law scaling via data pruning (NeurIPS 2022)",
    params=[keep_fraction_param(0.5), order_param(" (hard keeps the farthest)")],
)
def ssp(ctx: PruneContext, *, keep_fraction: float, order: str) -> Selection:
    """SSP selection over the context's active rows."""
    check_fraction("keep_fraction", keep_fraction)
    dist = ctx.dist[ctx.rows]
    keep = ssp_keep(dist, budget(keep_fraction, ctx.n_active), order, ctx.seed)
    return selection_from_mask(ctx, keep, reason_names=[REASONS[order]], score=dist)
