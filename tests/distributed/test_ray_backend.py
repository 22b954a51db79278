"""The Ray backend gives the local backend's outputs: same files, same catalog rows, same manifests.

One local Ray (2 CPUs, fractional task/actor CPUs) serves the whole module; the data is small and
generated: ~200 images embedded by the random-init demo CLIP, and LAION-style embedding releases with
planted near-duplicates, split into several shards, for clustering, pruning and train-test similarity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.distributed import RayBackend, RayUnavailable, import_ray, make_backend, session
from core.errors import ConfigError, DataError
from tests.conftest import make_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own deprecations

REPO = Path(__file__).resolve().parents[2]
D = 32


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend():
    """A local Ray for the module; every stage call below finds it open and leaves it open."""
    pytest.importorskip("ray")
    runner = RayBackend(address="local", local_cpus=2, task_cpus=0.5)
    with session(runner):
        yield runner


def _release(root: Path, X: np.ndarray, prefix: str, parts: int = 2) -> None:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    for p, idx in enumerate(np.array_split(np.arange(len(X)), parts)):
        np.save(root / "img_emb" / f"img_emb_{p}.npy", X[idx].astype(np.float16))
        pq.write_table(pa.table({"key": [f"{prefix}{i:04d}" for i in idx], "caption": [f"thing {i % 7}" for i in idx]}),
                       root / "metadata" / f"metadata_{p}.parquet")


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A workspace with imported sets ``pool`` (360 rows: 12 concepts, planted near and exact duplicates,
    6 shards), ``ref`` (60 rows, 2 shards) and benchmarks ``near``/``far`` (24 and 10 rows)."""
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings
    from core.workspace import Workspace

    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(7)
    centers = _unit(rng.normal(size=(12, D)))
    pool = _unit(centers[rng.integers(0, 12, 360)] + 0.35 * rng.normal(size=(360, D)))
    near_dups = rng.choice(360, 40, replace=False)
    pool[near_dups[:20]] = _unit(pool[near_dups[20:]] + 0.02 * rng.normal(size=(20, D)))
    pool[300] = pool[5]  # exact duplicates in different shards: ties broken by position
    bench = _unit(pool[rng.choice(360, 24, replace=False)] + 0.05 * rng.normal(size=(24, D)))
    bench[0] = pool[5]
    data = {"pool": pool, "ref": _unit(centers[rng.integers(0, 12, 60)] + 0.3 * rng.normal(size=(60, D))),
            "near": bench, "far": _unit(rng.normal(size=(10, D)))}
    ws = Workspace(root / "ws")
    ids = {}
    for name, X in data.items():
        _release(root / name, X, name[0])
        register_dataset(ws, name, "laion", root / name)
        ids[name] = import_laion_embeddings(ws, name, model="synthetic", shard_rows=64 if name == "pool" else 32).id
    return ws, ids


@pytest.fixture(scope="module")
def clustered(synthetic, backend):
    """The pool clustered (k=8) by each backend: ``c-local`` and ``c-ray``."""
    from core.clustering import ClusterConfig, run_clustering

    ws, ids = synthetic
    infos = {}
    for name, runner in (("local", None), ("ray", backend)):
        cfg = ClusterConfig(embedding_set=ids["pool"], k=8, seed=0, n_neighbors=3, clustering_id=f"c-{name}")
        infos[name] = run_clustering(ws, cfg, backend=runner)
    return ws, infos


