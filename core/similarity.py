"""Train-test similarity: which pool samples are closer to a test sample than its reference neighbour.

Ref: Mayilvahanan et al., "Does CLIP's generalization performance mainly stem from high train-test
similarity?", ICLR 2024 (brendel-group/clip-ood); ALGORITHMS.md "Train-test similarity".

Array in, array out; no paths, no catalog. Conventions: rows are unit-norm image embeddings and the
similarity of two rows is their dot product (= cosine, in [-1, 1]; larger = more similar). For each test
sample ``t`` of a benchmark the reference threshold is ``s_ref(t) = max_{x in reference} cos(t, x)``
(reference = ImageNet-train in the paper); a pool sample ``x`` is *closer than reference* to ``t`` when
``cos(t, x) > s_ref(t)``. Thresholds are per test sample, never one per benchmark; a pool sample is pruned
when it is closer than reference to ANY test sample.

Databases (reference set, pool) are streamed as ``(start, X)`` row blocks, e.g. memory-mapped float16
shards; every block is converted to float32 on its own, so memory stays bounded by the block size (plus
the ``batch`` bound of :func:`closer_than_reference`), never by the database size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from core.cluster import _resolve_gpu, validate_embeddings
from core.errors import ConfigError, DataError

#: Upper bound on float32 elements of one pool-by-test similarity chunk (64 MiB).
_CHUNK_ELEMENTS = 1 << 24

Blocks = Iterable[tuple[int, np.ndarray]]


def row_blocks(X: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Splits an (N, D) array (memmaps included) into ``(start, X[start:start + rows])`` blocks.

    Raises:
        ConfigError: rows < 1.
    """
    if rows < 1:
        raise ConfigError(f"block rows must be >= 1, got {rows}")
    for start in range(0, X.shape[0], rows):
        yield start, X[start : start + rows]


def _check_queries(Q: np.ndarray, what: str) -> np.ndarray:
    """(q, D) float32 unit rows; DataError for an empty array or a NaN/inf/zero row."""
    Qn, valid = validate_embeddings(np.asarray(Q))
    if not valid.all():
        bad = np.flatnonzero(~valid)
        raise DataError(f"{len(bad)} {what} rows are NaN/inf or zero (first: row {int(bad[0])})")
    return Qn


def _check_block(X: np.ndarray, dim: int, start: int, what: str) -> np.ndarray:
    """One database block as C-contiguous float32; DataError for a wrong width or NaN/inf."""
    if X.ndim != 2 or X.shape[1] != dim:
        raise DataError(
            f"{what} rows have shape {tuple(X.shape)} but the test rows have width {dim}: "
            "were they embedded with another model?"
        )
    B = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(B).all():
        raise DataError(f"{what} block at position {start} contains NaN or inf")
    return B


def _flat_ip_index(dim: int, use_gpu: bool) -> Any:
    """An empty exact inner-product index, on the GPU when asked (the block is added per search)."""
    if use_gpu:
        res = faiss.StandardGpuResources()
        return faiss.GpuIndexFlatIP(res, dim)  # faiss's wrapper keeps a reference to res
    return faiss.IndexFlatIP(dim)


