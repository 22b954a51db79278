"""The synthetic LAION-style workspace builder of the benchmarks, at 2,000 rows (not a timing test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.datasets import open_dataset
from core.embed import load_embeddings
from core.workspace import Workspace
from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "synthetic.py"


@pytest.fixture(scope="module")
def synthetic():
    """benchmarks/synthetic.py as a module."""
    return load_script(SCRIPT, "bench_synthetic")


@pytest.fixture(scope="module")
def built(synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    info = synthetic.build_synthetic_workspace(root, n=2000, dim=128, n_concepts=10, dup_fraction=0.05,
                                               partition_rows=700)
    return root, info


def test_builds_registers_and_imports(built):
    root, info = built
    assert info["built"] == {"generate": True, "register": True, "import": True}
    assert (info["n"], info["dim"]) == (2000, 128)
    ws = Workspace(root)
    ids, X = load_embeddings(ws, info["embedding_set"])
    assert X.shape == (2000, 128) and X.dtype == np.float16
    assert np.allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1.0, atol=2e-3)
    index = open_dataset(ws, info["dataset"]).index
    assert len(index) == 2000 and sorted(index["partition"].unique()) == [0, 1, 2]
    assert index["url"].str.startswith("https://").all()
    assert 0.95 < index["caption"].notna().mean() < 1.0  # 1 % missing, as in web data


def test_planted_structure_matches_the_truth(built):
    root, info = built
    release = Path(info["release"])
    truth = pd.read_parquet(release / "truth.parquet")
    _, X = load_embeddings(Workspace(root), info["embedding_set"])
    X = X.astype(np.float32)
    counts = truth["dup_kind"].value_counts()
    assert counts[1] + counts[2] == 100 and abs(counts[1] - counts[2]) <= 3  # 5 %, half exact, half near
    exact, near = truth[truth["dup_kind"] == 1], truth[truth["dup_kind"] == 2]
    assert np.array_equal(X[exact.index], X[exact["dup_of"]])
    cos = np.einsum("ij,ij->i", X[near.index], X[near["dup_of"]])
    assert (cos > 0.99).all() and (cos < 1.0).all()
    # rows are closer to their own concept's mean than to any other concept's
    concept = truth["concept"].to_numpy()
    means = np.stack([X[concept == c].mean(axis=0) for c in range(10)])
    assert (np.argmax(X @ means.T, axis=1) == concept).mean() > 0.95


def test_a_second_build_reuses_everything(synthetic, built):
    root, info = built
    files = {p: p.stat().st_mtime_ns for p in Path(info["release"]).rglob("*") if p.is_file()}
    again = synthetic.build_synthetic_workspace(root, n=2000, dim=128, n_concepts=10, dup_fraction=0.05,
                                                partition_rows=700)
    assert again["built"] == {"generate": False, "register": False, "import": False}
    assert again["embedding_set"] == info["embedding_set"]
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten
