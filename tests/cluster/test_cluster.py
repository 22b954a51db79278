"""core.cluster against numpy brute force on small random data (CPU, well under a second each)."""

from __future__ import annotations

import numpy as np
import pytest

from core.cluster import assign, cluster_stats, fit_centroids, validate_embeddings
from core.errors import ConfigError, DataError


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blobs(seed: int = 0, n_blobs: int = 10, per_blob: int = 50, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated unit-norm blobs around orthonormal centres: (n_blobs * per_blob, d) rows, blob ids."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.standard_normal((d, n_blobs)))[0].T.astype(np.float32)
    truth = np.repeat(np.arange(n_blobs), per_blob)
    x = centers[truth] + 0.05 * rng.standard_normal((truth.size, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def brute_stats(labels: np.ndarray, dist: np.ndarray, C: np.ndarray, l: int) -> tuple[np.ndarray, ...]:  # noqa: E741
    """Plain loops over clusters: (size, d_intra, d_inter, complexity) with the DBP < 3 members rule."""
    k = C.shape[0]
    C64 = C.astype(np.float64)
    size = np.array([(labels == j).sum() for j in range(k)])
    d_intra = np.array([dist[labels == j].astype(np.float64).mean() if size[j] else np.nan for j in range(k)])
    d_inter = np.empty(k)
    for j in range(k):
        others = [1.0 - C64[j] @ C64[m] for m in range(k) if m != j]
        d_inter[j] = np.mean(sorted(others)[:l])
    raw = d_inter * d_intra
    fill = raw[size >= 3].mean()
    return size, d_intra, d_inter, np.where(size >= 3, raw, fill)


# --- validate_embeddings ---------------------------------------------------------------------------


def test_validate_normalises_and_masks_bad_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float64) * 3
    x[1, 2] = np.nan
    x[3] = 0.0
    x[4, 0] = np.inf
    xn, valid = validate_embeddings(x, expected_dim=8)
    assert xn.dtype == np.float32 and xn.shape == (6, 8)
    assert valid.tolist() == [True, False, True, False, False, True]
    np.testing.assert_allclose(np.linalg.norm(xn[valid], axis=1), 1.0, rtol=1e-6)
    assert not xn[~valid].any() and np.isfinite(xn).all()
    np.testing.assert_allclose(xn[0], x[0] / np.linalg.norm(x[0]), rtol=1e-6)


def test_validate_wrong_width_is_one_line_data_error():
    with pytest.raises(DataError, match=r"^embeddings have 768 columns, expected 512$"):
        validate_embeddings(np.ones((3, 768), dtype=np.float32), expected_dim=512)


@pytest.mark.parametrize("shape", [(0, 512), (0,), (4,)])
def test_validate_empty_or_not_2d_is_data_error(shape):
    with pytest.raises(DataError):
        validate_embeddings(np.zeros(shape, dtype=np.float32))


# --- assign ----------------------------------------------------------------------------------------


def test_assign_equals_brute_force_argmax():
    rng = np.random.default_rng(1)
    x, c = unit_rows(rng, 200, 12), unit_rows(rng, 9, 12)
    labels, dist = assign(x, c)
    sims = x.astype(np.float64) @ c.astype(np.float64).T
    assert labels.dtype == np.int32 and dist.dtype == np.float32
    np.testing.assert_array_equal(labels, sims.argmax(axis=1))
    np.testing.assert_allclose(dist, 1.0 - sims.max(axis=1), atol=1e-6)


def test_assign_batched_equals_one_batch():
    rng = np.random.default_rng(2)
    x, c = unit_rows(rng, 101, 10), unit_rows(rng, 5, 10)
    lab1, d1 = assign(x, c)
    lab7, d7 = assign(x, c, batch_rows=7)
    np.testing.assert_array_equal(lab7, lab1)
    np.testing.assert_array_equal(d7, d1)


def test_assign_float16_memmap_matches_float32_up_to_ties(tmp_path):
    rng = np.random.default_rng(3)
    x, c = unit_rows(rng, 300, 16), unit_rows(rng, 8, 16)
    np.save(tmp_path / "part.npy", x.astype(np.float16))
    mm = np.load(tmp_path / "part.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and mm.dtype == np.float16
    lab16, d16 = assign(mm, c, batch_rows=64)
    lab32, d32 = assign(x, c)
    top2 = np.sort(x @ c.T, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2e-3  # float16 rounding moves a dot product by < ~1e-3
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(lab16[clear], lab32[clear])
    np.testing.assert_allclose(d16, d32, atol=2e-3)


def test_assign_width_mismatch_is_data_error():
    with pytest.raises(DataError):
        assign(np.ones((3, 4), np.float32), np.ones((2, 5), np.float32))


# --- cluster_stats ---------------------------------------------------------------------------------


def test_cluster_stats_equals_brute_force_with_small_and_empty_clusters():
    rng = np.random.default_rng(4)
    k = 7
    c = unit_rows(rng, k, 6)
    # Sizes: cluster 2 has 1 member, cluster 5 has 2, cluster 6 is empty, the others have >= 3.
    labels = np.array([0] * 5 + [1] * 4 + [2] + [3] * 6 + [4] * 3 + [5] * 2, dtype=np.int32)
    rng.shuffle(labels)
    dist = rng.uniform(0.0, 1.0, labels.size).astype(np.float32)
    for n_neighbors in (3, 20):  # 20 > k - 1 -> l = k - 1
        stats = cluster_stats(labels, dist, c, n_neighbors=n_neighbors)
        size, d_intra, d_inter, comp = brute_stats(labels, dist, c, min(n_neighbors, k - 1))
        assert list(stats.columns) == ["cluster", "size", "d_intra", "d_inter", "complexity"]
        np.testing.assert_array_equal(stats["cluster"], np.arange(k))
        np.testing.assert_array_equal(stats["size"], size)
        np.testing.assert_allclose(stats["d_intra"], d_intra, rtol=1e-6, equal_nan=True)
        np.testing.assert_allclose(stats["d_inter"], d_inter, rtol=1e-5)
        np.testing.assert_allclose(stats["complexity"], comp, rtol=1e-5)
    assert np.isnan(stats.loc[6, "d_intra"]) and stats.loc[6, "size"] == 0
    assert stats.loc[2, "complexity"] == stats.loc[5, "complexity"] == stats.loc[6, "complexity"]
    assert np.isfinite(stats["complexity"]).all()


def test_cluster_stats_blocked_inter_distance_matches_unblocked(monkeypatch):
    import core.cluster as cl

    rng = np.random.default_rng(5)
    c = unit_rows(rng, 12, 5)
    labels = np.repeat(np.arange(12), 3).astype(np.int32)
    dist = rng.uniform(0, 1, labels.size).astype(np.float32)
    full = cluster_stats(labels, dist, c, n_neighbors=4)
    monkeypatch.setattr(cl, "_BLOCK_ELEMENTS", 25)  # blocks of 2 rows
    np.testing.assert_allclose(cluster_stats(labels, dist, c, n_neighbors=4)["d_inter"], full["d_inter"])


def test_cluster_stats_bad_labels_is_data_error():
    c = unit_rows(np.random.default_rng(6), 3, 4)
    with pytest.raises(DataError):
        cluster_stats(np.array([0, 3]), np.array([0.1, 0.2]), c)


# --- fit_centroids ---------------------------------------------------------------------------------


def test_fit_is_deterministic_for_a_seed():
    x, _ = blobs(seed=7, n_blobs=6, per_blob=40, d=8)
    a = fit_centroids(x, 6, seed=11, niter=10, gpu=False)
    b = fit_centroids(x, 6, seed=11, niter=10, gpu=False)
    other = fit_centroids(x, 6, seed=12, niter=10, gpu=False)
    assert a.shape == (6, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)


def test_fit_recovers_well_separated_blobs():
    x, truth = blobs()
    # One random initialisation often seeds two centroids in one blob (faiss's init); keep the best of 10.
    c = fit_centroids(x, 10, nredo=10, gpu=False)
    labels, _ = assign(x, c)
    purity = sum(np.bincount(truth[labels == j]).max() for j in np.unique(labels)) / truth.size
    assert purity > 0.95


def test_fit_on_seeded_sample():
    x, _ = blobs(seed=8, n_blobs=5, per_blob=40, d=8)
    a = fit_centroids(x, 5, fit_sample=60, niter=5, gpu=False)
    np.testing.assert_array_equal(a, fit_centroids(x, 5, fit_sample=60, niter=5, gpu=False))
    with pytest.raises(ConfigError, match="k must be between 2"):
        fit_centroids(x, 10, fit_sample=8, gpu=False)


@pytest.mark.parametrize("k", [1, 0, 31])
def test_fit_k_out_of_range_is_config_error(k):
    x = unit_rows(np.random.default_rng(9), 30, 4)
    with pytest.raises(ConfigError, match="k must be between 2 and the 30 rows"):
        fit_centroids(x, k, gpu=False)


@pytest.mark.parametrize("kw", [{"niter": 0}, {"nredo": 0}, {"fit_sample": 0}])
def test_fit_bad_parameters_are_config_errors(kw):
    x = unit_rows(np.random.default_rng(11), 30, 4)
    with pytest.raises(ConfigError):
        fit_centroids(x, 3, gpu=False, **kw)


def test_fit_empty_or_nonfinite_is_data_error():
    with pytest.raises(DataError):
        fit_centroids(np.zeros((0, 4), np.float32), 2, gpu=False)
    x = unit_rows(np.random.default_rng(10), 10, 4)
    x[3, 1] = np.nan
    with pytest.raises(DataError):
        fit_centroids(x, 2, gpu=False)


def test_cluster_stats_all_clusters_small_get_one_finite_value():
    c = unit_rows(np.random.default_rng(12), 4, 5)
    stats = cluster_stats(np.array([0, 0, 1, 2]), np.array([0.2, 0.4, 0.3, 0.1]), c)
    assert stats["complexity"].nunique() == 1 and np.isfinite(stats["complexity"]).all()


def test_fit_gpu_true_without_gpu_is_config_error(monkeypatch):
    import core.cluster as cl

    monkeypatch.setattr(cl.faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(ConfigError, match="no GPU"):
        fit_centroids(unit_rows(np.random.default_rng(13), 10, 4), 2, gpu=True)


def test_validate_keeps_rows_whose_squares_overflow_float32():
    X = np.array([[3e19, 4e19], [np.inf, 1.0], [0.6, 0.8]], dtype=np.float32)
    Xn, valid = validate_embeddings(X)
    assert valid.tolist() == [True, False, True]
    assert np.allclose(Xn[0], [0.6, 0.8]) and np.allclose(Xn[2], [0.6, 0.8]) and not Xn[1].any()
