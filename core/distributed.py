"""The Ray backend: the stages' heavy work on a Ray cluster (Ray Data), with the same outputs.

What runs where (``--backend ray``): the stage functions (:func:`core.embed.embed_dataset`,
:func:`core.clustering.run_clustering`, :func:`core.prune.manifest.run_pruning`,
:func:`core.similarity_stage.run_similarity`) still resolve configs, open and close the set, write
``meta.json`` and the catalog rows here, in the driver; only the per-shard and per-cluster work moves:

- **embed**: a pool of actors, each holding the model (``num_gpus`` per actor for GPU actors, CPU
  otherwise), computes whole shards with :func:`core.embed.embed_shards` (the function the local
  path runs) and writes them to the workspace, so resuming and the files are as without Ray;
- **assign** (clustering): one task per embedding shard runs the local assignment of that shard
  against the centroids (fitted in the driver on the sample, as locally); the driver concatenates;
- **per-cluster pruning** (SemDeDup, both modes): shards are read into rows (position, cluster,
  place in the pruning order, embedding), grouped by cluster, and each cluster runs
  :func:`core.prune.semdedup.semdedup_max_similarity` or :func:`~core.prune.semdedup.semdedup_groups`.
  Methods that read no embeddings (dbp, ssp, random, clip_score, similarity) are O(n) array work on
  the labels and distances and run in the driver unchanged;
- **train-test similarity**: one task per reference shard finds each test row's top-1 there, the
  driver keeps the best (ties: lower position); one task per pool shard computes the pool rows'
  statistics against every benchmark, the driver concatenates and reduces the per-test ones.

Ray schedules everything (no scheduler of our own). Workers read and write the workspace's files,
so on a real cluster the workspace and the datasets' images must be on storage every node mounts at
the same path, and prunescope (with the ``dist`` extra) must be installed on every node.

``ray`` is imported only inside this module's functions: ``import core.distributed`` works without it
and :func:`import_ray` turns its absence into one line (:class:`RayUnavailable`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError, DataError, PrunescopeError

if TYPE_CHECKING:
    import pyarrow as pa

    from core.embed import EmbedConfig
    from core.prune.base import PruneContext, Selection
    from core.runs import RunHandle
    from core.workspace import Workspace

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
SHUFFLES = ("sort", "hash")
RAY_HINT = "install the dist extra: pip install 'prunescope[dist]'"
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}$")


class RayUnavailable(ConfigError):
    """``--backend ray`` was asked for but Ray is not installed."""


def import_ray() -> Any:
    """The ``ray`` module (with Ray Data); RayUnavailable naming the extra to install when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401  (the pipelines need it; `ray` alone may be a core-only install)
    except ImportError:
        raise RayUnavailable("the ray backend needs Ray (with Ray Data), which is not installed",
                             hint=RAY_HINT) from None
    return ray


