"""Clustering, SemDeDup and DBP over 10M x 512 rows through the real streaming code, timed and measured.

Goal (issue "Scale"): on two cores, cluster + SemDeDup + DBP of 10,000,000 x 512 embeddings in at
most 15 minutes and 16 GiB peak RSS.

Setup (timed, reported, not part of the goal; reused when ``--workdir`` already holds it):

1. ``generate``: a LAION-style release of ``--rows`` clustered float16 unit rows (benchmarks/synthetic.py:
   concept mixture, planted exact and near duplicates, captions, urls), written partition by partition
   (``--partition-rows`` rows in memory at a time), so generating stays low-memory at any size;
2. ``register``: ``register_dataset(kind="laion")`` (the dataset index);
3. ``import``: ``import_laion_embeddings`` into the project's embedding-set layout
   (``embeddings/<set>/image/part-*.npy`` + ``.parquet``), read memory-mapped by every stage.

The goal's steps, each in a child process of its own (so its peak RSS is its own):

4. ``cluster``: ``core.clustering.run_clustering`` (k-means on a ``--fit-sample`` sample, every row
   assigned shard by shard, stats, caption labels, files, catalog), the path ``prunescope cluster`` runs;
5. ``prune``: ``core.prune.manifest.run_pruning`` with the chain semdedup(eps) > dbp(keep_fraction), the
   path ``prunescope prune`` runs (context from the clustering, embeddings streamed per chunk of clusters,
   manifest written and registered); split into semdedup, dbp and the rest (load, manifest, catalog).

Per step: wall seconds (measured by this process, interpreter start included) and peak RSS (the child's
VmHWM; per phase where a phase is not nested, by resetting VmHWM through ``/proc/self/clear_refs``).
Below 10M rows an estimate at 10M is printed beside, per phase: time x (10M / rows)^e with e = 0 for
k-means (same sample, k, iterations), 2 for SemDeDup (at fixed k a cluster grows with the rows, its
pairwise work with their square; each chunk of clusters is one more pass over every shard, an upper
bound for the reading part: gathering a chunk's rows does not repeat per pass) and 1 for everything
else. Memory: the child's start RSS (libraries loaded) plus its growth scaled linearly, except SemDeDup's
chunk buffers, which are capped (two chunks of ``--max-chunk-gib`` at most). Both are upper-bound models
for sizing a run, not measurements. Peaks are VmHWM per child (``getrusage(RUSAGE_CHILDREN)`` is not
used: resetting VmHWM lowers it too). ``--max-chunk-gib`` trades memory for fewer passes over the shards.

    python benchmarks/scale_10m.py                          # 10M rows (needs ~25 GB of disk under --workdir)
    python benchmarks/scale_10m.py --rows 1000000 --keep    # validation size; keep the workspace for reruns
    python benchmarks/scale_10m.py --rows 200000 --k 4096 --workdir /tmp/scale200k

Prints a table and appends to ``benchmarks/results/scale.csv`` (``--no-csv`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_ROWS = 10_000_000
GOAL_SECONDS = 15 * 60
GOAL_GIB = 16.0
NAME = "scale"
CSV_PATH = ROOT / "benchmarks" / "results" / "scale.csv"
CSV_COLUMNS = ("date", "git_rev", "machine", "rows", "dim", "k", "fit_sample", "niter", "eps", "keep_fraction",
               "step", "in_goal", "seconds", "peak_rss_gib", "est_10m_seconds", "est_10m_rss_gib", "detail")
#: Exponent of rows in each phase's time at fixed k (see the module docstring); unlisted phases: 1.
SCALING = {"k-means": 0, "semdedup": 2, "semdedup: read rows": 2, "catalog": 0}
CLUSTER_PHASES = {  # as benchmarks/cluster.py splits run_clustering
    ("core.clustering", "_fit_sample"): "sample read",
    ("core.clustering", "fit_centroids"): "k-means",
    ("core.clustering", "_assign_all"): "assign",
    ("core.clustering", "cluster_stats"): "stats",
    ("core.clustering", "_labels"): "label",
    ("core.clustering", "_register"): "catalog",
    ("core.atomic", "save_npy"): "write",
    ("core.atomic", "write_parquet"): "write",
}
PRUNE_PHASES = {
    ("core.prune.sources", "workspace_context_parts"): "load",
    ("core.prune.semdedup", "semdedup_plan"): "semdedup",
    ("core.clustering", "gather_embeddings"): "semdedup: read rows",
    ("core.prune.dbp", "dbp_plan"): "dbp",
    ("core.prune.manifest", "manifest_table"): "manifest",
    ("core.atomic", "write_parquet"): "write",
}
#: Imported before a child's start RSS is taken, so that growth is the step's data, not its libraries.
LIBRARIES = ("faiss", "pandas", "pyarrow.parquet", "sklearn.feature_extraction.text", "core.clustering", "core.prune",
             "core.prune.manifest", "core.embed", "core.datasets", "benchmarks.synthetic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=TARGET_ROWS)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--concepts", type=int, default=1000, help="mixture components of the generated rows")
    p.add_argument("--zipf-a", type=float, default=0.8, help="Zipf exponent of the concept sizes")
    p.add_argument("--k", type=int, default=4096,
                   help="clusters (flat assignment costs ~N k, SemDeDup ~N^2 / k: 4096 is near their balance at 10M)")
    p.add_argument("--fit-sample", type=int, default=200_000, help="rows k-means is fitted on")
    p.add_argument("--niter", type=int, default=10, help="k-means iterations")
    p.add_argument("--eps", type=float, default=0.05, help="SemDeDup eps")
    p.add_argument("--keep-fraction", type=float, default=0.5, help="DBP keep fraction (of SemDeDup's output)")
    p.add_argument("--max-chunk-gib", type=float, default=1.0,
                   help="float32 rows SemDeDup reads per pass over the shards (run_pruning's max_chunk_bytes; "
                        "the project's default is 1)")
    p.add_argument("--partition-rows", type=int, default=100_000, help="rows per release partition (generation)")
    p.add_argument("--no-captions", action="store_true", help="no captions (clusters get no c-TF-IDF labels)")
    p.add_argument("--workdir", type=Path, help="workspace folder (default /tmp/prunescope-scale-<rows>)")
    p.add_argument("--keep", action="store_true", help="keep the workspace afterwards (reused by the next run)")
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workdir is None:
        args.workdir = Path(f"/tmp/prunescope-scale-{args.rows}")
    return args


def spec_of(args: argparse.Namespace) -> Any:
    from benchmarks.synthetic import SynthSpec

    return SynthSpec(n=args.rows, dim=args.dim, n_concepts=args.concepts, zipf_a=args.zipf_a,
                     with_captions=not args.no_captions, partition_rows=args.partition_rows)


# -- memory ----------------------------------------------------------------------------------------
def _status_gib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM)."""
    return _status_gib("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Phases:
    """Seconds, calls and (for phases not nested in another) peak RSS per named phase of wrapped functions."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    depth: int = 0

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            top = self.depth == 0
            if top:
                self.overall = max(self.overall, peak_rss_gib())
                top = reset_peak()
            self.depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
                if top:
                    self.peak[name] = max(self.peak.get(name, 0.0), peak_rss_gib())
        return timed

    @contextlib.contextmanager
    def patched(self, spec: dict[tuple[str, str], str]) -> Iterator[Phases]:
        saved = []
        for (module_name, attr), name in spec.items():
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, self.wrap(getattr(module, attr), name))
        try:
            yield self
        finally:
            for module, attr, fn in saved:
                setattr(module, attr, fn)

    def peak_total(self) -> float:
        return max([self.overall, peak_rss_gib(), *self.peak.values()])


# -- the steps (each runs in a child: ``--child STEP``) ---------------------------------------------
def _workspace(args: argparse.Namespace) -> Any:
    from core.workspace import Workspace

    return Workspace(args.workdir)


def step_generate(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.synthetic import write_release

    write_release(spec_of(args), _workspace(args).dir("sources", NAME))
    return {}


def step_register(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.synthetic import _register

    _register(_workspace(args), NAME, _workspace(args).dir("sources", NAME), spec_of(args))
    return {}


def step_import(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.synthetic import _import, _set_id

    _import(_workspace(args), NAME, _set_id(NAME), "float16", replace=True)
    return {}


def step_cluster(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.synthetic import _set_id
    from core.clustering import ClusterConfig, run_clustering

    cfg = ClusterConfig(embedding_set=_set_id(NAME), k=args.k, niter=args.niter, fit_sample=args.fit_sample,
                        clustering_id=f"{NAME}.k{args.k}")
    with Phases().patched(CLUSTER_PHASES) as ph:
        info = run_clustering(_workspace(args), cfg, replace=True)
    sizes = info.stats["size"].to_numpy()
    return {"phases": dict(ph.seconds), "phase_peak": ph.peak, "peak_rss_gib": ph.peak_total(),
            "note": f"{info.n:,} rows, k={info.k}: cluster sizes median {int(sorted(sizes)[len(sizes) // 2]):,}, "
                    f"max {int(sizes.max()):,}, sum of squares / N {float((sizes.astype(float) ** 2).sum()) / info.n:,.0f}"}


def step_prune(args: argparse.Namespace) -> dict[str, Any]:
    from core.prune.manifest import PruneConfig, run_pruning

    cfg = PruneConfig(f"{NAME}.k{args.k}", chain=[("semdedup", {"eps": args.eps}),
                                                    ("dbp", {"keep_fraction": args.keep_fraction})])
    with Phases().patched(PRUNE_PHASES) as ph:
        info = run_pruning(_workspace(args), cfg, replace=True, max_chunk_bytes=int(args.max_chunk_gib * 2**30))
    by_step = [*info.meta.get("removed_by_step", []), 0, 0]
    return {"phases": dict(ph.seconds), "phase_peak": ph.peak, "peak_rss_gib": ph.peak_total(),
            "calls": dict(ph.calls),
            "note": f"kept {info.n_kept:,} of {info.n_in:,}; removed by semdedup {by_step[0]:,}, by dbp {by_step[1]:,}"}


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "generate": step_generate, "register": step_register, "import": step_import,
    "cluster": step_cluster, "prune": step_prune,
}
SETUP = ("generate", "register", "import")


def child_main(args: argparse.Namespace) -> None:
    for name in LIBRARIES:
        importlib.import_module(name)
    start_rss = _status_gib("VmRSS")
    started = time.perf_counter()
    out = STEPS[args.child](args)
    out["seconds"] = time.perf_counter() - started
    out.setdefault("peak_rss_gib", peak_rss_gib())
    out["start_rss_gib"] = start_rss
    print("RESULT " + json.dumps(out))


def run_child(step: str, argv: list[str]) -> dict[str, Any]:
    """Run one step in a fresh interpreter; its RESULT plus ``wall`` (seconds, start-up included)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", step],
                          stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"step {step} failed (exit {proc.returncode}); its output ends:\n{proc.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = wall
    return result


# -- the report ----------------------------------------------------------------------------------------
@dataclass
class StepRow:
    step: str
    in_goal: bool
    seconds: float
    peak_rss_gib: float
    est_seconds: float
    est_rss_gib: float
    detail: str


def _estimate(phases: dict[str, float], inner: float, wall: float, factor: float) -> float:
    """Wall at 10M: each phase scaled by factor^e, the rest of the step (``inner`` seconds) linearly, the
    interpreter's start-up (``wall - inner``) as is. ``phases`` must not overlap."""
    rest = max(0.0, inner - sum(phases.values()))
    return sum(v * factor ** SCALING.get(k, 1) for k, v in phases.items()) + rest * factor + max(0.0, wall - inner)


def _rss_estimate(peak: float, start: float, factor: float, bounded: tuple[float, float] = (0.0, 0.0)) -> float:
    """Peak at 10M: the start RSS, plus the growth beyond ``bounded[0]`` (GiB of buffers whose size is capped,
    ``bounded[1]`` at 10M) scaled linearly with the rows."""
    return start + max(0.0, peak - start - bounded[0]) * factor + bounded[1]


def _chunk_gib(rows: int, dim: int, max_chunk_gib: float) -> float:
    """SemDeDup's float32 chunk buffers: all rows when they fit one chunk, else two chunks (the next one is
    read while the previous is still referenced)."""
    return min(rows * dim * 4 / 2**30, 2 * max_chunk_gib)


def _fmt_phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())


