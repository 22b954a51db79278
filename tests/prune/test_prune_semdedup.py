"""SemDeDup against an O(n^2) brute force: both semantics, which member is kept, the eps curve."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.prune import ArrayEmbeddings, PruneContext, select, semdedup_max_similarity, semdedup_plan
from core.prune import semdedup as semdedup_module


def brute_order(ctx: PruneContext, c: int, order: str) -> np.ndarray:
    """Positions of cluster c in the pruning order (hard: distance descending, ties by position; random:
    by a seeded permutation of all rows, the documented rule)."""
    members = np.flatnonzero(ctx.labels == c)
    if order == "random":
        key = np.random.default_rng(ctx.seed).permutation(ctx.n)[members]
    else:
        key = -ctx.dist[members] if order == "hard" else ctx.dist[members]
    return members[np.lexsort((members, key))]


def brute_reference(X: np.ndarray, ctx: PruneContext, order: str, eps: float) -> tuple[set[int], dict[int, int]]:
    """Removed positions and, for each, the earlier member it duplicates (argmax), in float64."""
    removed, ref = set(), {}
    for c in range(ctx.k):
        pos = brute_order(ctx, c, order)
        S = X[pos].astype(np.float64) @ X[pos].astype(np.float64).T
        for j in range(1, len(pos)):
            i = int(np.argmax(S[:j, j]))
            if S[i, j] > 1 - eps:
                removed.add(int(pos[j]))
                ref[int(pos[j])] = int(pos[i])
    return removed, ref


def brute_groups(X: np.ndarray, ctx: PruneContext, order: str, eps: float) -> tuple[set[int], dict[int, int]]:
    """Removed positions and their group's kept (first) member: connected components by search."""
    removed, rep = set(), {}
    for c in range(ctx.k):
        pos = brute_order(ctx, c, order)
        adj = (X[pos].astype(np.float64) @ X[pos].astype(np.float64).T) > 1 - eps
        seen = np.zeros(len(pos), bool)
        for start in range(len(pos)):  # in order: the first unseen member starts (and keeps) its group
            if seen[start]:
                continue
            stack, seen[start] = [start], True
            while stack:
                u = stack.pop()
                for v in np.flatnonzero(adj[u] & ~seen):
                    seen[v] = True
                    stack.append(v)
                    removed.add(int(pos[v]))
                    rep[int(pos[v])] = int(pos[start])
    return removed, rep


@pytest.mark.parametrize("order", ["hard", "easy", "random"])
@pytest.mark.parametrize("eps", [0.005, 0.05])
def test_reference_mode_equals_brute_force(planted, order, eps):
    ctx = planted.context(seed=3)
    sel = select(ctx, "semdedup", eps=eps, order=order)
    removed, ref = brute_reference(planted.X, ctx, order, eps)
    assert set(sel.removed.tolist()) == removed
    assert len(removed) >= 10 if eps == 0.05 else True
    assert {int(r): int(f) for r, f in zip(sel.removed, sel.ref, strict=True)} == ref
    S = planted.X[sel.removed].astype(np.float64) * planted.X[sel.ref].astype(np.float64)
    assert np.allclose(sel.score, S.sum(1), atol=1e-5)  # score = the cosine to the member it duplicates
    assert all(r.startswith("semdedup:") for r in sel.reason_names)


@pytest.mark.parametrize("order", ["hard", "easy", "random"])
def test_one_per_group_mode_equals_brute_force(planted, order):
    ctx = planted.context(seed=3)
    sel = select(ctx, "semdedup", eps=0.05, order=order, mode="one_per_group")
    removed, rep = brute_groups(planted.X, ctx, order, 0.05)
    assert set(sel.removed.tolist()) == removed
    assert {int(r): int(f) for r, f in zip(sel.removed, sel.ref, strict=True)} == rep


