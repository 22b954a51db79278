"""Fixtures of the pruning tests: planted near-duplicates in arrays, and a tiny workspace clustering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.prune import PruneContext
from core.prune.similarity import SimilarityTable


@dataclass
class Planted:
    """Clustered unit rows with planted near-duplicates (``dup_of[j] = i`` when row j copies row i)."""

    ids: np.ndarray
    labels: np.ndarray
    dist: np.ndarray
    centroids: np.ndarray
    X: np.ndarray
    clip: np.ndarray
    dup_of: np.ndarray
    similarity: SimilarityTable

    def context(self, **kw) -> PruneContext:
        kw.setdefault("similarity", self.similarity)
        return PruneContext.from_arrays(self.ids, self.labels, self.dist, self.centroids, self.X,
                                        clip_scores=self.clip, **kw)


def planted_similarity(X: np.ndarray, rng: np.random.Generator, n_missing: int = 4) -> SimilarityTable:
    """Two benchmarks by brute force: ``near`` = noisy copies of 12 rows, ``far`` = random directions;
    the reference = 30 other noisy copies; ``n_missing`` rows are left out of the analysis (NaN)."""
    def noisy(rows: np.ndarray, scale: float) -> np.ndarray:
        T = X[rows] + scale * rng.normal(size=(len(rows), X.shape[1]))
        return T / np.linalg.norm(T, axis=1, keepdims=True)

    tests = {"near": noisy(rng.choice(len(X), 12, replace=False), 0.05),
             "far": noisy(rng.choice(len(X), 8, replace=False), 2.0)}
    R = noisy(rng.choice(len(X), 30, replace=False), 0.3)
    sims = {b: X @ T.T for b, T in tests.items()}
    max_sim = np.stack([s.max(1) for s in sims.values()], 1).astype(np.float32)
    closer = np.stack([(s > (T @ R.T).max(1)[None, :]).any(1) for s, T in zip(sims.values(), tests.values(), strict=True)], 1)
    missing = rng.choice(len(X), n_missing, replace=False)
    max_sim[missing], closer[missing] = np.nan, False
    return SimilarityTable("planted", tuple(tests), max_sim, closer)


def make_planted(k: int = 5, per: int = 60, dim: int = 32, n_dups: int = 40, seed: int = 0) -> Planted:
    """k clusters of ``per`` rows plus ``n_dups`` near-copies (cos ~0.99) of random rows, some of them
    copies of copies; a few captions are missing (clip NaN)."""
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(k, dim))
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    X = np.repeat(C, per, axis=0) + 0.35 * rng.normal(size=(k * per, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    dup_of = np.full(k * per + n_dups, -1)
    rows = [X]
    for j in range(k * per, k * per + n_dups):
        src = int(rng.integers(0, j))
        src_vec = X[src] if src < k * per else rows[src - k * per + 1][0]
        v = src_vec + 0.02 * rng.normal(size=dim)
        rows.append((v / np.linalg.norm(v))[None])
        dup_of[j] = src
    X = np.concatenate(rows).astype(np.float32)
    sims = X @ C.T.astype(np.float32)
    clip = rng.uniform(0.1, 0.4, len(X)).astype(np.float32)
    clip[rng.choice(len(X), 5, replace=False)] = np.nan
    return Planted(np.array([f"r{i:04d}" for i in range(len(X))], dtype=object), sims.argmax(1),
                   (1 - sims.max(1)).astype(np.float32), C.astype(np.float32), X, clip, dup_of,
                   planted_similarity(X, rng))


@pytest.fixture(scope="session")
def planted() -> Planted:
    return make_planted()


# -- a tiny workspace -------------------------------------------------------------------------------
def write_release(root: Path, *, per: int = 25, dim: int = 16, seed: int = 0) -> None:
    """A LAION-style release with image AND caption embeddings, DataComp-style 32-hex uids, three
    clusters, a few planted duplicates, and one sample without a usable caption embedding."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3]
    img = np.repeat(centres, per, axis=0) + 0.3 * rng.normal(size=(3 * per, dim))
    img[[1, 2, 30]] = img[[0, 0, 31]] + 0.01 * rng.normal(size=(3, dim))  # near-duplicates
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.8 * rng.normal(size=img.shape)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    uids = [f"{int(rng.integers(0, 2**63)):016x}{i:016x}" for i in range(len(img))]
    (root / "img_emb").mkdir(parents=True)
    (root / "text_emb").mkdir()
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", img.astype(np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", txt.astype(np.float16))
    pq.write_table(pa.table({"uid": uids, "caption": [f"caption {i}" for i in range(len(img))]}),
                   root / "metadata" / "metadata_0.parquet")


@pytest.fixture(scope="module")
def clustered_ws(tmp_path_factory):
    """``(ws, clustering_id)``: the release registered, imported with both modalities and clustered (k=3)."""
    from core.clustering import ClusterConfig, run_clustering
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings
    from core.workspace import Workspace

    tmp_path = tmp_path_factory.mktemp("prune_ws")
    write_release(tmp_path / "release")
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "pool", "laion", tmp_path / "release")
    info = import_laion_embeddings(ws, "pool", model="synthetic", modality="both")
    clustering = run_clustering(ws, ClusterConfig(embedding_set=info.id, k=3, seed=0, n_neighbors=2))
    return ws, clustering.id
