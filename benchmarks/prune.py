"""Pruning speed beside reference-style baselines, every row from the same run.

Rows (defaults in brackets):

1. SemDeDup M (max similarity to an earlier member) over ``--n`` rows x ``--dim`` [1M x 512] in
   ``--clusters`` [1000] clusters, ours (:class:`core.prune.SemDeDupPlan`: lower-triangle row blocks,
   clusters on ``--workers`` threads with single-threaded BLAS) against a reference-style
   implementation (per cluster: full n x n similarity matrix, ``np.triu(S, 1)``, column max; numpy's
   default BLAS threads), with the removed sets compared at ``--eps``. The bare per-cluster matrix
   product ``Xc @ Xc.T`` is timed too. Both sides include gathering and normalising the cluster's
   float16 rows; the within-cluster sort is done once beforehand for both. Goal: >= 1.8x, identical.
2. One ``--big-cluster`` [100k]-member cluster, ours only, in a child process: seconds and peak RSS
   (goal: within 2 GiB); the reference's memory is reported in theory (a float32 n x n matrix).
3. A 10-point eps curve against a single eps (plan + curve vs plan + one selection). Goal <= 1.2x.
4. DBP re-plan at ``--dbp-clusters`` [10k] (new tau / keep fraction from a :class:`DBPPlan`) against a
   general QP solver. qpsolvers/OSQP (the reference code's solver) are not installed in this project's
   environment, so the baseline is scipy's ``minimize(method="trust-constr")`` on the same QP. Goal:
   <= 5 ms, quotas summing exactly to N, within 1 of the QP per cluster.

Data is generated in-process (seeded): unit rows around random centroids (cosine to the centroid about
0.75, as CLIP clusters), stored float16, with ``--dup-fraction`` [0.1] of the rows near-copies (cosine
0.9-0.999) of another member of their cluster.

    python benchmarks/prune.py                                  # the full run (several minutes)
    python benchmarks/prune.py --n 100000 --clusters 100 --big-cluster 20000 --dbp-clusters 1000
    python benchmarks/prune.py --out benchmarks/results/prune.md

Prints a table and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPS_GRID = [0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--dup-fraction", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=None, help="threads of ours (default: CPU count)")
    p.add_argument("--device", default=None,
                   help="where ours runs SemDeDup's products: auto (default: a CUDA GPU when torch sees one) | cpu | cuda")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each SemDeDup side (best per group)")
    p.add_argument("--groups", type=int, default=10, help="cluster groups the SemDeDup sides alternate over")
    p.add_argument("--no-torch", action="store_true", help="skip the torch (reference code path) row")
    p.add_argument("--big-cluster", type=int, default=100_000, help="0 skips the one-cluster memory row")
    p.add_argument("--dbp-clusters", type=int, default=10_000)
    p.add_argument("--dbp-rows", type=int, default=1_000_000)
    p.add_argument("--skip-qp", action="store_true", help="skip the (slow) general QP baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--child-big", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-torch", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- data ------------------------------------------------------------------------------------------
def make_pool(n: int, dim: int, k: int, dup_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X float16 (n, dim) unit rows, labels (n,), centroids (k, dim))`` with planted near-duplicates."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((k, dim)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    sizes = rng.lognormal(0.0, 0.5, k)
    sizes = np.maximum(2, np.floor(sizes / sizes.sum() * n)).astype(np.int64)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    labels = rng.permutation(np.repeat(np.arange(k), sizes))
    X = np.empty((n, dim), np.float16)
    sigma = 0.9 / np.sqrt(dim)  # cosine to the centroid about 1 / sqrt(1 + 0.81) = 0.74
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        x = C[labels[s:e]] + sigma * rng.standard_normal((e - s, dim), dtype=np.float32)
        X[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    _plant_duplicates(X, labels, dup_fraction, rng)
    return X, labels, C


def _plant_duplicates(X: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator) -> None:
    n, dim = X.shape
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels))])
    dups = rng.choice(n, int(fraction * n), replace=False)
    lab = labels[dups]
    src = order[bounds[lab] + rng.integers(0, bounds[lab + 1] - bounds[lab])]
    cos = rng.uniform(0.9, 0.999, len(dups)).astype(np.float32)
    for s in range(0, len(dups), 65536):
        d, sr, c = dups[s:s + 65536], src[s:s + 65536], cos[s:s + 65536]
        noise = rng.standard_normal((len(d), dim), dtype=np.float32)
        base = X[sr].astype(np.float32)
        noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to the source
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        X[d] = c[:, None] * base + np.sqrt(1 - c**2)[:, None] * noise


def distances(X: np.ndarray, labels: np.ndarray, C: np.ndarray) -> np.ndarray:
    out = np.empty(len(X), np.float32)
    for s in range(0, len(X), 65536):
        x = X[s:s + 65536].astype(np.float32)
        out[s:s + 65536] = 1 - np.einsum("ij,ij->i", x, C[labels[s:s + 65536]])
    return out


# -- SemDeDup --------------------------------------------------------------------------------------
def _cluster_rows(X16: np.ndarray, positions: np.ndarray) -> np.ndarray:
    Xc = X16[positions].astype(np.float32)
    Xc /= np.linalg.norm(Xc, axis=1, keepdims=True)  # as the reference's F.normalize
    return Xc


def reference_semdedup(X16: np.ndarray, positions: np.ndarray, bounds: np.ndarray, eps: float,
                       clusters: range, bare: bool = False) -> np.ndarray:
    """Reference-style: per cluster the full similarity matrix, its strict upper triangle, column max.

    numpy computes ``Xc @ Xc.T`` with a symmetric product (BLAS syrk), so this baseline already does
    only half of the multiplications. Returns the removed original positions (``bare``: only the
    matrix products; returns nothing)."""
    removed = []
    for c in clusters:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        if hi - lo < 2:
            continue
        Xc = _cluster_rows(X16, positions[lo:hi])
        S = Xc @ Xc.T
        if bare:
            continue
        max_sim = np.triu(S, 1).max(axis=0)
        removed.append(positions[lo:hi][max_sim > 1 - eps])
    return np.sort(np.concatenate(removed)) if removed else np.zeros(0, np.int64)


def torch_reference(X16: np.ndarray, positions: np.ndarray, bounds: np.ndarray, eps: float) -> np.ndarray:
    """The SemDeDup reference code's own path (torch on CPU: a general matrix product, fill_diagonal_,
    triu, max over dim 0); run in a child process so torch's threads do not disturb the rest."""
    import torch

    removed = []
    for c in range(len(bounds) - 1):
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        if hi - lo < 2:
            continue
        reps = torch.nn.functional.normalize(torch.from_numpy(X16[positions[lo:hi]].astype(np.float32)), dim=1)
        S = reps @ reps.T
        S.fill_diagonal_(0.0)
        max_sim = torch.max(torch.triu(S, diagonal=1), dim=0)[0].numpy()
        removed.append(positions[lo:hi][max_sim > 1 - eps])
    return np.sort(np.concatenate(removed))


