"""Density-based pruning (DBP): per-cluster quotas from cluster complexity, then the hardest per cluster.

Ref: Abbas, Rusak, Tirumala, Brendel, Chaudhuri, Morcos, "Effective pruning of web-scale datasets based
on complexity of concept clusters" (ICLR 2024); code: amro-kamal/effective_pruning. Steps (ALGORITHMS.md):

1. (SemDeDup first: chain ``semdedup`` then ``dbp``, see :func:`core.prune.run_chain`.)
2. Complexity per cluster ``C_j = d_inter(j) * d_intra(j)`` over the rows the step sees
   (:func:`core.cluster.cluster_stats`, which gives clusters with < 3 members the mean C).
3. ``P = softmax(C / tau)``; tau defaults to 0.5 (the code's default; the paper's value is unverified).
4. Budget ``N = round(keep_fraction * total)`` (the reference ``--prune-ratio`` is the fraction KEPT).
5. Quotas ``x = argmin 0.5 ||x - N P||^2`` s.t. ``sum x = N``, ``lb_j <= x_j <= n_j`` with
   ``lb_j = max(0, min(m, n_j - 1))``, ``m = floor(N / k * balance)``, and ``m = 1`` when balance is 0
   (the reference code's rule). Solved exactly by :func:`capped_simplex_projection` (no QP solver),
   then rounded to integers summing exactly to N within the bounds by :func:`round_to_total`.
6. In each cluster keep the ``x_j`` members farthest from the centroid (``order="hard"``; easy/random
   optional).

Infeasible budgets: with ``0 <= balance <= 1`` the lower bounds always fit (``sum lb <= k m <= N``); with
``balance = 0`` (m = 1) a budget below the number of clusters with >= 2 members cannot give each one
row, and that is a ConfigError saying so (no silent clamping).

:class:`DBPPlan` keeps the per-cluster sizes, complexities and ordered members, so a new tau, balance
or keep fraction re-plans in about a millisecond at 10k clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import ConfigError
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
from core.registry import ParamSpec

OVER_QUOTA = register_reason("dbp:over_quota", "beyond the quota of cluster {cluster} (distance {score:.4f})")


# -- array core ------------------------------------------------------------------------------------
def capped_simplex_projection(target: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection of ``target`` onto ``{x : sum x = total, lower <= x <= upper}``.

    The solution is ``x(lam) = clip(target - lam, lower, upper)`` for the multiplier lam at which
    ``g(lam) = sum x(lam) = total``; g is piecewise linear and non-increasing with breakpoints
    ``target - upper`` and ``target - lower``. A bisection over the sorted breakpoints finds the
    linear piece holding the root, and the root is then solved for exactly on that piece. O(k log k).

    Args:
        target: (k,) point to project (DBP: ``N * P``). lower, upper: (k,) bounds, lower <= upper.
        total: the required sum.

    Returns:
        (k,) float64 x.

    Raises:
        ConfigError: shapes differ, lower > upper somewhere, or total is outside [sum lower, sum upper].
    """
    t, lo, hi = (np.asarray(a, dtype=np.float64) for a in (target, lower, upper))
    if not t.shape == lo.shape == hi.shape or t.ndim != 1:
        raise ConfigError(f"target, lower and upper must be 1-D of one length; got {t.shape}, {lo.shape}, {hi.shape}")
    if (lo > hi).any():
        raise ConfigError("every lower bound must be <= its upper bound")
    s_lo, s_hi = lo.sum(), hi.sum()
    if not s_lo <= total <= s_hi:
        raise ConfigError(f"total {total} is outside the feasible range [{s_lo:g}, {s_hi:g}]")
    if total == s_hi:
        return hi.copy()
    if total == s_lo:
        return lo.copy()
    a, b = t - hi, t - lo  # lam <= a_j: x_j = upper; lam >= b_j: x_j = lower
    bps = np.sort(np.concatenate([a, b]))  # repeated values are harmless: g differs across the bracket
    left, right = 0, len(bps) - 1  # g(bps[left]) >= total > g(bps[right])
    while right - left > 1:
        mid = (left + right) // 2
        if np.clip(t - bps[mid], lo, hi).sum() >= total:
            left = mid
        else:
            right = mid
    lam0 = bps[left]
    g0 = np.clip(t - lam0, lo, hi).sum()
    free = (a <= lam0) & (b >= bps[right])  # coordinates moving with lam on (bps[left], bps[right])
    lam = lam0 + (g0 - total) / max(int(free.sum()), 1)
    return np.clip(t - lam, lo, hi)


