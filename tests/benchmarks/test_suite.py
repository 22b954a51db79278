"""The benchmark suite's runner: one row per goal, failures kept to their row, the CSV (not a timing test)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

import pytest

from core.workspace import Workspace
from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"


@pytest.fixture(scope="module")
def suite():
    """benchmarks/suite.py as a module."""
    return load_script(SCRIPT, "bench_suite")


@pytest.fixture(scope="module")
def tiny(suite):
    """Sizes at which every goal runs in a second or two."""
    return suite.Sizes(
        embed_n=8, embed_batch=4, embed_image_px=48, embed_workers=0, cluster_n=2_000, cluster_dim=32,
        cluster_concepts=10, cluster_k=8, cluster_fit_sample=1_000, cluster_niter=3, cluster_sklearn=False,
        prune_n=2_000, prune_dim=32, prune_clusters=10, prune_groups=2, big_cluster=500, dbp_goal_clusters=200,
        dbp_qp_clusters=50, dbp_rows=2_000, sim_n=2_000, sim_dim=32, sim_shard=500, sim_queries=10,
        sim_benchmarks=2, sim_reference=200, robust_n=4, robust_px=32, repeats=1)


def _run(run_id: str, start: dt.datetime, seconds: float, config: dict, message: str = "") -> dict:
    return {"id": run_id, "kind": "demo", "status": "done", "config_json": json.dumps(config), "git_rev": "abc",
            "started_at": start, "ended_at": start + dt.timedelta(seconds=seconds), "message": message}


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory):
    """A workspace whose runs table holds a full tiny demo build (100 s) and a later resumed one (5 s)."""
    ws = Workspace(tmp_path_factory.mktemp("demo") / "ws")
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    t1 = t0 + dt.timedelta(hours=1)
    ws.catalog.insert("runs", [
        _run("demo-full", t0, 100.0, {"size": "tiny", "seed": 0, "jobs": True}),
        _run("stage-a", t0 + dt.timedelta(seconds=1), 50.0, {"stage": "train_clip", "size": "tiny"}, "trained"),
        _run("demo-resumed", t1, 5.0, {"size": "tiny", "seed": 0, "jobs": True}),
        _run("stage-b", t1 + dt.timedelta(seconds=1), 1.0, {"stage": "train_clip", "size": "tiny"},
             "demo CLIP already trained (run x)"),
    ])
    return ws.root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == SUITE_COLUMNS
        return list(reader)


SUITE_COLUMNS = ("date", "git_rev", "machine", "mode", "goal_id", "goal", "ours", "baseline", "ratio", "met",
                 "status", "detail", "seconds")


def test_csv_columns_are_the_documented_ones(suite):
    assert suite.CSV_COLUMNS == SUITE_COLUMNS


@pytest.mark.slow
def test_every_goal_gets_a_row_with_a_finite_positive_ratio(suite, tiny, demo_ws, tmp_path):
    rows = suite.run_suite(sizes=tiny, workdir=tmp_path / "work", demo_workspace=demo_ws)
    assert [r.goal_id for r in rows] == list(suite.GOALS)
    by_id = {r.goal_id: r for r in rows}
    assert by_id["slider"].status == "skipped" and "page_load.py" in by_id["slider"].detail
    failed = {r.goal_id: r.detail for r in rows if r.status == "failed"}
    assert not failed
    for r in rows:
        if r.status == "ok":
            assert math.isfinite(r.ratio) and r.ratio > 0, (r.goal_id, r.ratio)
            assert r.ours and r.baseline and r.met in (True, False, None)
    assert by_id["corrupted_eval"].met is None  # the project states no goal for it

    machine = suite.machine_info()
    path = tmp_path / "suite.csv"
    suite.append_csv(rows, path, machine, "tiny")
    written = _read_csv(path)
    assert [w["goal_id"] for w in written] == list(suite.GOALS)
    assert all(w["git_rev"] == machine["git_rev"] and w["mode"] == "tiny" for w in written)
    assert all(math.isfinite(float(w["ratio"])) for w in written if w["status"] == "ok")
    markdown = suite.markdown_table(rows)
    assert all(f"| {g} |" in markdown for g in suite.GOALS)


def test_a_failing_goal_is_reported_in_its_row_and_the_others_still_run(suite, tiny, demo_ws, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the baseline\nexploded")

    monkeypatch.setitem(suite.GOALS, "dbp_replan", suite.Goal("dbp_replan", "re-plan <= 5 ms", broken))
    rows = suite.run_suite(["dbp_replan", "demo_build", "slider"], sizes=tiny, workdir=tmp_path,
                           demo_workspace=demo_ws)
    by_id = {r.goal_id: r for r in rows}
    assert by_id["dbp_replan"].status == "failed"
    assert by_id["dbp_replan"].detail == "RuntimeError: the baseline exploded"  # one line
    assert math.isnan(by_id["dbp_replan"].ratio)
    assert by_id["demo_build"].status == "ok"
    assert by_id["slider"].status == "skipped"
    assert "| dbp_replan |" in suite.markdown_table(rows) and "failed" in suite.text_table(rows)


def test_dbp_goal_at_tiny_size(suite, tiny, tmp_path):
    (row,) = suite.run_suite(["dbp_replan"], sizes=tiny, workdir=tmp_path)
    assert row.status == "ok", row.detail
    assert math.isfinite(row.ratio) and row.ratio > 0 and row.met in (True, False)


def test_demo_build_time_is_the_last_full_build(suite, demo_ws):
    run = suite.last_demo_build(demo_ws)
    assert run["id"] == "demo-full" and run["full"] and run["size"] == "tiny"
    assert run["seconds"] == pytest.approx(100.0)  # read back from the fake runs table, not timed here
    row = suite.run_goal(suite.GOALS["demo_build"], suite.Context(suite.QUICK, Path("."), demo_ws))
    assert row.status == "ok" and row.ratio == pytest.approx(100.0 / 120.0) and row.met is True


def test_demo_build_is_skipped_without_a_workspace(suite, tmp_path):
    row = suite.run_goal(suite.GOALS["demo_build"], suite.Context(suite.QUICK, tmp_path))
    assert row.status == "skipped" and "--demo-workspace" in row.detail
    row = suite.run_goal(suite.GOALS["demo_build"], suite.Context(suite.QUICK, tmp_path, tmp_path / "nowhere"))
    assert row.status == "skipped" and "not a workspace" in row.detail


def test_csv_is_appended_with_a_header_once(suite, tmp_path):
    rows = [suite.Row("embed", "g", "1 img/s", "2 img/s", 0.5, False, "ok", "d", 1.0),
            suite.Row("slider", "g", status="skipped", detail="why")]
    machine = {"cpu": "cpu", "cores": "2", "ram_gib": "8", "torch": "t", "faiss": "f", "gpu": "none", "git_rev": "r"}
    path = tmp_path / "results" / "suite.csv"
    suite.append_csv(rows, path, machine, "quick")
    suite.append_csv(rows, path, machine, "quick")
    written = _read_csv(path)
    assert len(written) == 4 and path.read_text().count("goal_id") == 1
    assert written[0]["ratio"] == "0.5" and written[0]["met"] == "false"
    assert written[1]["ratio"] == "" and written[1]["met"] == "" and written[1]["status"] == "skipped"