def _chain_context(order_dist):
    """Three rows on a great circle: a~b and b~c are duplicates at eps 0.1, a and c are not."""
    theta = np.arccos(0.93)
    u, v = np.eye(4)[0], np.eye(4)[1]
    X = np.stack([np.cos(t) * u + np.sin(t) * v for t in (0.0, theta, 2 * theta)]).astype(np.float32)
    C = np.eye(4, dtype=np.float32)[[2, 3]]
    return PruneContext.from_arrays(["a", "b", "c"], [0, 0, 0], order_dist, C, X), X


def test_removal_is_not_transitive_in_reference_mode_and_groups_keep_one():
    ctx, X = _chain_context([0.3, 0.2, 0.1])  # hard order: a, b, c
    assert float(X[0] @ X[2]) < 0.9 < float(X[0] @ X[1])
    ref = select(ctx, "semdedup", eps=0.1)
    assert ctx.ids[ref.kept].tolist() == ["a"] and ctx.ids[ref.ref].tolist() == ["a", "b"]  # c -> b, removed too
    grp = select(ctx, "semdedup", eps=0.1, mode="one_per_group")
    assert ctx.ids[grp.kept].tolist() == ["a"] and ctx.ids[grp.ref].tolist() == ["a", "a"]
    # easy order: c, b, a -> c kept; the other end of the chain
    ctx_easy, _ = _chain_context([0.3, 0.2, 0.1])
    assert ctx_easy.ids[select(ctx_easy, "semdedup", eps=0.1, order="easy").kept].tolist() == ["c"]
    # order a, c, b: reference keeps a and c (c resembles no EARLIER member); one group keeps only a
    ctx2, _ = _chain_context([0.3, 0.1, 0.2])
    assert ctx2.ids[select(ctx2, "semdedup", eps=0.1).kept].tolist() == ["a", "c"]
    assert ctx2.ids[select(ctx2, "semdedup", eps=0.1, mode="one_per_group").kept].tolist() == ["a"]


def test_eps_curve_equals_recomputation_per_eps(planted):
    ctx = planted.context()
    plan = semdedup_plan(ctx, "hard")
    grid = [0.0, 0.001, 0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0]
    curve = plan.curve(grid)
    for eps, n_kept in zip(grid, curve["n_kept"], strict=True):
        fresh = select(planted.context(), "semdedup", eps=eps)
        assert len(fresh.kept) == n_kept == plan.n_kept(eps)
    assert (np.diff(curve["n_kept"]) <= 0).all()  # larger eps removes more
    assert curve["n_kept"].iloc[-1] >= ctx.k  # eps 1: each cluster keeps at least its first member


def test_blocked_kernel_matches_full_matrix_across_block_sizes_and_threads():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(700, 24)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X[400] = X[12]  # exact duplicate across blocks
    S = X.astype(np.float64) @ X.astype(np.float64).T
    want_M = np.array([-np.inf] + [S[:j, j].max() for j in range(1, 700)])
    want_A = np.array([-1] + [int(S[:j, j].argmax()) for j in range(1, 700)])
    for slab in (1 << 14, 1 << 16, 1 << 26):  # 16-row blocks up to one 256-row block
        max_sim, arg = semdedup_max_similarity(X, max_slab_bytes=slab)
        assert np.allclose(max_sim, want_M, atol=1e-5) and (arg == want_A).all()
        with ThreadPoolExecutor(2) as pool:
            max_sim2, arg2 = semdedup_max_similarity(X, max_slab_bytes=slab, pool=pool)
        assert (max_sim2 == max_sim).all() and (arg2 == arg).all()
    assert arg[400] == 12


class _Streamed(ArrayEmbeddings):
    """An array source that pretends to stream (chunked reads, as a workspace source)."""

    def __init__(self, X):
        super().__init__(X)
        self.random_access = False
        self.calls = 0

    def gather(self, positions):
        self.calls += 1
        return super().gather(positions)


