import json

import pytest

from core.reference import load_reference_results, read_table, reference_results
from core.runs import recorded_run
from core.workspace import Workspace


def test_reference_results_load_idempotently(tmp_path):
    ws = Workspace(tmp_path / "ws")
    n = load_reference_results(ws)
    assert n == len(reference_results()) > 30
    load_reference_results(ws)
    df = ws.catalog.query("SELECT * FROM reference_results")
    assert len(df) == n
    clean = df[(df.source == "rusak2020") & (df.model == "ResNet-50 vanilla") & (df.metric == "mCE")]
    assert clean["value"].tolist() == [76.7] and clean["corruption"].isna().all()


def test_rounded_resnet50_ces_average_to_published_value():
    # ALGORITHMS.md: the rounded per-corruption CEs average 76.9 (the unrounded ones give 76.7).
    df = reference_results()
    ce = df[(df.source == "hendrycks2019") & (df.metric == "CE")]
    assert len(ce) == 15
    assert round(ce["value"].mean(), 1) == 76.9


def test_alexnet_table_in_canonical_order():
    df = read_table("alexnet_imagenet_c_errors.csv")
    assert df["corruption"].tolist()[:3] == ["gaussian_noise", "shot_noise", "impulse_noise"]
    assert len(df) == 15 and df["mean_error"].between(0.5, 1).all()


def test_recorded_run_success_and_failure(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with recorded_run(ws, "demo", {"size": "tiny"}, seed=3) as run:
        params = json.loads((run.dir / "params.json").read_text())
        assert params["config"] == {"size": "tiny"} and params["seed"] == 3
        status = ws.catalog.query("SELECT status FROM runs WHERE id = ?", [run.id])["status"][0]
        assert status == "running"
    with pytest.raises(ZeroDivisionError), recorded_run(ws, "demo", {}) as failed:
        raise ZeroDivisionError("division by zero")
    df = ws.catalog.query("SELECT id, status, message, ended_at FROM runs ORDER BY started_at")
    by_id = df.set_index("id")
    assert by_id.loc[run.id, "status"] == "done"
    assert by_id.loc[failed.id, "status"] == "failed"
    assert "ZeroDivisionError" in by_id.loc[failed.id, "message"]
    assert df["ended_at"].notna().all()


def test_progress_writer_and_torn_line(tmp_path):
    from core.runs import ProgressWriter, read_progress

    pw = ProgressWriter(tmp_path / "run")
    pw.write(step=1, loss=2.0)
    pw.write(step=2, loss=1.5)
    with open(pw.path, "a") as f:
        f.write('{"step": 3, "lo')  # a writer killed mid-line
    recs = read_progress(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2] and all("t" in r for r in recs)
    assert read_progress(tmp_path / "nothing") == []
