"""UMAP maps: the array layer (determinism, structure, fit-on-sample, small n) and the cached workspace layer."""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import core.project as project
from core.clustering import ClusterConfig, gather_embeddings, load_assignments, run_clustering
from core.datasets import register_dataset
from core.embed import import_laion_embeddings
from core.errors import ConfigError, DataError, UnknownName
from core.project import (
    MapConfig,
    centroid_map,
    compute_maps,
    fit_positions,
    has_member_map,
    member_map,
    umap_2d,
)
from core.workspace import Workspace

K = 4


def _blobs(n_per: int = 60, n_blobs: int = 3, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs on the unit sphere: (n, dim) float32 rows and (n,) blob labels."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_blobs]
    X = np.concatenate([c + 0.15 * rng.normal(size=(n_per, dim)) for c in centres])
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(n_blobs), n_per)


def _nn_label_agreement(Y: np.ndarray, labels: np.ndarray, ref: np.ndarray | None = None) -> float:
    """Share of points whose nearest other 2-D point (among ``ref`` rows, default all) has their label."""
    ref = np.arange(len(Y)) if ref is None else ref
    d = ((Y[:, None, :] - Y[None, ref, :]) ** 2).sum(-1)
    d[ref, np.arange(len(ref))] = np.inf  # a point is not its own neighbour
    return float((labels[ref[d.argmin(1)]] == labels).mean())


@pytest.fixture(scope="module")
def blobs():
    return _blobs()


@pytest.fixture(scope="module")
def blob_map(blobs):
    """The one full UMAP fit of the blobs every array test compares against (pays numba's JIT once)."""
    return umap_2d(blobs[0], seed=0)


# -- array layer ------------------------------------------------------------------------------------
def test_same_seed_same_map_other_seed_other_map(blobs, blob_map):
    X, _ = blobs
    assert blob_map.shape == (len(X), 2) and blob_map.dtype == np.float32 and np.isfinite(blob_map).all()
    assert np.array_equal(umap_2d(X, seed=0), blob_map)
    assert not np.allclose(umap_2d(X, seed=1), blob_map)


def test_separated_blobs_stay_separated_and_output_is_standardised(blobs, blob_map):
    _, labels = blobs
    assert _nn_label_agreement(blob_map, labels) > 0.95
    assert np.allclose(blob_map.mean(0), 0, atol=1e-4)
    assert np.sqrt((blob_map ** 2).sum(1).mean()) == pytest.approx(1, abs=1e-4)


def test_fit_on_sample_keeps_fitted_coordinates_and_places_the_rest(blobs):
    X, labels = blobs
    Y = umap_2d(X, seed=0, fit_sample=100)
    assert Y.shape == (len(X), 2) and np.isfinite(Y).all()
    assert np.array_equal(Y, umap_2d(X, seed=0, fit_sample=100))  # transform is seeded too
    fit = fit_positions(len(X), 100, 0)
    assert len(fit) == 100 and np.array_equal(fit, np.sort(np.random.default_rng(0).choice(len(X), 100, replace=False)))
    assert np.allclose(Y[fit], umap_2d(X[fit], seed=0, fit_sample=100), atol=1e-6)  # the same fit, standardised alike
    rest = np.setdiff1d(np.arange(len(X)), fit)
    d = ((Y[rest, None, :] - Y[None, fit, :]) ** 2).sum(-1)
    assert (labels[fit[d.argmin(1)]] == labels[rest]).mean() > 0.9  # transformed rows land in their blob


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_small_n_falls_back_to_pca(n):
    X = np.random.default_rng(n).normal(size=(n, 8))
    Y = umap_2d(X)
    assert Y.shape == (n, 2) and Y.dtype == np.float32 and np.isfinite(Y).all()
    assert np.array_equal(Y, umap_2d(X))
    if n >= 2:
        assert len(np.unique(Y.round(5), axis=0)) == n
    if n == 1:
        assert np.array_equal(Y, np.zeros((1, 2), np.float32))


def test_pca_fallback_matches_brute_force_distances():
    X = np.random.default_rng(3).normal(size=(5, 2)) * [3.0, 1.0]  # 2-D data: PCA is a rigid motion
    Y = umap_2d(X, metric="euclidean")
    D = lambda A: np.linalg.norm(A[:, None] - A[None], axis=-1)  # noqa: E731
    assert np.allclose(D(Y) / D(Y).max(), D(X) / D(X).max(), atol=1e-5)


