"""The pruning interface: a :class:`PruneContext` in, a :class:`Selection` out, one registry of methods.

Every method (``core/prune/<method>.py``) registers one function with :func:`register`::

    @register("ssp", summary=..., paper=..., params=[ParamSpec("keep_fraction", "float", 0.5, ...)])
    def ssp(ctx: PruneContext, *, keep_fraction: float, order: str) -> Selection: ...

The registered wrapper validates and resolves the parameters through the registry (defaults filled
in, out-of-range values a one-line ConfigError), so a direct call and :func:`core.prune.select` behave
alike, and stamps the Selection with the method name and the resolved parameters.

Positions: a context describes the rows of one clustering (``ids``, ``labels``, ``dist`` of length
``n``, the *original* rows) and an *active* subset ``rows`` of them (all of them unless the context was
restricted with :meth:`PruneContext.subset`, as a chain does). Every position a Selection holds indexes
the original rows, so results of chained steps can be combined and mapped to ids directly.

Reasons are stored as small integer codes into ``reason_names`` (e.g. ``"semdedup:duplicate"``) plus a
numeric ``score`` (the value that decided: a cosine, a distance) and ``ref`` (the position of the row it
was compared to, -1 if none). This costs 14 bytes per removed row at 1M rows; readable text is made only
on demand (:meth:`Selection.details`) from per-reason templates (:func:`register_reason`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from core.errors import ConfigError, DataError
from core.registry import ParamSpec, Registry

if TYPE_CHECKING:
    from core.workspace import Workspace

#: Orders within a cluster: ``hard`` = farthest from the centroid first, ``easy`` = nearest first,
#: ``random`` = a seeded shuffle.
ORDERS = ("hard", "easy", "random")
#: Rows whose embedding norm is at or below this are invalid (as in core.cluster).
_MIN_NORM = 1e-12
#: Default bound on the float32 embedding rows a context materialises at once (1 GiB).
DEFAULT_CHUNK_BYTES = 1 << 30

MethodFn = Callable[..., "Selection"]
METHODS: Registry[MethodFn] = Registry("pruning method")
_REASON_TEXT: dict[str, str] = {}


def register_reason(name: str, template: str) -> str:
    """Declare a removal reason ``"<method>:<code>"`` and its detail template; returns ``name``.

    The template may use ``{score}`` (float), ``{ref}`` (id of the related row, '' if none) and
    ``{cluster}`` (int), e.g. ``"cos {score:.4f} to {ref}"``.
    """
    _REASON_TEXT[name] = template
    return name


def register(name: str, *, summary: str, paper: str = "", params: Sequence[ParamSpec] = ()) -> Callable[[MethodFn], MethodFn]:
    """Register a pruning method under ``name`` in :data:`METHODS` (timm-style decorator).

    The returned wrapper takes ``(ctx, **params)``: parameters left at ``None`` take their defaults,
    unknown or out-of-range ones raise ConfigError, and the Selection gets ``method``, ``params`` and
    a one-step ``chain`` filled in (``params`` the method set itself, e.g. a default it derived,
    override the registry's resolution).
    """

    def deco(fn: MethodFn) -> MethodFn:
        @functools.wraps(fn)
        def method(ctx: PruneContext, **values: Any) -> Selection:
            resolved = METHODS.entry(name).validate_params(values)
            sel = fn(ctx, **resolved)
            resolved = {**resolved, **sel.params}  # a method may resolve a default further
            return replace(sel, method=name, params=resolved, chain=((name, resolved),))

        METHODS.register(name, summary=summary, paper=paper, params=params)(method)
        return method

    return deco


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """What a method (or a chain) keeps and removes, with why.

    Attributes:
        kept: (n_kept,) int64 sorted positions into the context's original rows.
        removed: (n_removed,) int64 sorted positions into the original rows.
        reason: (n_removed,) int16 codes into ``reason_names``.
        reason_names: e.g. ``("semdedup:duplicate",)``; the part before ':' names the method.
        score: (n_removed,) float32 value that decided the removal (NaN when there is none); its meaning
            depends on the reason (cosine for duplicates, distance to the centroid for dbp/ssp).
        ref: (n_removed,) int64 position of the row the removed one was compared to (the earlier
            duplicate it resembles), -1 when there is none.
        step: (n_removed,) int16 index into ``chain`` of the step that removed the row.
        per_cluster: one row per cluster: ``cluster``, ``size`` (input rows), ``kept``, ``removed``,
            plus method-specific columns (dbp: ``complexity``, ``probability``, ``quota``).
        method: the method's name, or the chain's names joined by ``>``.
        params: the resolved parameters (for a chain: ``{"chain": [...], "fraction_of": ...}``).
        chain: the resolved ``(method, params)`` steps.
    """

    kept: np.ndarray
    removed: np.ndarray
    reason: np.ndarray
    reason_names: tuple[str, ...]
    score: np.ndarray
    ref: np.ndarray
    step: np.ndarray
    per_cluster: pd.DataFrame
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    chain: tuple[tuple[str, dict[str, Any]], ...] = ()

    @property
    def n_in(self) -> int:
        return len(self.kept) + len(self.removed)

    @property
    def reasons(self) -> pd.Categorical:
        """(n_removed,) reason names as a Categorical (no per-row strings are made)."""
        return pd.Categorical.from_codes(self.reason.astype(np.int64), categories=list(self.reason_names))

    def reason_counts(self) -> dict[str, int]:
        """Removed rows per reason name."""
        counts = np.bincount(self.reason.astype(np.int64), minlength=len(self.reason_names))
        return {name: int(c) for name, c in zip(self.reason_names, counts, strict=True)}

    def details(self, ids: np.ndarray, labels: np.ndarray) -> list[str]:
        """(n_removed,) human-readable detail per removed row, from the reasons' templates.

        Args:
            ids: (n,) ids of the original rows (to name ``ref``); labels: (n,) cluster of each row.
        """
        out = [""] * len(self.removed)
        for code, name in enumerate(self.reason_names):
            template = _REASON_TEXT.get(name, name)
            for i in np.flatnonzero(self.reason == code):
                r = int(self.ref[i])
                out[i] = template.format(score=float(self.score[i]), ref=ids[r] if r >= 0 else "",
                                         cluster=int(labels[self.removed[i]]))
        return out


def per_cluster_counts(labels: np.ndarray, rows: np.ndarray, kept: np.ndarray, k: int) -> pd.DataFrame:
    """``cluster, size, kept, removed`` for all k clusters; rows/kept are positions into ``labels``."""
    size = np.bincount(labels[rows], minlength=k)
    n_kept = np.bincount(labels[kept], minlength=k)
    return pd.DataFrame({"cluster": np.arange(k, dtype=np.int64), "size": size.astype(np.int64),
                         "kept": n_kept.astype(np.int64), "removed": (size - n_kept).astype(np.int64)})


def check_fraction(name: str, value: float) -> float:
    """A fraction in (0, 1]; ConfigError otherwise."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1]; got {value}")
    return value


