"""The train-test similarity stage: embedding sets in, per-benchmark parquet and a catalog summary out.

For a pool, a reference train set and benchmarks (all embedding sets of one model; their image rows),
:func:`run_similarity` computes with :mod:`core.similarity`, per benchmark: each test sample's reference
threshold ``s_ref`` (its max similarity to the reference set), its nearest pool neighbour, the number of
pool samples closer to it than its reference neighbour, and per pool sample its max similarity to the
benchmark and whether it is closer than reference to any test sample (the CLIP-OOD paper's pruning
rule; Mayilvahanan et al., ICLR 2024). Outputs, each written atomically:

    similarity/<id>/<benchmark>.test.parquet   id, s_ref, ref_id, nn_pool_sim, nn_pool_id, n_closer
    similarity/<id>/<benchmark>.pool.parquet   id, max_sim, nearest_test_id, closer (pool set order)
    similarity/<id>/meta.json                  resolved config and the summary per benchmark

and rows in the catalog's ``metrics`` table (run_id = the analysis id, model = the pool set, dataset =
the benchmark's dataset; metrics ``share_test_pool_closer``, ``n_pool_closer``, ``share_pool_closer``,
``median_s_ref``, ``median_nn_pool_sim``). Pool, reference and test rows are streamed shard by shard;
rows with NaN/inf/zero embeddings are left out of every comparison and flagged ``closer = False``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core import atomic
from core.errors import ConfigError, DataError
from core.files import read_frame, read_json
from core.workspace import Workspace, validate_name

if TYPE_CHECKING:
    from core.distributed import RayBackend

log = logging.getLogger(__name__)
#: What to do when an analysis's files are missing or damaged.
SIM_HINT = "run the analysis again: prunescope similarity ... --id ID"

#: Metrics written to the catalog per benchmark (name -> key of SimilarityResult.summary()).
SUMMARY_METRICS = {"share_test_pool_closer": "share_test_pool_closer", "n_pool_closer": "n_prune",
                   "share_pool_closer": "share_pool_pruned", "median_s_ref": "median_s_ref",
                   "median_nn_pool_sim": "median_nn_pool_sim"}


@dataclass(frozen=True)
class SimilarityConfig:
    """A train-test similarity analysis.

    Attributes:
        pool_set: the pool's embedding set (image rows).
        reference_set: the reference train set's embedding set (ImageNet-train in the paper).
        benchmark_sets: one embedding set per benchmark.
        analysis_id: default ``<pool_set>.vs.<reference_set>`` (shortened to a valid name).
    """

    pool_set: str
    reference_set: str
    benchmark_sets: tuple[str, ...]
    analysis_id: str | None = None

    def __post_init__(self) -> None:
        sets = (self.pool_set, self.reference_set, *self.benchmark_sets)
        for name in sets:
            validate_name(name, "embedding set id")
        if not self.benchmark_sets:
            raise ConfigError("give at least one benchmark embedding set")
        if len(set(sets)) != len(sets):
            raise ConfigError("pool, reference and benchmark sets must all differ")
        object.__setattr__(self, "benchmark_sets", tuple(self.benchmark_sets))
        aid = self.analysis_id or f"{self.pool_set[:28]}.vs.{self.reference_set[:28]}"
        object.__setattr__(self, "analysis_id", validate_name(aid, "analysis id"))

    @property
    def id(self) -> str:
        assert self.analysis_id is not None
        return self.analysis_id


def _image_blocks(ws: Workspace, set_id: str, dim: int, valid_out: list[np.ndarray] | None = None,
                  ids_out: list[np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, X)`` unit float32 blocks of a set's image rows (invalid rows zeroed: similarity 0)."""
    from core.cluster import validate_embeddings
    from core.embed import iter_embedding_shards

    start = 0
    for ids, _rows, X in iter_embedding_shards(ws, set_id, "image"):
        Xn, valid = validate_embeddings(np.asarray(X), expected_dim=dim)
        if valid_out is not None:
            valid_out.append(valid)
        if ids_out is not None:
            ids_out.append(ids)
        yield start, Xn
        start += len(Xn)


def _test_rows(ws: Workspace, set_id: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, T) of a benchmark's valid image rows; DataError when it has none."""
    from core.cluster import validate_embeddings
    from core.embed import load_embeddings

    ids, X = load_embeddings(ws, set_id, "image")
    if len(ids) == 0:
        raise DataError(f"benchmark set '{set_id}' has no rows")
    T, valid = validate_embeddings(np.asarray(X), expected_dim=dim)
    if not valid.any():
        raise DataError(f"benchmark set '{set_id}' has no valid rows")
    return np.asarray(ids, dtype=object)[valid], T[valid]