def bench_semdedup(args: argparse.Namespace, X16: np.ndarray, labels: np.ndarray, C: np.ndarray) -> dict:
    """Ours and the reference over the same cluster groups, interleaved (so that both see the same
    machine load; this machine is shared), each group's best of ``--repeats`` summed."""
    from core.prune import PruneContext, SemDeDupPlan

    n = len(X16)
    dist = distances(X16, labels, C)
    ids = np.array([f"{i:09d}" for i in range(n)], dtype=object)
    ctx = PruneContext.from_arrays(ids, labels, dist, C, X16, workers=args.workers,
                                   device=getattr(args, "device", None))
    t0 = time.perf_counter()
    positions, bounds = ctx.grouped("hard")
    t_group = time.perf_counter() - t0
    groups = [range(g[0], g[-1] + 1) for g in np.array_split(np.arange(ctx.k), args.groups)]
    subs = [ctx.subset(positions[bounds[g.start]:bounds[g.stop]]) for g in groups]
    best = {side: np.full(len(groups), np.inf) for side in ("ours", "reference", "bare")}
    removed: dict[str, list[np.ndarray]] = {"ours": [], "reference": []}
    for r in range(args.repeats):
        for gi, (g, sub) in enumerate(zip(groups, subs, strict=True)):
            sides = ["reference", "ours", "bare"]
            for side in sides[(r + gi) % 3:] + sides[:(r + gi) % 3]:  # rotate who goes first
                t0 = time.perf_counter()
                if side == "ours":
                    out = sub.rows[SemDeDupPlan.build(sub, "hard").removed_mask(args.eps)]
                else:
                    out = reference_semdedup(X16, positions, bounds, args.eps, g, bare=side == "bare")
                best[side][gi] = min(best[side][gi], time.perf_counter() - t0)
                if r == 0 and side != "bare":
                    removed[side].append(out)
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v.sum():.1f} s" for k, v in best.items()), flush=True)
    ours, ref = (np.sort(np.concatenate(removed[s])) for s in ("ours", "reference"))
    return {"n": n, "group_s": t_group, "times": {k: float(v.sum()) for k, v in best.items()},
            "mismatch": int(len(np.setxor1d(ours, ref))), "n_removed": int(len(ours)), "n_ref_removed": int(len(ref)),
            "eps_rows": _eps_rows(ctx, args.eps), "peak_rss_gib": peak_rss_gib(),
            "_positions": positions, "_bounds": bounds, "_removed": ours}