def round_to_total(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int) -> np.ndarray:
    """Integers within 1 of ``x`` that sum exactly to ``total`` and respect integer bounds.

    Floors ``x`` (clipped to the bounds), then adds 1 to the entries with the largest fractional parts
    that are below their upper bound (ties: lower index first) until the sum is ``total`` (or removes
    1 from the smallest fractional parts above their lower bound, if rounding overshot).

    Returns:
        (k,) int64. Raises ConfigError when no integer point within the bounds sums to ``total``.
    """
    lo = np.asarray(lower, dtype=np.int64)
    hi = np.asarray(upper, dtype=np.int64)
    q = np.clip(np.floor(np.asarray(x, dtype=np.float64)), lo, hi).astype(np.int64)
    frac = np.asarray(x, dtype=np.float64) - q
    rem = int(total - q.sum())
    if rem > 0:
        cand = np.flatnonzero(q < hi)
        pick = cand[np.argsort(-frac[cand], kind="stable")[:rem]]
        q[pick] += 1
    elif rem < 0:
        cand = np.flatnonzero(q > lo)
        pick = cand[np.argsort(frac[cand], kind="stable")[:-rem]]
        q[pick] -= 1
    if q.sum() != total:
        raise ConfigError(f"no integer quotas within the bounds sum to {total}")
    return q


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a 1-D array."""
    e = np.exp(z - z.max())
    return np.asarray(e / e.sum(), dtype=np.float64)


@dataclass(frozen=True)
class Quotas:
    """One DBP plan: budget N, probabilities P, bounds, continuous and integer quotas (all (k,))."""

    n_budget: int
    probability: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    continuous: np.ndarray
    quota: np.ndarray


def dbp_quotas(complexity: np.ndarray, sizes: np.ndarray, *, keep_fraction: float, tau: float = 0.5,
               balance: float = 0.5) -> Quotas:
    """DBP steps 3-5: quotas per cluster.

    Args:
        complexity: (k,) C_j (larger = more complex = more rows kept). sizes: (k,) rows per cluster.
        keep_fraction: fraction of ``sizes.sum()`` to keep, in (0, 1]. tau: softmax temperature > 0.
        balance: cluster-balance ratio in [0, 1]; each cluster keeps at least
            ``min(floor(N/k * balance), n_j - 1)`` (1 instead when balance is 0).

    Returns:
        :class:`Quotas`; ``quota`` sums exactly to N and lies within ``[lower, upper]``.
    """
    check_fraction("keep_fraction", keep_fraction)
    if not tau > 0:
        raise ConfigError(f"tau must be > 0; got {tau}")
    if not 0.0 <= balance <= 1.0:
        raise ConfigError(f"balance must be in [0, 1]; got {balance}")
    sizes = np.asarray(sizes, dtype=np.int64)
    k, total = len(sizes), int(sizes.sum())
    n_budget = budget(keep_fraction, total)
    m = int(np.floor(n_budget / k * balance)) if balance > 0 else 1
    lower = np.maximum(np.minimum(m, sizes - 1), 0)
    if lower.sum() > n_budget:
        raise ConfigError(f"keep_fraction {keep_fraction} keeps {n_budget} rows, fewer than the {int(lower.sum())} "
                          f"that give every cluster its minimum of {m}",
                          hint="raise keep_fraction, or use a balance > 0")
    P = softmax(np.asarray(complexity, dtype=np.float64) / tau)
    x = capped_simplex_projection(n_budget * P, lower, sizes, n_budget)
    return Quotas(n_budget, P, lower, sizes, x, round_to_total(x, lower, sizes, n_budget))


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DBPPlan:
    """Everything a DBP re-plan needs, precomputed once per context, order and n_neighbors.

    Attributes:
        positions: (n_active,) int64 original positions grouped by cluster, each cluster in ``order``.
        bounds: (k+1,) int64 cluster c's rows are ``positions[bounds[c]:bounds[c+1]]``.
        rank: (n_active,) int64 place of each grouped row within its cluster.
        at: (n_active,) int64 index of each grouped row in the context's ``rows``.
        stats: :func:`core.cluster.cluster_stats` of the active rows (size, d_intra, d_inter, complexity).
    """

    order: str
    positions: np.ndarray
    bounds: np.ndarray
    rank: np.ndarray
    at: np.ndarray
    stats: pd.DataFrame

    @classmethod
    def build(cls, ctx: PruneContext, order: str = "hard", *, n_neighbors: int = 20) -> DBPPlan:
        from core.cluster import cluster_stats  # faiss stays out of `import core.prune`

        if ctx.k < 2:
            raise ConfigError(f"DBP needs at least 2 clusters, got {ctx.k}")
        positions, bounds = ctx.grouped(order)
        stats = cluster_stats(ctx.labels[ctx.rows], ctx.dist[ctx.rows], ctx.centroids, n_neighbors=n_neighbors)
        sizes = np.diff(bounds)
        rank = np.arange(len(positions), dtype=np.int64) - np.repeat(bounds[:-1], sizes)
        return cls(order, positions, bounds, rank, ctx.row_index()[positions], stats)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def quotas(self, keep_fraction: float, tau: float = 0.5, balance: float = 0.5) -> Quotas:
        """Re-plan for new settings (no embeddings, no sorting of rows)."""
        return dbp_quotas(self.stats["complexity"].to_numpy(), self.sizes, keep_fraction=keep_fraction, tau=tau,
                          balance=balance)

    def keep_mask(self, quota: np.ndarray) -> np.ndarray:
        """(n_active,) bool over the context's rows: the first ``quota[c]`` rows of each cluster. O(n)."""
        keep = np.empty(len(self.positions), dtype=bool)
        keep[self.at] = self.rank < np.repeat(np.asarray(quota, dtype=np.int64), self.sizes)
        return keep


