"""DBP: exact capped-simplex quotas against an independent solver (scipy), rounding, re-planning."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from core.cluster import cluster_stats
from core.errors import ConfigError
from core.prune import PruneContext, capped_simplex_projection, dbp_plan, dbp_quotas, round_to_total, select
from core.prune.dbp import softmax


def scipy_projection(target, lower, upper, total):
    """The same QP by SLSQP (an independent general solver), on variables scaled to about [0, 1]."""
    s = float(max(np.max(upper), 1))
    t, lo, hi = target / s, lower / s, upper / s
    res = minimize(lambda y: 0.5 * np.sum((y - t) ** 2), np.clip(t, lo, hi), jac=lambda y: y - t,
                   bounds=list(zip(lo, hi, strict=True)), method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda y: y.sum() - total / s, "jac": lambda y: np.ones_like(y)}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    assert res.success, res.message
    return res.x * s


def random_instance(rng, k):
    sizes = rng.integers(0, 200, k)
    sizes[rng.choice(k, 2, replace=False)] = [1, 2]  # tiny clusters
    complexity = rng.uniform(0.05, 0.6, k)
    return complexity, sizes


@pytest.mark.parametrize("seed", range(6))
def test_projection_matches_scipy_and_kkt(seed):
    rng = np.random.default_rng(seed)
    k = 25
    complexity, sizes = random_instance(rng, k)
    N = int(rng.integers(sizes.sum() // 10, sizes.sum()))
    lower = np.maximum(np.minimum(N // k // 2, sizes - 1), 0)
    target = N * softmax(complexity / rng.choice([0.05, 0.5, 5.0]))
    x = capped_simplex_projection(target, lower, sizes, N)
    assert abs(x.sum() - N) < 1e-6 and (x >= lower - 1e-9).all() and (x <= sizes + 1e-9).all()
    assert np.allclose(x, scipy_projection(target, lower, sizes, N), atol=1e-3)
    # KKT: one multiplier lam with x = clip(target - lam, lower, upper)
    free = (x > lower + 1e-9) & (x < sizes - 1e-9)
    if free.any():
        lam = (target - x)[free]
        assert np.ptp(lam) < 1e-8
        assert np.allclose(x, np.clip(target - lam[0], lower, sizes))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
def test_integer_quotas_sum_to_budget_within_bounds_and_within_one_of_the_qp(seed, balance):
    rng = np.random.default_rng(100 + seed)
    k = 30
    complexity, sizes = random_instance(rng, k)
    keep = float(rng.uniform(0.2, 0.9))
    q = dbp_quotas(complexity, sizes, keep_fraction=keep, tau=0.3, balance=balance)
    N = int(np.floor(keep * sizes.sum() + 0.5))
    assert q.n_budget == N and q.quota.sum() == N and q.quota.dtype == np.int64
    m = int(np.floor(N / k * balance)) if balance > 0 else 1
    assert (q.lower == np.maximum(np.minimum(m, sizes - 1), 0)).all()
    assert (q.quota >= q.lower).all() and (q.quota <= sizes).all()
    qp = scipy_projection(N * softmax(complexity / 0.3), q.lower, sizes, N)
    assert np.abs(q.quota - qp).max() <= 1.0 + 1e-3


def test_round_to_total_edge_cases():
    assert round_to_total(np.array([0.5, 0.5, 0.5, 0.5]), np.zeros(4), np.ones(4), 2).tolist() == [1, 1, 0, 0]
    assert round_to_total(np.array([2.0, 3.0]), np.zeros(2), np.array([2, 3]), 5).tolist() == [2, 3]
    assert round_to_total(np.array([2.9999999999, 2.0000000001]), np.zeros(2), np.array([3, 3]), 5).tolist() == [3, 2]
    with pytest.raises(ConfigError):
        round_to_total(np.array([1.0, 1.0]), np.zeros(2), np.ones(2), 3)


def test_infeasible_and_bad_settings_are_config_errors():
    sizes = np.array([5, 5, 5, 5])
    with pytest.raises(ConfigError, match="fewer than"):  # balance 0: one per cluster, budget 2 < 4
        dbp_quotas(np.ones(4), sizes, keep_fraction=0.1, balance=0.0)
    for kw in ({"keep_fraction": 0.0}, {"keep_fraction": 1.5}, {"keep_fraction": 0.5, "tau": 0.0},
               {"keep_fraction": 0.5, "balance": 1.5}):
        with pytest.raises(ConfigError):
            dbp_quotas(np.ones(4), sizes, **kw)
    with pytest.raises(ConfigError, match="outside the feasible"):
        capped_simplex_projection(np.ones(3), np.zeros(3), np.ones(3), 4.0)


def test_selection_keeps_the_hardest_per_cluster_and_replans_consistently(planted):
    ctx = planted.context()
    sel = select(ctx, "dbp", keep_fraction=0.4, tau=0.2)
    pc = sel.per_cluster
    assert pc["kept"].tolist() == pc["quota"].tolist() and pc["kept"].sum() == round(0.4 * ctx.n)
    stats = cluster_stats(planted.labels, planted.dist, planted.centroids)
    assert np.allclose(pc["complexity"], stats["complexity"])
    for c in range(ctx.k):  # the kept members of a cluster are its farthest ones
        members = np.flatnonzero(planted.labels == c)
        kept = np.intersect1d(members, sel.kept)
        if 0 < len(kept) < len(members):
            assert planted.dist[kept].min() >= planted.dist[np.setdiff1d(members, kept)].max()
    plan = dbp_plan(ctx)
    for tau, keep in ((0.05, 0.3), (1.0, 0.7), (0.2, 0.4)):  # re-plans equal fresh computations
        fresh = select(planted.context(), "dbp", keep_fraction=keep, tau=tau)
        assert (plan.quotas(keep, tau).quota == fresh.per_cluster["quota"]).all()
    assert np.isin(sel.removed, planted.dist.argsort()[: len(sel.removed) // 2]).any()
    assert (select(ctx, "dbp", keep_fraction=0.4, tau=0.2).kept == sel.kept).all()


def test_empty_clusters_get_no_quota_and_lower_temperature_follows_complexity(planted):
    C = np.concatenate([planted.centroids, np.eye(planted.centroids.shape[1], dtype=np.float32)[:2]])
    ctx = PruneContext.from_arrays(planted.ids, planted.labels, planted.dist, C)
    sel = select(ctx, "dbp", keep_fraction=0.5)
    assert sel.per_cluster["quota"].tolist()[-2:] == [0, 0] and len(sel.kept) == round(0.5 * ctx.n)
    q = dbp_quotas(np.array([1.0, 1.1, 1.2]), np.array([100, 100, 100]), keep_fraction=0.3, tau=0.1, balance=0.0)
    assert q.quota[2] > q.quota[1] > q.quota[0] >= 1  # the most complex cluster gets the most
