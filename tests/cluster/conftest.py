"""Shared fixtures of the clustering tests: a small LAION-style release of well-separated concepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

#: The release's concepts; captions name them, so cluster labels can be checked.
RELEASE_CONCEPTS = ("red triangle", "blue star", "green circle", "yellow square")


def write_release(root: Path, per_concept: int = 30, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Four well-separated concepts with captions naming them, in two LAION partitions; row 5 is broken
    (all zeros). Returns the (4, dim) unit concept centres."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(RELEASE_CONCEPTS)]
    X, captions = [], []
    for c, name in enumerate(RELEASE_CONCEPTS):
        pts = centres[c] + 0.15 * rng.normal(size=(per_concept, dim))
        X.append(pts / np.linalg.norm(pts, axis=1, keepdims=True))
        captions += [f"a photo of a {name} stock image {i}" for i in range(per_concept)]
    X = np.concatenate(X).astype(np.float16)
    X[5] = 0  # one broken row: skipped at registration
    order = rng.permutation(len(X))
    for p, part in enumerate(np.array_split(order, 2)):
        (root / "img_emb").mkdir(parents=True, exist_ok=True)
        np.save(root / "img_emb" / f"img_emb_{p}.npy", X[part])
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": [f"s{i:04d}" for i in part], "caption": [captions[i] for i in part]}),
                       root / "metadata" / f"metadata_{p}.parquet")
    return centres.astype(np.float32)


@pytest.fixture(scope="session")
def make_release():
    """``make_release(root) -> centres``: writes the release (see :func:`write_release`)."""
    return write_release


@pytest.fixture(scope="session")
def release_concepts() -> tuple[str, ...]:
    return RELEASE_CONCEPTS
