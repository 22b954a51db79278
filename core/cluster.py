"""Concept clusters of embeddings: validation, spherical k-means, nearest-centroid assignment, stats.

Array in, array out; no paths, no catalog. Conventions (docs: ALGORITHMS.md "Embeddings and
clustering"): rows are L2-normalised, similarity is the dot product (= cosine), and the distance of a
row to a centroid is the cosine distance ``1 - <x, c>`` in ``[0, 2]``; larger = farther = harder.

At scale, centroids are fitted on a seeded sample (:func:`fit_centroids` ``fit_sample``) and every row
is then assigned in bounded batches (:func:`assign`), which also reads memory-mapped float16 shards.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pandas as pd

from core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Rows whose norm is at or below this are treated as zero vectors (invalid).
_MIN_NORM = 1e-12
#: Upper bound on elements of one centroid-centroid similarity block in :func:`cluster_stats`.
_BLOCK_ELEMENTS = 1 << 24


def validate_embeddings(X: np.ndarray, *, expected_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Checks an embedding matrix and L2-normalises its rows.

    Args:
        X: (N, D) embeddings, any float dtype (float16 memmaps included).
        expected_dim: D the caller expects (the model's width); ``None`` accepts any width.

    Returns:
        ``(Xn, valid)``: Xn is (N, D) float32 with unit-norm valid rows and all-zero invalid rows; valid
        is (N,) bool, False for rows with a NaN/inf or a (near-)zero norm. The caller drops invalid rows
        and counts them as skipped with reason ``bad_embedding``.

    Raises:
        DataError: X is empty, not 2-D, or its width differs from ``expected_dim``.
    """
    if X.ndim != 2:
        raise DataError(f"embeddings must be a 2-D array (rows, dim), got shape {tuple(X.shape)}")
    n, d = X.shape
    if expected_dim is not None and d != expected_dim:
        raise DataError(f"embeddings have {d} columns, expected {expected_dim}")
    if n == 0 or d == 0:
        raise DataError(f"embeddings are empty (shape {tuple(X.shape)})")
    Xn = np.array(X, dtype=np.float32, copy=True, order="C")
    norms = _row_norms(Xn)
    valid = np.isfinite(norms) & (norms > _MIN_NORM)
    if valid.all():  # the common case: one in-place divide, no masked copies
        Xn /= norms[:, None]
    else:
        Xn[~valid] = 0.0
        np.divide(Xn, norms[:, None], out=Xn, where=valid[:, None])
    if not valid.all():
        log.info("%d of %d embedding rows are invalid (non-finite or zero norm)", int((~valid).sum()), n)
    return Xn, valid