# -- the backend and its session -------------------------------------------------------------------
@dataclass(frozen=True)
class RayBackend:
    """Where and how the Ray backend runs. Execution settings only: they never change a result.

    Attributes:
        address: ``auto`` (the running cluster: ``RAY_ADDRESS`` or one started with ``ray start``),
            ``local`` (an in-process cluster of ``local_cpus`` CPUs, shut down after the stage),
            ``HOST:PORT`` (a cluster's GCS address) or ``ray://HOST:PORT`` (Ray Client).
        local_cpus: CPUs of the ``local`` cluster.
        task_cpus: CPUs each task and actor claims; fractional so that, on a small machine, actors
            never take every CPU and starve the tasks feeding them (ENV.md "Ray").
        num_gpus: GPUs per embedding actor (0 = CPU actors; 1 = one GPU each; 0.5 = two per GPU).
        actors: embedding actors (each loads the model once and embeds whole shards).
        shuffle: Ray Data's group-by shuffle: ``sort`` (pull-based sort shuffle; starts in well under a
            second) or ``hash`` (Ray's default; aggregator actors, for very large groups).
        progress: show Ray Data's progress bars.
    """

    address: str = "auto"
    local_cpus: int = 2
    task_cpus: float = 0.5
    num_gpus: float = 0.0
    actors: int = 1
    shuffle: str = "sort"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.address not in ("auto", "local") and not _ADDRESS.match(self.address):
            raise ConfigError(f"Ray address must be auto, local, HOST:PORT or ray://HOST:PORT; got {self.address!r}")
        if isinstance(self.local_cpus, bool) or not isinstance(self.local_cpus, int) or self.local_cpus < 1:
            raise ConfigError(f"local_cpus must be an integer >= 1; got {self.local_cpus!r}")
        if isinstance(self.actors, bool) or not isinstance(self.actors, int) or self.actors < 1:
            raise ConfigError(f"the number of embedding actors must be an integer >= 1; got {self.actors!r}")
        if not self.task_cpus > 0:
            raise ConfigError(f"task_cpus must be > 0; got {self.task_cpus!r}")
        if not self.num_gpus >= 0:
            raise ConfigError(f"num_gpus must be >= 0; got {self.num_gpus!r}")
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"shuffle must be one of {', '.join(SHUFFLES)}; got {self.shuffle!r}")


def make_backend(backend: str, address: str | None = None, **options: Any) -> RayBackend | None:
    """The CLI's ``--backend local|ray`` and ``--address``: None for ``local``, else a RayBackend.

    ``options`` are RayBackend fields; those left at None keep their defaults.

    Raises:
        ConfigError: an unknown backend, or ``address``/Ray options given with the local backend.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    given = {k: v for k, v in options.items() if v is not None}
    if backend == "local":
        if address is not None or given:
            names = ["address"] * (address is not None) + list(given)
            verb = "applies" if len(names) == 1 else "apply"
            raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in names)} only {verb} with --backend ray")
        return None
    runner = RayBackend(address=address or "auto", **given)
    import_ray()  # a missing Ray fails here, before any work
    return runner


@contextlib.contextmanager
def session(backend: RayBackend) -> Iterator[Any]:
    """Ray, connected for the duration: a session already open in this process (a notebook's, a test
    module's) is used as it is and left open; otherwise one is started (``local``) or joined, and shut
    down (disconnected, for a cluster) at the end. Yields the ``ray`` module.

    Raises:
        RayUnavailable: Ray is not installed. ConfigError: no cluster answers at the address.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _init(ray, backend)
    data = ray.data.DataContext.get_current()
    saved = (data.enable_progress_bars, data.shuffle_strategy, data.raise_original_map_exception)
    data.enable_progress_bars = backend.progress
    data.shuffle_strategy = _shuffle_strategy(backend.shuffle)
    data.raise_original_map_exception = True  # a DataError in a task reaches us as itself (see _consume)
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    if not backend.progress:
        data_log.setLevel(logging.WARNING)  # no per-pipeline "Starting execution ..." lines on stderr
    try:
        yield ray
    finally:
        data.enable_progress_bars, data.shuffle_strategy, data.raise_original_map_exception = saved
        data_log.setLevel(saved_level)
        if started:
            ray.shutdown()


def _init(ray: Any, backend: RayBackend) -> None:
    if backend.address == "local":
        kw: dict[str, Any] = {"num_cpus": backend.local_cpus, "include_dashboard": False, "log_to_driver": False}
    else:
        kw = {"address": backend.address}
    try:
        ray.init(logging_level=logging.WARNING, **kw)
    except ConnectionError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"no Ray cluster answers at {backend.address}: {first}",
                          hint="start one with `ray start --head` (then --address auto), "
                               "or use --address local for a Ray on this machine") from None


def _shuffle_strategy(name: str) -> Any:
    from ray.data.context import ShuffleStrategy

    return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if name == "sort" else ShuffleStrategy.HASH_SHUFFLE


