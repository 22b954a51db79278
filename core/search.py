"""Text search over a clustering: a phrase through the embedding set's CLIP text tower to the nearest
clusters (by centroid) and the nearest samples (by image embedding).

CLIP puts images and texts in one space, so ``<image, text>`` (both unit-norm) ranks images by how well
they match a phrase, and ``<centroid, text>`` ranks concept clusters. The model is the one that made
the embedding set (its ``meta.json`` names the architecture and the pretrained tag or checkpoint), so
the query lands in the same space as the rows. The same encoder names clusters from a vocabulary
(:func:`vocabulary_embeddings`, used by the clustering stage).

Array functions (:func:`nearest_clusters`, :func:`top_k_similar`) take no paths; the workspace
functions stream the set shard by shard, so memory stays bounded by one shard plus ``top`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.errors import ConfigError, DataError
from core.files import read_json
from core.workspace import Workspace

log = logging.getLogger(__name__)

#: The prompt a bare vocabulary name or query is wrapped in when no templates are given (CLIP's own).
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
#: Longest query accepted (characters); CLIP tokenizers truncate at 77 tokens anyway.
MAX_QUERY_CHARS = 300

TextEncoder = Callable[[list[str]], np.ndarray]


def set_weights(ws: Workspace, set_id: str) -> dict[str, Any]:
    """The model that made an embedding set: ``{"model", "pretrained", "checkpoint"}`` from its meta."""
    from core.embed import embedding_set_row

    row = embedding_set_row(ws, set_id)
    meta_path = ws.abs(row["path"]) / "meta.json"
    meta = read_json(meta_path, f"the meta.json of embedding set '{set_id}'") if meta_path.exists() else {}
    config = meta.get("config", {})
    checkpoint = config.get("checkpoint")
    # For a checkpoint the catalog's `pretrained` holds a display label of the weights, not a tag.
    pretrained = config.get("pretrained") if checkpoint else (config.get("pretrained") or row.get("pretrained"))
    return {"model": row["model"], "pretrained": pretrained, "checkpoint": checkpoint}


def load_text_encoder(ws: Workspace, set_id: str, *, device: str | None = None) -> TextEncoder:
    """``encode(texts) -> (B, D)`` float32 unit rows from the text tower of the set's model.

    Raises:
        WeightsUnavailable: the set's pretrained weights are not cached and cannot be downloaded.
        MissingFileError: its checkpoint is gone (e.g. the run folder was deleted).
        UnknownName: the set was imported with a model name open_clip does not know.
    """
    from core.models import load_clip

    spec = set_weights(ws, set_id)
    clip = load_clip(spec["model"], spec["pretrained"], checkpoint=spec["checkpoint"], device=device)

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(clip.encode_texts(texts).cpu().numpy(), dtype=np.float32)

    return encode


def check_query(text: str) -> str:
    """The query stripped; ConfigError when it is empty or longer than :data:`MAX_QUERY_CHARS`."""
    query = " ".join(str(text).split())
    if not query:
        raise ConfigError("type a few words to search for, e.g. 'a red triangle'")
    if len(query) > MAX_QUERY_CHARS:
        raise ConfigError(f"the query has {len(query)} characters; keep it under {MAX_QUERY_CHARS}")
    return query


def vocabulary_embeddings(encode: TextEncoder, names: Sequence[str],
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
    """(V, D) float32 unit rows: each name's prompt embeddings averaged over ``templates`` (CLIP's
    prompt ensembling, Radford et al. 2021, sec. 3.1.4)."""
    from core.evaluate.zeroshot import build_text_classifier

    return build_text_classifier(encode, list(names), list(templates))


def nearest_clusters(query: np.ndarray, centroids: np.ndarray, top: int = 10) -> pd.DataFrame:
    """The ``top`` centroids most similar to a query: ``cluster, similarity`` (cosine, descending).

    Args:
        query: (D,) unit-norm text embedding.
        centroids: (k, D) unit-norm centroids.
    """
    sims = _check(centroids, query) @ query
    order = np.argsort(-sims, kind="stable")[: max(1, top)]
    return pd.DataFrame({"cluster": order.astype(np.int64), "similarity": sims[order].astype(np.float64)})


def top_k_similar(blocks: Iterable[tuple[int, np.ndarray]], query: np.ndarray, top: int) -> pd.DataFrame:
    """Running top-``top`` over streamed row blocks: ``pos, similarity`` (descending).

    Args:
        blocks: ``(start, X)`` pairs; X (n, D) unit rows whose first row has position ``start``.
        query: (D,) unit-norm vector.
    """
    best_pos = np.zeros(0, np.int64)
    best_sim = np.zeros(0, np.float32)
    for start, X in blocks:
        if len(X) == 0:
            continue
        sims = _check(X, query) @ query
        keep = min(top, len(sims))
        idx = np.argpartition(-sims, keep - 1)[:keep]
        best_pos = np.concatenate([best_pos, start + idx.astype(np.int64)])
        best_sim = np.concatenate([best_sim, sims[idx]])
        if len(best_sim) > top:
            cut = np.argpartition(-best_sim, top - 1)[:top]
            best_pos, best_sim = best_pos[cut], best_sim[cut]
    order = np.lexsort((best_pos, -best_sim))
    return pd.DataFrame({"pos": best_pos[order], "similarity": best_sim[order].astype(np.float64)})


def _check(X: np.ndarray, query: np.ndarray) -> np.ndarray:
    if query.ndim != 1 or X.ndim != 2 or X.shape[1] != query.shape[0]:
        raise DataError(f"the query has width {query.shape[-1]} but the rows have {X.shape[-1]}: "
                        "was the set embedded with another model?")
    return np.asarray(X, dtype=np.float32)


def search_clustering(ws: Workspace, clustering_id: str, text: str, *, encode: TextEncoder | None = None,
                      top_clusters: int = 10, top_samples: int = 24) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nearest clusters and samples of a clustering to a phrase.

    Returns:
        ``(clusters, samples)``: clusters has ``cluster, similarity``; samples has ``pos`` (position in
        the assignments table), ``id``, ``row`` (dataset index position), ``cluster``,
        ``dist_to_centroid``, ``similarity`` (cosine to the query; larger = better match).
    """
    from core.clustering import clustering_meta, iter_assigned_embeddings, load_assignments, load_centroids

    query_text = check_query(text)
    if encode is None:
        encode = load_text_encoder(ws, clustering_meta(ws, clustering_id)["config"]["embedding_set"])
    query = np.asarray(encode([query_text]), dtype=np.float32)[0]
    clusters = nearest_clusters(query, load_centroids(ws, clustering_id), top_clusters)
    hits = top_k_similar(iter_assigned_embeddings(ws, clustering_id), query, top_samples)
    members = load_assignments(ws, clustering_id).iloc[hits["pos"].to_numpy()].reset_index(drop=True)
    samples = pd.concat([hits[["pos"]], members[["id", "row", "cluster", "dist_to_centroid"]],
                         hits[["similarity"]]], axis=1)
    return clusters, samples