def _row_norms(X: np.ndarray) -> np.ndarray:
    """(N,) float32 L2 norms; NaN for a row holding a NaN or an infinity.

    Squared norms come from one einsum pass; a row whose square overflows float32 while all its values
    are finite (|x| > ~1e19) is measured again in float64 so it still counts as valid.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    odd = np.flatnonzero(~np.isfinite(norms))
    if len(odd):
        rows = X[odd]
        ok = np.isfinite(rows).all(axis=1)
        norms[odd] = np.where(ok, np.linalg.norm(rows.astype(np.float64), axis=1), np.nan)
    return norms


def _resolve_gpu(gpu: bool | None) -> bool:
    """``None`` -> use a GPU when faiss sees one; ``True`` without one is a ConfigError."""
    n_gpus = faiss.get_num_gpus()
    if gpu is None:
        return n_gpus > 0
    if gpu and n_gpus == 0:
        raise ConfigError("gpu=True but faiss sees no GPU", hint="install the [gpu] extra or pass gpu=False")
    return bool(gpu)


def _fit_rows(X: np.ndarray, k: int, seed: int, fit_sample: int | None) -> np.ndarray:
    """The (M, D) float32 contiguous rows k-means is fitted on: all rows, or a seeded sample."""
    n = X.shape[0]
    if fit_sample is not None and fit_sample < 1:
        raise ConfigError(f"fit_sample must be >= 1, got {fit_sample}")
    if fit_sample is not None and fit_sample < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=fit_sample, replace=False))
        rows = X[idx]
    else:
        rows = X
    m = rows.shape[0]
    if k < 2 or k > m:
        where = f"the {m} rows it is fitted on" if m < n else f"the {n} rows"
        raise ConfigError(f"k must be between 2 and {where}, got k={k}")
    out = np.ascontiguousarray(rows, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError("embeddings contain NaN or inf; run validate_embeddings and drop invalid rows")
    return out


def fit_centroids(
    X: np.ndarray,
    k: int,
    *,
    seed: int = 1234,
    niter: int = 20,
    nredo: int = 1,
    fit_sample: int | None = None,
    gpu: bool | None = None,
) -> np.ndarray:
    """Spherical k-means centroids (faiss ``Kmeans(spherical=True)``).

    Ref: SemDeDup (Abbas et al. 2023) and DBP (Abbas, Rusak et al. ICLR 2024) cluster CLIP embeddings
    with spherical k-means; SemDeDup's reference run used k=50,000, 100 iterations, seed 1234.

    Deterministic for a fixed seed on a given device and faiss build. Note that faiss itself subsamples
    to 256 rows per centroid (``max_points_per_centroid``) with the same seed. faiss initialises with k
    random rows, which can put two seeds in one true cluster and leave another merged; ``nredo > 1``
    runs that many initialisations and keeps the best objective (costs ``nredo`` times the time).

    Args:
        X: (N, D) unit-norm rows (valid rows of :func:`validate_embeddings`); float16 memmaps work.
        k: number of clusters, 2 <= k <= number of rows fitted on.
        seed: seed of the sample and of faiss's initialisation.
        niter: k-means iterations.
        nredo: independent k-means runs; the one with the best objective is kept (SemDeDup used 1).
        fit_sample: fit on this many rows drawn without replacement (seeded) when smaller than N.
        gpu: use a faiss GPU; ``None`` = when ``faiss.get_num_gpus() > 0``.

    Returns:
        (k, D) float32 centroids with unit-norm rows.

    Raises:
        ConfigError: k out of range, niter/nredo/fit_sample < 1, or gpu=True without a GPU.
        DataError: the rows fitted on contain NaN/inf.
    """
    if X.ndim != 2 or X.shape[0] == 0:
        raise DataError(f"embeddings must be a non-empty 2-D array, got shape {tuple(X.shape)}")
    if niter < 1 or nredo < 1:
        raise ConfigError(f"niter and nredo must be >= 1, got niter={niter}, nredo={nredo}")
    rows = _fit_rows(X, k, seed, fit_sample)
    use_gpu = _resolve_gpu(gpu)
    km = faiss.Kmeans(
        rows.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=True, gpu=use_gpu, verbose=False
    )
    km.train(rows)
    centroids = np.array(km.centroids, dtype=np.float32).reshape(k, rows.shape[1])
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return np.ascontiguousarray(centroids / np.maximum(norms, _MIN_NORM), dtype=np.float32)


def assign(X: np.ndarray, centroids: np.ndarray, *, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row by inner product, in bounded batches.

    Ref: ALGORITHMS.md "Embeddings and clustering": ``dist_to_centroid(x) = 1 - <x, c_j>`` (SemDeDup;
    Sorscher et al. 2022 use it as the SSP difficulty).

    Args:
        X: (N, D) unit-norm rows; may be a memory-mapped float16 array, read ``batch_rows`` at a time and
            converted to float32 per batch, so memory stays O(batch_rows * D).
        centroids: (k, D) unit-norm centroids.
        batch_rows: rows per batch.

    Returns:
        ``(labels, dist)``: labels (N,) int32 in [0, k); dist (N,) float32 cosine distance to the assigned
        centroid, in [0, 2], larger = farther = harder. Ties go to the lower centroid index as faiss
        orders them. An all-zero (invalid) row gets similarity 0, i.e. dist 1: mask those out first.

    Raises:
        DataError: widths of X and centroids differ, or either is not 2-D.
        ConfigError: batch_rows < 1.
    """
    if X.ndim != 2 or centroids.ndim != 2 or X.shape[1] != centroids.shape[1]:
        raise DataError(f"embeddings {tuple(X.shape)} and centroids {tuple(centroids.shape)} do not match")
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_rows):
        stop = min(start + batch_rows, n)
        batch = np.ascontiguousarray(X[start:stop], dtype=np.float32)
        sim, idx = index.search(batch, 1)
        labels[start:stop] = idx[:, 0]
        dist[start:stop] = 1.0 - sim[:, 0]
    return labels, dist