def run_similarity(ws: Workspace, cfg: SimilarityConfig, *, backend: RayBackend | None = None) -> pd.DataFrame:
    """Analyse every benchmark; returns the summary (one row per benchmark) and registers it.

    The reference set and the pool are each read once for all benchmarks together. ``backend`` runs both
    passes on a Ray cluster, one task per shard (per-shard top-1 / per-shard statistics, reduced here;
    :mod:`core.distributed`); the outputs are the same.

    Raises:
        UnknownName: a set is not registered. DataError: the sets come from different models or
            checkpoints, or a set is empty.
    """
    from core.embed import embedding_set_row

    rows = {s: embedding_set_row(ws, s) for s in (cfg.pool_set, cfg.reference_set, *cfg.benchmark_sets)}
    _check_same_model(rows)
    dim = int(rows[cfg.pool_set]["dim"])
    datasets = [str(rows[b]["dataset"]) for b in cfg.benchmark_sets]
    if len(set(datasets)) != len(datasets):
        raise ConfigError("two benchmark sets embed the same dataset: " + ", ".join(datasets))
    folder = ws.dir("similarity", cfg.id)
    summaries = _analyse(ws, cfg, datasets, dim, folder, backend)
    summary = pd.DataFrame(summaries)
    _register(ws, cfg, summary)
    atomic.write_json(folder / "meta.json", {"config": asdict(cfg), "summary": summaries})
    return summary


def _check_same_model(rows: dict[str, dict[str, Any]]) -> None:
    """DataError unless every set was embedded by one model (architecture, weights, width)."""
    keys = {s: (str(r["model"]), str(r.get("pretrained") or ""), int(r["dim"])) for s, r in rows.items()}
    if len(set(keys.values())) != 1:
        raise DataError("similarities need one embedding space, but the sets come from different models: "
                        + "; ".join(f"{s}: {m} {p} (dim {d})" for s, (m, p, d) in keys.items()),
                        hint="embed the pool, the reference set and the benchmarks with the same model")


def _analyse(ws: Workspace, cfg: SimilarityConfig, datasets: list[str], dim: int, folder: Any,
             backend: RayBackend | None = None) -> list[dict[str, Any]]:
    tests = [_test_rows(ws, b, dim) for b in cfg.benchmark_sets]
    bounds = np.cumsum([0, *(len(T) for _, T in tests)])
    Ts = [T for _, T in tests]
    if backend is None:
        s_all, idx_all, all_ref = _reference_pass(ws, cfg.reference_set, np.concatenate(Ts), dim)
        s_refs = [s_all[bounds[b]:bounds[b + 1]] for b in range(len(tests))]
        results, pool_valid, pool_all = _pool_pass(ws, cfg.pool_set, Ts, s_refs, dim)
    else:
        from core.distributed import similarity_passes

        s_all, idx_all, all_ref, results, pool_valid, pool_all = similarity_passes(
            backend, ws, cfg.reference_set, cfg.pool_set, Ts, dim)
    out = []
    for b, (dataset, (test_ids, _), result) in enumerate(zip(datasets, tests, results, strict=True)):
        ref_idx = idx_all[bounds[b]:bounds[b + 1]]
        out.append(_write_benchmark(cfg, dataset, cfg.benchmark_sets[b], folder, test_ids, all_ref[ref_idx],
                                    pool_all, pool_valid, result))
    return out


