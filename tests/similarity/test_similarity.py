"""Train-test similarity (Mayilvahanan et al. ICLR 2024) against brute force on small random data."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError, DataError
from core.similarity import (
    SimilarityResult,
    closer_than_reference,
    most_similar,
    nearest_neighbors,
    prune_mask_near,
    reference_thresholds,
    row_blocks,
    split_by_similarity,
)

DIM = 8


def unit(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    X = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def brute_topk(Q: np.ndarray, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims_all = Q @ X.T
    idx = np.argsort(-sims_all, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims_all, idx, 1), idx


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("rows", [1, 7, 60])
def test_nearest_neighbors_equals_brute_force(k: int, rows: int) -> None:
    Q, X = unit(6, 0), unit(60, 1)
    sims, idx = nearest_neighbors(Q, row_blocks(X, rows), k=k, gpu=False)
    want_sims, want_idx = brute_topk(Q, X, k)
    assert sims.shape == idx.shape == (6, k) and sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()


def test_float16_blocks_match_their_float32_values() -> None:
    Q, X16 = unit(5, 2), unit(40, 3).astype(np.float16)
    sims, idx = nearest_neighbors(Q, row_blocks(X16, 9), k=3, gpu=False)
    want_sims, want_idx = brute_topk(Q, X16.astype(np.float32), 3)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


def test_streaming_equals_one_block_and_ties_go_to_lower_position() -> None:
    Q = unit(4, 4)
    X = np.concatenate([unit(10, 5), unit(10, 5)])  # rows 10..19 duplicate rows 0..9
    one = nearest_neighbors(Q, [(0, X)], k=4, gpu=False)
    streamed = nearest_neighbors(Q, row_blocks(X, 3), k=4, gpu=False)
    np.testing.assert_array_equal(one[1], streamed[1])
    np.testing.assert_allclose(one[0], streamed[0], atol=1e-6)
    best = np.argmax(Q @ X[:10].T, axis=1)
    np.testing.assert_array_equal(streamed[1][:, :2], np.stack([best, best + 10], axis=1))


def test_reference_thresholds_are_max_similarity() -> None:
    T, R = unit(7, 6), unit(30, 7)
    s_ref, ref_idx = reference_thresholds(T, row_blocks(R, 4), gpu=False)
    sims_all = T @ R.T
    np.testing.assert_array_equal(ref_idx, sims_all.argmax(1))
    np.testing.assert_allclose(s_ref, sims_all.max(1), atol=1e-5)


def _angle(deg: float) -> np.ndarray:
    """A unit vector in the (e0, e1) plane at ``deg`` degrees from e0, padded to DIM."""
    v = np.zeros(DIM, np.float32)
    v[0], v[1] = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return v


def test_thresholds_are_per_test_sample() -> None:
    # t0 = e2 has a very close reference (cos 0.99); t1 = e3 a far one (cos 0.30).
    T = np.eye(DIM, dtype=np.float32)[[2, 3]]
    s_ref = np.array([0.99, 0.30], np.float32)
    P = np.zeros((4, DIM), np.float32)
    P[0, 2], P[0, 0] = 0.95, np.sqrt(1 - 0.95**2)  # cos(t0)=0.95 < 0.99: not closer
    P[1, 3], P[1, 0] = 0.50, np.sqrt(1 - 0.50**2)  # cos(t1)=0.50 > 0.30: closer
    P[2, 2], P[2, 0] = 0.995, np.sqrt(1 - 0.995**2)  # cos(t0)=0.995 > 0.99: closer
    P[3, 0] = 1.0  # orthogonal to both
    result = closer_than_reference(T, s_ref, [(0, P)])
    np.testing.assert_array_equal(result.closer, [False, True, True, False])
    np.testing.assert_array_equal(result.n_closer, [1, 1])
    # One global threshold gives another answer either way:
    max_sim = (P @ T.T).max(1)
    assert not np.array_equal(max_sim > s_ref.max(), result.closer)  # loses row 1
    assert not np.array_equal(max_sim > s_ref.mean(), result.closer)  # adds row 0


@pytest.mark.parametrize(("rows", "batch"), [(1, None), (13, 4), (50, None), (50, 7)])
def test_closer_than_reference_equals_brute_force(rows: int, batch: int | None) -> None:
    T, R, P = unit(9, 10), unit(25, 11), unit(50, 12)
    s_ref, _ = reference_thresholds(T, [(0, R)], gpu=False)
    res = closer_than_reference(T, s_ref, row_blocks(P.astype(np.float16), rows), batch=batch)
    P32 = P.astype(np.float16).astype(np.float32)
    sims_all = P32 @ T.T
    above = sims_all > s_ref
    assert above.any() and not above.all()  # the data exercises both outcomes
    np.testing.assert_array_equal(res.closer, above.any(1))
    np.testing.assert_array_equal(res.n_closer, above.sum(0))
    np.testing.assert_allclose(res.max_sim, sims_all.max(1), atol=1e-5)
    np.testing.assert_array_equal(res.argmax_test, sims_all.argmax(1))
    np.testing.assert_allclose(res.nn_pool_sim, sims_all.max(0), atol=1e-5)
    np.testing.assert_array_equal(res.nn_pool_idx, sims_all.argmax(0))
    keep = prune_mask_near(res)
    np.testing.assert_array_equal(np.flatnonzero(~keep), np.flatnonzero(above.any(1)))
    summary = res.summary()
    assert summary["n_prune"] == int(above.any(1).sum())
    assert summary["share_test_pool_closer"] == pytest.approx(np.mean(sims_all.max(0) > s_ref))
    assert summary["n_pool"] == 50 and summary["n_test"] == 9


def _result(max_sim: list[float]) -> SimilarityResult:
    n = len(max_sim)
    z = np.zeros(1, np.float32)
    return SimilarityResult(
        s_ref=z,
        max_sim=np.array(max_sim, np.float32),
        argmax_test=np.zeros(n, np.int64),
        closer=np.zeros(n, bool),
        n_closer=np.zeros(1, np.int64),
        nn_pool_sim=z,
        nn_pool_idx=np.zeros(1, np.int64),
    )


def test_most_similar_and_splits_order_sizes_and_ties() -> None:
    res = _result([0.2, 0.9, 0.5, 0.9, 0.1, 0.5])
    np.testing.assert_array_equal(most_similar(res, 4), [1, 3, 2, 5])
    np.testing.assert_array_equal(most_similar(res, 0), np.zeros(0, np.int64))
    np.testing.assert_array_equal(split_by_similarity(res, 3, near=True), [1, 2, 3])  # 0.9, 0.9, first 0.5
    np.testing.assert_array_equal(split_by_similarity(res, 3, near=False), [0, 2, 4])  # 0.1, 0.2, first 0.5
    assert len(split_by_similarity(res, 6, near=False)) == 6
    with pytest.raises(ConfigError):
        most_similar(res, 7)
    with pytest.raises(ConfigError):
        split_by_similarity(res, -1)


def test_bad_input() -> None:
    Q, X = unit(3, 20), unit(10, 21)
    with pytest.raises(DataError, match="width"):
        nearest_neighbors(Q, [(0, unit(10, 22, dim=DIM + 1))], gpu=False)
    with pytest.raises(ConfigError):
        nearest_neighbors(Q, [(0, X)], k=0, gpu=False)
    with pytest.raises(ConfigError):
        nearest_neighbors(Q, [(0, X)], k=11, gpu=False)
    with pytest.raises(DataError, match="empty"):
        nearest_neighbors(Q, [], gpu=False)
    with pytest.raises(DataError, match="empty"):
        closer_than_reference(Q, np.zeros(3, np.float32), [(0, X[:0])])
    bad = Q.copy()
    bad[1, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        nearest_neighbors(bad, [(0, X)], gpu=False)
    with pytest.raises(DataError, match="NaN"):
        closer_than_reference(bad, np.zeros(3, np.float32), [(0, X)])
    with pytest.raises(DataError, match="s_ref"):
        closer_than_reference(Q, np.zeros(2, np.float32), [(0, X)])
    with pytest.raises(DataError, match="contiguous"):
        closer_than_reference(Q, np.zeros(3, np.float32), [(0, X[:5]), (6, X[5:])])


def test_many_benchmarks_in_one_pass_equal_one_at_a_time() -> None:
    from core.similarity import closer_than_reference_many

    rng = np.random.default_rng(7)
    P = unit(300, 1, 24)
    tests = [unit(q, 2 + q, 24) for q in (5, 11, 1)]
    refs = [rng.uniform(0.2, 0.6, len(T)).astype(np.float32) for T in tests]
    many = closer_than_reference_many(tests, refs, row_blocks(P, 70), batch=33)
    for T, s, got in zip(tests, refs, many, strict=True):
        one = closer_than_reference(T, s, row_blocks(P, 300))
        for field in ("argmax_test", "closer", "n_closer", "nn_pool_idx"):  # discrete: identical
            assert np.array_equal(getattr(one, field), getattr(got, field)), field
        for field in ("s_ref", "max_sim", "nn_pool_sim"):  # BLAS may round another matrix shape 1 ulp apart
            assert np.allclose(getattr(one, field), getattr(got, field), rtol=0, atol=1e-6), field
