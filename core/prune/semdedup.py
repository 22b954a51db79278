"""SemDeDup: remove semantic near-duplicates within each concept cluster.

Ref: Abbas, Tirumala, Simig, Ganguli, Morcos, "SemDeDup: Data-efficient learning at web-scale through
semantic deduplication" (2023), and its code (facebookresearch/SemDeDup). Within each cluster, members
are ordered by cosine distance to the centroid, descending ("hard": farthest first; "easy" reverses,
"random" is a seeded shuffle). For the member at place j of that order,
``M_j = max_{i<j} cos(e_i, e_j)``, and j is removed iff ``M_j > 1 - eps``.

Two semantics (``mode``):

- ``reference`` (default, the reference code's ``triu(X X^T).max(0)``): the first member of a duplicate
  group in the order is kept and removal is not transitive: j is removed for resembling an earlier i
  even if i is itself removed. Each removal records ``ref`` = the argmax i (the earlier member j
  duplicates) and ``score`` = M_j.
- ``one_per_group`` (the paper's wording): the connected components of the graph with an edge for every
  pair with ``cos > 1 - eps`` are the duplicate groups; the first member of each group in the order is
  kept. ``ref`` = that kept representative; ``score`` = M_j (which may be <= 1 - eps for a member linked
  to its group only through later members). The groups depend on eps, so this mode has no eps curve.

Speed and memory: M does not depend on eps, so :class:`SemDeDupPlan` computes M and its argmax once
and answers any eps in O(n) and a whole eps -> kept curve from one sort. M is computed in row blocks
of the lower triangle only (block vs all earlier rows with one matrix product, the block's own
triangle with a symmetric product plus a mask), so a block's similarity slab stays under
``max_slab_bytes`` whatever the cluster size. Clusters (or, for a large cluster, its row blocks) run
on ``ctx.workers`` threads with single-threaded BLAS each. On a GPU (``ctx.device``: a CUDA GPU when torch
sees one, unless ``cpu`` is asked for), M is computed per cluster by torch in float32 row blocks of up to
:data:`GPU_SLAB_BYTES` (full float32: TF32 is switched off for these products); M then differs from the
CPU path by float rounding only. The one_per_group mode's duplicate graph always runs on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.errors import ConfigError
from core.prune.base import (
    PruneContext,
    Selection,
    order_param,
    register,
    register_reason,
    selection_from_mask,
)
from core.registry import ParamSpec

#: Slider stops for eps: log-spaced from 1e-5, including the published LAION-440M values (SemDeDup, 2023).
EPS_TICKS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 0.00095, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.124,
             0.165, 0.205, 0.26, 0.3)
MODES = ("reference", "one_per_group")
DUPLICATE = register_reason("semdedup:duplicate", "cos {score:.4f} to earlier member {ref}")
DUPLICATE_GROUP = register_reason("semdedup:duplicate_group", "duplicate group kept as {ref} (max cos to earlier {score:.4f})")

#: Key in ``PruneContext.shared`` of an executor that runs the per-cluster work elsewhere (the Ray backend,
#: :class:`core.distributed.RayClusterExecutor`): ``semdedup_max_similarity(ctx, order, max_slab_bytes=)``
#: and ``semdedup_groups(ctx, order, threshold)`` return the arrays this module computes in-process,
#: aligned with ``ctx.rows``, from the same per-cluster functions. Subsets share ``shared``, so every
#: step of a chain uses it.
CLUSTER_BACKEND = "cluster_backend"

#: Default bound on one block's float32 similarity slab (rows x earlier rows).
MAX_SLAB_BYTES = 64 << 20
#: Bound on one block's similarity slab on a GPU (a 1,000-member cluster is one block; 100k members: ~38).
GPU_SLAB_BYTES = 1 << 30
_MIN_BLOCK, _MAX_BLOCK = 16, 256
#: Clusters at least this large are split into row blocks run in parallel (others run whole, in parallel).
_LARGE_CLUSTER = 16_384
#: Edges kept in memory before the duplicate graph of a cluster is compacted (one_per_group).
_MAX_EDGES = 1 << 22
_UPPER = np.triu(np.full((_MAX_BLOCK, _MAX_BLOCK), -np.inf, dtype=np.float32))  # -inf on and above the diagonal


# -- array core ------------------------------------------------------------------------------------
def block_rows(m: int, max_slab_bytes: int = MAX_SLAB_BYTES) -> int:
    """Rows per block for an m-member cluster: 256 (measured fastest: the diagonal blocks use a
    symmetric product, so larger blocks waste nothing), fewer when ``block x m`` float32 would exceed
    ``max_slab_bytes``; a cluster of at most 256 members is one block."""
    if m <= _MAX_BLOCK:
        return max(m, 1)
    return int(max(_MIN_BLOCK, min(_MAX_BLOCK, max_slab_bytes // (4 * m))))


def _block_max(X: np.ndarray, s: int, e: int, M: np.ndarray, A: np.ndarray) -> None:
    """Fill ``M[s:e]``, ``A[s:e]`` with the max and argmax of ``cos(x_i, x_j)`` over i < j."""
    B = X[s:e]
    r = e - s
    rows = np.arange(r)
    diag = B @ B.T  # numpy runs a symmetric product (BLAS syrk) for a @ a.T
    diag += _UPPER[:r, :r]
    a = diag.argmax(axis=1)
    v = diag[rows, a]
    if s:
        off = B @ X[:s].T
        a_off = off.argmax(axis=1)
        v_off = off[rows, a_off]
        later = v > v_off  # ties go to the earlier member
        v = np.where(later, v, v_off)
        a = np.where(later, a + s, a_off)
    M[s:e] = v
    A[s:e] = np.where(np.isneginf(v), -1, a)


def semdedup_max_similarity(X: np.ndarray, *, max_slab_bytes: int = MAX_SLAB_BYTES,
                            pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per member, the largest cosine similarity to an EARLIER member of the order, and which one.

    Ref: SemDeDup (Abbas et al. 2023), ``M = triu(X X^T, 1).max(0)`` in the reference code.

    Args:
        X: (m, D) float32 unit rows of one cluster, in the pruning order.
        max_slab_bytes: bound on the float32 similarity slab of one row block.
        pool: run the row blocks on these threads (for one large cluster).

    Returns:
        ``(M, A)``: M (m,) float32 ``max_{i<j} cos(x_i, x_j)`` (-inf for the first member; larger = more
        duplicated); A (m,) int64 the argmax i (the first one on ties), -1 for the first member.
    """
    m = X.shape[0]
    M = np.empty(m, np.float32)
    A = np.empty(m, np.int64)
    b = block_rows(m, max_slab_bytes)
    starts = range(0, m, b)
    if pool is None:
        for s in starts:
            _block_max(X, s, min(s + b, m), M, A)
    else:  # biggest blocks (the last ones) first, for balance
        list(pool.map(lambda s: _block_max(X, s, min(s + b, m), M, A), reversed(starts)))
    return M, A


