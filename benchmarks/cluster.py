"""The clustering stage beside raw faiss k-means + assignment and scikit-learn MiniBatchKMeans, same data.

Three loops over the same embedding set (a synthetic LAION-style workspace, ``benchmarks/synthetic.py``):

- ours: ``core.clustering.run_clustering`` (replace=True), timed as a whole and split by wrapping its
  steps (core is not edited): sample read, k-means, assignment, stats, labels (c-TF-IDF over the
  captions), file writes, catalog;
- raw faiss: the same sample rows (same seeded draw) read from the memory-mapped shards,
  ``faiss.Kmeans(d, k, niter, seed, spherical=True)``, then ``IndexFlatIP.search(X, 1)`` over every
  row in batches. Goal: ours (fit + assign) <= 1.15x raw; the total is reported beside;
- scikit-learn ``MiniBatchKMeans`` (n_init=1, ``--niter`` epochs over the same sample) fitted on the
  same rows, then ``predict`` over every row in batches.

Objective of each: mean cosine distance ``1 - cos(x, c)`` of every row to its assigned centroid
(sklearn's centroids L2-normalised first); smaller = tighter clusters.

    python benchmarks/cluster.py --n 100000 --k 100                       # quick
    python benchmarks/cluster.py --workspace /tmp/synth1m                 # 1M x 512, k=1000 (build reused)
    python benchmarks/cluster.py --workspace /tmp/synth1m --save benchmarks/results/cluster.md

Without ``--workspace`` the synthetic workspace is built in a temporary folder (1M rows: minutes).
The machine's load average is printed beside each loop: other jobs inflate the times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Rows per faiss search / sklearn predict batch in the baselines (as ``core.cluster.assign``).
BATCH_ROWS = 65_536


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the synthetic set")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--concepts", type=int, default=1000, help="mixture components of the synthetic data")
    p.add_argument("--k", type=int, default=1000, help="clusters")
    p.add_argument("--fit-sample", type=int, default=100_000, help="rows k-means is fitted on (all three)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (sklearn: epochs over the sample)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sk-batch", type=int, default=4096, help="MiniBatchKMeans batch_size")
    p.add_argument("--workspace", help="synthetic workspace to build or reuse (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="faiss / BLAS / OpenMP threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timed runs of each loop (best is reported)")
    p.add_argument("--no-sklearn", action="store_true", help="skip the MiniBatchKMeans loop")
    p.add_argument("--save", help="also write the report (markdown) to this file")
    return p.parse_args(argv)


@dataclass
class Result:
    """One timed loop: seconds per phase, the assignment's objective and, for ours, the phase split."""

    method: str
    fit: float
    assign: float
    total: float
    objective: float
    load: tuple[float, float]  # 1-minute load average before and after
    phases: dict[str, float] = field(default_factory=dict)
    labels: np.ndarray | None = None
    note: str = ""

    @property
    def other(self) -> float:
        return self.total - self.fit - self.assign


# -- data --------------------------------------------------------------------------------------------
def shards(ws: Any, set_id: str) -> list[np.ndarray]:
    """The set's (n_i, D) memory-mapped shards, in storage order."""
    from core.embed import iter_embedding_shards

    return [X for _ids, _rows, X in iter_embedding_shards(ws, set_id)]


def warm_page_cache(parts: list[np.ndarray]) -> float:
    """Read every shard once so that no loop pays the first read from disk; returns seconds."""
    started = time.perf_counter()
    for X in parts:
        for s in range(0, len(X), BATCH_ROWS):
            np.asarray(X[s:s + BATCH_ROWS]).sum()
    return time.perf_counter() - started


def sample_rows(parts: list[np.ndarray], fit_sample: int | None, seed: int) -> np.ndarray:
    """(M, D) float32 rows drawn exactly as ``core.clustering._fit_sample`` draws them (same seed)."""
    n = sum(len(X) for X in parts)
    picks = None
    if fit_sample is not None and fit_sample < n:
        picks = np.sort(np.random.default_rng(seed).choice(n, fit_sample, replace=False))
    out, offset = [], 0
    for X in parts:
        take = slice(None) if picks is None else picks[(picks >= offset) & (picks < offset + len(X))] - offset
        out.append(np.asarray(X[take], dtype=np.float32))
        offset += len(X)
    return np.ascontiguousarray(np.concatenate(out))


