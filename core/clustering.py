"""The clustering stage: an embedding set in, concept clusters in the workspace and catalog out.

Builds on the array functions of :mod:`core.cluster`. Centroids are fitted on a seeded sample
(``fit_sample`` rows, drawn across shards), then every row is assigned shard by shard, so memory stays
bounded by one shard plus two (n,) arrays. Outputs, each written atomically:

    clusters/<id>/centroids.npy        (k, D) float32 unit rows
    clusters/<id>/assignments.parquet  id, row (dataset index position), cluster, dist_to_centroid (1 - cos)
    clusters/<id>/meta.json            resolved config, counts, skipped rows by reason

and rows in the catalog tables ``clusterings`` and ``clusters`` (size, d_intra, d_inter, complexity,
label from the captions by class-based TF-IDF when the dataset has captions). A complete clustering
with the same config is reused; rows whose embedding is NaN, infinite or zero are skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core import atomic
from core.cluster import assign, cluster_stats, fit_centroids, validate_embeddings
from core.errors import ConfigError, DataError, MissingFileError
from core.files import load_npy, read_json, read_table, reading
from core.store.catalog import insert_rows, utcnow
from core.workspace import Workspace, validate_name

if TYPE_CHECKING:
    from core.distributed import RayBackend

log = logging.getLogger(__name__)
#: What to do when a clustering's files are missing or damaged.
CLUSTER_HINT = "re-run the clustering: prunescope cluster SET --id ID --replace"


@dataclass(frozen=True)
class ClusterConfig:
    """A clustering of one embedding set.

    Attributes:
        embedding_set: a registered embedding set (its image rows; ``modality`` picks another).
        k: clusters (SemDeDup used 50,000 on LAION-440M; DBP 500 and 100).
        seed: k-means seed (SemDeDup's 1234 by default). niter: k-means iterations.
        fit_sample: fit the centroids on this many rows drawn at random (None: all rows).
        n_neighbors: nearest other centroids averaged in d_inter (DBP: 20).
        clustering_id: default ``<embedding_set>.k<k>.s<seed>``.
        gpu: faiss GPU index (None: when faiss sees a GPU).
        vocabulary: a file of names (.txt one per line, or a .json list) to name clusters with through
            the set's CLIP text tower (``vocab_label``); the demo passes its class names.
        templates: prompt templates for the vocabulary (same formats; default "a photo of a {}.").
    """

    embedding_set: str
    k: int = 100
    seed: int = 1234
    niter: int = 20
    fit_sample: int | None = None
    n_neighbors: int = 20
    modality: str | None = None
    clustering_id: str | None = None
    gpu: bool | None = None
    vocabulary: str | None = None
    templates: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.embedding_set, "embedding set id")
        for name in ("vocabulary", "templates"):
            value = getattr(self, name)
            if value is not None:
                path = Path(value).expanduser().resolve()
                if not path.is_file():
                    raise MissingFileError(f"{name} file {path} does not exist")
                object.__setattr__(self, name, str(path))
        for name, low in (("k", 2), ("niter", 1), ("n_neighbors", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
        if self.fit_sample is not None and (not isinstance(self.fit_sample, int) or self.fit_sample < self.k):
            raise ConfigError(f"fit_sample must be an integer >= k ({self.k}); got {self.fit_sample!r}")
        cid = self.clustering_id or f"{self.embedding_set}.k{self.k}.s{self.seed}"
        if len(cid) > 64:
            cid = f"{self.embedding_set[:40]}.k{self.k}.s{self.seed}"
        object.__setattr__(self, "clustering_id", validate_name(cid, "clustering id"))

    @property
    def id(self) -> str:
        assert self.clustering_id is not None
        return self.clustering_id


@dataclass(frozen=True)
class ClusteringInfo:
    id: str
    embedding_set: str
    k: int
    n: int
    n_skipped: int
    path: Path
    stats: pd.DataFrame


def run_clustering(ws: Workspace, cfg: ClusterConfig, *, replace: bool = False,
                   backend: RayBackend | None = None) -> ClusteringInfo:
    """Fit, assign, measure and label; returns the registered clustering (reused when complete).

    ``backend`` assigns the rows on a Ray cluster, shard by shard (:mod:`core.distributed`); the
    centroids are fitted here on the sample either way, and the outputs are the same.
    """
    from core.embed import embedding_set_row, iter_embedding_shards

    set_row = embedding_set_row(ws, cfg.embedding_set)
    folder = ws.dir("clusters", cfg.id)
    meta_path = folder / "meta.json"
    config = {k: v for k, v in asdict(cfg).items() if k != "gpu"}
    if meta_path.exists() and not replace:
        meta = read_json(meta_path, f"the meta.json of clustering '{cfg.id}'", hint=CLUSTER_HINT)
        if meta.get("config") == config and meta.get("complete"):
            return _info(ws, cfg, folder, meta)
    shards = lambda: iter_embedding_shards(ws, cfg.embedding_set, cfg.modality)  # noqa: E731
    n_total = int(set_row["n"])
    if cfg.k > n_total:
        raise ConfigError(f"k = {cfg.k} is more than the {n_total} rows of embedding set '{cfg.embedding_set}'")
    vocab = _vocabulary(ws, cfg)  # before any fitting: missing weights fail fast
    sample = _fit_sample(shards(), n_total, cfg, int(set_row["dim"]))
    if len(sample) == 0:
        raise DataError(f"embedding set '{cfg.embedding_set}' has no valid rows to cluster "
                        "(every row is NaN, infinite or all zeros)")
    if len(sample) < cfg.k:
        raise ConfigError(f"k = {cfg.k} is more than the {len(sample)} valid rows sampled from "
                          f"'{cfg.embedding_set}'", hint="lower --k or raise --fit-sample")
    centroids = fit_centroids(sample, cfg.k, seed=cfg.seed, niter=cfg.niter, gpu=cfg.gpu)
    if backend is None:
        table, skipped = _assign_all(shards(), centroids)
    else:
        from core.distributed import assign_set

        table, skipped = assign_set(backend, ws, cfg.embedding_set, cfg.modality, centroids)
    if table.num_rows == 0:
        raise DataError(f"embedding set '{cfg.embedding_set}' has no valid rows to cluster")
    labels = table.column("cluster").to_numpy()
    stats = cluster_stats(labels, table.column("dist_to_centroid").to_numpy(), centroids,
                          n_neighbors=cfg.n_neighbors)
    stats["label"] = _labels(ws, set_row["dataset"], table, cfg.k)
    stats["vocab_label"], stats["vocab_score"] = _vocab_labels(vocab, centroids, cfg.k)
    atomic.save_npy(folder / "centroids.npy", centroids)
    atomic.write_parquet(folder / "assignments.parquet", table)
    meta = {"config": config, "n": table.num_rows, "skipped": skipped, "complete": True}
    _register(ws, cfg, folder, stats)
    atomic.write_json(meta_path, meta)
    log.info("clustering %s: %d rows into %d clusters (%d skipped)", cfg.id, table.num_rows, cfg.k, sum(skipped.values()))
    return ClusteringInfo(cfg.id, cfg.embedding_set, cfg.k, table.num_rows, sum(skipped.values()), folder, stats)


def _fit_sample(shards: Any, n_total: int, cfg: ClusterConfig, dim: int) -> np.ndarray:
    """The rows k-means is fitted on: all valid rows, or a seeded random sample of ``fit_sample``."""
    if cfg.fit_sample is None or cfg.fit_sample >= n_total:
        picks = None
    else:
        picks = np.sort(np.random.default_rng(cfg.seed).choice(n_total, cfg.fit_sample, replace=False))
    parts, offset = [], 0
    for _ids, _rows, X in shards:
        n = len(X)
        take = slice(None) if picks is None else picks[(picks >= offset) & (picks < offset + n)] - offset
        Xn, valid = validate_embeddings(np.asarray(X[take]), expected_dim=dim)
        parts.append(Xn[valid])
        offset += n
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _assign_all(shards: Any, centroids: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    """Assign every valid row, shard by shard; invalid rows are counted as ``bad_embedding``."""
    ids_out, rows_out, lab_out, dist_out, bad = [], [], [], [], 0
    for ids, rows, X in shards:
        Xn, valid = validate_embeddings(np.asarray(X), expected_dim=centroids.shape[1])
        lab, dist = assign(Xn if valid.all() else Xn[valid], centroids)
        ids_out.append(ids[valid])
        rows_out.append(rows[valid])
        lab_out.append(lab)
        dist_out.append(dist)
        bad += int((~valid).sum())
    table = pa.table({
        "id": pa.array(np.concatenate(ids_out).tolist() if ids_out else [], pa.string()),
        "row": pa.array(np.concatenate(rows_out) if rows_out else [], pa.int64()),
        "cluster": pa.array(np.concatenate(lab_out) if lab_out else [], pa.int32()),
        "dist_to_centroid": pa.array(np.concatenate(dist_out) if dist_out else [], pa.float32()),
    })
    return table, ({"bad_embedding": bad} if bad else {})


def _labels(ws: Workspace, dataset: str, table: pa.Table, k: int) -> list[str | None]:
    """Cluster names from the members' captions (None for every cluster when there are none)."""
    from core.datasets import open_dataset

    index = open_dataset(ws, dataset).index
    if "caption" not in index or index["caption"].isna().all():
        return [None] * k
    from core.label import cluster_labels

    captions = index["caption"].to_numpy()[table.column("row").to_numpy()]
    names = cluster_labels(list(captions), table.column("cluster").to_numpy(), k)
    return [n or None for n in names]


def _vocabulary(ws: Workspace, cfg: ClusterConfig) -> tuple[list[str], np.ndarray] | None:
    """The vocabulary's names and their (V, D) prompt-averaged text embeddings (None without one)."""
    if cfg.vocabulary is None:
        return None
    from core.evaluate.zeroshot import read_names
    from core.search import DEFAULT_TEMPLATES, load_text_encoder, vocabulary_embeddings

    names = read_names(cfg.vocabulary)
    templates = read_names(cfg.templates) if cfg.templates else list(DEFAULT_TEMPLATES)
    if not names:
        raise ConfigError(f"the vocabulary {cfg.vocabulary} lists no names")
    encode = load_text_encoder(ws, cfg.embedding_set)
    return names, vocabulary_embeddings(encode, [n.replace("_", " ") for n in names], templates)


def _vocab_labels(vocab: tuple[list[str], np.ndarray] | None, centroids: np.ndarray,
                  k: int) -> tuple[list[str | None], list[float | None]]:
    if vocab is None:
        return [None] * k, [None] * k
    from core.label import vocabulary_labels

    names, emb = vocab
    labels, score = vocabulary_labels(centroids, emb, names)
    return list(labels), [float(v) for v in score]


def _register(ws: Workspace, cfg: ClusterConfig, folder: Path, stats: pd.DataFrame) -> None:
    rows = stats.astype(object).where(stats.notna(), None).to_dict("records")
    with ws.catalog.connect() as con:
        con.execute("DELETE FROM clusterings WHERE id = ?", [cfg.id])
        con.execute("DELETE FROM clusters WHERE clustering_id = ?", [cfg.id])
        con.execute("INSERT INTO clusterings VALUES (?, ?, ?, ?, ?, ?)",
                    [cfg.id, cfg.embedding_set, cfg.k, cfg.seed, ws.rel(folder), utcnow()])
        insert_rows(con, "clusters", [
            {"clustering_id": cfg.id, "cluster": int(r["cluster"]), "size": int(r["size"]), "d_intra": r["d_intra"],
             "d_inter": r["d_inter"], "complexity": r["complexity"], "label": r["label"],
             "vocab_label": r.get("vocab_label"), "vocab_score": r.get("vocab_score")} for r in rows])


def _info(ws: Workspace, cfg: ClusterConfig, folder: Path, meta: dict[str, Any]) -> ClusteringInfo:
    stats = ws.catalog.query("SELECT * FROM clusters WHERE clustering_id = ? ORDER BY cluster", [cfg.id])
    return ClusteringInfo(cfg.id, cfg.embedding_set, cfg.k, int(meta["n"]), sum(meta["skipped"].values()), folder, stats)


def clustering_meta(ws: Workspace, clustering_id: str) -> dict[str, Any]:
    """The clustering's ``meta.json`` (resolved config, n, skipped); UnknownName when it is not registered."""
    row = ws.catalog.row("clusterings", "id", clustering_id, what="clustering")
    meta_path = ws.abs(row["path"]) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"clustering '{clustering_id}' has no meta.json in {meta_path.parent}",
                        hint=f"run it again: prunescope cluster {row['embedding_set']} --replace")
    meta: dict[str, Any] = read_json(meta_path, f"the meta.json of clustering '{clustering_id}'", hint=CLUSTER_HINT)
    return meta