def _reference_pass(ws: Workspace, set_id: str, T_all: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s_ref (q,), nearest reference position (q,), ids of every reference row) in one pass."""
    from core.similarity import reference_thresholds

    ref_ids: list[np.ndarray] = []
    s_all, idx_all = reference_thresholds(T_all, _image_blocks(ws, set_id, dim, ids_out=ref_ids))
    return s_all, idx_all, np.concatenate(ref_ids)


def _pool_pass(ws: Workspace, set_id: str, tests: list[np.ndarray], s_refs: list[np.ndarray],
               dim: int) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """(one SimilarityResult per benchmark, (n,) valid mask, (n,) ids) of the pool in one pass."""
    from core.similarity import closer_than_reference_many

    valid: list[np.ndarray] = []
    pool_ids: list[np.ndarray] = []
    results = closer_than_reference_many(tests, s_refs, _image_blocks(ws, set_id, dim, valid, pool_ids))
    return results, np.concatenate(valid), np.concatenate(pool_ids)


def _write_benchmark(cfg: SimilarityConfig, dataset: str, bench_set: str, folder: Any, test_ids: np.ndarray,
                     ref_ids: np.ndarray, pool_all: np.ndarray, pool_valid: np.ndarray,
                     result: Any) -> dict[str, Any]:
    closer = result.closer & pool_valid
    atomic.write_parquet(folder / f"{dataset}.test.parquet", pa.table({
        "id": pa.array(test_ids.tolist(), pa.string()), "s_ref": result.s_ref, "ref_id": ref_ids.tolist(),
        "nn_pool_sim": result.nn_pool_sim, "nn_pool_id": pool_all[result.nn_pool_idx].tolist(),
        "n_closer": result.n_closer}))
    atomic.write_parquet(folder / f"{dataset}.pool.parquet", pa.table({
        "id": pa.array(pool_all.tolist(), pa.string()),
        "max_sim": np.where(pool_valid, result.max_sim, np.nan).astype(np.float32),
        "nearest_test_id": test_ids[result.argmax_test].tolist(), "closer": closer}))
    summary = result.summary() | {"n_prune": int(closer.sum()), "share_pool_pruned": float(closer.mean())}
    log.info("similarity %s / %s: %.1f%% of test samples have a pool neighbour closer than reference; "
             "%d pool samples closer than reference", cfg.id, dataset, 100 * summary["share_test_pool_closer"],
             summary["n_prune"])
    return {"benchmark": dataset, "embedding_set": bench_set, **summary}


def _register(ws: Workspace, cfg: SimilarityConfig, summary: pd.DataFrame) -> None:
    rows = [{"run_id": cfg.id, "model": cfg.pool_set, "dataset": r["benchmark"], "corruption": None, "severity": 0,
             "adaptation": "none", "metric": metric, "value": float(r[key])}
            for r in summary.to_dict("records") for metric, key in SUMMARY_METRICS.items()]
    ws.catalog.insert("metrics", rows, replace_where="run_id = ?", replace_params=[cfg.id])


def load_similarity(ws: Workspace, analysis_id: str, benchmark: str, part: str = "test") -> pd.DataFrame:
    """One output table of an analysis: ``part`` = ``test`` or ``pool``."""
    if part not in ("test", "pool"):
        raise ConfigError(f"part must be 'test' or 'pool'; got {part!r}")
    path = ws.dir("similarity", validate_name(analysis_id, "analysis id"), f"{validate_name(benchmark, 'benchmark')}.{part}.parquet")
    if not path.exists():
        raise DataError(f"no {part} table for benchmark '{benchmark}' in analysis '{analysis_id}' ({path})",
                        hint="run `prunescope similarity` first")
    return read_frame(path, f"the {part} table of benchmark '{benchmark}' in analysis '{analysis_id}'", hint=SIM_HINT)


def list_analyses(ws: Workspace) -> list[str]:
    """Ids of the analyses with a meta.json, sorted."""
    root = ws.dir("similarity")
    return sorted(p.parent.name for p in root.glob("*/meta.json")) if root.exists() else []


def analysis_meta(ws: Workspace, analysis_id: str) -> dict[str, Any]:
    path = ws.dir("similarity", validate_name(analysis_id, "analysis id"), "meta.json")
    if not path.exists():
        raise DataError(f"similarity analysis '{analysis_id}' not found", hint="run `prunescope similarity` first")
    what = f"the meta.json of similarity analysis '{analysis_id}'"
    meta: dict[str, Any] = read_json(path, what, hint=SIM_HINT)
    config, summary = (meta.get("config"), meta.get("summary")) if isinstance(meta, dict) else (None, None)
    if (not isinstance(config, dict) or not all(isinstance(config.get(k), str) for k in ("pool_set", "reference_set"))
            or not isinstance(summary, list) or not summary
            or not all(isinstance(b, dict) and isinstance(b.get("benchmark"), str)
                       and isinstance(b.get("embedding_set"), str) for b in summary)):
        raise DataError(f"{what} ({path}) lacks its config (pool_set, reference_set) or its per-benchmark summary",
                        hint=SIM_HINT)
    return meta