def _consume(run: Callable[[], Any]) -> Any:
    """``run()``, with a prunescope error raised inside a Ray task re-raised as itself (one line in the
    CLI) instead of Ray's wrapper with the remote traceback."""
    try:
        return run()
    except Exception as exc:
        cause = _prunescope_cause(exc)
        if cause is None or cause is exc:
            raise
        raise cause from None


def _prunescope_cause(exc: BaseException) -> PrunescopeError | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # RayTaskError keeps the remote exception here
        if isinstance(inner, BaseException) and inner is not e:
            e = inner
            continue
        if isinstance(e, PrunescopeError) and hasattr(e, "message"):
            return e
        e = e.__cause__ or e.__context__
    return None


# -- helpers that run on the workers ---------------------------------------------------------------
def _resolve(value: Any) -> Any:
    """An object-store reference's value (arrays come zero-copy, read-only), or the value itself."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _items(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A numpy batch of shard items as a list of plain dicts."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys} for i in range(n)]


def _load_shard(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) str objects, rows (n,) int64, X (n, D) memory-mapped) of one shard, as
    :func:`core.embed.iter_embedding_shards` yields them."""
    import pyarrow.parquet as pq

    table = pq.read_table(item["parquet"])
    X = np.load(item["npy"], mmap_mode="r", allow_pickle=False)
    if X.shape[0] != table.num_rows:
        raise DataError(f"{item['npy']} has {X.shape[0]} rows but {Path(item['parquet']).name} lists {table.num_rows}")
    return np.asarray(table.column("id").to_pylist(), dtype=object), table.column("row").to_numpy(), X