def load_centroids(ws: Workspace, clustering_id: str) -> np.ndarray:
    """(k, D) float32 unit-norm centroids of a clustering."""
    path = ws.dir("clusters", validate_name(clustering_id, "clustering id"), "centroids.npy")
    return load_npy(path, f"the centroids of clustering '{clustering_id}'", hint=CLUSTER_HINT)


def iter_assigned_embeddings(ws: Workspace, clustering_id: str) -> Iterator[tuple[int, np.ndarray]]:
    """Stream the clustered rows' embeddings, aligned with ``assignments.parquet``.

    Yields ``(start, X)`` per embedding shard: X is (n, D) float32, unit-norm, the shard's valid rows
    (the ones clustering kept), and ``start`` is the position of ``X[0]`` in the assignments table.
    Memory stays bounded by one shard.
    """
    from core.embed import iter_embedding_shards

    config = clustering_meta(ws, clustering_id)["config"]
    dim = load_centroids(ws, clustering_id).shape[1]
    start = 0
    for _ids, _rows, X in iter_embedding_shards(ws, config["embedding_set"], config.get("modality")):
        Xn, valid = validate_embeddings(np.asarray(X), expected_dim=dim)
        yield start, Xn[valid]
        start += int(valid.sum())


@dataclass(frozen=True)
class _AssignedLayout:
    """Where each assignment-table position lives: shard ``i`` holds positions ``starts[i]`` onwards, at raw
    rows ``valid[i]`` of shard file ``shards[i]`` (None: every row is valid, the common case)."""

    starts: np.ndarray
    valid: list[np.ndarray | None]
    shards: list[Path | np.ndarray]  # a .npy path (mapped per gather), or the array when it has no file
    dim: int
    total: int


