"""UMAP 2-D maps of a clustering: one of the centroids, one per cluster of its members; cached, seeded.

Array layer: :func:`umap_2d` maps (n, D) rows to (n, 2) coordinates (UMAP, McInnes et al. 2018, via
umap-learn). Big inputs are fitted on a seeded sample of ``fit_sample`` rows and the rest are placed
with ``transform``, so the cost is bounded by the sample (a 20k-row fit takes about a minute on one
core). Fewer than :data:`MIN_UMAP_ROWS` rows get a PCA layout instead (see :func:`umap_2d`).

Workspace layer, cached next to the clustering (every file written atomically)::

    clusters/<id>/maps/stamp.json                       size + mtime_ns of assignments.parquet and
                                                        centroids.npy the maps were made from
    clusters/<id>/maps/<key>/config.json                the MapConfig of the maps in this folder
    clusters/<id>/maps/<key>/centroids.parquet          cluster, x, y                  (k rows)
    clusters/<id>/maps/<key>/members/<cluster>.parquet  pos, id, row, x, y, dist_to_centroid

``<key>`` is :attr:`MapConfig.key`, so maps made with another config are never read. When the
clustering is re-run (``--replace`` rewrites its files) the stamp no longer matches and every map is
dropped before the next one is written; readers (:func:`has_member_map`) treat stale maps as missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import shutil
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from core import atomic
from core.clustering import gather_embeddings, load_assignments, load_centroids
from core.errors import ConfigError, DataError, MissingFileError, UnknownName
from core.files import load_npy, read_frame
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

#: Below this many rows UMAP is not run; :func:`umap_2d` falls back to PCA.
MIN_UMAP_ROWS = 8
#: Metrics a map may use (umap-learn names).
METRICS = ("cosine", "euclidean", "correlation", "manhattan")
#: Upper bound on the bytes of member embeddings :func:`compute_maps` holds at once.
GATHER_BYTES = 2 << 30
#: Rows placed by one ``UMAP.transform`` call (bounds its memory on huge clusters).
TRANSFORM_BATCH = 200_000
#: Bumped when the layout algorithm changes, so older caches are not read (part of MapConfig.key).
_MAP_VERSION = 1

_MEMBER_SCHEMA = pa.schema([("pos", pa.int64()), ("id", pa.string()), ("row", pa.int64()),
                            ("x", pa.float32()), ("y", pa.float32()), ("dist_to_centroid", pa.float32())])
_CENTROID_SCHEMA = pa.schema([("cluster", pa.int32()), ("x", pa.float32()), ("y", pa.float32())])


# -- array layer ------------------------------------------------------------------------------------
def _check_params(*, seed: Any, n_neighbors: Any, min_dist: Any, fit_sample: Any, metric: Any) -> None:
    """ConfigError on the first bad UMAP parameter."""
    for name, value, low in (("seed", seed, 0), ("n_neighbors", n_neighbors, 2),
                             ("fit_sample", fit_sample, MIN_UMAP_ROWS)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    if isinstance(min_dist, bool) or not isinstance(min_dist, numbers.Real) or not 0.0 <= float(min_dist) <= 1.0:
        raise ConfigError(f"min_dist must be a number in [0, 1]; got {min_dist!r}")
    if metric not in METRICS:
        raise UnknownName(f"map metric {metric!r} not found; available: {', '.join(METRICS)}")


def _validate_rows(X: Any) -> np.ndarray:
    """(n, D) float32 copy of X; DataError when X is not 2-D, not numeric or not finite."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise DataError(f"rows to map must be a 2-D array (rows, dim), got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"rows to map must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] and arr.shape[1] == 0:
        raise DataError(f"rows to map have no columns (shape {tuple(arr.shape)})")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise DataError(f"{int(bad.sum())} of {len(out)} rows to map hold NaN or inf (first: row {int(np.argmax(bad))})")
    return out