# -- (a) embedding -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedding_shards_match_local(tmp_path_factory, backend):
    from core.datasets import register_dataset
    from core.embed import EmbedConfig, embed_dataset, iter_embedding_shards, load_embedding_rows
    from core.workspace import Workspace

    root = tmp_path_factory.mktemp("pics")
    for i in range(200):
        make_image(root / "src" / f"img_{i:03d}.png", i)
        (root / "src" / f"img_{i:03d}.txt").write_text(f"a shape number {i % 9}", encoding="utf-8")
    ws = Workspace(root / "ws")
    register_dataset(ws, "pics", "image_folder", root / "src")
    infos = {}
    for name, runner in (("local", None), ("ray", backend)):
        cfg = EmbedConfig(dataset="pics", model="demo-vit-tiny", modality="both", batch_size=32, num_workers=0,
                          shard_rows=64, set_id=f"pics-{name}")
        infos[name] = embed_dataset(ws, cfg, backend=runner)
    local, ray_ = infos["local"], infos["ray"]
    assert (ray_.n, ray_.dim, ray_.dtype, ray_.n_skipped) == (local.n, local.dim, local.dtype, local.n_skipped) == (
        200, 64, "float16", 0)
    for modality in ("image", "text"):
        assert ray_.stats[modality].n_shards == local.stats[modality].n_shards == 4
        pd_local = load_embedding_rows(ws, local.id, modality)
        assert load_embedding_rows(ws, ray_.id, modality).equals(pd_local)  # same ids, same order
        shards = zip(iter_embedding_shards(ws, local.id, modality), iter_embedding_shards(ws, ray_.id, modality),
                     strict=True)
        for (ids_l, rows_l, X_l), (ids_r, rows_r, X_r) in shards:
            assert list(ids_l) == list(ids_r) and np.array_equal(rows_l, rows_r)
            assert X_r.dtype == X_l.dtype == np.float16
            # torch may use other thread counts in the actors; float16 storage rounds to ~1e-3
            np.testing.assert_allclose(np.asarray(X_r, np.float32), np.asarray(X_l, np.float32), atol=2e-3)
    meta_l, meta_r = (json.loads((ws.dir("embeddings", s) / "meta.json").read_text()) for s in (local.id, ray_.id))
    for key in ("complete", "dataset", "model", "dim", "dtype", "modality", "weights", "device", "precision", "identity"):
        assert meta_r[key] == meta_l[key], key
    for m in ("image", "text"):
        for key in ("n", "n_shards", "skipped", "shards_computed"):
            assert meta_r["modalities"][m][key] == meta_l["modalities"][m][key]
    rows = ws.catalog.query("SELECT id, dataset, model, pretrained, dim, n, dtype, modality FROM embedding_sets "
                            "ORDER BY id")
    assert rows.drop(columns="id").iloc[0].to_dict() == rows.drop(columns="id").iloc[1].to_dict()
    # resumable as locally: a second call finds every shard and recomputes nothing
    again = embed_dataset(ws, EmbedConfig(dataset="pics", model="demo-vit-tiny", modality="both", batch_size=32,
                                          num_workers=0, shard_rows=64, set_id="pics-ray"), backend=backend)
    assert again.n == 200


# -- (b) assignment ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_assignments_identical(clustered):
    from core.clustering import load_assignments, load_centroids

    ws, infos = clustered
    assert infos["ray"].n == infos["local"].n == 360 and infos["ray"].n_skipped == infos["local"].n_skipped
    assert np.array_equal(load_centroids(ws, "c-ray"), load_centroids(ws, "c-local"))
    a_local, a_ray = load_assignments(ws, "c-local"), load_assignments(ws, "c-ray")
    assert a_ray.equals(a_local)
    stats = ws.catalog.query("SELECT * EXCLUDE (clustering_id) FROM clusters WHERE clustering_id = ? ORDER BY cluster",
                             ["c-local"])
    assert ws.catalog.query("SELECT * EXCLUDE (clustering_id) FROM clusters WHERE clustering_id = ? ORDER BY cluster",
                            ["c-ray"]).equals(stats)
    metas = [json.loads((ws.dir("clusters", c) / "meta.json").read_text()) for c in ("c-local", "c-ray")]
    assert metas[0]["n"] == metas[1]["n"] and metas[0]["skipped"] == metas[1]["skipped"]


# -- (c) per-cluster pruning ---------------------------------------------------------------------------
CHAINS = {
    "semdedup": [("semdedup", {"eps": 0.05})],
    "semdedup-groups": [("semdedup", {"eps": 0.05, "mode": "one_per_group", "order": "easy"})],
    "dbp": [("dbp", {"keep_fraction": 0.5})],
    "semdedup-dbp": [("semdedup", {"eps": 0.05}), ("dbp", {"keep_fraction": 0.6})],
    "dbp-semdedup": [("dbp", {"keep_fraction": 0.7}), ("semdedup", {"eps": 0.1, "order": "random"})],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAINS))
def test_manifests_identical(clustered, backend, name):
    from core.prune.manifest import PruneConfig, load_manifest, run_pruning

    ws, _ = clustered
    infos = {}
    for label, runner in (("local", None), ("ray", backend)):
        cfg = PruneConfig(clustering_id="c-local", chain=CHAINS[name], seed=3, pruning_id=f"{name}-{label}")
        infos[label] = run_pruning(ws, cfg, backend=runner)
    local, ray_ = infos["local"], infos["ray"]
    assert (ray_.n_in, ray_.n_kept) == (local.n_in, local.n_kept)
    assert 0 < local.n_kept < local.n_in
    m_local, m_ray = load_manifest(ws, f"{name}-local"), load_manifest(ws, f"{name}-ray")
    assert m_ray.equals(m_local)  # kept/removed ids, step, reason, detail, score, ref_id
    if name.startswith("semdedup"):
        assert m_local["reason"].astype(str).str.startswith("semdedup").any()  # the planted duplicates
    assert ray_.meta["removed_by_reason"] == local.meta["removed_by_reason"]
    rows = ws.catalog.query("SELECT methods, config_json, n_in, n_kept FROM prunings WHERE id IN (?, ?) ORDER BY id",
                            [f"{name}-local", f"{name}-ray"])
    assert rows.iloc[0].to_dict() == rows.iloc[1].to_dict()


