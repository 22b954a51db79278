"""The clustering stage end to end: a LAION-style release -> embedding set -> clusters in the catalog."""

import numpy as np
import pytest

from core.cluster import assign
from core.clustering import ClusterConfig, list_clusterings, load_assignments, run_clustering
from core.datasets import register_dataset
from core.embed import import_laion_embeddings, load_embeddings
from core.errors import ConfigError, DataError
from core.workspace import Workspace


@pytest.fixture()
def ws_with_set(tmp_path, make_release):
    make_release(tmp_path / "laion")
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "pool", "laion", tmp_path / "laion")
    info = import_laion_embeddings(ws, "pool", model="synthetic")
    return ws, info.id


def test_clusters_recover_concepts_and_are_named_from_captions(ws_with_set, release_concepts):
    ws, set_id = ws_with_set
    info = run_clustering(ws, ClusterConfig(embedding_set=set_id, k=4, seed=0, n_neighbors=3))
    assert info.n == 119 and info.k == 4
    stats = ws.catalog.query("SELECT * FROM clusters WHERE clustering_id = ? ORDER BY cluster", [info.id])
    assert stats["size"].sum() == 119 and (stats["complexity"] > 0).all()
    assert np.allclose(stats["complexity"], stats["d_intra"] * stats["d_inter"])
    labels = set(stats["label"])
    for name in release_concepts:  # each concept's cluster is named after it (colour and shape words)
        assert any(set(name.split()) <= set(label.split()) for label in labels), (name, labels)
    assert all("stock" not in label and "photo" not in label for label in labels)
    assert list_clusterings(ws)["id"].tolist() == [info.id]


def test_assignments_equal_brute_force_nearest_centroid(ws_with_set):
    ws, set_id = ws_with_set
    info = run_clustering(ws, ClusterConfig(embedding_set=set_id, k=4, seed=0, n_neighbors=3))
    assignments = load_assignments(ws, info.id)
    centroids = np.load(info.path / "centroids.npy")
    ids, X = load_embeddings(ws, set_id)
    X = np.asarray(X, np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    sims = X @ centroids.T
    by_id = assignments.set_index("id")
    assert (by_id.loc[list(ids), "cluster"].to_numpy() == sims.argmax(1)).all()
    assert np.allclose(by_id.loc[list(ids), "dist_to_centroid"].to_numpy(), 1 - sims.max(1), atol=1e-5)
    lab, _ = assign(X, centroids)
    assert (lab == sims.argmax(1)).all()


def test_complete_clustering_is_reused_and_fit_sample_is_seeded(ws_with_set):
    ws, set_id = ws_with_set
    cfg = ClusterConfig(embedding_set=set_id, k=4, seed=3, fit_sample=60, n_neighbors=3)
    first = run_clustering(ws, cfg)
    mtime = (first.path / "assignments.parquet").stat().st_mtime_ns
    again = run_clustering(ws, cfg)
    assert (again.path / "assignments.parquet").stat().st_mtime_ns == mtime
    redo = run_clustering(ws, cfg, replace=True)
    assert np.array_equal(np.load(redo.path / "centroids.npy"), np.load(first.path / "centroids.npy"))


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"k": 1}, "k must be"), ({"k": 4, "fit_sample": 2}, "fit_sample"), ({"k": 4, "niter": 0}, "niter"),
])
def test_bad_config(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ClusterConfig(embedding_set="x", **kw)


def test_k_larger_than_rows_is_a_clear_error(ws_with_set):
    ws, set_id = ws_with_set
    with pytest.raises(ConfigError, match="more than the 119 rows"):
        run_clustering(ws, ClusterConfig(embedding_set=set_id, k=500))


def _damage_first_shard(ws, set_id: str, rows: dict[int, float]) -> None:
    """Overwrite rows of the set's first image shard (value per row: nan, inf or 0.0), as a bad writer would."""
    from core.embed import embedding_set_row

    path = ws.abs(embedding_set_row(ws, set_id)["path"]) / "image" / "part-00000.npy"
    X = np.load(path)
    for r, value in rows.items():
        X[r] = value
    np.save(path, X)


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0], ids=["nan", "inf", "zero"])
def test_bad_rows_are_counted_skips(ws_with_set, value):
    ws, set_id = ws_with_set
    _damage_first_shard(ws, set_id, {0: value, 3: value})
    info = run_clustering(ws, ClusterConfig(embedding_set=set_id, k=4, seed=0, n_neighbors=3))
    assert info.n == 117 and info.n_skipped == 2
    assert len(load_assignments(ws, info.id)) == 117
    meta = (info.path / "meta.json").read_text()
    assert '"bad_embedding": 2' in meta


def test_gather_reads_the_rows_the_stream_yields_and_only_them(ws_with_set, monkeypatch):
    import core.embed
    from core.clustering import gather_embeddings, iter_assigned_embeddings

    ws, set_id = ws_with_set
    _damage_first_shard(ws, set_id, {0: np.nan, 3: 0.0})  # skipped rows shift every later position
    info = run_clustering(ws, ClusterConfig(embedding_set=set_id, k=4, seed=0, n_neighbors=3))
    every = np.concatenate([X for _, X in iter_assigned_embeddings(ws, info.id)])
    assert len(every) == info.n == 117
    pos = np.random.default_rng(0).integers(0, info.n, 300)  # unsorted, with repeats, across every shard
    assert np.array_equal(gather_embeddings(ws, info.id, pos), every[pos])
    assert np.array_equal(gather_embeddings(ws, info.id, np.arange(info.n)), every)
    # Later gathers use the cached layout: no pass over the set's shards.
    monkeypatch.setattr(core.embed, "iter_embedding_shards", lambda *a, **k: pytest.fail("re-read every shard"))
    assert np.array_equal(gather_embeddings(ws, info.id, pos[::-1]), every[pos[::-1]])
    with pytest.raises(DataError, match="positions must lie"):
        gather_embeddings(ws, info.id, np.array([info.n]))


def test_set_without_a_valid_row_is_a_clear_error(ws_with_set):
    ws, set_id = ws_with_set
    from core.embed import embedding_set_row

    folder = ws.abs(embedding_set_row(ws, set_id)["path"]) / "image"
    for path in folder.glob("part-*.npy"):
        X = np.load(path)
        X[:] = np.nan
        np.save(path, X)
    with pytest.raises(DataError, match="no valid rows"):
        run_clustering(ws, ClusterConfig(embedding_set=set_id, k=4, seed=0))


def test_wrong_width_shard_is_a_clear_error(ws_with_set):
    ws, set_id = ws_with_set
    from core.embed import embedding_set_row

    path = ws.abs(embedding_set_row(ws, set_id)["path"]) / "image" / "part-00000.npy"
    X = np.load(path)
    np.save(path, np.zeros((X.shape[0], X.shape[1] + 3), X.dtype) + 0.1)  # a shard of another model
    with pytest.raises(DataError, match="19 columns, expected 16"):
        run_clustering(ws, ClusterConfig(embedding_set=set_id, k=4, seed=0))