def test_chunked_reading_threads_and_graph_compaction_give_the_same_result(planted, monkeypatch):
    base = select(planted.context(workers=1), "semdedup", eps=0.05)
    source = _Streamed(planted.X.astype(np.float16))
    ctx = PruneContext.from_arrays(planted.ids, planted.labels, planted.dist, planted.centroids, source,
                                   max_chunk_bytes=100 * planted.X.shape[1] * 4, workers=2)
    chunked = select(ctx, "semdedup", eps=0.05)
    assert source.calls > 1
    assert (chunked.kept == base.kept).all() and (chunked.ref == base.ref).all()
    grp = select(planted.context(), "semdedup", eps=0.05, mode="one_per_group")
    monkeypatch.setattr(semdedup_module, "_MAX_EDGES", 3)
    grp_small = select(planted.context(), "semdedup", eps=0.05, mode="one_per_group")
    assert (grp.kept == grp_small.kept).all() and (grp.ref == grp_small.ref).all()


def test_nan_embedding_is_a_one_line_data_error(planted):
    from core.errors import DataError

    X = planted.X.copy()
    X[7, 3] = np.nan
    ctx = PruneContext.from_arrays(planted.ids, planted.labels, planted.dist, planted.centroids, X)
    with pytest.raises(DataError, match="r0007.*NaN") as exc:
        select(ctx, "semdedup", eps=0.05)
    assert "\n" not in exc.value.one_line()


# -- the torch path (a GPU's; run here on the CPU) -----------------------------------------------------------
def test_torch_kernel_matches_full_matrix_across_block_sizes():
    import torch

    rng = np.random.default_rng(2)
    X = rng.normal(size=(500, 24)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X[300] = X[7]  # exact duplicates: the earliest member wins the tie, as on the CPU path
    X[420] = X[7]
    S = X.astype(np.float64) @ X.astype(np.float64).T
    want_M = np.array([-np.inf] + [S[:j, j].max() for j in range(1, 500)])
    want_A = np.array([-1] + [int(S[:j, j].argmax()) for j in range(1, 500)])
    cpu_M, cpu_A = semdedup_max_similarity(X)
    for slab in (4 * 500 * 7, 4 * 500 * 64, 1 << 30):  # 7-row blocks, 64-row blocks, one block
        max_sim, arg = semdedup_module.semdedup_max_similarity_torch(X, torch.device("cpu"), max_slab_bytes=slab)
        assert max_sim.dtype == np.float32 and arg.dtype == np.int64
        assert np.allclose(max_sim, want_M, atol=1e-5) and (arg == want_A).all()
        assert np.abs(max_sim[1:] - cpu_M[1:]).max() < 1e-6 and (arg == cpu_A).all()
    assert arg[300] == 7 and arg[420] == 7 and arg[0] == -1 and np.isneginf(max_sim[0])
    one_M, one_A = semdedup_module.semdedup_max_similarity_torch(X[:1], torch.device("cpu"))
    assert np.isneginf(one_M).all() and (one_A == -1).all()


def test_a_context_on_a_torch_device_gives_the_same_pruning(planted, monkeypatch):
    import torch

    base = select(planted.context(device="cpu"), "semdedup", eps=0.05)
    asked: list[str | None] = []

    def torch_cpu(device):
        asked.append(device)
        return torch.device("cpu")  # what a GPU would get, run by torch on this machine

    monkeypatch.setattr(semdedup_module, "pairwise_device", torch_cpu)
    on_torch = select(planted.context(device="cuda"), "semdedup", eps=0.05)
    assert asked == ["cuda"]
    assert (on_torch.kept == base.kept).all() and (on_torch.removed == base.removed).all()
    assert (on_torch.ref == base.ref).all() and np.allclose(on_torch.score, base.score, atol=1e-6)


def test_device_names():
    import torch

    from core.errors import ConfigError

    assert semdedup_module.pairwise_device("cpu") is None
    if not torch.cuda.is_available():
        assert semdedup_module.pairwise_device(None) is None and semdedup_module.pairwise_device("auto") is None
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            semdedup_module.pairwise_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        semdedup_module.pairwise_device("tpu")
