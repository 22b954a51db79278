"""CLIP-score filtering: keep rows whose image and caption embeddings agree.

Ref: DataComp's baselines (Gadre et al., "DataComp: In search of the next generation of multimodal
datasets", 2023): CLIP score = cosine similarity between a sample's image and caption embeddings
(larger = better aligned); filter either by a threshold (e.g. 0.28 for B/32 in DataComp's code) or by
keeping the top fraction (their best small-scale baselines keep the top 30 %).

Rows without a caption embedding (score NaN) are removed with the reason ``clip_score:no_caption``.
With ``keep_fraction``, the budget is ``round(keep_fraction * n)`` of ALL the rows the step sees, filled
by the best-scored captioned rows (fewer when fewer rows have captions); ties go to the lower position.
Exactly one of ``threshold`` and ``keep_fraction`` may be given; neither means ``keep_fraction=0.3``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from core.errors import ConfigError
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
from core.registry import ParamSpec

DEFAULT_KEEP_FRACTION = 0.3
BELOW_THRESHOLD = register_reason("clip_score:below_threshold", "clip score {score:.4f} below the threshold")
NOT_TOP = register_reason("clip_score:below_top_fraction", "clip score {score:.4f} outside the top fraction")
NO_CAPTION = register_reason("clip_score:no_caption", "no caption embedding")


def clip_keep(scores: np.ndarray, *, threshold: float | None = None, n_keep: int | None = None) -> np.ndarray:
    """(n,) bool: ``scores >= threshold``, or the ``n_keep`` best non-NaN scores. NaN is never kept."""
    if threshold is not None:
        return np.nan_to_num(scores, nan=-np.inf) >= threshold
    ranked = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    ranked = ranked[~np.isnan(scores[ranked])][: n_keep or 0]
    keep = np.zeros(len(scores), dtype=bool)
    keep[ranked] = True
    return keep


@register(
    "clip_score",
    summary="keep rows whose image-caption cosine is at least a threshold, or the top fraction",
    paper="Gadre et al., DataComp: In search of the next generation of multimodal datasets (2023)",
    params=[
        ParamSpec("threshold", "float", None, help="keep rows with image-caption cosine >= this", min=-1.0, max=1.0),
        keep_fraction_param(None, "fraction of the input to keep, best scores first (default 0.3 if no threshold)"),
    ],
)
def clip_score(ctx: PruneContext, *, threshold: float | None, keep_fraction: float | None) -> Selection:
    """CLIP-score selection over the context's active rows (needs caption embeddings)."""
    if threshold is not None and keep_fraction is not None:
        raise ConfigError("give clip_score either a threshold or a keep_fraction, not both")
    scores = ctx.clip_scores()[ctx.rows]
    if threshold is None:
        fraction = check_fraction("keep_fraction", keep_fraction or DEFAULT_KEEP_FRACTION)
        keep = clip_keep(scores, n_keep=budget(fraction, ctx.n_active))
    else:
        keep = clip_keep(scores, threshold=threshold)
    names = [NOT_TOP if threshold is None else BELOW_THRESHOLD, NO_CAPTION]
    sel = selection_from_mask(ctx, keep, reason_names=names, reason=np.isnan(scores).astype(np.int16), score=scores)
    return sel if threshold is not None else replace(sel, params={"keep_fraction": fraction})