def pairwise_device(device: str | None) -> Any:
    """The torch device SemDeDup's pairwise products run on, or None for the numpy path on the CPU.

    None / ``auto``: the first CUDA GPU when torch sees one, else None. ``cpu``: None. ``cuda`` / ``cuda:N``
    (or ``mps``): that device, checked by :func:`core.models.select_device` (ConfigError when it is absent).
    """
    name = (device or "auto").strip().lower()
    if name == "cpu":
        return None
    if name == "auto":
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a core dependency
            return None
        return torch.device("cuda") if torch.cuda.is_available() else None
    from core.models import select_device

    chosen = select_device(name)
    return None if chosen.type == "cpu" else chosen


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """torch matrix products in full float32 while inside (no TF32: it would move M by ~1e-3)."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def semdedup_max_similarity_torch(X: np.ndarray, device: Any, *,
                                  max_slab_bytes: int = GPU_SLAB_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`semdedup_max_similarity` computed by torch on ``device`` (a GPU; any torch device works).

    Each row block is multiplied with all rows up to its end in one product, entries on and above the
    diagonal are masked, and the row max and its first argmax are taken (the earliest member on ties, as
    the CPU path). Returns numpy ``(M, A)`` as :func:`semdedup_max_similarity` does.
    """
    import torch

    m = X.shape[0]
    if m == 0:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    T = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
    M = torch.empty(m, dtype=torch.float32, device=device)
    A = torch.empty(m, dtype=torch.int64, device=device)
    b = int(max(1, min(m, max_slab_bytes // (4 * m))))
    index = torch.arange(m, device=device)
    with torch.no_grad(), _full_float32():
        for s in range(0, m, b):
            e = min(s + b, m)
            S = T[s:e] @ T[:e].T
            S.masked_fill_(index[:e][None, :] >= index[s:e][:, None], float("-inf"))
            M[s:e], A[s:e] = S.max(dim=1)
    M_np, A_np = M.cpu().numpy(), A.cpu().numpy()
    A_np[np.isneginf(M_np)] = -1
    return M_np, A_np


def _lower_slabs(X: np.ndarray, max_slab_bytes: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(s, e, S)`` per row block: S (e-s, e) cosines of rows s..e-1 with rows 0..e-1, -inf for i >= j."""
    m = X.shape[0]
    b = block_rows(m, max_slab_bytes)
    for s in range(0, m, b):
        e = min(s + b, m)
        S = X[s:e] @ X[:e].T
        S[:, s:e] += _UPPER[: e - s, : e - s]
        yield s, e, S


def semdedup_groups(X: np.ndarray, threshold: float, *, max_slab_bytes: int = MAX_SLAB_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Duplicate groups of one cluster: connected components of ``{(i, j): cos(x_i, x_j) > threshold}``.

    Ref: SemDeDup (Abbas et al. 2023), "keep one per group of duplicates" (the paper's wording).

    Args:
        X: (m, D) float32 unit rows of one cluster, in the pruning order.
        threshold: ``1 - eps``.

    Returns:
        ``(rep, M)``: rep (m,) int64 the group's first member in the order (rep[j] == j: j is kept);
        M (m,) float32 max cosine to an earlier member (-inf for the first).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    m = X.shape[0]
    M = np.full(m, -np.inf, np.float32)
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    n_edges = 0
    rep = np.arange(m, dtype=np.int64)

    def compact() -> np.ndarray:
        j = np.concatenate([e[0] for e in edges]) if edges else np.zeros(0, np.int64)
        i = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(len(j), np.int8), (j, i)), shape=(m, m))
        _, comp = connected_components(graph, directed=False)
        _, first = np.unique(comp, return_index=True)  # order = index, so the first index is the rep
        return first[comp].astype(np.int64)

    thr = np.float64(threshold)  # compare in float64, as SemDeDupPlan.removed_mask does
    for s, e, sims in _lower_slabs(X, max_slab_bytes):
        M[s:e] = sims.max(axis=1)
        jj, ii = np.nonzero(sims > thr)
        edges.append((jj.astype(np.int64) + s, ii.astype(np.int64)))
        n_edges += len(jj)
        if n_edges > _MAX_EDGES:  # keep memory bounded: replace the edges by a star per group
            rep = compact()
            moved = np.flatnonzero(rep != np.arange(m))
            edges, n_edges = [(moved, rep[moved])], len(moved)
    return compact(), M


# -- running over clusters -------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A thread pool with single-threaded BLAS inside (threads parallelise clusters instead), or None.

    The BLAS limit is process-wide while the pool lives (threadpoolctl), measured faster than
    multi-threaded BLAS on per-cluster products of this size, and much faster on a shared machine.
    """
    if workers <= 1:
        yield None
        return
    try:
        from threadpoolctl import threadpool_limits

        limit: Any = threadpool_limits(1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limit = contextlib.nullcontext()
    with limit, ThreadPoolExecutor(workers) as pool:
        yield pool


def for_each_cluster(ctx: PruneContext, order: str, fn: Callable[[int, int, np.ndarray, ThreadPoolExecutor | None], None]) -> None:
    """Call ``fn(lo, hi, X, pool)`` for every cluster with >= 2 active rows.

    ``X`` is the cluster's (m, D) float32 unit rows in ``order`` and ``grouped(order)[0][lo:hi]`` their
    positions. Array sources are read one cluster at a time inside the worker threads; others (a
    workspace) in chunks of whole clusters within ``ctx.max_chunk_bytes``. Large clusters run one at
    a time with their row blocks spread over the pool (``pool`` is passed only then; ``fn`` may
    ignore it and run the cluster on one thread).
    """
    positions, bounds = ctx.grouped(order)
    workers = ctx.workers or os.cpu_count() or 1
    with _threads(workers) as pool:
        if ctx.embeddings is not None and ctx.embeddings.random_access:
            _run_clusters(np.arange(ctx.k), bounds, lambda lo, hi: ctx.load_embeddings(positions[lo:hi]), fn, pool)
            return
        for c0, c1 in ctx.cluster_chunks(order):
            base = int(bounds[c0])
            X = ctx.load_embeddings(positions[base:bounds[c1]])
            _run_clusters(np.arange(c0, c1), bounds, functools.partial(_chunk_rows, X, base), fn, pool)
            del X  # before the next chunk loads: one chunk in memory at a time, not two


def _chunk_rows(X: np.ndarray, base: int, lo: int, hi: int) -> np.ndarray:
    return X[lo - base:hi - base]


def _run_clusters(clusters: np.ndarray, bounds: np.ndarray, load: Callable[[int, int], np.ndarray],
                  fn: Callable[[int, int, np.ndarray, ThreadPoolExecutor | None], None],
                  pool: ThreadPoolExecutor | None) -> None:
    sizes = bounds[clusters + 1] - bounds[clusters]
    clusters = clusters[sizes >= 2]
    sizes = bounds[clusters + 1] - bounds[clusters]
    large = clusters[sizes >= _LARGE_CLUSTER] if pool is not None else clusters[:0]
    small = np.setdiff1d(clusters, large)
    small = small[np.argsort(-(bounds[small + 1] - bounds[small]), kind="stable")]  # biggest first
    for c in large:
        fn(int(bounds[c]), int(bounds[c + 1]), load(int(bounds[c]), int(bounds[c + 1])), pool)

    def one(c: int) -> None:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        fn(lo, hi, load(lo, hi), None)

    if pool is None:
        for c in small:
            one(int(c))
    else:
        list(pool.map(one, small.tolist()))


# -- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SemDeDupPlan:
    """M and its argmax for every active row: answers any eps without touching embeddings.

    Attributes:
        order: the within-cluster order M was computed in.
        rows: (n_active,) int64 sorted original positions.
        max_sim: (n_active,) float32 M_j aligned with ``rows``; -inf for a cluster's first member.
        ref: (n_active,) int64 original position of the most similar earlier member (-1: none).
    """

    order: str
    rows: np.ndarray
    max_sim: np.ndarray
    ref: np.ndarray
    _sorted: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, ctx: PruneContext, order: str = "hard", *, max_slab_bytes: int = MAX_SLAB_BYTES) -> SemDeDupPlan:
        """Compute M over every cluster of ``ctx`` (the only step that reads embeddings), here or on the
        context's cluster backend (:data:`CLUSTER_BACKEND`)."""
        backend = ctx.shared.get(CLUSTER_BACKEND)
        if backend is not None:
            max_sim, ref = backend.semdedup_max_similarity(ctx, order, max_slab_bytes=max_slab_bytes)
        else:
            max_sim, ref = _max_similarity_here(ctx, order, max_slab_bytes)
        return cls(order, ctx.rows, max_sim, ref, np.sort(max_sim.astype(np.float64)))

    def removed_mask(self, eps: float) -> np.ndarray:
        """(n_active,) bool: ``M_j > 1 - eps`` (compared in float64)."""
        return self.max_sim > np.float64(1.0 - _check_eps(eps))

    def n_kept(self, eps: float) -> int:
        return int(np.searchsorted(self._sorted, np.float64(1.0 - _check_eps(eps)), side="right"))

    def curve(self, eps: np.ndarray | list[float]) -> pd.DataFrame:
        """``eps, threshold, n_kept, fraction_kept`` for each eps, from one sort (O(len(eps) log n))."""
        eps_arr = np.asarray(eps, dtype=np.float64)
        for e in eps_arr:
            _check_eps(float(e))
        n_kept = np.searchsorted(self._sorted, 1.0 - eps_arr, side="right")
        return pd.DataFrame({"eps": eps_arr, "threshold": 1.0 - eps_arr, "n_kept": n_kept.astype(np.int64),
                             "fraction_kept": n_kept / max(len(self.rows), 1)})


def _max_similarity_here(ctx: PruneContext, order: str, max_slab_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_sim, ref) of :class:`SemDeDupPlan`, aligned with ``ctx.rows``, computed in this process."""
    positions, _ = ctx.grouped(order)
    M_g = np.full(len(positions), -np.inf, np.float32)
    ref_g = np.full(len(positions), -1, np.int64)
    device = pairwise_device(ctx.device)

    def one(lo: int, hi: int, X: np.ndarray, pool: ThreadPoolExecutor | None) -> None:
        if device is not None:
            M, A = semdedup_max_similarity_torch(X, device)
        else:
            M, A = semdedup_max_similarity(X, max_slab_bytes=max_slab_bytes, pool=pool)
        M_g[lo:hi] = M
        ref_g[lo:hi] = np.where(A >= 0, positions[lo + np.maximum(A, 0)], -1)

    for_each_cluster(ctx, order, one)
    at = np.searchsorted(ctx.rows, positions)
    max_sim = np.empty_like(M_g)
    ref = np.empty_like(ref_g)
    max_sim[at] = M_g
    ref[at] = ref_g
    return max_sim, ref


def _check_eps(eps: float) -> float:
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"eps must be in [0, 1]; got {eps}")
    return eps


def semdedup_plan(ctx: PruneContext, order: str = "hard") -> SemDeDupPlan:
    """The context's plan for ``order``, computed once and cached on the context."""
    key = ("semdedup_plan", order)
    if key not in ctx.cache:
        ctx.cache[key] = SemDeDupPlan.build(ctx, order)
    plan: SemDeDupPlan = ctx.cache[key]
    return plan


def _group_selection(ctx: PruneContext, order: str, eps: float) -> Selection:
    backend = ctx.shared.get(CLUSTER_BACKEND)
    if backend is not None:
        M, rep = backend.semdedup_groups(ctx, order, 1.0 - eps)
    else:
        M, rep = _groups_here(ctx, order, eps)
    keep = rep == ctx.rows
    return selection_from_mask(ctx, keep, reason_names=[DUPLICATE_GROUP], score=M, ref=np.where(keep, -1, rep))


def _groups_here(ctx: PruneContext, order: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(M, rep) aligned with ``ctx.rows`` (rep = the group's kept position), computed in this process."""
    positions, _ = ctx.grouped(order)
    M_g = np.full(len(positions), -np.inf, np.float32)
    rep_g = positions.copy()

    def one(lo: int, hi: int, X: np.ndarray, pool: ThreadPoolExecutor | None) -> None:
        rep, M = semdedup_groups(X, 1.0 - eps)
        M_g[lo:hi] = M
        rep_g[lo:hi] = positions[lo + rep]

    for_each_cluster(ctx, order, one)
    at = np.searchsorted(ctx.rows, positions)
    M, rep = np.empty_like(M_g), np.empty_like(rep_g)
    M[at], rep[at] = M_g, rep_g
    return M, rep


@register(
    "semdedup",
    summary="remove semantic near-duplicates within each cluster (cos > 1 - eps to an earlier member)",
    paper="Abbas et al., SemDeDup: Data-efficient learning at web-scale through semantic deduplication (2023)",
    params=[
        ParamSpec("eps", "float", 0.05, help="duplicate threshold: removed iff max cos to an earlier member > 1 - eps",
                  min=0.0, max=1.0, ticks=EPS_TICKS),
        order_param(" (which member of a duplicate group is kept: the first in this order)"),
        ParamSpec("mode", "choice", "reference", choices=MODES,
                  help="reference = the reference code (non-transitive); one_per_group = one per connected group"),
    ],
)
def semdedup(ctx: PruneContext, *, eps: float, order: str, mode: str) -> Selection:
    """SemDeDup selection; see the module docstring for the two modes."""
    if mode == "one_per_group":
        return _group_selection(ctx, order, eps)
    plan = semdedup_plan(ctx, order)
    removed = plan.removed_mask(eps)
    return selection_from_mask(ctx, ~removed, reason_names=[DUPLICATE], score=plan.max_sim, ref=plan.ref)