def _merge_topk(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of the (q, m) candidates: descending similarity, ties by lower position."""
    q, m = sims.shape
    rows = np.repeat(np.arange(q), m)
    flat = np.lexsort((idx.ravel(), -sims.ravel(), rows)).reshape(q, m)
    order = flat[:, :k] - m * np.arange(q)[:, None]  # rows are the primary key: offsets within each row
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def nearest_neighbors(
    queries: np.ndarray, blocks: Blocks, *, k: int = 1, gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of every query in a database streamed as row blocks.

    Each block goes into a faiss ``IndexFlatIP`` (a GPU one when asked) and the running top-k is merged
    across blocks. Memory: O(block rows * D + q * k) besides faiss's own search buffers.

    Args:
        queries: (q, D) rows; validated and L2-normalised (see :func:`validate_embeddings`).
        blocks: ``(start, X)`` pairs; X (n_b, D) unit-norm database rows (float16 allowed) whose first
            row has global position ``start``.
        k: neighbours per query, 1 <= k <= database rows. On a GPU faiss caps k at 2048.
        gpu: use a faiss GPU; ``None`` = when ``faiss.get_num_gpus() > 0``.

    Returns:
        ``(sims, idx)``: sims (q, k) float32 cosine similarities, descending per row; idx (q, k) int64
        global database positions. Ties go to the lower position.

    Raises:
        ConfigError: k < 1, k larger than the database, or gpu=True without a GPU.
        DataError: bad queries (empty, NaN/inf, zero rows), a block of another width or with NaN/inf,
            or an empty database.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    Q = _check_queries(queries, "query")
    index = _flat_ip_index(Q.shape[1], _resolve_gpu(gpu))
    best_sim = np.zeros((Q.shape[0], 0), np.float32)
    best_idx = np.zeros((Q.shape[0], 0), np.int64)
    n_rows = 0
    for start, X in blocks:
        B = _check_block(X, Q.shape[1], start, "database")
        if len(B) == 0:
            continue
        n_rows += len(B)
        index.reset()
        index.add(B)
        sims, idx = index.search(Q, min(k, len(B)))
        best_sim = np.concatenate([best_sim, sims.astype(np.float32)], axis=1)
        best_idx = np.concatenate([best_idx, idx.astype(np.int64) + start], axis=1)
        best_sim, best_idx = _merge_topk(best_sim, best_idx, k)
    if n_rows == 0:
        raise DataError("the database is empty (no rows in any block)")
    if k > n_rows:
        raise ConfigError(f"k={k} exceeds the {n_rows} database rows")
    return best_sim, best_idx


def reference_thresholds(
    test: np.ndarray, reference_blocks: Blocks, *, gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per test sample, the similarity to its nearest reference sample: ``s_ref(t) = max_x cos(t, x)``.

    Ref: Mayilvahanan et al. ICLR 2024 (reference = ImageNet-train).

    Args:
        test: (q, D) test embeddings (normalised here).
        reference_blocks: ``(start, X)`` blocks of the (n_ref, D) unit-norm reference embeddings.
        gpu: as in :func:`nearest_neighbors`.

    Returns:
        ``(s_ref, ref_idx)``: s_ref (q,) float32 in [-1, 1]; ref_idx (q,) int64 reference position of the
        nearest neighbour (ties: lower position).
    """
    sims, idx = nearest_neighbors(test, reference_blocks, k=1, gpu=gpu)
    return sims[:, 0], idx[:, 0]


@dataclass(frozen=True)
class SimilarityResult:
    """Train-test similarity of one benchmark (q test samples) against a pool (n rows).

    Attributes:
        s_ref: (q,) float32 similarity of each test sample to its nearest reference sample.
        max_sim: (n,) float32 ``max_t cos(t, x)`` per pool row; larger = nearer to the benchmark.
        argmax_test: (n,) int64 test sample attaining ``max_sim`` (ties: lower test index).
        closer: (n,) bool, True when ``cos(t, x) > s_ref(t)`` for at least one test sample t.
        n_closer: (q,) int64 number of pool rows closer to t than t's reference neighbour.
        nn_pool_sim: (q,) float32 similarity of each test sample to its nearest pool row.
        nn_pool_idx: (q,) int64 pool position of that row (ties: lower position).
    """

    s_ref: np.ndarray
    max_sim: np.ndarray
    argmax_test: np.ndarray
    closer: np.ndarray
    n_closer: np.ndarray
    nn_pool_sim: np.ndarray
    nn_pool_idx: np.ndarray

    def summary(self) -> dict[str, float | int]:
        """Headline numbers: sizes, the share of test samples whose nearest pool neighbour is closer than
        their reference neighbour (``mean(nn_pool_sim > s_ref)``), and the pool rows to prune."""
        n_prune = int(self.closer.sum())
        return {
            "n_test": int(len(self.s_ref)),
            "n_pool": int(len(self.max_sim)),
            "share_test_pool_closer": float(np.mean(self.nn_pool_sim > self.s_ref)),
            "n_prune": n_prune,
            "share_pool_pruned": n_prune / max(len(self.max_sim), 1),
            "median_s_ref": float(np.median(self.s_ref)),
            "median_nn_pool_sim": float(np.median(self.nn_pool_sim)),
        }


@dataclass
class _Accumulator:
    """Running per-test statistics while the pool streams by."""

    n_closer: np.ndarray
    nn_sim: np.ndarray
    nn_idx: np.ndarray

    def update(self, sims: np.ndarray, start: int, s_ref: np.ndarray) -> np.ndarray:
        """Folds a (rows, q) similarity chunk at pool position ``start``; returns its (rows, q) mask
        ``cos(t, x) > s_ref(t)``."""
        above: np.ndarray = sims > s_ref  # (rows, q) vs (q,): a threshold per test sample
        self.n_closer += above.sum(axis=0)
        col_arg = sims.argmax(axis=0)
        col_max = sims[col_arg, np.arange(sims.shape[1])]
        col_idx = col_arg.astype(np.int64) + start
        better = (col_max > self.nn_sim) | ((col_max == self.nn_sim) & (col_idx < self.nn_idx))
        self.nn_sim[better] = col_max[better]
        self.nn_idx[better] = col_idx[better]
        return above


def closer_than_reference(
    test: np.ndarray, s_ref: np.ndarray, pool_blocks: Blocks, *, batch: int | None = None
) -> SimilarityResult:
    """Streams the pool once and finds the pool rows closer to some test sample than its reference.

    Ref: Mayilvahanan et al. ICLR 2024: prune x when ``cos(t, x) > s_ref(t)`` for any test sample t,
    with a threshold per test sample. Exact: every chunk ``P @ test.T`` is compared column-wise with
    ``s_ref`` (float32 matmuls on the CPU). One benchmark of :func:`closer_than_reference_many`.

    Args:
        test: (q, D) test embeddings (normalised here, as in :func:`reference_thresholds`).
        s_ref: (q,) thresholds from :func:`reference_thresholds`.
        pool_blocks: ``(start, X)`` blocks of the (n, D) unit-norm pool, contiguous and in order
            (first start 0, each next start = previous start + rows); float16 allowed.
        batch: pool rows per similarity chunk; ``None`` = as many as keep one chunk at 2**24 float32
            elements (64 MiB). Memory: O(block rows * D + batch * q + n).

    Returns:
        A :class:`SimilarityResult`; its pool arrays are indexed by pool position.

    Raises:
        ConfigError: batch < 1.
        DataError: bad test rows, s_ref of the wrong shape or not finite, a block of another width, with
            NaN/inf or out of order, or an empty pool.
    """
    return closer_than_reference_many([test], [s_ref], pool_blocks, batch=batch)[0]


def closer_than_reference_many(
    tests: Sequence[np.ndarray], s_refs: Sequence[np.ndarray], pool_blocks: Blocks, *, batch: int | None = None
) -> list[SimilarityResult]:
    """:func:`closer_than_reference` for several benchmarks in ONE pass over the pool.

    The benchmarks' test rows are stacked into one (sum q_b, D) matrix, so each pool chunk is read and
    multiplied once; per-pool-row results are then taken per benchmark from its columns.

    Args:
        tests: per benchmark b, (q_b, D) test embeddings. s_refs: per benchmark, (q_b,) thresholds.
        pool_blocks, batch: as in :func:`closer_than_reference` (``batch`` bounds ``batch * sum q_b``).

    Returns:
        One :class:`SimilarityResult` per benchmark, in order.
    """
    if len(tests) != len(s_refs) or not tests:
        raise ConfigError(f"give one s_ref per test set; got {len(tests)} test sets and {len(s_refs)} s_ref")
    Ts = [_check_queries(t, "test") for t in tests]
    dims = {T.shape[1] for T in Ts}
    if len(dims) != 1:
        raise DataError(f"the test sets have different widths: {sorted(dims)}")
    refs = [_check_thresholds(s, len(T)) for s, T in zip(s_refs, Ts, strict=True)]
    T_all, s_all = np.concatenate(Ts), np.concatenate(refs)
    bounds = np.concatenate([[0], np.cumsum([len(T) for T in Ts])])
    if batch is not None and batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    rows_per_chunk = batch or max(1, _CHUNK_ELEMENTS // len(T_all))
    acc = _Accumulator(np.zeros(len(T_all), np.int64), np.full(len(T_all), -np.inf, np.float32),
                       np.full(len(T_all), -1, np.int64))
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in Ts]
    expected = 0
    for start, X in pool_blocks:
        if start != expected:
            raise DataError(
                f"pool blocks must be contiguous and in order: expected start {expected}, got {start}"
            )
        B = _check_block(X, T_all.shape[1], start, "pool")
        for lo in range(0, len(B), rows_per_chunk):
            sims = B[lo : lo + rows_per_chunk] @ T_all.T
            above = acc.update(sims, start + lo, s_all)
            for b in range(len(Ts)):
                cols = slice(int(bounds[b]), int(bounds[b + 1]))
                arg = sims[:, cols].argmax(axis=1)
                closer: np.ndarray = np.asarray(above[:, cols].any(axis=1))
                parts[b].append((sims[np.arange(len(sims)), arg + cols.start], arg.astype(np.int64), closer))
        expected += len(B)
    if expected == 0:
        raise DataError("the pool is empty (no rows in any block)")
    return [_result(parts[b], acc, refs[b], slice(int(bounds[b]), int(bounds[b + 1]))) for b in range(len(Ts))]


def _check_thresholds(s_ref: np.ndarray, q: int) -> np.ndarray:
    s = np.asarray(s_ref, dtype=np.float32)
    if s.shape != (q,) or not np.isfinite(s).all():
        raise DataError(f"s_ref must be {q} finite thresholds (one per test row), got shape {s.shape}")
    return s


def _result(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], acc: _Accumulator, s_ref: np.ndarray,
            cols: slice) -> SimilarityResult:
    max_sim, argmax_test, closer = (np.concatenate(p) for p in zip(*parts, strict=True))
    return SimilarityResult(s_ref=s_ref, max_sim=max_sim.astype(np.float32), argmax_test=argmax_test,
                            closer=closer, n_closer=acc.n_closer[cols].copy(), nn_pool_sim=acc.nn_sim[cols].copy(),
                            nn_pool_idx=acc.nn_idx[cols].copy())


