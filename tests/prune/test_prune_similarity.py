"""The `similarity` pruning method: the paper's rule, most similar, near/far splits, chains, workspace analyses."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import ConfigError, DataError
from core.prune import run_chain, select
from core.prune.similarity import SimilarityTable, closer_counts


def test_closer_than_reference_removes_exactly_the_closer_rows(planted):
    ctx = planted.context()
    table = planted.similarity
    sel = select(ctx, "similarity")
    want = np.flatnonzero(table.closer.any(1))
    assert np.array_equal(sel.removed, want) and len(want) > 0
    assert sel.params["analysis"] == "planted" and sel.params["benchmarks"] == "near,far"
    assert closer_counts(ctx)["any benchmark (removed)"] == len(want)
    only_far = select(ctx, "similarity", benchmarks="far")
    assert np.array_equal(only_far.removed, np.flatnonzero(table.closer[:, 1]))
    assert np.allclose(sel.score, np.nanmax(table.max_sim[want], axis=1))


def test_most_similar_removes_the_top_rows_and_ignores_unanalysed_ones(planted):
    ctx = planted.context()
    sims = np.nanmax(np.where(np.isnan(planted.similarity.max_sim), -np.inf, planted.similarity.max_sim), axis=1)
    sel = select(ctx, "similarity", mode="most_similar", count=25)
    assert np.array_equal(sel.removed, np.sort(np.argsort(-sims, kind="stable")[:25]))
    by_fraction = select(ctx, "similarity", mode="most_similar", keep_fraction=0.9)
    assert len(by_fraction.kept) == round(0.9 * ctx.n)
    assert not np.isin(np.flatnonzero(np.isnan(planted.similarity.max_sim).all(1)), by_fraction.removed).any()


@pytest.mark.parametrize("mode", ["near", "far"])
def test_splits_keep_the_nearest_or_farthest_analysed_rows(planted, mode):
    ctx = planted.context()
    raw = planted.similarity.max_sim
    sims = np.where(np.isnan(raw).all(1), np.nan, np.nanmax(np.nan_to_num(raw, nan=-np.inf), axis=1))
    analysed = np.flatnonzero(~np.isnan(sims))
    sel = select(ctx, "similarity", mode=mode, count=40)
    order = analysed[np.argsort(-sims[analysed] if mode == "near" else sims[analysed], kind="stable")]
    assert np.array_equal(sel.kept, np.sort(order[:40]))
    counts = sel.reason_counts()
    assert counts["similarity:not_analysed"] == ctx.n - len(analysed)
    with pytest.raises(DataError, match="analysed rows"):
        select(ctx, "similarity", mode=mode, count=len(analysed) + 1)


def test_chain_after_dedup_sees_only_its_input(planted):
    ctx = planted.context()
    sel = run_chain(ctx, [("random", {"keep_fraction": 0.6}), ("similarity", {})])
    first = select(ctx, "random", keep_fraction=0.6)
    closer = planted.similarity.closer.any(1)
    assert np.array_equal(sel.kept, first.kept[~closer[first.kept]])
    assert set(sel.reason_counts()) == {"random:not_drawn", "similarity:closer_than_reference"}


@pytest.mark.parametrize(("params", "match"), [
    ({"count": 3}, "takes no count"),
    ({"mode": "near"}, "exactly one of count and keep_fraction"),
    ({"mode": "far", "count": 3, "keep_fraction": 0.5}, "exactly one"),
    ({"benchmarks": "sketch"}, "'sketch' is not in analysis 'planted'; it has near, far"),
    ({"mode": "most_similar", "count": 10_000}, "exceeds"),
])
def test_bad_parameters(planted, params, match):
    with pytest.raises(ConfigError, match=match):
        select(planted.context(), "similarity", **params)


def test_a_context_without_an_analysis_says_what_to_run(planted):
    ctx = planted.context(similarity=None)
    with pytest.raises(DataError) as exc:
        select(ctx, "similarity")
    assert "prunescope similarity" in exc.value.one_line()


def test_table_shape_is_checked():
    with pytest.raises(DataError, match="needs"):
        SimilarityTable("a", ("x", "y"), np.zeros((3, 1), np.float32), np.zeros((3, 1), bool))


# -- workspace -------------------------------------------------------------------------------------
def _img_release(root, X, prefix):
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    np.save(root / "img_emb" / "img_emb_0.npy", X.astype(np.float16))
    pq.write_table(pa.table({"key": [f"{prefix}{i:03d}" for i in range(len(X))], "caption": ["x"] * len(X)}),
                   root / "metadata" / "metadata_0.parquet")


@pytest.fixture(scope="module")
def analysed_ws(tmp_path_factory):
    """The pruning tests' clustered release plus a reference set and two benchmarks, analysed once."""
    from core.clustering import ClusterConfig, run_clustering
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings, load_embeddings
    from core.similarity_stage import SimilarityConfig, run_similarity
    from core.workspace import Workspace
    from tests.prune.conftest import write_release

    tmp = tmp_path_factory.mktemp("sim_ws")
    write_release(tmp / "release")
    ws = Workspace(tmp / "ws")
    register_dataset(ws, "pool", "laion", tmp / "release")
    pool = import_laion_embeddings(ws, "pool", model="synthetic", modality="both")
    clustering = run_clustering(ws, ClusterConfig(embedding_set=pool.id, k=3, seed=0, n_neighbors=2)).id
    _, P = load_embeddings(ws, pool.id, "image")
    rng = np.random.default_rng(1)
    noisy = {"ref": (P[::3], 0.4), "val": (P[:10], 0.05), "sketch": (rng.normal(size=(6, P.shape[1])), 0.0)}
    sets = {}
    for name, (base, scale) in noisy.items():
        X = np.asarray(base, np.float64) + scale * rng.normal(size=base.shape)
        _img_release(tmp / name, X / np.linalg.norm(X, axis=1, keepdims=True), name)
        register_dataset(ws, name, "laion", tmp / name)
        sets[name] = import_laion_embeddings(ws, name, model="synthetic").id
    run_similarity(ws, SimilarityConfig(pool_set=pool.id, reference_set=sets["ref"],
                                        benchmark_sets=(sets["val"], sets["sketch"]), analysis_id="sim1"))
    return ws, clustering


def test_workspace_pruning_removes_the_analysis_closer_ids(analysed_ws):
    from core.prune.manifest import PruneConfig, load_manifest, run_pruning
    from core.similarity_stage import load_similarity

    ws, clustering = analysed_ws
    info = run_pruning(ws, PruneConfig(clustering_id=clustering, chain=(("similarity", {}),), pruning_id="sim-prune"))
    manifest = load_manifest(ws, info.id)
    removed = set(manifest.loc[~manifest["kept"], "id"])
    want = set()
    for bench in ("val", "sketch"):
        pool = load_similarity(ws, "sim1", bench, "pool")
        want |= set(pool.loc[pool["closer"], "id"])
    assert removed == want and len(want) > 0
    assert info.meta["chain_run"][0][1]["analysis"] == "sim1"  # the default analysis is recorded resolved


def test_workspace_named_analysis_and_missing_ones(analysed_ws):
    from core.prune import PruneContext

    ws, clustering = analysed_ws
    ctx = PruneContext.from_clustering(ws, clustering)
    assert closer_counts(ctx, "sim1")["val"] >= 5
    with pytest.raises(DataError, match="not found"):
        select(ctx, "similarity", analysis="nope")