def fit_positions(n: int, fit_sample: int, seed: int) -> np.ndarray:
    """Sorted (m,) int64 positions UMAP is fitted on: all n rows, or a seeded sample of ``fit_sample``."""
    if n <= fit_sample:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=fit_sample, replace=False)).astype(np.int64)


def _standardise(Y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Y centred on the mean of ``Y[ref]`` and scaled so ``Y[ref]``'s RMS distance to it is 1."""
    Y = np.asarray(Y, np.float64)
    centre = Y[ref].mean(axis=0)
    rms = float(np.sqrt(((Y[ref] - centre) ** 2).sum(axis=1).mean()))
    return ((Y - centre) / (rms if rms > 1e-12 else 1.0)).astype(np.float32)


def _pca_2d(X: np.ndarray, metric: str) -> np.ndarray:
    """(n, 2) scores on the first two principal axes (rows L2-normalised first for cosine)."""
    X = X.astype(np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        X = X / np.where(norms > 0, norms, 1.0)
    U, S, _ = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    Y = np.zeros((len(X), 2))
    m = min(2, len(S))
    Y[:, :m] = U[:, :m] * S[:m]
    signs = np.sign(Y[np.abs(Y).argmax(axis=0), [0, 1]])  # fix SVD's sign freedom: largest entry > 0
    return Y * np.where(signs == 0, 1.0, signs)


@contextlib.contextmanager
def _quiet_umap() -> Iterator[None]:
    """Silence umap-learn's notes that a seed disables its parallelism (we want the seed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(n_jobs|random_state|transform_seed).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _fit_umap(X: np.ndarray, *, seed: int, n_neighbors: int, min_dist: float, metric: str) -> Any:
    """A fitted ``umap.UMAP`` on X (n >= MIN_UMAP_ROWS); n_neighbors is clamped to n - 1."""
    import umap  # lazy: ~4 s to import, and the first fit in a process pays ~20 s of numba JIT

    model = umap.UMAP(n_components=2, n_neighbors=min(int(n_neighbors), len(X) - 1), min_dist=float(min_dist),
                      metric=metric, random_state=int(seed), transform_seed=int(seed), n_jobs=1)
    with _quiet_umap():
        model.fit(X)
    return model


def _transform(model: Any, X: np.ndarray) -> np.ndarray:
    """(n, 2) coordinates of rows the model was not fitted on, placed in batches."""
    parts = []
    with _quiet_umap():
        for start in range(0, len(X), TRANSFORM_BATCH):
            parts.append(np.asarray(model.transform(X[start:start + TRANSFORM_BATCH]), np.float32))
    return np.concatenate(parts)


def umap_2d(X: Any, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
            fit_sample: int = 10_000, metric: str = "cosine") -> np.ndarray:
    """2-D UMAP layout of the rows of X, deterministic for a given seed.

    UMAP is fitted on all rows when n <= ``fit_sample``, else on ``fit_positions(n, fit_sample, seed)``
    (drawn with ``np.random.default_rng(seed)``) and the other rows are placed with ``transform``, so
    a fitted row keeps its fitted coordinates. Fewer than :data:`MIN_UMAP_ROWS` rows (too few for
    UMAP's neighbour graph) get their PCA scores instead (two leading principal axes via SVD, signs
    fixed; one row maps to the origin, two to a horizontal pair).

    Coordinates are standardised: centred on the fitted rows' mean and scaled so the fitted rows' RMS
    distance from it is 1 (unitless; only neighbourhoods mean something, as in any UMAP plot).

    Args:
        X: (n, D) rows (embeddings); any real dtype, all finite.
        seed: UMAP ``random_state`` and the sample's seed.
        n_neighbors: UMAP neighbourhood size (clamped to the fitted rows - 1).
        min_dist: UMAP minimum distance between embedded points, in [0, 1].
        fit_sample: most rows UMAP is fitted on (>= MIN_UMAP_ROWS).
        metric: one of :data:`METRICS`.

    Returns:
        (n, 2) float32 coordinates.

    Raises:
        DataError: X is not 2-D, not numeric, or holds NaN/inf. ConfigError: a bad parameter.
    """
    _check_params(seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, fit_sample=fit_sample, metric=metric)
    X = _validate_rows(X)
    n = len(X)
    if n == 0:
        return np.zeros((0, 2), np.float32)
    if n < MIN_UMAP_ROWS:
        return _standardise(_pca_2d(X, metric), np.ones(n, bool))
    fit = fit_positions(n, int(fit_sample), int(seed))
    model = _fit_umap(X[fit], seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric)
    out = np.empty((n, 2), np.float32)
    out[fit] = model.embedding_
    rest = np.ones(n, bool)
    rest[fit] = False
    if rest.any():
        out[rest] = _transform(model, X[rest])
    return _standardise(out, fit)


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapConfig:
    """How maps are made (the arguments of :func:`umap_2d`).

    Attributes:
        n_neighbors: UMAP neighbourhood size. min_dist: UMAP minimum distance, in [0, 1].
        seed: UMAP random_state and fit-sample seed. fit_sample: most rows UMAP is fitted on.
        metric: one of :data:`METRICS`.
    """

    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0
    fit_sample: int = 10_000
    metric: str = "cosine"

    def __post_init__(self) -> None:
        _check_params(**asdict(self))
        for name in ("n_neighbors", "seed", "fit_sample"):  # numpy ints -> int, so the key is stable
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "min_dist", float(self.min_dist))

    @property
    def key(self) -> str:
        """10 hex digits identifying this config (and the map algorithm's version) in cache paths."""
        text = json.dumps({**asdict(self), "version": _MAP_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


# -- cache bookkeeping ------------------------------------------------------------------------------
def _clustering_dir(ws: Workspace, clustering_id: str) -> Path:
    return ws.dir("clusters", validate_name(clustering_id, "clustering id"))


def _missing(ws: Workspace, clustering_id: str, path: Path) -> NoReturn:
    ws.catalog.row("clusterings", "id", clustering_id, what="clustering")  # UnknownName if not registered
    raise MissingFileError(f"clustering '{clustering_id}' has no {path.name} in {path.parent}",
                           hint="run the clustering again with --replace")


def _stamp(ws: Workspace, clustering_id: str) -> dict[str, list[int]]:
    """What the maps depend on: [mtime_ns, size] of the clustering's assignments and centroids."""
    folder = _clustering_dir(ws, clustering_id)
    out: dict[str, list[int]] = {}
    for name in ("assignments.parquet", "centroids.npy"):
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            _missing(ws, clustering_id, folder / name)
        out[name] = [st.st_mtime_ns, st.st_size]
    return out


def _is_fresh(ws: Workspace, clustering_id: str) -> bool:
    stamp_path = _clustering_dir(ws, clustering_id) / "maps" / "stamp.json"
    current = _stamp(ws, clustering_id)
    try:
        return bool(json.loads(stamp_path.read_text()) == current)
    except (OSError, ValueError):  # missing or damaged: the maps are recomputed
        return False


def _fresh_maps_dir(ws: Workspace, clustering_id: str) -> Path:
    """``clusters/<id>/maps``, emptied first when its maps were made from another run of the clustering."""
    maps = _clustering_dir(ws, clustering_id) / "maps"
    if not _is_fresh(ws, clustering_id):
        if maps.exists():
            log.info("clustering %s changed: dropping its cached maps", clustering_id)
            shutil.rmtree(maps)
        atomic.write_json(maps / "stamp.json", _stamp(ws, clustering_id))
    return maps


def _member_path(maps: Path, cfg: MapConfig, cluster: int) -> Path:
    return maps / cfg.key / "members" / f"{cluster}.parquet"


def _write(path: Path, df: pd.DataFrame, schema: pa.Schema, cfg: MapConfig, maps: Path) -> None:
    config_path = maps / cfg.key / "config.json"
    if not config_path.exists():
        atomic.write_json(config_path, asdict(cfg))
    atomic.write_parquet(path, pa.Table.from_pandas(df, schema=schema, preserve_index=False))


def _centroid_shape(ws: Workspace, clustering_id: str) -> tuple[int, int]:
    """(k, D) of the clustering's centroids, read from the npy header only."""
    path = _clustering_dir(ws, clustering_id) / "centroids.npy"
    if not path.exists():
        _missing(ws, clustering_id, path)
    k, dim = load_npy(path, f"the centroids of clustering '{clustering_id}'", mmap_mode="r").shape
    return int(k), int(dim)


def _check_clusters(clusters: Iterable[Any], k: int, clustering_id: str) -> list[int]:
    """Sorted unique cluster indices; UnknownName for one outside 0..k-1."""
    out = set()
    for c in clusters:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) < k:
            raise UnknownName(f"cluster {c!r} not in clustering '{clustering_id}'; valid: 0..{k - 1}")
        out.add(int(c))
    return sorted(out)


# -- workspace layer --------------------------------------------------------------------------------
def centroid_map(ws: Workspace, clustering_id: str, cfg: MapConfig | None = None) -> pd.DataFrame:
    """Map of a clustering's centroids (cached).

    Returns:
        k rows: ``cluster`` (0..k-1), ``x``, ``y`` (standardised UMAP coordinates, see :func:`umap_2d`).
    """
    cfg = cfg or MapConfig()
    maps = _fresh_maps_dir(ws, clustering_id)
    path = maps / cfg.key / "centroids.parquet"
    if path.exists():
        with contextlib.suppress(DataError):  # a damaged cache is recomputed
            return read_frame(path, "a cached centroid map")
    xy = umap_2d(load_centroids(ws, clustering_id), **asdict(cfg))
    df = pd.DataFrame({"cluster": np.arange(len(xy), dtype=np.int32), "x": xy[:, 0], "y": xy[:, 1]})
    _write(path, df, _CENTROID_SCHEMA, cfg, maps)
    return df


def _member_frame(assignments: pd.DataFrame, pos: np.ndarray, X: np.ndarray, cfg: MapConfig) -> pd.DataFrame:
    """The member map of one cluster from its assignment positions and (len(pos), D) embeddings."""
    xy = umap_2d(X, **asdict(cfg)) if len(pos) else np.zeros((0, 2), np.float32)
    sub = assignments.iloc[pos]
    return pd.DataFrame({
        "pos": pos.astype(np.int64), "id": sub["id"].to_numpy(dtype=object),
        "row": sub["row"].to_numpy(dtype=np.int64), "x": xy[:, 0], "y": xy[:, 1],
        "dist_to_centroid": sub["dist_to_centroid"].to_numpy(dtype=np.float32),
    })


def member_map(ws: Workspace, clustering_id: str, cluster: int, cfg: MapConfig | None = None) -> pd.DataFrame:
    """Map of one cluster's members (cached).

    Returns:
        One row per member, in assignments order: ``pos`` (position in assignments.parquet), ``id``,
        ``row`` (dataset index position), ``x``, ``y`` (standardised UMAP coordinates),
        ``dist_to_centroid`` (1 - cos, as in the assignments). Empty (same columns) for an empty cluster.

    Raises:
        UnknownName: the clustering is not registered, or ``cluster`` is outside 0..k-1.
    """
    cfg = cfg or MapConfig()
    maps = _fresh_maps_dir(ws, clustering_id)
    (cluster,) = _check_clusters([cluster], _centroid_shape(ws, clustering_id)[0], clustering_id)
    path = _member_path(maps, cfg, cluster)
    if path.exists():
        with contextlib.suppress(DataError):  # a damaged cache is recomputed
            return read_frame(path, "a cached member map")
    assignments = load_assignments(ws, clustering_id)
    pos = np.flatnonzero(assignments["cluster"].to_numpy() == cluster)
    X = gather_embeddings(ws, clustering_id, pos) if len(pos) else np.zeros((0, 0), np.float32)
    df = _member_frame(assignments, pos, X, cfg)
    _write(path, df, _MEMBER_SCHEMA, cfg, maps)
    return df


def has_centroid_map(ws: Workspace, clustering_id: str, cfg: MapConfig | None = None) -> bool:
    """Whether :func:`centroid_map` would answer from its cache (a stale cache counts as missing)."""
    maps = _clustering_dir(ws, clustering_id) / "maps"
    return _is_fresh(ws, clustering_id) and (maps / (cfg or MapConfig()).key / "centroids.parquet").exists()


def has_member_map(ws: Workspace, clustering_id: str, cluster: int, cfg: MapConfig | None = None) -> bool:
    """Whether :func:`member_map` would answer from its cache (a stale cache counts as missing)."""
    maps = _clustering_dir(ws, clustering_id) / "maps"
    return _is_fresh(ws, clustering_id) and _member_path(maps, cfg or MapConfig(), int(cluster)).exists()


def _batches(todo: list[int], sizes: dict[int, int], dim: int) -> Iterator[list[int]]:
    """Consecutive runs of clusters whose embeddings together stay under GATHER_BYTES (one at least)."""
    batch: list[int] = []
    rows = 0
    for c in todo:
        if batch and (rows + sizes[c]) * dim * 4 > GATHER_BYTES:
            yield batch
            batch, rows = [], 0
        batch.append(c)
        rows += sizes[c]
    if batch:
        yield batch


def _compute_members(ws: Workspace, clustering_id: str, todo: list[int], cfg: MapConfig, maps: Path,
                     progress: bool) -> None:
    """Write the member maps of ``todo``, streaming the embedding shards once per memory-bounded batch."""
    assignments = load_assignments(ws, clustering_id)
    k, dim = _centroid_shape(ws, clustering_id)
    labels = assignments["cluster"].to_numpy()
    order = np.argsort(labels, kind="stable")  # positions grouped by cluster, ascending within each
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    groups = {c: order[bounds[c]:bounds[c + 1]].astype(np.int64) for c in todo}
    with tqdm(total=len(todo), desc=f"maps {clustering_id}", unit="cluster", disable=not progress) as bar:
        for batch in _batches(todo, {c: len(g) for c, g in groups.items()}, dim):
            pos = np.concatenate([groups[c] for c in batch])
            X = gather_embeddings(ws, clustering_id, pos) if len(pos) else np.zeros((0, dim), np.float32)
            start = 0
            for c in batch:
                stop = start + len(groups[c])
                df = _member_frame(assignments, groups[c], X[start:stop], cfg)
                _write(_member_path(maps, cfg, c), df, _MEMBER_SCHEMA, cfg, maps)
                start = stop
                bar.update(1)


def compute_maps(ws: Workspace, clustering_id: str, *, clusters: Iterable[int] | None = None,
                 cfg: MapConfig | None = None, progress: bool = False) -> dict[str, int]:
    """Make the centroid map and the member maps of ``clusters`` (None: all), skipping cached ones.

    Reads the assignments once and streams the embedding shards once per batch of clusters whose
    embeddings fit in :data:`GATHER_BYTES` (one pass for all clusters of a set under 2 GiB). Each map
    is written atomically as soon as it is made, so an interrupted call resumes where it stopped.

    Returns:
        ``{"computed": n, "cached": m}``, counting maps (the centroid map included).
    """
    cfg = cfg or MapConfig()
    maps = _fresh_maps_dir(ws, clustering_id)
    k, _dim = _centroid_shape(ws, clustering_id)
    wanted = _check_clusters(range(k) if clusters is None else clusters, k, clustering_id)
    counts = {"computed": 0, "cached": 0}
    counts["cached" if (maps / cfg.key / "centroids.parquet").exists() else "computed"] += 1
    centroid_map(ws, clustering_id, cfg)
    todo = [c for c in wanted if not _member_path(maps, cfg, c).exists()]
    if todo:
        _compute_members(ws, clustering_id, todo, cfg, maps, progress)
    counts["computed"] += len(todo)
    counts["cached"] += len(wanted) - len(todo)
    log.info("maps of %s: %d computed, %d cached", clustering_id, counts["computed"], counts["cached"])
    return counts