#: Layouts of recently gathered clusterings, keyed by (workspace, clustering, assignments mtime).
_LAYOUTS: dict[tuple[str, str, int], _AssignedLayout] = {}


def _assigned_layout(ws: Workspace, clustering_id: str) -> _AssignedLayout:
    """One validating pass over the set, cached for the process (shard files and their valid rows): later
    gathers map only the shards they need and read only the rows they need, instead of every shard again."""
    from core.embed import iter_embedding_shards

    path = ws.dir("clusters", validate_name(clustering_id, "clustering id"), "assignments.parquet")
    with reading(path, f"the assignments of clustering '{clustering_id}'", hint=CLUSTER_HINT):
        key = (str(ws.root), clustering_id, path.stat().st_mtime_ns)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    config = clustering_meta(ws, clustering_id)["config"]
    dim = load_centroids(ws, clustering_id).shape[1]
    starts, valid_rows, shards, start = [], [], [], 0
    for _ids, _rows, X in iter_embedding_shards(ws, config["embedding_set"], config.get("modality")):
        _, valid = validate_embeddings(np.asarray(X), expected_dim=dim)
        starts.append(start)
        valid_rows.append(None if valid.all() else np.flatnonzero(valid))
        # Keep the file name, not the map: a map held open keeps every page it touched resident (RSS).
        filename = getattr(X, "filename", None)
        shards.append(Path(filename) if filename else X)
        del X
        start += int(valid.sum())
    layout = _AssignedLayout(np.asarray(starts, np.int64), valid_rows, shards, dim, start)
    _LAYOUTS.clear()  # one clustering at a time: the memory maps of an older one are let go
    _LAYOUTS[key] = layout
    return layout