@pytest.mark.parametrize(("X", "fragment"), [
    (np.ones(10), "2-D"), (np.ones((2, 3, 4)), "2-D"), (np.array([["a", "b"]] * 10), "numeric"),
    (np.ones((10, 0)), "no columns"),
])
def test_bad_shape_is_a_data_error(X, fragment):
    with pytest.raises(DataError, match=fragment):
        umap_2d(X)


def test_non_finite_row_is_a_data_error(blobs):
    X = blobs[0].copy()
    X[7, 3] = np.nan
    X[9, 0] = np.inf
    with pytest.raises(DataError, match="2 of 180 rows .* NaN or inf .* row 7"):
        umap_2d(X)


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"n_neighbors": 1}, "n_neighbors"), ({"min_dist": 1.5}, "min_dist"), ({"min_dist": float("nan")}, "min_dist"),
    ({"seed": -1}, "seed"), ({"seed": True}, "seed"), ({"fit_sample": 3}, "fit_sample"),
    ({"n_neighbors": 2.5}, "n_neighbors"), ({"metric": "cosin"}, "available: cosine"),
])
def test_bad_config_is_a_config_error(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        MapConfig(**kw)
    with pytest.raises(ConfigError, match=fragment):
        umap_2d(np.ones((3, 4)), **kw)


def test_config_key_is_stable_and_tells_configs_apart():
    assert MapConfig().key == MapConfig(seed=np.int64(0), min_dist=0.1).key
    assert len(MapConfig().key) == 10
    keys = {MapConfig(**kw).key for kw in ({}, {"seed": 1}, {"n_neighbors": 10}, {"min_dist": 0.2},
                                           {"fit_sample": 100}, {"metric": "euclidean"})}
    assert len(keys) == 6


# -- workspace layer --------------------------------------------------------------------------------
def _release(root: Path, per_concept: int = 30, dim: int = 16) -> None:
    """K well-separated concepts as a LAION-style release in two partitions."""
    X, _ = _blobs(per_concept, K, dim, seed=1)
    order = np.random.default_rng(1).permutation(len(X))
    for p, part in enumerate(np.array_split(order, 2)):
        (root / "img_emb").mkdir(parents=True, exist_ok=True)
        np.save(root / "img_emb" / f"img_emb_{p}.npy", X[part].astype(np.float16))
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": [f"s{i:04d}" for i in part], "caption": [f"thing {i % K}" for i in part]}),
                       root / "metadata" / f"metadata_{p}.parquet")


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A workspace with one embedding set of 4 x 30 rows and a k=4 clustering of it: (ws, clustering id, set id)."""
    root = tmp_path_factory.mktemp("maps")
    _release(root / "laion")
    ws = Workspace(root / "ws")
    register_dataset(ws, "pool", "laion", root / "laion")
    set_id = import_laion_embeddings(ws, "pool", model="synthetic").id
    info = run_clustering(ws, ClusterConfig(embedding_set=set_id, k=K, seed=0, n_neighbors=2))
    return ws, info.id, set_id


def _no_umap(monkeypatch):
    def boom(*_a, **_kw):
        raise AssertionError("umap_2d called: the map should have come from the cache")
    monkeypatch.setattr(project, "umap_2d", boom)


def test_centroid_map_has_one_row_per_cluster_and_is_cached(clustered, monkeypatch):
    ws, cid, _ = clustered
    cfg = MapConfig(seed=11)
    df = centroid_map(ws, cid, cfg)
    assert list(df.columns) == ["cluster", "x", "y"]
    assert df["cluster"].tolist() == list(range(K)) and np.isfinite(df[["x", "y"]].to_numpy()).all()
    assert (ws.dir("clusters", cid, "maps", cfg.key, "centroids.parquet")).exists()
    _no_umap(monkeypatch)
    again = centroid_map(ws, cid, cfg)
    assert again["cluster"].tolist() == df["cluster"].tolist()
    assert np.array_equal(again[["x", "y"]].to_numpy(), df[["x", "y"]].to_numpy())


def test_member_map_rows_are_the_cluster_members_and_are_cached(clustered, monkeypatch):
    ws, cid, _ = clustered
    cfg = MapConfig(seed=12, n_neighbors=10)
    assignments = load_assignments(ws, cid)
    c = int(assignments["cluster"].iloc[0])
    pos = np.flatnonzero(assignments["cluster"].to_numpy() == c)
    assert not has_member_map(ws, cid, c, cfg)
    df = member_map(ws, cid, c, cfg)
    assert list(df.columns) == ["pos", "id", "row", "x", "y", "dist_to_centroid"]
    assert df["pos"].tolist() == pos.tolist()
    assert df["id"].tolist() == assignments["id"].iloc[pos].tolist()
    assert df["row"].tolist() == assignments["row"].iloc[pos].tolist()
    assert np.array_equal(df["dist_to_centroid"].to_numpy(), assignments["dist_to_centroid"].to_numpy()[pos])
    xy = umap_2d(gather_embeddings(ws, cid, pos), **asdict(cfg))
    assert np.array_equal(df[["x", "y"]].to_numpy(), xy)
    assert has_member_map(ws, cid, c, cfg) and not has_member_map(ws, cid, c, MapConfig(seed=13))
    _no_umap(monkeypatch)
    again = member_map(ws, cid, c, cfg)
    assert again.equals(df)


def test_empty_cluster_gives_an_empty_frame(clustered, monkeypatch):
    ws, cid, _ = clustered
    assignments = load_assignments(ws, cid)
    assignments["cluster"] = assignments["cluster"].replace({3: 2})  # nobody left in cluster 3
    monkeypatch.setattr(project, "load_assignments", lambda *_a: assignments)
    df = member_map(ws, cid, 3, MapConfig(seed=14))
    assert df.empty and list(df.columns) == ["pos", "id", "row", "x", "y", "dist_to_centroid"]
    assert has_member_map(ws, cid, 3, MapConfig(seed=14))


def test_unknown_cluster_or_clustering_lists_what_exists(clustered):
    ws, cid, _ = clustered
    for bad in (K, -1, "0"):
        with pytest.raises(UnknownName, match=rf"valid: 0\.\.{K - 1}"):
            member_map(ws, cid, bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownName, match=f"valid: 0..{K - 1}"):
        compute_maps(ws, cid, clusters=[0, K])
    with pytest.raises(UnknownName, match=f"registered: {cid}"):
        centroid_map(ws, "nope")


def test_compute_maps_reads_shards_once_then_serves_everything_from_cache(clustered, monkeypatch):
    ws, cid, _ = clustered
    cfg = MapConfig(seed=15)
    calls = []
    monkeypatch.setattr(project, "gather_embeddings", lambda *a: calls.append(a[2]) or gather_embeddings(*a))
    assert compute_maps(ws, cid, clusters=[1, 1], cfg=cfg) == {"computed": 2, "cached": 0}
    assert compute_maps(ws, cid, cfg=cfg, progress=True) == {"computed": K - 1, "cached": 2}
    assert len(calls) == 2  # one pass over the shards per call, however many clusters
    assert all(has_member_map(ws, cid, c, cfg) for c in range(K))
    _no_umap(monkeypatch)
    assert compute_maps(ws, cid, cfg=cfg) == {"computed": 0, "cached": K + 1}
    assert len(calls) == 2


def test_compute_maps_in_memory_bounded_batches_matches_direct_maps(clustered, monkeypatch):
    ws, cid, _ = clustered
    cfg = MapConfig(seed=16)
    calls = []
    monkeypatch.setattr(project, "GATHER_BYTES", 1)  # every cluster in a batch of its own
    monkeypatch.setattr(project, "gather_embeddings", lambda *a: calls.append(a[2]) or gather_embeddings(*a))
    assert compute_maps(ws, cid, cfg=cfg) == {"computed": K + 1, "cached": 0}
    assert len(calls) == K
    assignments = load_assignments(ws, cid)
    assert sum(len(member_map(ws, cid, c, cfg)) for c in range(K)) == len(assignments)
    for c in range(K):
        df = member_map(ws, cid, c, cfg)
        assert np.array_equal(df[["x", "y"]].to_numpy(), umap_2d(gather_embeddings(ws, cid, df["pos"].to_numpy()), seed=16))


def test_replaced_clustering_drops_its_cached_maps(clustered, monkeypatch):
    ws, _, set_id = clustered
    cc = ClusterConfig(embedding_set=set_id, k=K, seed=5, n_neighbors=2, clustering_id="replace-me")
    run_clustering(ws, cc)
    cfg = MapConfig(seed=17)
    member_map(ws, "replace-me", 0, cfg)
    centroid_map(ws, "replace-me", cfg)
    old = ws.dir("clusters", "replace-me", "maps", cfg.key, "members", "0.parquet")
    assert old.exists() and has_member_map(ws, "replace-me", 0, cfg)
    run_clustering(ws, cc, replace=True)
    assert not has_member_map(ws, "replace-me", 0, cfg)
    with monkeypatch.context() as m:
        _no_umap(m)
        with pytest.raises(AssertionError, match="umap_2d called"):
            member_map(ws, "replace-me", 1, cfg)
    assert not old.exists()  # the stale maps went before anything new was written
    assert compute_maps(ws, "replace-me", clusters=[0], cfg=cfg) == {"computed": 2, "cached": 0}