def batches(parts: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Every row, as contiguous float32 batches of at most BATCH_ROWS."""
    for X in parts:
        for s in range(0, len(X), BATCH_ROWS):
            yield np.ascontiguousarray(X[s:s + BATCH_ROWS], dtype=np.float32)


# -- ours ----------------------------------------------------------------------------------------------
#: Steps of run_clustering wrapped for timing: (module, attribute) -> phase.
OUR_PHASES = {
    ("core.clustering", "_fit_sample"): "sample read",
    ("core.clustering", "fit_centroids"): "k-means",
    ("core.clustering", "_assign_all"): "assign",
    ("core.clustering", "cluster_stats"): "stats",
    ("core.clustering", "_labels"): "label",
    ("core.atomic", "save_npy"): "write",
    ("core.atomic", "write_parquet"): "write",
    ("core.atomic", "write_json"): "write",
    ("core.clustering", "_register"): "catalog",
}


@contextlib.contextmanager
def phase_timers(spec: dict[tuple[str, str], str]) -> Iterator[dict[str, float]]:
    """Wrap each ``module.attribute`` so its seconds add up under its phase name; restored on exit."""
    import importlib

    times: dict[str, float] = defaultdict(float)
    saved = []

    def wrap(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[phase] += time.perf_counter() - started
        return timed

    for (module_name, attr), phase in spec.items():
        module = importlib.import_module(module_name)
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, wrap(getattr(module, attr), phase))
    try:
        yield times
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def time_ours(ws: Any, set_id: str, args: argparse.Namespace) -> Result:
    """run_clustering end to end; fit = sample read + k-means, assign = read + validate + search + table."""
    from core.clustering import ClusterConfig, load_assignments, run_clustering

    cfg = ClusterConfig(embedding_set=set_id, k=args.k, seed=args.seed, niter=args.niter,
                        fit_sample=args.fit_sample, gpu=False)
    load0 = os.getloadavg()[0]
    with phase_timers(OUR_PHASES) as times:
        started = time.perf_counter()
        info = run_clustering(ws, cfg, replace=True)
        total = time.perf_counter() - started
    phases = dict(times)
    phases["rest"] = total - sum(phases.values())
    table = load_assignments(ws, info.id)
    return Result("ours: run_clustering", phases["sample read"] + phases["k-means"], phases["assign"], total,
                  float(table["dist_to_centroid"].astype(np.float64).mean()), (load0, os.getloadavg()[0]),
                  phases, table["cluster"].to_numpy())


# -- baselines -----------------------------------------------------------------------------------------
def time_raw_faiss(parts: list[np.ndarray], args: argparse.Namespace) -> Result:
    """faiss.Kmeans(spherical) on the same sample, then IndexFlatIP search over every row."""
    import faiss

    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    sample = sample_rows(parts, args.fit_sample, args.seed)
    km = faiss.Kmeans(sample.shape[1], args.k, niter=args.niter, seed=args.seed, spherical=True, verbose=False)
    km.train(sample)
    fitted = time.perf_counter()
    index = faiss.IndexFlatIP(sample.shape[1])
    index.add(km.centroids)
    labels, sims = [], []
    for X in batches(parts):
        sim, idx = index.search(X, 1)
        labels.append(idx[:, 0])
        sims.append(sim[:, 0])
    done = time.perf_counter()
    sim_all = np.concatenate(sims).astype(np.float64)
    return Result("raw faiss: Kmeans + search", fitted - started, done - fitted, done - started,
                  float(np.mean(1.0 - sim_all)), (load0, os.getloadavg()[0]), labels=np.concatenate(labels))


def time_sklearn(parts: list[np.ndarray], args: argparse.Namespace) -> Result:
    """MiniBatchKMeans (n_init=1, --niter epochs) on the same sample, predict every row in batches."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    sample = sample_rows(parts, args.fit_sample, args.seed)
    km = MiniBatchKMeans(n_clusters=args.k, batch_size=args.sk_batch, n_init=1, max_iter=args.niter,
                         random_state=args.seed, compute_labels=False)
    # sklearn's OpenMP loops keep every thread; its BLAS (a pthreads OpenBLAS, unlike faiss's OpenMP
    # one) gets one: on 2 shared cores the two pools spinning against each other made the k-means++
    # init 5x slower (100k x 512, k=100: 26 s -> 5 s). This is sklearn's best setting here, not a handicap.
    with threadpool_limits(limits=1, user_api="blas"):
        km.fit(sample)
    fitted = time.perf_counter()
    centres = km.cluster_centers_.astype(np.float32)
    unit = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    predict_s, dist_sum, n, labels = 0.0, 0.0, 0, []
    for X in batches(parts):
        t0 = time.perf_counter()
        lab = km.predict(X)
        predict_s += time.perf_counter() - t0  # the objective below is not part of the timing
        labels.append(lab)
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        dist_sum += float((1.0 - np.einsum("ij,ij->i", Xn, unit[lab])).astype(np.float64).sum())
        n += len(X)
    read_s = (time.perf_counter() - fitted) - predict_s  # float32 conversion of the batches, counted too
    assign_s = predict_s + read_s
    note = f"{km.n_steps_} steps ({km.n_iter_:.0f} of {args.niter} epochs), batch {args.sk_batch}"
    return Result("sklearn MiniBatchKMeans", fitted - started, assign_s, fitted - started + assign_s,
                  dist_sum / n, (load0, os.getloadavg()[0]), labels=np.concatenate(labels), note=note)


# -- report ----------------------------------------------------------------------------------------------
def agreement(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Share of rows two assignments put in the same cluster id (identical centroids give 1.0)."""
    return float(np.mean(a == b)) if a is not None and b is not None and len(a) == len(b) else float("nan")


def table(results: list[Result], raw: Result) -> list[str]:
    """The markdown table: one row per method, ratios against raw faiss."""
    head = ("| method | fit s | assign s | other s | total s | fit+assign / raw | total / raw "
            "| objective (mean 1-cos) | load 1m before/after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(f"| {r.method} | {r.fit:.1f} | {r.assign:.1f} | {r.other:.1f} | {r.total:.1f} "
                     f"| {(r.fit + r.assign) / (raw.fit + raw.assign):.2f} | {r.total / raw.total:.2f} "
                     f"| {r.objective:.4f} | {r.load[0]:.1f} / {r.load[1]:.1f} |")
    return lines


def phase_lines(ours: Result) -> list[str]:
    """Where ours spends its time, phase by phase."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in ours.phases.items())
    return [f"ours by phase: {parts} (total {ours.total:.1f} s)"]


def machine_line(threads: int | None) -> str:
    """Cores, memory, library versions and threads of this run."""
    import faiss
    import sklearn

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: {' '.join(filter(None, (platform.machine(), platform.processor())))}, nproc {os.cpu_count()}, "
            f"{mem_gib:.0f} GiB RAM; faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
            f"scikit-learn {sklearn.__version__}, numpy {np.__version__}, threads {threads or 'default'}")


def report(args: argparse.Namespace, info: dict[str, Any], runs: dict[str, list[Result]], warm_s: float) -> str:
    """The whole markdown report: setup, table (best run of each loop), phase split, sanity checks."""
    best = {name: min(rs, key=lambda r: r.total) for name, rs in runs.items()}
    raw, ours = best["raw"], best["ours"]
    lines = [
        f"## clustering benchmark, {dt.datetime.now().isoformat(timespec='minutes')}",
        "",
        f"command: `python benchmarks/cluster.py {shlex.join(sys.argv[1:])}`",
        "",
        f"data: synthetic `{info['embedding_set']}`, {info['n']} x {info['dim']} float16, "
        f"{info['n_concepts']} concepts; k={args.k}, fit_sample={args.fit_sample}, niter={args.niter}, "
        f"seed={args.seed}; best of {args.repeats} interleaved run(s); page cache warmed ({warm_s:.1f} s)",
        "",
        machine_line(args.threads),
        "",
        *table([raw, ours] + ([best["sklearn"]] if "sklearn" in best else []), raw),
        "",
        *phase_lines(ours),
        f"ours vs raw faiss: {agreement(ours.labels, raw.labels):.4f} of rows get the same cluster id",
    ]
    if "sklearn" in best:
        lines.append(f"sklearn: {best['sklearn'].note}")
    if args.repeats > 1:
        for name, rs in runs.items():
            lines.append(f"{name} totals: " + ", ".join(f"{r.total:.1f}" for r in rs))
        lines += paired_lines(runs["raw"], runs["ours"])
    return "\n".join(lines) + "\n"


def paired_lines(raw: list[Result], ours: list[Result]) -> list[str]:
    """Ratios ours/raw within each repeat (the two ran back to back, so they saw similar load)."""
    fa = [(o.fit + o.assign) / (r.fit + r.assign) for o, r in zip(ours, raw, strict=True)]
    tot = [o.total / r.total for o, r in zip(ours, raw, strict=True)]
    return [f"paired ours/raw per repeat: fit+assign {', '.join(f'{v:.2f}' for v in fa)} "
            f"(median {np.median(fa):.2f}); total {', '.join(f'{v:.2f}' for v in tot)} (median {np.median(tot):.2f})"]


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Any, dict[str, Any]]:
    """The synthetic workspace (built, or reused when it exists with the same parameters)."""
    from benchmarks.synthetic import build_synthetic_workspace
    from core.workspace import Workspace

    root = Path(args.workspace) if args.workspace else tmp / "ws"
    info = build_synthetic_workspace(root, n=args.n, dim=args.dim, n_concepts=args.concepts)
    if info["seconds"]:
        print("built synthetic workspace: " + ", ".join(f"{k} {v:.1f} s" for k, v in info["seconds"].items()))
    return Workspace(root), info


def set_threads(threads: int | None) -> None:
    """Limit faiss's OpenMP and the BLAS/OpenMP pools numpy and sklearn use."""
    if not threads:
        return
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    threadpool_limits(threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="prunescope-bench-cluster-") as tmp:
        ws, info = prepare(args, Path(tmp))
        parts = shards(ws, info["embedding_set"])
        warm_s = warm_page_cache(parts)
        runs: dict[str, list[Result]] = defaultdict(list)
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every loop alike
            runs["raw"].append(time_raw_faiss(parts, args))
            runs["ours"].append(time_ours(ws, info["embedding_set"], args))
            if not args.no_sklearn:
                runs["sklearn"].append(time_sklearn(parts, args))
        text = report(args, info, runs, warm_s)
    print(text)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
