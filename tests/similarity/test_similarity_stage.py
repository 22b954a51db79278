"""The similarity stage end to end: three LAION-style sets -> per-benchmark parquet and catalog metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import ConfigError
from core.similarity_stage import SimilarityConfig, load_similarity, run_similarity


def _release(root: Path, X: np.ndarray, prefix: str, parts: int = 2) -> None:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    for p, idx in enumerate(np.array_split(np.arange(len(X)), parts)):
        np.save(root / "img_emb" / f"img_emb_{p}.npy", X[idx].astype(np.float16))
        pq.write_table(pa.table({"key": [f"{prefix}{i:04d}" for i in idx], "caption": ["x"] * len(idx)}),
                       root / "metadata" / f"metadata_{p}.parquet")


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    X = rng.normal(size=(n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture()
def sets(tmp_path):
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings
    from core.workspace import Workspace

    rng = np.random.default_rng(0)
    data = {"pool": _unit(rng, 90), "ref": _unit(rng, 30), "bench": _unit(rng, 12), "far": _unit(rng, 7)}
    data["pool"][:5] = data["bench"][:5] + 0.01 * _unit(rng, 5)  # near copies of five test samples
    ws = Workspace(tmp_path / "ws")
    ids = {}
    for name, X in data.items():
        _release(tmp_path / name, X, name[0])
        register_dataset(ws, name, "laion", tmp_path / name)
        ids[name] = import_laion_embeddings(ws, name, model="synthetic").id
    return ws, ids, data


def _unit_f16(X: np.ndarray) -> np.ndarray:
    Y = X.astype(np.float16).astype(np.float32)
    return Y / np.linalg.norm(Y, axis=1, keepdims=True)


def test_stage_equals_brute_force_and_registers_metrics(sets):
    ws, ids, data = sets
    cfg = SimilarityConfig(pool_set=ids["pool"], reference_set=ids["ref"], benchmark_sets=(ids["bench"],),
                           analysis_id="a1")
    summary = run_similarity(ws, cfg)
    P, R, T = (_unit_f16(data[k]) for k in ("pool", "ref", "bench"))
    s_ref = (T @ R.T).max(1)
    closer = (s_ref[None, :] < (P @ T.T)).any(1)
    pool = load_similarity(ws, "a1", "bench", "pool").set_index("id")
    want = {f"p{i:04d}": bool(c) for i, c in enumerate(closer)}
    assert pool["closer"].to_dict() == want
    assert all(want[f"p{i:04d}"] for i in range(5))  # the planted near copies are found
    test = load_similarity(ws, "a1", "bench", "test").set_index("id")
    assert np.allclose(test.loc[[f"b{i:04d}" for i in range(12)], "s_ref"], s_ref, atol=1e-5)
    assert int(summary.loc[0, "n_prune"]) == int(closer.sum())
    metrics = ws.catalog.query("SELECT metric, value FROM metrics WHERE run_id = 'a1' AND dataset = 'bench'")
    assert dict(zip(metrics["metric"], metrics["value"], strict=True))["n_pool_closer"] == closer.sum()


def test_two_benchmarks_in_one_pass_equal_one_each(sets):
    ws, ids, data = sets
    both = run_similarity(ws, SimilarityConfig(pool_set=ids["pool"], reference_set=ids["ref"],
                                               benchmark_sets=(ids["bench"], ids["far"]), analysis_id="ab"))
    assert list(both["benchmark"]) == ["bench", "far"]
    for bench in ("bench", "far"):
        run_similarity(ws, SimilarityConfig(pool_set=ids["pool"], reference_set=ids["ref"],
                                            benchmark_sets=(ids[bench],), analysis_id=f"one-{bench}"))
        for part in ("test", "pool"):
            one = load_similarity(ws, f"one-{bench}", bench, part)
            both_part = load_similarity(ws, "ab", bench, part)
            floats = [c for c in one.columns if one[c].dtype.kind == "f"]
            assert one.drop(columns=floats).equals(both_part.drop(columns=floats)), (bench, part)
            assert np.allclose(one[floats], both_part[floats], rtol=0, atol=1e-6, equal_nan=True)
    P, R, T = (_unit_f16(data[k]) for k in ("pool", "ref", "far"))
    closer = ((T @ R.T).max(1)[None, :] < P @ T.T).any(1)
    assert int(both.set_index("benchmark").loc["far", "n_prune"]) == int(closer.sum())


def test_sets_of_different_models_are_refused(sets, tmp_path):
    from core.embed import import_laion_embeddings
    from core.errors import DataError

    ws, ids, _ = sets
    other = import_laion_embeddings(ws, "bench", model="another-model").id
    with pytest.raises(DataError, match="different models.*another-model"):
        run_similarity(ws, SimilarityConfig(pool_set=ids["pool"], reference_set=ids["ref"], benchmark_sets=(other,)))


def test_rerun_replaces_the_metrics(sets):
    ws, ids, _ = sets
    cfg = SimilarityConfig(pool_set=ids["pool"], reference_set=ids["ref"], benchmark_sets=(ids["bench"],),
                           analysis_id="a2")
    run_similarity(ws, cfg)
    run_similarity(ws, cfg)
    n = ws.catalog.query("SELECT count(*) AS n FROM metrics WHERE run_id = 'a2'")["n"].iloc[0]
    assert n == 5


def test_bad_configs():
    with pytest.raises(ConfigError, match="at least one benchmark"):
        SimilarityConfig(pool_set="p", reference_set="r", benchmark_sets=())
    with pytest.raises(ConfigError, match="must all differ"):
        SimilarityConfig(pool_set="p", reference_set="p", benchmark_sets=("b",))