def gather_embeddings(ws: Workspace, clustering_id: str, positions: np.ndarray) -> np.ndarray:
    """(len(positions), D) float32 unit-norm embeddings of the given assignment-table positions, in that
    order; equal to the rows :func:`iter_assigned_embeddings` yields (each row is normalised on its own).

    Reads only the shards and rows asked for (the first call on a clustering makes one validating pass).
    """
    positions = np.asarray(positions, dtype=np.int64)
    layout = _assigned_layout(ws, clustering_id)
    if not layout.shards:
        raise DataError(f"clustering '{clustering_id}' has no embeddings to read")
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    if len(wanted) and (wanted[0] < 0 or wanted[-1] >= layout.total):
        raise DataError(f"positions must lie in [0, {layout.total}) for clustering '{clustering_id}'")
    out = np.zeros((len(positions), layout.dim), np.float32)
    bounds = np.searchsorted(wanted, np.append(layout.starts, layout.total))
    for i in np.flatnonzero(np.diff(bounds)):
        lo, hi = bounds[i], bounds[i + 1]
        local = wanted[lo:hi] - layout.starts[i]
        valid = layout.valid[i]
        raw = local if valid is None else valid[local]
        shard = layout.shards[i]
        X = load_npy(shard, f"shard {i} of clustering '{clustering_id}'", mmap_mode="r",
                     hint=CLUSTER_HINT) if isinstance(shard, Path) else shard
        out[order[lo:hi]] = validate_embeddings(np.asarray(X[raw]), expected_dim=layout.dim)[0]
        del X
    return out


