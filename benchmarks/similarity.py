"""Train-test similarity search beside raw faiss flat search, with peak memory, every row from the same run.

Data (seeded, written once under ROOT and reused): a pool of ``--n`` [1M] unit rows x ``--dim`` [512]
in float16 ``.npy`` shards of ``--shard`` [100k] rows (LAION's img_emb layout), clustered around 1000
random centres; ``--benchmarks`` [5] test sets of ``--queries`` [400] rows (the first half noisy copies
of pool rows, "near" benchmarks; the rest fresh draws around the centres, "far"), and a ``--reference``
[100k]-row reference set.

Rows, each in its own child process so that peak RSS is its own (``ru_maxrss``):

1. ``faiss flat`` (the baseline): every pool shard read into one float32 array, ``IndexFlatIP.add``,
   one ``search`` of all test rows, k=1 (the raw faiss way; memory grows with the pool).
2. ``ours: nearest_neighbors``: :func:`core.similarity.nearest_neighbors` streamed over the memory-mapped
   shards (one shard in float32 at a time), k=1. Same neighbours as the baseline is checked (ties aside).
3. ``ours: closer_than_reference_many``: the analysis's pool pass for all benchmarks at once (per pool
   row its max similarity to each benchmark and the closer-than-reference flags), with the thresholds of
   the reference set computed beforehand (not timed).

Times include reading the shards (warm page cache for all rows alike). Goal: row 2 <= 1.2x row 1; peak
RSS of rows 2-3 bounded by the shard size, not the pool (``--sizes`` runs several pool sizes to show it).

    python benchmarks/similarity.py /tmp/bench/sim                        # 1M rows
    python benchmarks/similarity.py /tmp/bench/sim --sizes 1000000,3000000 --out benchmarks/results/similarity.md

Prints a table and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CENTRES = 1000


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def build(root: Path, n: int, dim: int, shard: int, queries: int, benchmarks: int, reference: int,
          seed: int = 0) -> Path:
    """Writes (or reuses) the data set; returns its folder."""
    folder = root / f"n{n}_d{dim}_s{shard}_q{queries}x{benchmarks}_r{reference}"
    done = folder / "done.json"
    if done.exists():
        return folder
    (folder / "pool").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(CENTRES, dim))).astype(np.float32)

    def draw(m: int, spread: float = 1.2) -> np.ndarray:
        return _unit(centres[rng.integers(0, CENTRES, m)] + spread * rng.normal(size=(m, dim)) / np.sqrt(dim))

    for i, start in enumerate(range(0, n, shard)):
        np.save(folder / "pool" / f"img_emb_{i:04d}.npy", draw(min(shard, n - start)).astype(np.float16))
    first = np.load(folder / "pool" / "img_emb_0000.npy").astype(np.float32)
    for b in range(benchmarks):
        near = b < (benchmarks + 1) // 2
        T = (_unit(first[rng.integers(0, len(first), queries)] + 0.02 * rng.normal(size=(queries, dim)))
             if near else draw(queries))
        np.save(folder / f"test_{b}.npy", T.astype(np.float32))
    np.save(folder / "reference.npy", draw(reference).astype(np.float16))
    done.write_text(json.dumps({"n": n, "dim": dim}))
    return folder


def _shards(folder: Path) -> list[Path]:
    return sorted((folder / "pool").glob("img_emb_*.npy"))


def _blocks(folder: Path):
    start = 0
    for path in _shards(folder):
        X = np.load(path, mmap_mode="r")
        yield start, X
        start += len(X)
        del X


def _tests(folder: Path) -> list[np.ndarray]:
    return [np.load(p) for p in sorted(folder.glob("test_*.npy"))]


# -- the measured variants (run in a child process each) -------------------------------------------
def run_faiss(folder: Path) -> dict[str, Any]:
    import faiss

    T = np.concatenate(_tests(folder))
    t0 = time.perf_counter()
    P = np.concatenate([np.load(p).astype(np.float32) for p in _shards(folder)])
    t_read = time.perf_counter() - t0
    index = faiss.IndexFlatIP(P.shape[1])
    index.add(P)
    sims, idx = index.search(T, 1)
    return {"seconds": time.perf_counter() - t0, "read_s": t_read, "idx": idx[:, 0].tolist(),
            "sims": sims[:, 0].tolist()}


def run_ours_nn(folder: Path) -> dict[str, Any]:
    from core.similarity import nearest_neighbors

    T = np.concatenate(_tests(folder))
    t0 = time.perf_counter()
    sims, idx = nearest_neighbors(T, _blocks(folder), k=1, gpu=False)
    return {"seconds": time.perf_counter() - t0, "idx": idx[:, 0].tolist(), "sims": sims[:, 0].tolist()}


def run_ours_closer(folder: Path) -> dict[str, Any]:
    from core.similarity import closer_than_reference_many, reference_thresholds, row_blocks

    tests = _tests(folder)
    R = np.load(folder / "reference.npy", mmap_mode="r")
    s_refs = [reference_thresholds(T, row_blocks(R, 100_000), gpu=False)[0] for T in tests]
    t0 = time.perf_counter()
    results = closer_than_reference_many(tests, s_refs, _blocks(folder))
    return {"seconds": time.perf_counter() - t0, "n_closer": [int(r.closer.sum()) for r in results],
            "share": [float(np.mean(r.nn_pool_sim > r.s_ref)) for r in results]}


VARIANTS = {"faiss": run_faiss, "ours_nn": run_ours_nn, "ours_closer": run_ours_closer}


def child(variant: str, folder: Path) -> dict[str, Any]:
    """Runs one variant in a fresh process; returns its result plus ``peak_rss_gib``."""
    proc = subprocess.run([sys.executable, __file__, "--worker", variant, str(folder)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed: {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def peak_rss_gib() -> float:
    """This process's peak resident memory: VmHWM, which (unlike ``ru_maxrss``) does not carry over the
    parent's peak into a child started from a large process (the benchmark suite)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(variant: str, folder: Path) -> None:
    result = VARIANTS[variant](folder)
    result["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(result))


# -- the report -----------------------------------------------------------------------------------------
def measure(folder: Path, n: int) -> list[dict[str, Any]]:
    base = child("faiss", folder)
    nn = child("ours_nn", folder)
    closer = child("ours_closer", folder)
    same = int(np.sum(np.asarray(base["idx"]) == np.asarray(nn["idx"])))
    tie = np.abs(np.asarray(base["sims"]) - np.asarray(nn["sims"])) <= 1e-5
    differ = int(np.sum((np.asarray(base["idx"]) != np.asarray(nn["idx"])) & ~tie))
    pool_gib = n * int(json.loads((folder / "done.json").read_text())["dim"]) * 2 / 2**30
    return [
        {"pool rows": n, "pool GiB (float16)": pool_gib, "variant": "faiss flat (baseline)", "seconds": base["seconds"],
         "ratio": 1.0, "peak RSS GiB": base["peak_rss_gib"], "note": f"read {base['read_s']:.1f} s"},
        {"pool rows": n, "pool GiB (float16)": pool_gib, "variant": "ours: nearest_neighbors (streamed)",
         "seconds": nn["seconds"], "ratio": nn["seconds"] / base["seconds"], "peak RSS GiB": nn["peak_rss_gib"],
         "note": f"{same} of {len(nn['idx'])} same neighbour, {differ} differ beyond ties"},
        {"pool rows": n, "pool GiB (float16)": pool_gib, "variant": "ours: closer_than_reference_many (all benchmarks)",
         "seconds": closer["seconds"], "ratio": closer["seconds"] / base["seconds"],
         "peak RSS GiB": closer["peak_rss_gib"], "note": "pool rows closer: " + ", ".join(map(str, closer["n_closer"]))},
    ]


def table(rows: list[dict[str, Any]]) -> str:
    head = "| pool rows | pool GiB (float16) | variant | seconds | ratio to faiss | peak RSS GiB | note |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pool rows']:,} | {r['pool GiB (float16)']:.2f} | {r['variant']} | {r['seconds']:.1f} | "
                     f"{r['ratio']:.2f} | {r['peak RSS GiB']:.2f} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--worker", choices=sorted(VARIANTS))
    ap.add_argument("--sizes", default="1000000", help="comma list of pool sizes")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--benchmarks", type=int, default=5)
    ap.add_argument("--reference", type=int, default=100_000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.root)
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        folder = build(args.root, n, args.dim, args.shard, args.queries, args.benchmarks, args.reference)
        rows += measure(folder, n)
        print(table(rows), flush=True)
    text = table(rows)
    if args.out:
        args.out.write_text(f"# Train-test similarity search\n\n`python benchmarks/similarity.py ROOT --sizes {args.sizes}`"
                            f" (dim {args.dim}, {args.benchmarks} x {args.queries} test rows, shards of "
                            f"{args.shard:,} rows, 2 CPU cores)\n\n{text}\n")
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