def _shard_task(batch: dict[str, np.ndarray], *, fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ray Data UDF: ``fn(item, **kwargs)`` for every shard item of the batch, results pickled by shard."""
    resolved = {k: _resolve(v) for k, v in kwargs.items()}
    items = _items(batch)
    blobs = [pickle.dumps(fn(item, **resolved), protocol=pickle.HIGHEST_PROTOCOL) for item in items]
    return {"k": np.asarray([it["k"] for it in items], np.int64), "blob": np.asarray(blobs, dtype=object)}


def _map_shards(ray: Any, backend: RayBackend, items: list[dict[str, Any]], fn: Callable[..., Any],
                **kwargs: Any) -> list[Any]:
    """``[fn(item, **kwargs) for item in items]`` as one Ray Data task per shard, in ``items`` order.

    Large arguments go to the object store once (``ray.put``) and are shared by every task.
    """
    if not items:
        return []
    refs = {k: ray.put(v) if isinstance(v, np.ndarray | list | tuple) else v for k, v in kwargs.items()}
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_shard_task, fn_kwargs={"fn": fn, "kwargs": refs}, batch_size=1, batch_format="numpy",
                        num_cpus=backend.task_cpus)
    out: dict[int, Any] = {}

    def collect() -> None:
        for row in ds.iter_rows():
            out[int(row["k"])] = pickle.loads(row["blob"])

    _consume(collect)
    return [out[int(item["k"])] for item in items]


def _set_shards(ws: Workspace, set_id: str, modality: str | None) -> list[dict[str, Any]]:
    """Every finished shard of an embedding set's modality: ``k``, ``npy``, ``parquet``, ``n`` (rows) and
    ``start`` (position of its first row in the set)."""
    import pyarrow.parquet as pq

    from core.embed import _modality_dir, shard_done, shard_paths

    folder = _modality_dir(ws, set_id, modality)
    items, k, start = [], 0, 0
    while shard_done(folder, k):
        npy, parquet = shard_paths(folder, k)
        n = int(pq.read_metadata(parquet).num_rows)
        items.append({"k": k, "npy": str(npy), "parquet": str(parquet), "n": n, "start": start})
        start += n
        k += 1
    return items


# -- (a) embedding ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipFacts:
    """What ``meta.json`` records of the model that embedded a set (from the actors that ran it)."""

    embed_dim: int
    weights: str
    device: str
    precision: str


@dataclass(frozen=True)
class _DatasetView:
    """What embedding a shard needs of a dataset (its index and source), without the workspace."""

    index: Any
    source: Any


class _EmbedActor:
    """Ray Data actor: loads the model once, then embeds and writes whole shards."""

    def __init__(self, cfg: EmbedConfig, view: Any, set_dir: str, ranges: list[tuple[int, int]]) -> None:
        from core.models import load_clip

        self.cfg, self.view, self.set_dir, self.ranges = cfg, _resolve(view), Path(set_dir), ranges
        self.error: PrunescopeError | None = None
        try:
            self.clip = load_clip(cfg.model, cfg.pretrained, checkpoint=cfg.checkpoint, device=cfg.device,
                                  cache_dir=cfg.cache_dir, precision=cfg.precision)
        except PrunescopeError as exc:  # raised with the first shard: Ray keeps a task's error, not an
            self.error = exc            # actor constructor's (ActorDiedError carries only its text)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from core.embed import embed_shards

        if self.error is not None:
            raise self.error
        out: dict[str, list[Any]] = {"modality": [], "k": [], "rows": []}
        for item in _items(batch):
            m, k = str(item["modality"]), int(item["k"])
            embed_shards(self.view, self.clip, self.cfg, m, self.set_dir / m, self.ranges, [k])
            out["modality"].append(m)
            out["k"].append(k)
            out["rows"].append(self.ranges[k][1] - self.ranges[k][0])
        n = len(out["k"])
        facts = {"embed_dim": [self.clip.embed_dim] * n, "weights": [self.clip.weights] * n,
                 "device": [str(self.clip.device)] * n, "precision": [self.clip.precision] * n}
        return {key: np.asarray(values) for key, values in {**out, **facts}.items()}


def embed_pending(backend: RayBackend, ds: Any, cfg: EmbedConfig, set_dir: Path, ranges: list[tuple[int, int]],
                  pending: dict[str, list[int]], *, progress: bool = False,
                  handle: RunHandle | None = None) -> tuple[ClipFacts, dict[str, float | None]]:
    """Embed the pending shards of every modality on a pool of model-holding actors.

    Args:
        ds: the opened dataset (its index and source are shipped to the actors once).
        ranges: [start, stop) index positions of every shard. pending: modality -> shard numbers to compute.

    Returns:
        ``(facts, rates)``: the model as the actors loaded it, and rows/s per modality (None when that
        modality had nothing to compute).
    """
    from tqdm.auto import tqdm

    from core.runs import ProgressWriter

    todo = [{"modality": m, "k": k} for m in cfg.modalities for k in pending[m]]
    if not todo:  # only meta.json was missing: describe the model without running it
        return _facts_here(cfg), {m: None for m in cfg.modalities}
    total = {m: sum(ranges[k][1] - ranges[k][0] for k in pending[m]) for m in cfg.modalities}
    done = dict.fromkeys(cfg.modalities, 0)
    finished: dict[str, float] = {}
    facts: ClipFacts | None = None
    writer = ProgressWriter(handle.dir) if handle is not None else None
    with session(backend) as ray, tqdm(total=sum(total.values()), unit="row", desc=f"embed {cfg.dataset} (ray)",
                                       disable=not progress) as bar:
        view = ray.put(_DatasetView(ds.index, ds.source))
        started = time.perf_counter()
        data = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _EmbedActor, fn_constructor_kwargs={"cfg": cfg, "view": view, "set_dir": str(set_dir), "ranges": ranges},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=backend.actors),
            num_cpus=backend.task_cpus, **({"num_gpus": backend.num_gpus} if backend.num_gpus else {}))

        def collect() -> None:
            nonlocal facts
            for row in data.iter_rows():
                m, k, n = str(row["modality"]), int(row["k"]), int(row["rows"])
                facts = ClipFacts(int(row["embed_dim"]), str(row["weights"]), str(row["device"]), str(row["precision"]))
                done[m] += n
                bar.update(n)
                elapsed = max(time.perf_counter() - started, 1e-9)
                if done[m] == total[m]:
                    finished[m] = elapsed
                if writer is not None:
                    writer.write(stage="embed", modality=m, shard=k, done=done[m], total=total[m],
                                 rows_per_s=round(done[m] / elapsed, 2))

        _consume(collect)
    assert facts is not None
    rates = {m: (total[m] / finished[m] if m in finished and total[m] else None) for m in cfg.modalities}
    return facts, rates


def _facts_here(cfg: EmbedConfig) -> ClipFacts:
    from core.models import load_clip

    clip = load_clip(cfg.model, cfg.pretrained, checkpoint=cfg.checkpoint, device=cfg.device,
                     cache_dir=cfg.cache_dir, precision=cfg.precision)
    return ClipFacts(clip.embed_dim, clip.weights, str(clip.device), clip.precision)


# -- (b) assignment to the centroids ---------------------------------------------------------------
def _assign_shard(item: dict[str, Any], *, centroids: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    from core.clustering import _assign_all  # the local path's function, on this one shard

    return _assign_all([_load_shard(item)], centroids)


def assign_set(backend: RayBackend, ws: Workspace, set_id: str, modality: str | None,
               centroids: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    """Assign every row of an embedding set to its nearest centroid, one Ray task per shard.

    Returns:
        What :func:`core.clustering._assign_all` returns over the whole set: the assignments table
        (``id, row, cluster, dist_to_centroid`` in shard order, invalid rows left out) and the skipped
        rows by reason.
    """
    import pyarrow as pa

    items = _set_shards(ws, set_id, modality)
    with session(backend) as ray:
        parts = _map_shards(ray, backend, items, _assign_shard, centroids=np.ascontiguousarray(centroids, np.float32))
    if not parts:
        from core.clustering import _assign_all

        return _assign_all([], centroids)
    table = pa.concat_tables([t for t, _ in parts]).combine_chunks()
    bad = sum(s.get("bad_embedding", 0) for _, s in parts)
    return table, ({"bad_embedding": bad} if bad else {})


# -- (c) per-cluster pruning -----------------------------------------------------------------------
def _cluster_rows(batch: dict[str, np.ndarray], *, rank: Any, labels: Any, dim: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: the rows of the batch's shards that a per-cluster kernel needs.

    A shard's valid rows (as :func:`core.clustering.iter_assigned_embeddings` keeps them) sit at the
    assignment positions ``pos0 .. pos0 + count``; rows with ``rank < 0`` (inactive, or in a cluster with
    fewer than two active rows) are dropped.
    """
    from core.cluster import validate_embeddings

    rank_all, labels_all = _resolve(rank), _resolve(labels)
    parts = []
    for item in _items(batch):
        _ids, _rows, X = _load_shard(item)
        Xn, valid = validate_embeddings(np.asarray(X), expected_dim=dim)
        Xv = Xn[valid]
        if len(Xv) != item["count"]:
            raise DataError(f"shard {item['npy']} has {len(Xv)} valid rows but the clustering holds {item['count']}",
                            hint="the embedding set changed after clustering; re-run the clustering with --replace")
        pos = item["pos0"] + np.arange(len(Xv), dtype=np.int64)
        keep = rank_all[pos] >= 0
        parts.append((pos[keep], Xv[keep]))
    pos = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
    X = np.concatenate([x for _, x in parts]) if parts else np.zeros((0, dim), np.float32)
    return {"pos": pos, "cluster": labels_all[pos].astype(np.int64), "rank": rank_all[pos], "emb": X}


def _cluster_kernel(batch: dict[str, np.ndarray], *, kernel: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
                    ) -> dict[str, np.ndarray]:
    """Ray Data group UDF: one cluster's rows in the pruning order -> ``kernel`` -> per-row outputs.

    ``kernel(X)`` returns (value (m,), index (m,) of a related member within the cluster, -1 = none);
    the index is returned as that member's position.
    """
    order = np.argsort(batch["rank"], kind="stable")
    pos = np.asarray(batch["pos"])[order]
    X = np.array(np.asarray(batch["emb"])[order], dtype=np.float32)
    X /= np.sqrt(np.einsum("ij,ij->i", X, X))[:, None]  # as PruneContext.load_embeddings does
    value, rel = kernel(X)
    ref = np.where(rel >= 0, pos[np.maximum(rel, 0)], -1).astype(np.int64)
    return {"pos": pos, "value": np.asarray(value, np.float32), "ref": ref}


def _max_similarity_kernel(X: np.ndarray, *, max_slab_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    from core.prune.semdedup import semdedup_max_similarity

    return semdedup_max_similarity(X, max_slab_bytes=max_slab_bytes)


def _groups_kernel(X: np.ndarray, *, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    from core.prune.semdedup import semdedup_groups

    rep, M = semdedup_groups(X, threshold)
    return M, rep


class RayClusterExecutor:
    """Runs SemDeDup's per-cluster work of a workspace clustering on Ray (installed in a context's
    ``shared`` under :data:`core.prune.semdedup.CLUSTER_BACKEND` by :func:`run_chain_on_ray`).

    Needs an open :func:`session`. Every result is aligned with ``ctx.rows``, as the local path's.
    """

    def __init__(self, backend: RayBackend, ws: Workspace, clustering_id: str) -> None:
        self.backend, self.ws, self.clustering_id = backend, ws, clustering_id
        self._shards: list[dict[str, Any]] | None = None

    def semdedup_max_similarity(self, ctx: PruneContext, order: str, *,
                                max_slab_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(max_sim, ref) of :class:`core.prune.semdedup.SemDeDupPlan` (-inf / -1 for a cluster's first)."""
        max_sim = np.full(ctx.n_active, -np.inf, np.float32)
        ref = np.full(ctx.n_active, -1, np.int64)
        kernel = functools.partial(_max_similarity_kernel, max_slab_bytes=max_slab_bytes)
        return self._run(ctx, order, kernel, max_sim, ref)

    def semdedup_groups(self, ctx: PruneContext, order: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(M, rep) of SemDeDup's ``one_per_group`` mode (rep = each row's kept group member)."""
        M = np.full(ctx.n_active, -np.inf, np.float32)
        return self._run(ctx, order, functools.partial(_groups_kernel, threshold=threshold), M, ctx.rows.copy())

    def _run(self, ctx: PruneContext, order: str, kernel: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
             value: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fill ``value``/``ref`` (aligned with ctx.rows) from the kernel run on every cluster with >= 2 rows."""
        rank = _order_rank(ctx, order)
        if not (rank >= 0).any():
            return value, ref
        ray = import_ray()
        rank_ref, labels_ref = ray.put(rank), ray.put(ctx.labels)
        items = self._clustered_shards(ctx)
        data = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _cluster_rows, fn_kwargs={"rank": rank_ref, "labels": labels_ref, "dim": int(ctx.centroids.shape[1])},
            batch_size=1, batch_format="numpy", num_cpus=self.backend.task_cpus)
        n_groups = int(len(np.unique(ctx.labels[rank >= 0])))
        data = data.groupby("cluster", num_partitions=max(1, min(n_groups, 200))).map_groups(
            _cluster_kernel, fn_kwargs={"kernel": kernel}, batch_format="numpy", num_cpus=self.backend.task_cpus)

        def collect() -> None:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                at = np.searchsorted(ctx.rows, batch["pos"])
                value[at] = batch["value"]
                ref[at] = batch["ref"]

        _consume(collect)
        return value, ref

    def _clustered_shards(self, ctx: PruneContext) -> list[dict[str, Any]]:
        """The embedding set's shards with ``pos0``/``count``: where their valid rows sit in the
        clustering's assignments (which list them shard by shard, in order)."""
        if self._shards is None:
            self._shards = clustered_shards(self.ws, self.clustering_id)
        total = sum(item["count"] for item in self._shards)
        if total != ctx.n:
            raise DataError(f"clustering '{self.clustering_id}' lists {ctx.n} rows but its embedding shards hold {total}",
                            hint="re-run the clustering with --replace")
        return self._shards


def _order_rank(ctx: PruneContext, order: str) -> np.ndarray:
    """(n,) int64 place of each original row within its cluster in ``order``; -1 for inactive rows and
    rows of clusters with fewer than two active rows (which no per-cluster kernel needs)."""
    positions, bounds = ctx.grouped(order)
    sizes = np.diff(bounds)
    rank = np.full(ctx.n, -1, np.int64)
    within = np.arange(len(positions), dtype=np.int64) - np.repeat(bounds[:-1], sizes)
    rank[positions] = np.where(np.repeat(sizes >= 2, sizes), within, -1)
    return rank


def clustered_shards(ws: Workspace, clustering_id: str) -> list[dict[str, Any]]:
    """Shard items of a clustering's embedding set with ``pos0`` (assignment position of the shard's
    first valid row) and ``count`` (its valid rows), from the ``row`` columns alone."""
    import pyarrow.parquet as pq

    from core.clustering import clustering_meta

    config = clustering_meta(ws, clustering_id)["config"]
    assigned = pq.read_table(ws.dir("clusters", clustering_id, "assignments.parquet"),
                             columns=["row"]).column("row").to_numpy()
    items, cursor = [], 0
    for item in _set_shards(ws, config["embedding_set"], config.get("modality")):
        rows = pq.read_table(item["parquet"], columns=["row"]).column("row").to_numpy()
        hit = np.isin(assigned[cursor:cursor + len(rows)], rows)  # the valid rows come first, in order
        count = len(hit) if hit.all() else int(np.argmin(hit))
        items.append({**item, "pos0": cursor, "count": count})
        cursor += count
    return items


def run_chain_on_ray(backend: RayBackend, ws: Workspace, clustering_id: str, ctx: PruneContext,
                     steps: Sequence[Any], *, fraction_of: str = "input") -> Selection:
    """:func:`core.prune.run_chain` with SemDeDup's per-cluster work on Ray (the rest is unchanged)."""
    from core.prune.chain import run_chain
    from core.prune.semdedup import CLUSTER_BACKEND

    with session(backend):
        ctx.shared[CLUSTER_BACKEND] = RayClusterExecutor(backend, ws, clustering_id)
        try:
            return run_chain(ctx, steps, fraction_of=fraction_of)
        finally:
            ctx.shared.pop(CLUSTER_BACKEND, None)


# -- (d) train-test similarity ---------------------------------------------------------------------
def _nearest_in_shard(item: dict[str, Any], *, queries: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of the shard, (q,) top-1 similarity, (q,) its global position) of the queries in one shard."""
    from core.cluster import validate_embeddings
    from core.similarity import nearest_neighbors

    ids, _rows, X = _load_shard(item)
    Xn, _valid = validate_embeddings(np.asarray(X), expected_dim=dim)  # invalid rows zeroed, as locally
    sims, idx = nearest_neighbors(queries, [(item["start"], Xn)], k=1)
    return ids, sims[:, 0], idx[:, 0]


def _pool_shard(item: dict[str, Any], *, tests: list[np.ndarray], s_refs: list[np.ndarray],
                dim: int) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """(ids, valid mask, one shard-relative SimilarityResult per benchmark) of one pool shard."""
    from core.cluster import validate_embeddings
    from core.similarity import closer_than_reference_many

    ids, _rows, X = _load_shard(item)
    Xn, valid = validate_embeddings(np.asarray(X), expected_dim=dim)
    return ids, valid, closer_than_reference_many(tests, s_refs, [(0, Xn)])


def similarity_passes(backend: RayBackend, ws: Workspace, reference_set: str, pool_set: str,
                      tests: list[np.ndarray], dim: int) -> tuple[Any, ...]:
    """Both passes of :func:`core.similarity_stage.run_similarity` on Ray, in one session.

    Returns:
        ``(s_ref (q,), nearest reference position (q,), reference ids, results per benchmark,
        pool valid mask (n,), pool ids (n,))`` over all benchmarks' q test rows, as the local passes.
    """
    bounds = np.cumsum([0, *(len(T) for T in tests)])
    with session(backend) as ray:
        s_all, idx_all, ref_ids = reference_pass(backend, ws, reference_set, np.concatenate(tests), dim, ray=ray)
        s_refs = [s_all[bounds[b]:bounds[b + 1]] for b in range(len(tests))]
        results, valid, pool_ids = pool_pass(backend, ws, pool_set, tests, s_refs, dim, ray=ray)
    return s_all, idx_all, ref_ids, results, valid, pool_ids


def reference_pass(backend: RayBackend, ws: Workspace, set_id: str, queries: np.ndarray, dim: int, *,
                   ray: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query its top-1 in the set (per-shard top-1, then the best; ties: lower position), with the
    ids of every row of the set. Ref: :func:`core.similarity.reference_thresholds`."""
    from core.similarity import _merge_topk

    items = [it for it in _set_shards(ws, set_id, "image") if it["n"] > 0]
    parts = _map_shards(ray, backend, items, _nearest_in_shard, queries=queries, dim=dim)
    if not parts:
        raise DataError("the database is empty (no rows in any block)")
    sims, idx = _merge_topk(np.stack([p[1] for p in parts], axis=1), np.stack([p[2] for p in parts], axis=1), 1)
    return sims[:, 0], idx[:, 0], np.concatenate([p[0] for p in parts])


def pool_pass(backend: RayBackend, ws: Workspace, set_id: str, tests: list[np.ndarray], s_refs: list[np.ndarray],
              dim: int, *, ray: Any) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """:func:`core.similarity.closer_than_reference_many` over the set, one task per shard, reduced
    here: pool-row arrays concatenated, per-test counts summed, nearest pool rows folded in shard order."""
    items = [it for it in _set_shards(ws, set_id, "image") if it["n"] > 0]
    parts = _map_shards(ray, backend, items, _pool_shard, tests=tests, s_refs=s_refs, dim=dim)
    if not parts:
        raise DataError("the pool is empty (no rows in any block)")
    starts = [it["start"] for it in items]
    results = [_reduce_benchmark([p[2][b] for p in parts], starts) for b in range(len(tests))]
    return results, np.concatenate([p[1] for p in parts]), np.concatenate([p[0] for p in parts])


def _reduce_benchmark(shards: list[Any], starts: list[int]) -> Any:
    """One benchmark's SimilarityResult from its per-shard results (shard-relative pool positions)."""
    from core.similarity import SimilarityResult

    nn_sim = np.full(len(shards[0].s_ref), -np.inf, np.float32)
    nn_idx = np.full(len(shards[0].s_ref), -1, np.int64)
    for r, start in zip(shards, starts, strict=True):  # the local accumulator's rule, shard by shard
        col_idx = r.nn_pool_idx + start
        better = (r.nn_pool_sim > nn_sim) | ((r.nn_pool_sim == nn_sim) & (col_idx < nn_idx))
        nn_sim[better] = r.nn_pool_sim[better]
        nn_idx[better] = col_idx[better]
    return SimilarityResult(
        s_ref=shards[0].s_ref, max_sim=np.concatenate([r.max_sim for r in shards]).astype(np.float32),
        argmax_test=np.concatenate([r.argmax_test for r in shards]),
        closer=np.concatenate([r.closer for r in shards]),
        n_closer=np.sum([r.n_closer for r in shards], axis=0).astype(np.int64), nn_pool_sim=nn_sim, nn_pool_idx=nn_idx)
