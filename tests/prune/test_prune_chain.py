"""Chains: each step sees the previous step's kept rows; reasons name the step; original positions."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError, DataError, UnknownName
from core.prune import run_chain, select


def test_semdedup_then_dbp(planted):
    ctx = planted.context()
    chain = run_chain(ctx, [("semdedup", {"eps": 0.05}), ("dbp", {"keep_fraction": 0.5, "tau": 0.3})])
    dedup = select(planted.context(), "semdedup", eps=0.05)
    dbp = select(ctx.subset(dedup.kept), "dbp", keep_fraction=0.5, tau=0.3)
    assert (chain.kept == dbp.kept).all()  # positions relative to the original pool
    assert len(chain.kept) == round(0.5 * len(dedup.kept))
    assert np.sort(np.concatenate([chain.kept, chain.removed])).tolist() == list(range(ctx.n))
    by_step = {0: set(dedup.removed.tolist()), 1: set(dbp.removed.tolist())}
    for step, reason in ((0, "semdedup:duplicate"), (1, "dbp:over_quota")):
        rows = chain.removed[chain.step == step]
        assert set(rows.tolist()) == by_step[step]
        assert set(chain.reasons[chain.step == step]) == {reason}
    dup = chain.step == 0  # refs of duplicates are original positions of the member they duplicate
    assert np.allclose((planted.X[chain.removed[dup]] * planted.X[chain.ref[dup]]).sum(1), chain.score[dup], atol=1e-5)
    assert chain.method == "semdedup>dbp" and [m for m, _ in chain.chain] == ["semdedup", "dbp"]
    assert chain.chain[1][1]["keep_fraction"] == 0.5 and chain.params["fraction_of"] == "input"
    pc = chain.per_cluster
    assert (pc["step1_removed"] + pc["step2_removed"] == pc["removed"]).all() and "step2_quota" in pc


def test_fractions_of_the_pool(planted):
    ctx = planted.context()
    chain = run_chain(ctx, [("semdedup", {"eps": 0.05}), ("ssp", {"keep_fraction": 0.4})], fraction_of="pool")
    assert len(chain.kept) == round(0.4 * ctx.n)
    ran = chain.chain[1][1]["keep_fraction"]
    assert ran > 0.4 and chain.params["chain"][1] == ["ssp", {"keep_fraction": 0.4}]
    with pytest.raises(ConfigError, match="step 2 \\(random\\).*rows reach this step"):
        run_chain(ctx, [("random", {"keep_fraction": 0.3}), ("random", {"keep_fraction": 0.5})], fraction_of="pool")


def test_chain_errors(planted):
    ctx = planted.context()
    with pytest.raises(UnknownName):
        run_chain(ctx, [("semdedup", {}), ("dpb", {})])
    with pytest.raises(ConfigError, match="at least one step"):
        run_chain(ctx, [])
    with pytest.raises(ConfigError, match="fraction_of"):
        run_chain(ctx, ["random"], fraction_of="total")
    single = run_chain(ctx, ["random"])
    assert (single.kept == select(ctx, "random").kept).all() and single.method == "random"


@pytest.mark.parametrize("order", ["hard", "easy", "random"])
def test_subset_grouping_derived_from_the_parent_equals_a_fresh_sort(order):
    from dataclasses import replace

    from core.prune import PruneContext

    rng = np.random.default_rng(0)
    n, k = 500, 7
    dist = rng.random(n).astype(np.float32)
    dist[::10] = dist[1::10]  # ties, broken by position
    ctx = PruneContext.from_arrays([f"r{i}" for i in range(n)], rng.integers(0, k, n), dist,
                                   np.eye(k, 8, dtype=np.float32), seed=3)
    ctx.grouped(order)
    rows = np.sort(rng.choice(n, 300, replace=False))
    sub = ctx.subset(rows)
    derived = sub.grouped(order)
    fresh = replace(sub, cache={}).grouped(order)
    assert np.array_equal(derived[0], fresh[0]) and np.array_equal(derived[1], fresh[1])
    outside = int(np.setdiff1d(np.arange(n), rows)[0])
    with pytest.raises(DataError, match="active rows"):
        sub.subset(np.array(sorted([int(rows[-1]), outside])))


def test_chain_steps_reused_from_the_context_cache_give_identical_results():
    from dataclasses import replace

    from core.prune import PruneContext

    rng = np.random.default_rng(1)
    n, k, d = 400, 6, 8
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[200:260] = X[100:160] + 1e-4  # planted near-duplicates
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    C = np.linalg.qr(rng.normal(size=(d, d)))[0][:k].astype(np.float32)
    labels = (X @ C.T).argmax(1)
    dist = 1 - (X * C[labels]).sum(1)
    ctx = PruneContext.from_arrays([f"r{i}" for i in range(n)], labels, dist, C, embeddings=X)
    chains = [[("semdedup", {"eps": 0.01}), ("dbp", {"keep_fraction": f})] for f in (0.5, 0.3, 0.5, 0.7)]
    for chain in chains:
        warm = run_chain(ctx, chain)
        cold = run_chain(replace(ctx, cache={}, shared={}), chain)
        assert np.array_equal(warm.kept, cold.kept) and np.array_equal(warm.removed, cold.removed)
        assert np.array_equal(warm.reason, cold.reason) and np.array_equal(warm.step, cold.step)
    assert len(ctx.cache["chain_steps"]) <= 6
