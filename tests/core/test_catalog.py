import subprocess
import sys
import textwrap
import time

import duckdb
import pytest

from core.errors import CatalogError, CatalogLocked, SchemaTooNew
from core.store import SCHEMA_VERSION, Catalog
from core.store.catalog import load_migrations

PUBLIC_TABLES = {
    "datasets": ["name", "kind", "role", "uri", "n_samples", "n_skipped", "created_at"],
    "embedding_sets": ["id", "dataset", "model", "pretrained", "dim", "n", "dtype", "path", "created_at"],
    "clusterings": ["id", "embedding_set", "k", "seed", "path", "created_at"],
    "clusters": ["clustering_id", "cluster", "size", "d_intra", "d_inter", "complexity", "label"],
    "prunings": ["id", "methods", "config_json", "n_in", "n_kept", "manifest_path", "created_at"],
    "runs": ["id", "kind", "status", "config_json", "seed", "git_rev", "version", "started_at", "ended_at", "run_dir"],
    "metrics": ["run_id", "model", "dataset", "corruption", "severity", "adaptation", "metric", "value"],
    "reference_results": ["source", "model", "dataset", "corruption", "severity", "adaptation", "metric", "value"],
}


def test_migrations_are_numbered_without_gaps():
    migs = load_migrations()
    assert [m.version for m in migs] == list(range(1, len(migs) + 1))
    assert len(migs) == SCHEMA_VERSION


def test_migrate_creates_public_tables_and_is_idempotent(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    assert cat.version() == 0
    assert cat.migrate() == SCHEMA_VERSION
    assert cat.migrate() == SCHEMA_VERSION
    rows = cat.query("SELECT count(*) AS n FROM schema_version")
    assert rows["n"][0] == SCHEMA_VERSION
    for table, cols in PUBLIC_TABLES.items():
        have = cat.query(f"SELECT * FROM {table} LIMIT 0").columns.tolist()
        assert have[: len(cols)] == cols or set(cols) <= set(have), table


def test_schema_too_new_is_refused_and_untouched(tmp_path):
    path = tmp_path / "c.duckdb"
    cat = Catalog(path)
    cat.migrate()
    cat.execute("INSERT INTO schema_version VALUES (?, 'future', now())", [SCHEMA_VERSION + 1])
    with pytest.raises(SchemaTooNew, match="newer than this prunescope"):
        cat.migrate()
    with pytest.raises(SchemaTooNew):
        cat.check_version()
    assert cat.version() == SCHEMA_VERSION + 1


def test_failed_transaction_rolls_back(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.migrate()
    with pytest.raises(duckdb.Error), cat.connect() as con:
        con.execute("INSERT INTO metrics (run_id, metric, value) VALUES ('r', 'acc', 1.0)")
        con.execute("INSERT INTO no_such_table VALUES (1)")
    assert cat.query("SELECT count(*) AS n FROM metrics")["n"][0] == 0


def test_insert_with_replace(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.migrate()
    row = {"source": "s", "model": "m", "dataset": "d", "corruption": None, "severity": 0,
           "adaptation": "none", "metric": "acc", "value": 1.0}
    cat.insert("reference_results", [row])
    cat.insert("reference_results", [row | {"value": 2.0}], replace_where="source = ?", replace_params=["s"])
    assert cat.query("SELECT value FROM reference_results")["value"].tolist() == [2.0]
    with pytest.raises(ValueError):
        cat.insert("metrics; DROP TABLE runs", [row])


def test_read_only_connect_without_catalog_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="no catalog"):
        Catalog(tmp_path / "missing.duckdb").query("SELECT 1")


def _hold_lock(path, seconds):
    code = textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(path)!r})
        print("locked", flush=True)
        time.sleep({seconds})
        con.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_retried_until_released(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb", lock_timeout=30)
    cat.migrate()
    proc = _hold_lock(cat.path, 1.5)
    try:
        df = cat.query("SELECT count(*) AS n FROM datasets")  # waits for the other process
        assert df["n"][0] == 0
        assert proc.poll() is not None  # only succeeded after the holder let go
    finally:
        proc.wait()


def test_lock_held_too_long_raises_catalog_locked(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb", lock_timeout=0.3)
    cat.migrate()
    proc = _hold_lock(cat.path, 3)
    try:
        t0 = time.monotonic()
        with pytest.raises(CatalogLocked, match="stayed locked"):
            cat.query("SELECT 1")
        assert time.monotonic() - t0 < 2.5
    finally:
        proc.wait()


@pytest.mark.parametrize("n", [3, 500])  # executemany below the bulk threshold, one Arrow scan above it
def test_insert_keeps_nulls_and_values_on_both_paths(tmp_path, n):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.migrate()
    rows = [{"clustering_id": "c", "cluster": i, "size": i * 2, "d_intra": None if i % 2 else i / 10,
             "d_inter": 0.5, "complexity": 0.25, "label": None if i % 3 else f"l{i}"} for i in range(n)]
    assert cat.insert("clusters", rows) == n
    df = cat.query("SELECT * FROM clusters ORDER BY cluster")
    assert df["size"].tolist() == [i * 2 for i in range(n)]
    assert df["d_intra"].isna().tolist() == [bool(i % 2) for i in range(n)]
    assert df["label"].isna().tolist() == [bool(i % 3) for i in range(n)]
    assert df["vocab_label"].isna().all()


def test_bulk_insert_falls_back_when_a_column_mixes_types(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    cat.migrate()
    rows = [{"clustering_id": "c", "cluster": i, "size": 1, "label": "x" if i % 2 else 7} for i in range(300)]
    assert cat.insert("clusters", rows) == 300
    assert set(cat.query("SELECT label FROM clusters")["label"]) == {"x", "7"}
