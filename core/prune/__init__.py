"""Pruning web-scale image-text pools: one interface, one module per method, one registry.

Methods (``METHODS``, each in its own module): ``random`` (random_baseline.py), ``clip_score``,
``semdedup``, ``ssp``, ``dbp``, ``similarity`` (train-test similarity, from a finished analysis). Each
takes a :class:`PruneContext` and returns a :class:`Selection`
(kept positions, removed positions with a reason, per-cluster counts)::

    ctx = PruneContext.from_clustering(ws, "pool.k100.s1234")
    sel = select(ctx, "semdedup", eps=0.05)
    sel = run_chain(ctx, [("semdedup", {"eps": 0.05}), ("dbp", {"keep_fraction": 0.5})])

Interactive tuning reuses per-context plans: :func:`semdedup_plan` (eps -> kept for any eps, the whole
curve) and :func:`dbp_plan` (quotas for any tau / keep fraction in milliseconds). Manifests (parquet
of kept and removed ids with reasons, registered in the catalog's ``prunings``) and exports (DataComp
subset npy, id list, webdataset keys) live in :mod:`core.prune.manifest`.
"""

from core.prune import clip_score, dbp, random_baseline, semdedup, similarity, ssp  # noqa: F401  (registers the methods)
from core.prune.base import (
    METHODS,
    ORDERS,
    ArrayEmbeddings,
    EmbeddingSource,
    PruneContext,
    Selection,
    register,
    register_reason,
)
from core.prune.chain import FRACTION_OF, run_chain, select
from core.prune.dbp import DBPPlan, capped_simplex_projection, dbp_plan, dbp_quotas, round_to_total
from core.prune.semdedup import SemDeDupPlan, semdedup_groups, semdedup_max_similarity, semdedup_plan

__all__ = [
    "FRACTION_OF", "METHODS", "ORDERS", "ArrayEmbeddings", "DBPPlan", "EmbeddingSource", "PruneContext",
    "SemDeDupPlan", "Selection", "capped_simplex_projection", "dbp_plan", "dbp_quotas", "register",
    "register_reason", "round_to_total", "run_chain", "select", "semdedup_groups", "semdedup_max_similarity",
    "semdedup_plan",
]