#: Which end of a cluster :func:`cluster_members` returns: nearest the centroid first, or farthest first.
MEMBER_ENDS = ("prototypical", "atypical")


def cluster_members(ws: Workspace, clustering_id: str, cluster: int, *, n: int | None = 12,
                    end: str = "prototypical") -> pd.DataFrame:
    """Members of one cluster from one end: ``pos, id, row, cluster, dist_to_centroid``.

    ``prototypical`` sorts by distance to the centroid ascending (the concept's typical images),
    ``atypical`` descending (outliers, junk, mis-assigned rows); ``n=None`` returns every member.
    Reads only the ``cluster`` and ``dist_to_centroid`` columns in full, then the ids of the picks.
    """
    if end not in MEMBER_ENDS:
        raise ConfigError(f"end must be one of {', '.join(MEMBER_ENDS)}; got {end!r}")
    path = ws.dir("clusters", validate_name(clustering_id, "clustering id"), "assignments.parquet")
    cols = read_table(path, f"the assignments of clustering '{clustering_id}'", columns=["cluster", "dist_to_centroid"],
                      hint=CLUSTER_HINT)
    labels = cols.column("cluster").to_numpy()
    pos = np.flatnonzero(labels == int(cluster))
    dist = cols.column("dist_to_centroid").to_numpy()[pos]
    order = np.lexsort((pos, dist if end == "prototypical" else -dist))
    pos = pos[order[:n] if n is not None else order]
    picked = read_table(path, f"the assignments of clustering '{clustering_id}'", columns=["id", "row"],
                        hint=CLUSTER_HINT).take(pa.array(pos))
    return pd.DataFrame({"pos": pos.astype(np.int64), "id": picked.column("id").to_pylist(),
                         "row": picked.column("row").to_numpy(), "cluster": int(cluster),
                         "dist_to_centroid": dist[order[: len(pos)]].astype(np.float64)})


def cluster_composition(ws: Workspace, clustering_id: str, values: pd.Series, *, top: int = 5) -> pd.DataFrame:
    """How a per-sample attribute (e.g. the demo's ground-truth concept) splits each cluster.

    Args:
        values: the attribute per dataset index row (indexed by index position, i.e. assignments' ``row``).
        top: values kept per cluster (the rest are summed as ``(other)``).

    Returns:
        ``cluster, value, count, share`` sorted by cluster then count descending; missing values show as
        ``(none)``. The first row per cluster is its majority value and ``share`` its purity.
    """
    path = ws.dir("clusters", validate_name(clustering_id, "clustering id"), "assignments.parquet")
    table = read_table(path, f"the assignments of clustering '{clustering_id}'", columns=["row", "cluster"],
                       hint=CLUSTER_HINT)
    rows = table.column("row").to_numpy()
    attr = values.reindex(rows).astype(object).where(lambda s: s.notna(), "(none)").astype(str).to_numpy()
    df = pd.DataFrame({"cluster": table.column("cluster").to_numpy(), "value": attr})
    counts = df.groupby(["cluster", "value"]).size().rename("count").reset_index()
    counts = counts.sort_values(["cluster", "count", "value"], ascending=[True, False, True], kind="stable")
    counts["rank"] = counts.groupby("cluster").cumcount()
    counts.loc[counts["rank"] >= top, "value"] = "(other)"
    counts = counts.groupby(["cluster", "value"], sort=False)["count"].sum().reset_index()
    counts["share"] = counts["count"] / counts.groupby("cluster")["count"].transform("sum")
    return counts.reset_index(drop=True)


def list_clusterings(ws: Workspace) -> pd.DataFrame:
    return ws.catalog.query("SELECT id, embedding_set, k, seed, path, created_at FROM clusterings ORDER BY created_at DESC")


def load_assignments(ws: Workspace, clustering_id: str) -> pd.DataFrame:
    """``id, row, cluster, dist_to_centroid`` of one clustering."""
    path = ws.dir("clusters", validate_name(clustering_id, "clustering id"), "assignments.parquet")
    return read_table(path, f"the assignments of clustering '{clustering_id}'", hint=CLUSTER_HINT).to_pandas()
