"""Reading a workspace clustering into a pruning context: rows, embeddings on demand, clip scores.

Positions are those of the clustering's ``assignments.parquet`` (the rows clustering kept), so they
line up with :func:`core.clustering.iter_assigned_embeddings` and ``gather_embeddings``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.errors import DataError

if TYPE_CHECKING:
    from core.prune.similarity import SimilarityTable
    from core.workspace import Workspace


class WorkspaceEmbeddings:
    """A clustering's embedding rows, read from its embedding set's shards (one pass per gather)."""

    random_access = False

    def __init__(self, ws: Workspace, clustering_id: str, n: int, dim: int) -> None:
        self.ws, self.clustering_id, self.n, self.dim = ws, clustering_id, n, dim

    def gather(self, positions: np.ndarray) -> np.ndarray:
        from core.clustering import gather_embeddings

        return gather_embeddings(self.ws, self.clustering_id, positions)


@dataclass(frozen=True)
class ContextParts:
    ids: np.ndarray
    labels: np.ndarray
    dist: np.ndarray
    centroids: np.ndarray
    embeddings: WorkspaceEmbeddings
    clip_scores: Callable[[], np.ndarray]
    similarity: Callable[[str | None], SimilarityTable]


def workspace_context_parts(ws: Workspace, clustering_id: str) -> ContextParts:
    """Ids, labels, distances and centroids of a clustering, plus lazy embeddings and clip scores."""
    from core.clustering import load_assignments, load_centroids

    table = load_assignments(ws, clustering_id)
    if table.empty:
        raise DataError(f"clustering '{clustering_id}' has no rows")
    centroids = load_centroids(ws, clustering_id)
    rows = table["row"].to_numpy(np.int64)
    return ContextParts(
        ids=table["id"].to_numpy(dtype=object), labels=table["cluster"].to_numpy(np.int64),
        dist=table["dist_to_centroid"].to_numpy(np.float32), centroids=centroids,
        embeddings=WorkspaceEmbeddings(ws, clustering_id, len(table), int(centroids.shape[1])),
        clip_scores=lambda: workspace_clip_scores(ws, clustering_id, rows),
        similarity=lambda analysis: workspace_similarity(ws, clustering_id, table["id"].to_numpy(dtype=object),
                                                         analysis))


def pool_analyses(ws: Workspace, set_id: str) -> list[str]:
    """Similarity analyses whose pool is the embedding set ``set_id``, newest first."""
    from core.similarity_stage import analysis_meta, list_analyses

    found = [(ws.dir("similarity", a, "meta.json").stat().st_mtime, a) for a in list_analyses(ws)
             if analysis_meta(ws, a)["config"].get("pool_set") == set_id]
    return [a for _, a in sorted(found, reverse=True)]


def workspace_similarity(ws: Workspace, clustering_id: str, ids: np.ndarray, analysis: str | None) -> SimilarityTable:
    """The analysis ``analysis`` (None = the newest on the clustering's embedding set) aligned with ``ids``.

    Raises:
        DataError: no analysis of this pool exists, the named one is missing, or it shares no id with the
            clustering (it was run on another pool).
    """
    import pandas as pd

    from core.clustering import clustering_meta
    from core.prune.similarity import SimilarityTable
    from core.similarity_stage import analysis_meta, load_similarity

    set_id = clustering_meta(ws, clustering_id)["config"]["embedding_set"]
    if analysis is None:
        found = pool_analyses(ws, set_id)
        if not found:
            raise DataError(f"no train-test similarity analysis of '{set_id}' (the pool of clustering "
                            f"'{clustering_id}')", hint="run `prunescope similarity` with this pool first")
        analysis = found[0]
    benchmarks = tuple(str(r["benchmark"]) for r in analysis_meta(ws, analysis)["summary"])
    index = pd.Index(ids)
    max_sim = np.full((len(ids), len(benchmarks)), np.nan, np.float32)
    closer = np.zeros((len(ids), len(benchmarks)), bool)
    for b, bench in enumerate(benchmarks):
        pool = load_similarity(ws, analysis, bench, "pool")
        at = index.get_indexer(pool["id"])
        hit = at >= 0
        max_sim[at[hit], b] = pool["max_sim"].to_numpy(np.float32)[hit]
        closer[at[hit], b] = pool["closer"].to_numpy(bool)[hit]
    if np.isnan(max_sim).all():
        raise DataError(f"similarity analysis '{analysis}' shares no sample with clustering '{clustering_id}'",
                        hint="analyse the clustering's own embedding set")
    return SimilarityTable(analysis, benchmarks, max_sim, closer)


def workspace_clip_scores(ws: Workspace, clustering_id: str, rows: np.ndarray) -> np.ndarray:
    """(n,) float32 cosine between each clustered row's embedding and the same sample's embedding in
    the set's other modality (image <-> caption), aligned by dataset row; NaN where the sample has
    none (no caption, or a caption that could not be embedded).

    Raises:
        DataError: the embedding set does not hold both modalities.
    """
    from core.clustering import clustering_meta, iter_assigned_embeddings
    from core.embed import embedding_set_row

    config = clustering_meta(ws, clustering_id)["config"]
    set_id = config["embedding_set"]
    if embedding_set_row(ws, set_id)["modality"] != "both":
        raise DataError(f"embedding set '{set_id}' holds one modality; clip scores need image and caption embeddings",
                        hint=f"embed the dataset with modality 'both' and cluster that set instead of '{set_id}'")
    other = "text" if (config.get("modality") or "image") == "image" else "image"
    index = _ShardIndex(ws, set_id, other)
    scores = np.full(len(rows), np.nan, np.float32)
    for start, X in iter_assigned_embeddings(ws, clustering_id):
        found, T = index.lookup(rows[start:start + len(X)])
        scores[start + np.flatnonzero(found)] = np.einsum("ij,ij->i", X[found], T)
    return scores


class _ShardIndex:
    """Dataset row -> (shard, offset) of one modality of a set, reading rows lazily from memmaps."""

    def __init__(self, ws: Workspace, set_id: str, modality: str) -> None:
        from core.embed import iter_embedding_shards

        self.arrays, rows, shard = [], [], []
        for k, (_ids, r, X) in enumerate(iter_embedding_shards(ws, set_id, modality)):
            self.arrays.append(X)
            rows.append(np.asarray(r, np.int64))
            shard.append(np.full(len(r), k, np.int64))
        all_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.shard = np.concatenate(shard) if shard else np.zeros(0, np.int64)
        self.offset = np.concatenate([np.arange(len(r)) for r in rows]) if rows else np.zeros(0, np.int64)
        self.sorter = np.argsort(all_rows, kind="stable")
        self.sorted_rows = all_rows[self.sorter]

    def lookup(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found (len(want),) bool, T (found.sum(), D) float32 unit rows; invalid rows are NaN)``."""
        from core.embed import normalize_rows

        if not len(self.sorted_rows):
            return np.zeros(len(want), bool), np.zeros((0, 0), np.float32)
        idx = np.minimum(np.searchsorted(self.sorted_rows, want), len(self.sorted_rows) - 1)
        found = self.sorted_rows[idx] == want
        g = self.sorter[idx[found]]
        T = np.empty((len(g), self.arrays[0].shape[1]), np.float32)
        for k in np.unique(self.shard[g]):
            sel = np.flatnonzero(self.shard[g] == k)
            T[sel] = np.asarray(self.arrays[k][self.offset[g[sel]]], dtype=np.float32)
        T, good = normalize_rows(T)
        T[~good] = np.nan
        return found, T