def _eps_rows(ctx, eps: float) -> dict:
    """The full plan once, then one eps (a Selection) against the 10-point curve."""
    from core.prune import SemDeDupPlan, select

    t0 = time.perf_counter()
    plan = SemDeDupPlan.build(ctx, "hard")
    t_build = time.perf_counter() - t0
    ctx.cache[("semdedup_plan", "hard")] = plan
    t0 = time.perf_counter()
    for _ in range(5):
        select(ctx, "semdedup", eps=eps)
    t_single = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    for _ in range(5):
        curve = plan.curve(EPS_GRID)
    t_curve = (time.perf_counter() - t0) / 5
    return {"build_s": t_build, "single_s": t_build + t_single, "curve_s": t_build + t_curve, "select_s": t_single,
            "curve_only_s": t_curve, "curve": curve[["eps", "fraction_kept"]].round(4).values.tolist()}


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not include the parent's
    memory at fork time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_big(m: int, dim: int, seed: int) -> None:
    """One m-member cluster, ours only; prints JSON (seconds, peak RSS)."""
    from core.prune import PruneContext, SemDeDupPlan

    X16, labels, C = make_pool(m, dim, 1, 0.1, seed)
    dist = distances(X16, labels, C)
    ctx = PruneContext.from_arrays(np.arange(m).astype(str).astype(object), labels, dist, C, X16)
    ctx.grouped("hard")
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS (Linux)
        f.write("5")
    before = peak_rss_gib()
    t0 = time.perf_counter()
    plan = SemDeDupPlan.build(ctx, "hard")
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    print(json.dumps({"m": m, "seconds": seconds, "peak_rss_gib": peak, "rss_before_gib": before,
                      "input_gib": X16.nbytes / 2**30, "n_kept_at_0.05": plan.n_kept(0.05)}))


def bench_big(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child-big", str(args.big_cluster), "--dim", str(args.dim),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_torch(folder: str, eps: float) -> None:
    """Time :func:`torch_reference` on the saved pool; prints JSON (seconds, differences from ours)."""
    d = Path(folder)
    X16 = np.load(d / "X16.npy", mmap_mode="r")
    positions, bounds, ours = (np.load(d / f"{name}.npy") for name in ("positions", "bounds", "removed"))
    t0 = time.perf_counter()
    removed = torch_reference(X16, positions, bounds, eps)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "mismatch": int(len(np.setxor1d(removed, ours)))}))