def budget(keep_fraction: float, n: int) -> int:
    """Rows to keep: ``round(keep_fraction * n)`` with halves rounded up (DBP step 4)."""
    return int(np.floor(keep_fraction * n + 0.5))


# -- embeddings ------------------------------------------------------------------------------------
class EmbeddingSource(Protocol):
    """Where a context reads embedding rows from (an in-memory/memory-mapped array, a workspace)."""

    dim: int
    n: int
    #: True when any rows can be read cheaply one cluster at a time (an array); False when reading
    #: means a pass over files, so whole chunks of clusters are read at once.
    random_access: bool

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), dim) float32 rows of the given original positions, in that order."""
        ...


class ArrayEmbeddings:
    """Rows of an (n, D) array (float16/float32, memory-mapped or not), gathered on demand."""

    def __init__(self, X: np.ndarray) -> None:
        if X.ndim != 2:
            raise DataError(f"embeddings must be a 2-D array (rows, dim), got shape {tuple(X.shape)}")
        self.X = X
        self.n, self.dim = int(X.shape[0]), int(X.shape[1])
        self.random_access = True

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return np.take(self.X, positions, axis=0).astype(np.float32, copy=False)


# -- the context -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PruneContext:
    """The rows of one clustering that a pruning method sees, and lazy access to their data.

    Attributes:
        ids: (n,) ids of the original rows (str objects).
        labels: (n,) int64 cluster of each row, in [0, k).
        dist: (n,) float32 cosine distance ``1 - <x, c>`` to the assigned centroid; larger = harder.
        centroids: (k, D) float32 unit-norm centroids.
        rows: (n_active,) int64 sorted original positions this context works on.
        seed: seed of every random choice (random order, random baseline).
        embeddings: source of the (unit-norm) embedding rows; None when the context has none.
        clip_source: (n,) float32 image-caption cosine per row (NaN = no caption embedding), or a
            function computing it on first use; None when there are no caption embeddings.
        max_chunk_bytes: bound on float32 embedding rows materialised at once (:meth:`cluster_chunks`).
        similarity_source: ``analysis id or None -> SimilarityTable`` of a train-test similarity
            analysis aligned with the rows (:mod:`core.prune.similarity`); None when there is none.
        workers: threads for per-cluster work (None = the CPU count); an execution setting that never
            changes a result.
        device: where SemDeDup's pairwise products run: None / ``auto`` = a CUDA GPU when torch sees one,
            else numpy on the CPU; ``cpu``; ``cuda`` / ``cuda:N``. An execution setting: M differs by float
            rounding only (a removal can change only for a similarity within ~1e-6 of the threshold).
    """

    ids: np.ndarray
    labels: np.ndarray
    dist: np.ndarray
    centroids: np.ndarray
    rows: np.ndarray
    seed: int = 0
    embeddings: EmbeddingSource | None = None
    clip_source: np.ndarray | Callable[[], np.ndarray] | None = None
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    workers: int | None = None
    similarity_source: Callable[[str | None], Any] | None = None
    device: str | None = None
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    shared: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, ids: Sequence[Any] | np.ndarray, labels: np.ndarray, dist: np.ndarray,
                    centroids: np.ndarray, embeddings: np.ndarray | EmbeddingSource | None = None,
                    clip_scores: np.ndarray | None = None, seed: int = 0,
                    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None,
                    similarity: Any = None, device: str | None = None) -> PruneContext:
        """A context over arrays (tests, notebooks, benchmarks); all rows active.

        Args:
            ids: (n,) unique ids. labels: (n,) cluster in [0, k). dist: (n,) cosine distance to the
            assigned centroid. centroids: (k, D). embeddings: (n, D) rows (float16 is fine; they are
            re-normalised per block) or an EmbeddingSource. clip_scores: (n,) image-caption cosine,
            NaN where a row has no caption embedding. seed: for random choices. max_chunk_bytes,
            workers, device: execution settings (see the class attributes). similarity: a
            :class:`core.prune.similarity.SimilarityTable` of these rows (or a SimilaritySource).

        Raises:
            DataError: empty input, mismatched lengths or widths, labels outside [0, k), non-finite
                distances, duplicate ids.
        """
        ids_arr = np.asarray(ids, dtype=object)
        labels_arr = np.asarray(labels)
        dist_arr = np.asarray(dist, dtype=np.float32)
        cents = np.asarray(centroids, dtype=np.float32)
        _check_rows(ids_arr, labels_arr, dist_arr, cents)
        source = ArrayEmbeddings(embeddings) if isinstance(embeddings, np.ndarray) else embeddings
        if source is not None and (source.dim != cents.shape[1] or source.n != len(ids_arr)):
            raise DataError(f"embeddings must have {len(ids_arr)} rows of width {cents.shape[1]} (the centroids')")
        clip = None if clip_scores is None else np.asarray(clip_scores, dtype=np.float32)
        if clip is not None and clip.shape != (len(ids_arr),):
            raise DataError(f"clip_scores must have shape ({len(ids_arr)},), got {clip.shape}")
        sim_source = similarity if similarity is None or callable(similarity) else (lambda _analysis: similarity)
        return cls(ids_arr, labels_arr.astype(np.int64), dist_arr, cents, np.arange(len(ids_arr), dtype=np.int64),
                   seed=int(seed), embeddings=source, clip_source=clip, max_chunk_bytes=max_chunk_bytes,
                   workers=workers, similarity_source=sim_source, device=device)

    @classmethod
    def from_clustering(cls, ws: Workspace, clustering_id: str, *, seed: int = 0,
                        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None,
                        device: str | None = None) -> PruneContext:
        """A context over a registered clustering's rows (``assignments.parquet`` order).

        Embeddings are streamed from the clustering's embedding set only when a method needs them
        (SemDeDup), in chunks of whole clusters of at most ``max_chunk_bytes`` float32 (one pass over
        the shards per chunk). Clip scores are computed on first use from the set's other modality
        (sets embedded with ``modality="both"``), aligned by dataset row. Train-test similarity is read
        from the workspace's analyses of the clustering's embedding set, aligned by id.
        """
        from core.prune.sources import workspace_context_parts

        parts = workspace_context_parts(ws, clustering_id)
        return cls(parts.ids, parts.labels, parts.dist, parts.centroids, np.arange(len(parts.ids), dtype=np.int64),
                   seed=int(seed), embeddings=parts.embeddings, clip_source=parts.clip_scores,
                   max_chunk_bytes=max_chunk_bytes, workers=workers, similarity_source=parts.similarity,
                   device=device)

    def subset(self, rows: np.ndarray) -> PruneContext:
        """The same context restricted to ``rows`` (original positions, a subset of the active rows).

        A Selection's ``kept`` (sorted, unique) is taken as is; the subset derives its hard/easy cluster
        grouping from this context's in O(n) (filtering a sorted order keeps it sorted), so a chain's
        later steps need no new sort.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
            rows = np.unique(rows)
        if len(rows) and not self._has_rows(rows):
            raise DataError("a subset's rows must be active rows of the context it restricts")
        cache = {("parent_grouped", key[1]): value for key, value in self.cache.items()
                 if key[0] == "grouped" and key[1] != "random"}
        return replace(self, rows=rows, cache=cache)

    def _has_rows(self, rows: np.ndarray) -> bool:
        """Whether sorted ``rows`` are all active rows of this context."""
        if rows[0] < 0 or rows[-1] >= self.n:
            return False
        if len(self.rows) == self.n:  # every row is active
            return True
        at = np.searchsorted(self.rows, rows)
        return bool((at < len(self.rows)).all() and (self.rows[np.minimum(at, len(self.rows) - 1)] == rows).all())

    # -- views -------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_active(self) -> int:
        return len(self.rows)

    def clip_scores(self) -> np.ndarray:
        """(n,) float32 image-caption cosine of the original rows; NaN = no caption embedding."""
        if "clip" not in self.shared:
            src = self.clip_source
            if src is None:
                raise DataError("this context has no caption embeddings for clip scores",
                                hint="embed the pool with modality 'both' (image and text)")
            self.shared["clip"] = np.asarray(src() if callable(src) else src, dtype=np.float32)
        scores: np.ndarray = self.shared["clip"]
        return scores

    def grouped(self, order: str) -> tuple[np.ndarray, np.ndarray]:
        """Active rows grouped by cluster and ordered within each cluster (cached per order).

        Returns:
            ``(positions, bounds)``: positions (n_active,) int64 original positions, cluster c's rows
            being ``positions[bounds[c]:bounds[c+1]]`` in ``order`` (hard = distance descending, easy =
            ascending, random = seeded shuffle; ties by position); bounds (k+1,) int64.
        """
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        key = ("grouped", order)
        if key not in self.cache and ("parent_grouped", order) in self.cache:
            self.cache[key] = self._filtered_grouping(*self.cache[("parent_grouped", order)])
        if key not in self.cache:
            labels = self.labels[self.rows]
            if order == "random":
                within = np.random.default_rng(self.seed).permutation(len(self.rows))
            else:
                within = -self.dist[self.rows] if order == "hard" else self.dist[self.rows]
            perm = np.lexsort((self.rows, within, labels))
            bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=self.k))]).astype(np.int64)
            self.cache[key] = (self.rows[perm], bounds)
        grouped: tuple[np.ndarray, np.ndarray] = self.cache[key]
        return grouped

    def _filtered_grouping(self, positions: np.ndarray, _bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A parent's grouping restricted to this context's rows: O(n), no sort."""
        member = np.zeros(self.n, dtype=bool)
        member[self.rows] = True
        kept = positions[member[positions]]
        counts = np.bincount(self.labels[kept], minlength=self.k)
        return kept, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def row_index(self) -> np.ndarray:
        """(n,) int64 index of each original position in ``rows`` (-1 for inactive rows), cached."""
        if "row_index" not in self.cache:
            inv = np.full(self.n, -1, dtype=np.int64)
            inv[self.rows] = np.arange(len(self.rows), dtype=np.int64)
            self.cache["row_index"] = inv
        index: np.ndarray = self.cache["row_index"]
        return index

    def load_embeddings(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), D) float32 unit rows; DataError naming a NaN/inf/zero row."""
        if self.embeddings is None:
            raise DataError("this context has no embeddings (SemDeDup needs them)")
        X = self.embeddings.gather(positions)
        if not X.flags.writeable or X.dtype != np.float32:
            X = np.array(X, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", X, X))
        bad = ~np.isfinite(norms) | (norms <= _MIN_NORM)
        if bad.any():
            raise DataError(f"embedding of row '{self.ids[positions[np.argmax(bad)]]}' is NaN, infinite or zero",
                            hint="re-run clustering, which skips invalid embeddings")
        X /= norms[:, None]
        return X

    def cluster_chunks(self, order: str) -> list[tuple[int, int]]:
        """``[(c0, c1), ...]``: ranges of clusters whose rows together fit ``max_chunk_bytes`` (a larger
        cluster is a chunk of its own)."""
        _, bounds = self.grouped(order)
        limit = max(1, self.max_chunk_bytes // (4 * self.centroids.shape[1]))
        chunks: list[tuple[int, int]] = []
        c0 = 0
        for c in range(self.k):
            if c > c0 and bounds[c + 1] - bounds[c0] > limit:
                chunks.append((c0, c))
                c0 = c
        chunks.append((c0, self.k))
        return chunks


def _check_rows(ids: np.ndarray, labels: np.ndarray, dist: np.ndarray, centroids: np.ndarray) -> None:
    n = len(ids)
    if n == 0:
        raise DataError("nothing to prune: the input has no rows")
    if centroids.ndim != 2 or centroids.shape[0] < 1:
        raise DataError(f"centroids must be a (k, D) array, got shape {centroids.shape}")
    if labels.shape != (n,) or dist.shape != (n,) or ids.ndim != 1:
        raise DataError(f"ids, labels and dist must be 1-D of one length; got {ids.shape}, {labels.shape}, {dist.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"cluster labels must be integers, got {labels.dtype}")
    k = centroids.shape[0]
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(f"cluster labels must lie in [0, {k}) for {k} centroids; got [{labels.min()}, {labels.max()}]")
    if not np.isfinite(dist).all():
        raise DataError("distances to the centroids contain NaN or inf")
    if not pd.Index(ids).is_unique:
        raise DataError("ids must be unique")


def selection_from_mask(ctx: PruneContext, keep: np.ndarray, *, reason_names: Sequence[str],
                        reason: np.ndarray | int = 0, score: np.ndarray | None = None,
                        ref: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> Selection:
    """A Selection from a (n_active,) keep mask over ``ctx.rows``.

    ``reason``, ``score`` and ``ref`` are (n_active,) arrays (or a single reason code); only their
    entries for removed rows are stored. ``ref`` holds original positions (-1 = none). ``extra`` adds
    (k,) per-cluster columns.
    """
    keep = np.asarray(keep, dtype=bool)
    drop = ~keep
    n_removed = int(drop.sum())
    codes = np.broadcast_to(np.asarray(reason, dtype=np.int16), keep.shape)[drop]
    scores = np.full(n_removed, np.nan, np.float32) if score is None else np.asarray(score, np.float32)[drop]
    refs = np.full(n_removed, -1, np.int64) if ref is None else np.asarray(ref, np.int64)[drop]
    kept = ctx.rows[keep]
    per_cluster = per_cluster_counts(ctx.labels, ctx.rows, kept, ctx.k)
    for name, values in (extra or {}).items():
        per_cluster[name] = values
    return Selection(kept=kept, removed=ctx.rows[drop], reason=codes.astype(np.int16),
                     reason_names=tuple(reason_names), score=scores, ref=refs,
                     step=np.zeros(n_removed, np.int16), per_cluster=per_cluster)


def order_param(help_extra: str = "") -> ParamSpec:
    """The shared ``order`` parameter spec (hard / easy / random)."""
    return ParamSpec("order", "choice", "hard", choices=ORDERS,
                     help="hard = farthest from the centroid first, easy = nearest first, random = seeded" + help_extra)


def keep_fraction_param(default: float | None = 0.5, help: str = "fraction of the input rows to keep") -> ParamSpec:
    return ParamSpec("keep_fraction", "float", default, help=help + " (0, 1]", min=0.0, max=1.0)