def _fmt_peaks(peaks: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()) or "n/a"


def step_rows(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[StepRow]:
    """One row per setup step, cluster, and prune's semdedup / dbp / rest."""
    rows = args.rows
    f = TARGET_ROWS / rows
    chunks = (_chunk_gib(rows, args.dim, args.max_chunk_gib), _chunk_gib(TARGET_ROWS, args.dim, args.max_chunk_gib))
    out = []
    for step in SETUP:
        r = results[step]
        if r.get("reused"):
            out.append(StepRow(step, False, 0.0, 0.0, float("nan"), float("nan"), "reused from --workdir"))
            continue
        out.append(StepRow(step, False, r["wall"], r["peak_rss_gib"], _estimate({}, r["seconds"], r["wall"], f),
                           _rss_estimate(r["peak_rss_gib"], r["start_rss_gib"], f), ""))
    c = results["cluster"]
    out.append(StepRow("cluster", True, c["wall"], c["peak_rss_gib"],
                       _estimate(c["phases"], c["seconds"], c["wall"], f),
                       _rss_estimate(c["peak_rss_gib"], c["start_rss_gib"], f),
                       f"{_fmt_phases(c['phases'])}; peak GiB by phase: {_fmt_peaks(c['phase_peak'])}; {c['note']}"))
    p = results["prune"]
    ph, pk = p["phases"], p["phase_peak"]
    sd, read, dbp = ph.get("semdedup", 0.0), ph.get("semdedup: read rows", 0.0), ph.get("dbp", 0.0)
    passes = p.get("calls", {}).get("semdedup: read rows", 0)
    out.append(StepRow("semdedup", True, sd, pk.get("semdedup", float("nan")), sd * f ** 2,
                       _rss_estimate(pk.get("semdedup", 0.0), p["start_rss_gib"], f, chunks),
                       f"of which reading + normalising rows {read:.1f} s in {passes} pass(es) over every shard "
                       f"(chunks of <= {args.max_chunk_gib:g} GiB float32)"))
    out.append(StepRow("dbp", True, dbp, pk.get("dbp", float("nan")), dbp * f,
                       _rss_estimate(pk.get("dbp", 0.0), p["start_rss_gib"], f), "plan (cluster stats, order)"))
    rest = p["wall"] - sd - dbp
    rest_phases = {k: v for k, v in ph.items() if k in ("load", "manifest", "write")}
    out.append(StepRow("prune: load, manifest, rest", True, rest,
                       max([v for k, v in pk.items() if k not in ("semdedup", "dbp")], default=float("nan")),
                       _estimate(rest_phases, p["seconds"] - sd - dbp, rest, f),
                       _rss_estimate(p["peak_rss_gib"], p["start_rss_gib"], f, chunks),
                       f"{_fmt_phases(rest_phases)}; whole prune child peak {p['peak_rss_gib']:.2f} GiB; {p['note']}"))
    return out


def goal_row(rows: list[StepRow], results: dict[str, dict[str, Any]]) -> StepRow:
    secs = results["cluster"]["wall"] + results["prune"]["wall"]
    peak = max(results["cluster"]["peak_rss_gib"], results["prune"]["peak_rss_gib"])
    est_s = sum(r.est_seconds for r in rows if r.in_goal)
    est_g = max(r.est_rss_gib for r in rows if r.in_goal)
    return StepRow("goal: cluster + semdedup + dbp", True, secs, peak, est_s, est_g,
                   f"goal <= {GOAL_SECONDS} s and <= {GOAL_GIB:.0f} GiB at {TARGET_ROWS:,} rows on 2 cores")


def table(rows: list[StepRow], measured_rows: int) -> str:
    est = measured_rows < TARGET_ROWS
    head = "| step | in goal | seconds | peak RSS GiB |" + (" est. at 10M s | est. at 10M GiB |" if est else "") + " detail |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        reused = math.isnan(r.est_seconds)
        cells = [r.step, "yes" if r.in_goal else "setup", "-" if reused else f"{r.seconds:.1f}",
                 "-" if reused else f"{r.peak_rss_gib:.2f}"]
        if est:
            cells += ["-", "-"] if reused else [f"{r.est_seconds:,.0f}", f"{r.est_rss_gib:.1f}"]
        lines.append("| " + " | ".join(cells + [r.detail]) + " |")
    return "\n".join(lines)


def verdict(goal: StepRow, measured_rows: int) -> str:
    ok = goal.seconds <= GOAL_SECONDS and goal.peak_rss_gib <= GOAL_GIB
    line = (f"at {measured_rows:,} rows: {goal.seconds:.0f} s (goal {GOAL_SECONDS} s at 10M), peak RSS "
            f"{goal.peak_rss_gib:.2f} GiB (goal {GOAL_GIB:.0f} GiB)")
    if measured_rows >= TARGET_ROWS:
        return line + f": goal {'MET' if ok else 'NOT met'}"
    est_ok = goal.est_seconds <= GOAL_SECONDS and goal.est_rss_gib <= GOAL_GIB
    return line + (f"; estimated at 10M: {goal.est_seconds:,.0f} s, {goal.est_rss_gib:.1f} GiB "
                   f"({'within' if est_ok else 'OVER'} the goal; an estimate, run --rows 10000000 to measure)")


def machine() -> tuple[str, str]:
    import faiss
    import numpy as np

    from core.runs import git_revision

    cpu = "cpu"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}; {len(os.sched_getaffinity(0))} cores; {mem:.0f} GiB; faiss {faiss.__version__}; "
            f"numpy {np.__version__}; faiss GPUs {faiss.get_num_gpus()}", git_revision() or "unknown")