# -- (d) nearest neighbours: train-test similarity ---------------------------------------------------
@pytest.mark.slow
def test_similarity_identical(synthetic, backend):
    from core.similarity_stage import SimilarityConfig, load_similarity, run_similarity

    ws, ids = synthetic
    summaries = {}
    for label, runner in (("local", None), ("ray", backend)):
        cfg = SimilarityConfig(pool_set=ids["pool"], reference_set=ids["ref"], benchmark_sets=(ids["near"], ids["far"]),
                               analysis_id=f"s-{label}")
        summaries[label] = run_similarity(ws, cfg, backend=runner)
    assert summaries["local"]["n_prune"].iloc[0] > 0
    for bench in ("near", "far"):
        t_local, t_ray = (load_similarity(ws, f"s-{x}", bench, "test") for x in ("local", "ray"))
        for col in ("id", "ref_id", "nn_pool_id", "n_closer"):
            assert t_ray[col].tolist() == t_local[col].tolist(), col
        for col in ("s_ref", "nn_pool_sim"):
            np.testing.assert_allclose(t_ray[col], t_local[col], atol=1e-6, rtol=0)
        p_local, p_ray = (load_similarity(ws, f"s-{x}", bench, "pool") for x in ("local", "ray"))
        for col in ("id", "nearest_test_id", "closer"):
            assert p_ray[col].tolist() == p_local[col].tolist(), col
        np.testing.assert_allclose(p_ray["max_sim"], p_local["max_sim"], atol=1e-6, rtol=0)
    assert t_local.shape[0] == 10
    near = load_similarity(ws, "s-ray", "near", "test")
    assert near.loc[0, "nn_pool_id"] == "p0005"  # the exact copy at positions 5 and 300: the lower wins
    metrics = ws.catalog.query("SELECT run_id, dataset, metric, value FROM metrics WHERE run_id IN ('s-local', 's-ray') "
                               "ORDER BY dataset, metric, run_id")
    assert np.allclose(metrics["value"].to_numpy()[0::2], metrics["value"].to_numpy()[1::2], atol=1e-6)


@pytest.mark.slow
def test_worker_errors_arrive_as_themselves(synthetic, backend):
    from core.distributed import assign_set

    ws, ids = synthetic
    with pytest.raises(DataError) as err:
        assign_set(backend, ws, ids["pool"], None, np.ones((3, 5), np.float32))
    assert type(err.value) is DataError and err.value.one_line() == f"embeddings have {D} columns, expected 5"


# -- without Ray, and the CLI flags ------------------------------------------------------------------
def test_missing_ray_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayUnavailable) as err:
        import_ray()
    assert err.value.one_line() == ("the ray backend needs Ray (with Ray Data), which is not installed "
                                    "(hint: install the dist extra: pip install 'prunescope[dist]')")
    with pytest.raises(RayUnavailable), session(RayBackend(address="local")):
        pass
    with pytest.raises(RayUnavailable):
        make_backend("ray", "local")
    assert make_backend("local") is None  # the local backend never imports Ray


@pytest.mark.slow
def test_cli_without_ray_prints_one_line(tmp_path):
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "no_ray"), PRUNESCOPE_WORKSPACE=str(tmp_path / "ws"),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "core.cli", "cluster", "some-set", "--backend", "ray"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == ("error: the ray backend needs Ray (with Ray Data), which is not installed "
                        "(hint: install the dist extra: pip install 'prunescope[dist]')")


def test_backend_flags_are_checked():
    with pytest.raises(ConfigError, match="backend must be one of local, ray"):
        make_backend("dask")
    with pytest.raises(ConfigError, match="--address only applies with --backend ray"):
        make_backend("local", "auto")
    with pytest.raises(ConfigError, match="--num-gpus only applies"):
        make_backend("local", num_gpus=1.0)
    with pytest.raises(ConfigError, match="Ray address"):
        RayBackend(address="not an address")
    for ok in ("auto", "local", "10.0.0.5:6379", "ray://head:10001"):
        assert RayBackend(address=ok).address == ok


def test_ray_is_imported_only_inside_core_distributed_functions():
    import ast

    for path in sorted((REPO / "core").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                assert path == REPO / "core" / "distributed.py", f"{path} imports ray"
                assert id(node) not in top_level, f"core/distributed.py imports ray at module level (line {node.lineno})"
    code = ("import sys, core.distributed, core.cli, core.embed, core.clustering, core.prune.manifest, "
            "core.similarity_stage; print('ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