def _mean_inter_distance(centroids: np.ndarray, n_neighbors: int) -> np.ndarray:
    """(k,) mean of ``1 - cos(c_j, c_l)`` over the l nearest OTHER centroids, l = min(n_neighbors, k-1).

    Computed in row blocks so a k=50,000 run never holds the full (k, k) similarity matrix.
    """
    k = centroids.shape[0]
    l = min(n_neighbors, k - 1)  # noqa: E741 - the paper's name
    C = np.ascontiguousarray(centroids, dtype=np.float32)
    out = np.empty(k, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, k, block):
        stop = min(start + block, k)
        sims = (C[start:stop] @ C.T).astype(np.float64)
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # exclude itself
        top = np.partition(-sims, l - 1, axis=1)[:, :l]  # -(l largest similarities)
        out[start:stop] = (1.0 + top).mean(axis=1)
    return out


def cluster_stats(
    labels: np.ndarray, dist: np.ndarray, centroids: np.ndarray, *, n_neighbors: int = 20
) -> pd.DataFrame:
    """Per-cluster size, intra- and inter-cluster distance, and DBP complexity.

    Ref: Abbas, Rusak et al., "Effective pruning of web-scale datasets based on complexity of concept
    clusters" (DBP, ICLR 2024), step 2: ``d_intra(j)`` = mean over members of ``1 - cos(x, c_j)``;
    ``d_inter(j)`` = mean of ``1 - cos(c_j, c_l)`` over its l nearest other centroids (l=20 in the paper,
    here ``min(n_neighbors, k-1)``); complexity ``C_j = d_inter(j) * d_intra(j)``.

    Imputation (DBP): a cluster with fewer than 3 members (1 or 2) keeps its measured ``d_intra`` but
    gets as complexity the mean complexity of the clusters with >= 3 members. An empty cluster has size
    0 and NaN ``d_intra`` and gets that same mean complexity. If no cluster has >= 3 members, every
    cluster gets the mean raw complexity of the non-empty clusters (0.0 if there is none), so that a
    softmax over complexities is uniform rather than NaN.

    Args:
        labels: (N,) cluster index of each row, in [0, k).
        dist: (N,) cosine distance of each row to its centroid (from :func:`assign`).
        centroids: (k, D) unit-norm centroids, k >= 2.
        n_neighbors: l, the number of nearest other centroids averaged in ``d_inter``.

    Returns:
        DataFrame with k rows ordered by cluster and columns ``cluster`` (int), ``size`` (int),
        ``d_intra``, ``d_inter``, ``complexity`` (float64; larger = more complex).

    Raises:
        ConfigError: k < 2 or n_neighbors < 1.
        DataError: labels and dist differ in length, or a label is outside [0, k).
    """
    k = centroids.shape[0]
    if k < 2:
        raise ConfigError(f"cluster stats need at least 2 centroids, got {k}")
    if n_neighbors < 1:
        raise ConfigError(f"n_neighbors must be >= 1, got {n_neighbors}")
    labels = np.asarray(labels)
    dist = np.asarray(dist, dtype=np.float64)
    if labels.shape != dist.shape or labels.ndim != 1:
        raise DataError(f"labels {labels.shape} and dist {dist.shape} must be 1-D of the same length")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"cluster labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    size = np.bincount(labels, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        d_intra = np.bincount(labels, weights=dist, minlength=k) / size  # 0/0 -> NaN for empty clusters
    d_inter = _mean_inter_distance(centroids, n_neighbors)
    complexity = d_inter * d_intra
    reliable = size >= 3
    if reliable.any():
        fill = float(complexity[reliable].mean())
    else:
        fill = float(complexity[size > 0].mean()) if (size > 0).any() else 0.0
    complexity = np.where(reliable, complexity, fill)
    return pd.DataFrame(
        {
            "cluster": np.arange(k, dtype=np.int64),
            "size": size.astype(np.int64),
            "d_intra": d_intra,
            "d_inter": d_inter,
            "complexity": complexity,
        }
    )