def append_csv(path: Path, rows: list[StepRow], args: argparse.Namespace, mach: str, rev: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    date = dt.datetime.now().isoformat(timespec="seconds")
    est = args.rows < TARGET_ROWS
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            reused = math.isnan(r.est_seconds)
            w.writerow({"date": date, "git_rev": rev, "machine": mach, "rows": args.rows, "dim": args.dim, "k": args.k,
                        "fit_sample": args.fit_sample, "niter": args.niter, "eps": args.eps,
                        "keep_fraction": args.keep_fraction, "step": r.step, "in_goal": str(r.in_goal).lower(),
                        "seconds": "" if reused else f"{r.seconds:.1f}",
                        "peak_rss_gib": "" if reused else f"{r.peak_rss_gib:.3f}",
                        "est_10m_seconds": f"{r.est_seconds:.0f}" if est and not reused else "",
                        "est_10m_rss_gib": f"{r.est_rss_gib:.2f}" if est and not reused else "", "detail": r.detail})


# -- main ------------------------------------------------------------------------------------------------
def _setup_done(args: argparse.Namespace) -> dict[str, bool]:
    """Which setup steps the workdir already holds for exactly these parameters."""
    from benchmarks.synthetic import _existing_set, _registered, _release_is, _set_id

    ws = _workspace(args)
    folder = ws.dir("sources", NAME)
    generated = _release_is(folder, spec_of(args))
    registered = generated and _registered(ws, NAME, folder, args.rows)
    return {"generate": generated, "register": registered,
            "import": registered and _existing_set(ws, _set_id(NAME)) is not None}


def _check_disk(args: argparse.Namespace) -> None:
    need = 2 * args.rows * args.dim * 2 + args.rows * 200  # release + embedding set (float16) + metadata
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < 1.1 * need:
        raise SystemExit(f"{args.workdir} has {free / 2**30:.1f} GiB free; this run needs about {need / 2**30:.1f} GiB")


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--rows", str(args.rows), "--dim", str(args.dim), "--concepts", str(args.concepts),
            "--zipf-a", str(args.zipf_a), "--k", str(args.k), "--fit-sample", str(args.fit_sample),
            "--niter", str(args.niter), "--eps", str(args.eps), "--keep-fraction", str(args.keep_fraction),
            "--partition-rows", str(args.partition_rows), "--max-chunk-gib", str(args.max_chunk_gib),
            "--workdir", str(args.workdir)]
    return argv + (["--no-captions"] if args.no_captions else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    mach, rev = machine()
    print(f"machine: {mach}; git {rev}; load (1 min) {os.getloadavg()[0]:.1f}", flush=True)
    print(f"rows {args.rows:,} x {args.dim}, k={args.k}, fit sample {args.fit_sample:,}, niter {args.niter}, "
          f"eps {args.eps}, keep {args.keep_fraction}; workspace {args.workdir}", flush=True)
    existed = args.workdir.exists()
    _check_disk(args)
    results: dict[str, dict[str, Any]] = {}
    try:
        done = _setup_done(args)
        for step in (*SETUP, "cluster", "prune"):
            if done.get(step):
                results[step] = {"reused": True}
                continue
            print(f"[{step}] ...", flush=True)
            results[step] = run_child(step, child_argv(args))
            print(f"[{step}] {results[step]['wall']:.1f} s, peak RSS {results[step]['peak_rss_gib']:.2f} GiB", flush=True)
    finally:
        if not args.keep and not existed:
            shutil.rmtree(args.workdir, ignore_errors=True)
    rows = step_rows(results, args)
    rows.append(goal_row(rows, results))
    print(table(rows, args.rows))
    print(verdict(rows[-1], args.rows))
    if not args.no_csv:
        append_csv(args.csv, rows, args, mach, rev)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
