"""The random baseline: keep a seeded uniform sample of exactly ``round(keep_fraction * n)`` rows.

Named ``random_baseline`` so that the module never shadows the standard library's ``random``; the
method is registered as ``random``. Ref: the random-pruning baseline of DataComp (Gadre et al., 2023)
and of the DBP paper (Abbas, Rusak et al., ICLR 2024).
"""

from __future__ import annotations

import numpy as np

from core.prune.base import (
    PruneContext,
    Selection,
    budget,
    check_fraction,
    keep_fraction_param,
    register,
    register_reason,
    selection_from_mask,
)

NOT_DRAWN = register_reason("random:not_drawn", "not in the random sample")


@register(
    "random",
    summary="keep a seeded uniform random sample of the rows (the baseline every method must beat)",
    paper="Gadre et al., DataComp: In search of the next generation of multimodal datasets (2023)",
    params=[keep_fraction_param(0.5)],
)
def random_prune(ctx: PruneContext, *, keep_fraction: float) -> Selection:
    """Keep exactly ``round(keep_fraction * n_active)`` rows drawn without replacement (``ctx.seed``)."""
    check_fraction("keep_fraction", keep_fraction)
    n = ctx.n_active
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng(ctx.seed).choice(n, size=budget(keep_fraction, n), replace=False)] = True
    return selection_from_mask(ctx, keep, reason_names=[NOT_DRAWN])