def dbp_plan(ctx: PruneContext, order: str = "hard", n_neighbors: int = 20) -> DBPPlan:
    """The context's plan, computed once and cached on the context."""
    key = ("dbp_plan", order, n_neighbors)
    if key not in ctx.cache:
        ctx.cache[key] = DBPPlan.build(ctx, order, n_neighbors=n_neighbors)
    plan: DBPPlan = ctx.cache[key]
    return plan


@register(
    "dbp",
    summary="density-based pruning: per-cluster quotas from cluster complexity, then the hardest per cluster",
    paper="Abbas, Rusak et al., Effective pruning of web-scale datasets based on complexity of concept clusters (ICLR 2024)",
    params=[
        keep_fraction_param(0.5, "fraction of this step's input rows to keep (the reference --prune-ratio)"),
        ParamSpec("tau", "float", 0.5, help="softmax temperature over complexities (> 0; code default 0.5)",
                  min=0.0, max=100.0),
        ParamSpec("balance", "float", 0.5, help="cluster-balance ratio: each cluster keeps >= floor(N/k * balance) "
                  "(1 when 0)", min=0.0, max=1.0),
        order_param(" (which members fill a cluster's quota)"),
        ParamSpec("n_neighbors", "int", 20, help="nearest other centroids averaged in d_inter", min=1),
    ],
)
def dbp(ctx: PruneContext, *, keep_fraction: float, tau: float, balance: float, order: str,
        n_neighbors: int) -> Selection:
    """DBP selection over the context's active rows (see the module docstring)."""
    check_fraction("keep_fraction", keep_fraction)
    plan = dbp_plan(ctx, order, n_neighbors)
    q = plan.quotas(keep_fraction, tau, balance)
    keep = plan.keep_mask(q.quota)
    extra = {"complexity": plan.stats["complexity"].to_numpy(), "probability": q.probability, "quota": q.quota}
    return selection_from_mask(ctx, keep, reason_names=[OVER_QUOTA], score=ctx.dist[ctx.rows], extra=extra)