def prune_mask_near(result: SimilarityResult) -> np.ndarray:
    """(n,) bool keep mask of the pool: False for every row closer than reference to some test sample.

    Ref: Mayilvahanan et al. ICLR 2024 ("near" pruning of LAION towards a benchmark).
    """
    return ~result.closer


def _check_count(n: int, n_pool: int, what: str) -> None:
    if n < 0 or n > n_pool:
        raise ConfigError(f"{what} must be between 0 and the {n_pool} pool rows, got {n}")


def most_similar(result: SimilarityResult, n: int) -> np.ndarray:
    """(n,) int64 pool positions with the largest ``max_sim``, most similar first (ties: lower position).

    Raises:
        ConfigError: n < 0 or n > pool rows.
    """
    pos = np.arange(len(result.max_sim))
    _check_count(n, len(pos), "n")
    return np.lexsort((pos, -result.max_sim))[:n].astype(np.int64)


def split_by_similarity(result: SimilarityResult, size: int, near: bool = True) -> np.ndarray:
    """A pool split of ``size`` rows: the nearest (``near``) or farthest rows to the benchmark by ``max_sim``.

    Rows are ranked by ``max_sim`` (descending when near, ascending when far), ties by lower position;
    the first ``size`` are taken. Ref: Mayilvahanan et al. ICLR 2024 build pool splits this way.

    Returns:
        (size,) int64 pool positions in ascending order (a split is a set of rows).

    Raises:
        ConfigError: size < 0 or size > pool rows.
    """
    pos = np.arange(len(result.max_sim))
    _check_count(size, len(pos), "size")
    key = -result.max_sim if near else result.max_sim
    return np.sort(np.lexsort((pos, key))[:size]).astype(np.int64)
