"""Text search and vocabulary names: array functions against brute force, the workspace path end to end."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError, DataError, PrunescopeError
from core.label import vocabulary_labels
from core.search import check_query, nearest_clusters, search_clustering, top_k_similar


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_nearest_clusters_equal_brute_force():
    rng = np.random.default_rng(0)
    C, q = unit(rng, 50, 8), unit(rng, 1, 8)[0]
    got = nearest_clusters(q, C, top=7)
    want = np.argsort(-(C @ q))[:7]
    assert got["cluster"].tolist() == want.tolist()
    assert np.allclose(got["similarity"], (C @ q)[want])


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("top", [1, 5, 30])
def test_streamed_top_k_equals_brute_force(block, top):
    rng = np.random.default_rng(block + top)
    X, q = unit(rng, 257, 12), unit(rng, 1, 12)[0]
    blocks = [(s, X[s : s + block]) for s in range(0, len(X), block)]
    got = top_k_similar(iter(blocks), q, top)
    sims = X @ q
    want = np.argsort(-sims, kind="stable")[:top]
    assert got["pos"].tolist() == want.tolist()
    assert np.allclose(got["similarity"], sims[want])


def test_top_k_with_fewer_rows_than_asked_and_ties():
    q = np.array([1.0, 0.0], np.float32)
    X = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    got = top_k_similar(iter([(0, X[:2]), (2, X[2:])]), q, 10)
    assert got["pos"].tolist() == [0, 2, 1]  # equal similarity: lower position first


def test_width_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="width 4 but the rows have 8"):
        nearest_clusters(np.ones(4, np.float32), np.ones((3, 8), np.float32))


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_query_is_refused(text):
    with pytest.raises(ConfigError, match="type a few words"):
        check_query(text)


def test_long_query_is_refused_and_whitespace_collapsed():
    assert check_query("  a   red\ttriangle ") == "a red triangle"
    with pytest.raises(ConfigError, match="301 characters"):
        check_query("x" * 301)


def test_vocabulary_labels_pick_the_nearest_names():
    rng = np.random.default_rng(1)
    names = ["red triangle", "blue star", "green circle", "pink cross"]
    E = unit(rng, 4, 16)
    C = E[[2, 0, 3]] + 0.05 * unit(rng, 3, 16)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    labels, score = vocabulary_labels(C, E, names, top_n=2)
    assert [lab.split(", ")[0] for lab in labels] == ["green circle", "red triangle", "pink cross"]
    assert all(len(lab.split(", ")) == 2 for lab in labels)
    assert np.allclose(score, (C * E[[2, 0, 3]]).sum(axis=1))


def test_vocabulary_labels_bad_input():
    E = np.eye(3, dtype=np.float32)
    with pytest.raises(ConfigError, match="empty"):
        vocabulary_labels(E, E[:0], [])
    with pytest.raises(DataError, match="do not fit"):
        vocabulary_labels(np.eye(4, dtype=np.float32), E, ["a", "b", "c"])


# -- workspace ----------------------------------------------------------------------------------------
@pytest.fixture()
def clustered(tmp_path, make_release):
    """Four concepts (see test_clustering_stage) clustered with k=4; returns (ws, clustering id, centres)."""
    from core.clustering import ClusterConfig, run_clustering
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings
    from core.workspace import Workspace

    centres = make_release(tmp_path / "laion")
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "pool", "laion", tmp_path / "laion")
    info = import_laion_embeddings(ws, "pool", model="synthetic")
    cid = run_clustering(ws, ClusterConfig(embedding_set=info.id, k=4, seed=0, n_neighbors=3)).id
    return ws, cid, centres


def test_search_finds_the_concept_cluster_and_its_members(clustered):
    from core.clustering import load_assignments

    ws, cid, centres = clustered
    near, samples = search_clustering(ws, cid, "blue star", encode=lambda texts: centres[[1]], top_samples=10)
    a = load_assignments(ws, cid)
    best = int(near["cluster"].iloc[0])
    assert set(samples["cluster"]) == {best}
    assert samples["similarity"].is_monotonic_decreasing
    assert (a.iloc[samples["pos"]]["id"].to_numpy() == samples["id"].to_numpy()).all()
    captions = ws.catalog.query("SELECT label FROM clusters WHERE clustering_id = ? AND cluster = ?", [cid, best])
    assert {"blue", "star"} <= set(captions["label"].iloc[0].split())


def test_search_with_an_unknown_model_is_a_one_line_error(clustered):
    ws, cid, _ = clustered
    with pytest.raises(PrunescopeError) as err:
        search_clustering(ws, cid, "a blue star")
    assert "synthetic" in err.value.one_line() and "\n" not in err.value.one_line()


def test_vocabulary_file_missing_is_refused_before_any_work(tmp_path):
    from core.clustering import ClusterConfig
    from core.errors import MissingFileError

    with pytest.raises(MissingFileError, match="vocabulary file"):
        ClusterConfig(embedding_set="x", vocabulary=str(tmp_path / "nope.txt"))