def bench_torch(args: argparse.Namespace, X16: np.ndarray, sd: dict) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        np.save(Path(tmp) / "X16.npy", X16)
        for name in ("positions", "bounds", "removed"):
            np.save(Path(tmp) / f"{name}.npy", sd[f"_{name}"])
        cmd = [sys.executable, __file__, "--child-torch", tmp, "--eps", str(args.eps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- DBP -------------------------------------------------------------------------------------------
def bench_dbp(args: argparse.Namespace) -> dict:
    from core.prune import PruneContext, dbp_plan

    rng = np.random.default_rng(args.seed)
    k, n = args.dbp_clusters, args.dbp_rows
    sizes = np.maximum(2, (rng.pareto(1.2, k) * 20).astype(np.int64))
    labels = rng.permutation(np.repeat(np.arange(k), np.floor(sizes / sizes.sum() * n).astype(np.int64) + 1))
    C = rng.standard_normal((k, 64)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    ctx = PruneContext.from_arrays(np.arange(len(labels)).astype(str).astype(object), labels,
                                   rng.uniform(0.1, 0.5, len(labels)).astype(np.float32), C)
    t0 = time.perf_counter()
    plan = dbp_plan(ctx)
    t_build = time.perf_counter() - t0
    settings = [(tau, keep) for tau in (0.05, 0.1, 0.3, 0.5, 1.0) for keep in (0.1, 0.3, 0.5, 0.7, 0.9)]
    t_plan, t_mask = [], []
    for tau, keep in settings:
        t0 = time.perf_counter()
        q = plan.quotas(keep, tau)
        t_plan.append(time.perf_counter() - t0)
        plan.keep_mask(q.quota)
        t_mask.append(time.perf_counter() - t0)
        assert q.quota.sum() == q.n_budget and (q.quota >= q.lower).all() and (q.quota <= q.upper).all()
    out = {"k": k, "n": len(labels), "build_s": t_build, "replan_ms": 1e3 * float(np.median(t_plan)),
           "replan_max_ms": 1e3 * max(t_plan), "replan_mask_ms": 1e3 * float(np.median(t_mask))}
    if not args.skip_qp:
        out.update(_qp_baseline(plan.quotas(0.3, 0.5)))
    return out


def _qp_baseline(q) -> dict:
    import scipy.sparse as sp
    from scipy.optimize import Bounds, LinearConstraint, minimize

    k, N = len(q.quota), q.n_budget
    t = N * q.probability
    lo, hi = q.lower.astype(float), q.upper.astype(float)
    t0 = time.perf_counter()
    res = minimize(lambda x: 0.5 * np.sum((x - t) ** 2), np.clip(t, lo, hi), jac=lambda x: x - t,
                   hess=lambda x: sp.identity(k, format="csr"), method="trust-constr", bounds=Bounds(lo, hi),
                   constraints=[LinearConstraint(sp.csr_matrix(np.ones((1, k))), N, N)],
                   options={"gtol": 1e-8, "xtol": 1e-10, "maxiter": 5000})
    seconds = time.perf_counter() - t0
    return {"qp_s": seconds, "qp_status": int(res.status), "qp_max_diff_continuous": float(np.abs(res.x - q.continuous).max()),
            "qp_max_diff_quota": float(np.abs(res.x - q.quota).max()), "qp_rint_sum_minus_N": int(np.rint(res.x).sum() - N)}


# -- report ----------------------------------------------------------------------------------------
def table(args: argparse.Namespace, sd: dict, big: dict | None, dbp: dict, torch_row: dict | None) -> str:
    n = sd["n"]
    best = sd["times"]
    eps = sd["eps_rows"]
    rows = [
        (f"SemDeDup M, {n:,} x {args.dim}, {args.clusters} clusters (rows/s)", f"{n / best['ours']:,.0f}",
         f"{n / best['reference']:,.0f} numpy reference (its bare X @ X.T products alone: {n / best['bare']:,.0f})",
         f"{best['reference'] / best['ours']:.2f}x", ">= 1.8x",
         f"removed at eps {args.eps}: {sd['n_removed']:,} vs {sd['n_ref_removed']:,}, {sd['mismatch']} differ"),
    ]
    if torch_row:
        rows.append(("same, against the reference code's own path (torch CPU, general matrix product)",
                     f"{n / best['ours']:,.0f}", f"{n / torch_row['seconds']:,.0f}",
                     f"{torch_row['seconds'] / best['ours']:.2f}x", "(context)", f"{torch_row['mismatch']} removals differ"))
    rows.append(("SemDeDup 10-point eps curve vs one eps (s)", f"{eps['curve_s']:.2f}", f"{eps['single_s']:.2f}",
                 f"{eps['curve_s'] / eps['single_s']:.3f}x", "<= 1.2x",
                 f"curve from plan {1e3 * eps['curve_only_s']:.1f} ms; one eps from plan {1e3 * eps['select_s']:.0f} ms"))
    if big:
        theory = big["m"] ** 2 * 4 / 1e9
        rows.append((f"SemDeDup, one {big['m']:,}-member cluster: peak RSS (GiB)", f"{big['peak_rss_gib']:.2f}",
                     f"{theory:.0f} GB in theory (float32 n x n), not run", f"{theory / (big['peak_rss_gib'] * 1.074):.0f}x less",
                     "<= 2 GiB", f"{big['seconds']:.0f} s; input {big['input_gib']:.2f} GiB float16"))
    qp = (f"{dbp['qp_s'] * 1e3:,.0f} (scipy trust-constr)", f"{dbp['qp_s'] * 1e3 / dbp['replan_ms']:,.0f}x faster",
          f"max abs(ours - QP) {dbp['qp_max_diff_quota']:.2f}; QP continuous diff {dbp['qp_max_diff_continuous']:.1e}; "
          f"np.rint(QP) sums to N{dbp['qp_rint_sum_minus_N']:+d}") if "qp_s" in dbp else ("skipped", "", "")
    rows.append((f"DBP re-plan, {dbp['k']:,} clusters (ms, median of 25)", f"{dbp['replan_ms']:.2f}", qp[0], qp[1],
                 "<= 5 ms", f"sums exactly to N; +kept mask over {dbp['n']:,} rows {dbp['replan_mask_ms']:.1f} ms; "
                 + qp[2]))
    head = "| benchmark | ours | baseline | ratio | goal | check |\n|---|---|---|---|---|---|\n"
    return head + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_big:
        child_big(args.child_big, args.dim, args.seed)
        return
    if args.child_torch:
        child_torch(args.child_torch, args.eps)
        return
    t0 = time.perf_counter()
    X16, labels, C = make_pool(args.n, args.dim, args.clusters, args.dup_fraction, args.seed)
    print(f"generated {args.n:,} x {args.dim} in {time.perf_counter() - t0:.0f} s", flush=True)
    sd = bench_semdedup(args, X16, labels, C)
    print(f"semdedup done: {json.dumps(sd['times'])}", flush=True)
    torch_row = None if args.no_torch else bench_torch(args, X16, sd)
    del X16
    sd = {k: v for k, v in sd.items() if not k.startswith("_")}
    big = bench_big(args) if args.big_cluster else None
    dbp = bench_dbp(args)
    text = table(args, sd, big, dbp, torch_row)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}"
    print(text)
    if args.out:
        Path(args.out).write_text(f"# Pruning benchmark\n\n`python benchmarks/prune.py {' '.join(argv or sys.argv[1:])}`"
                                  f" on {machine}\n\n{text}\n")
    print("RESULT " + json.dumps({"semdedup": sd, "torch_reference": torch_row, "big_cluster": big, "dbp": dbp},
                                 default=str))


if __name__ == "__main__":
    main()
