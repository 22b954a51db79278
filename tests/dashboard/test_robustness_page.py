"""AppTest of the Robustness page: headlines equal core's mCE, the protocol switch, partial grids, two grids
side by side, not-applicable combinations, downloads and the empty state."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.corrupt import ALL_CORRUPTIONS, HOLDOUT_CORRUPTIONS, SEVERITIES, TEST_CORRUPTIONS
from core.evaluate.robustness import mce

PAGE = "app_pages/robustness.py"
DATASET = "demo-c"
MODELS = ("resnet-demo vanilla", "demo-clip zero-shot")
ADAPTATIONS = ("none", "bn", "tent")
#: (run id, model, adaptation) of each complete grid; one run per model.
RUNS = {MODELS[0]: "eval-c-0001", MODELS[1]: "eval-c-0002"}
PARTIAL = ("eval-c-0003", MODELS[0], "rpl")
NOT_APPLICABLE = ("eval-c-0002", MODELS[1], "rpl")
#: Test corruptions the partial grid lacks.
PARTIAL_GAPS = TEST_CORRUPTIONS[:3]


def error_pct(model: str, adaptation: str, corruption: str, severity: int) -> float:
    """A known, distinct error in % per cell: grows with severity, differs by model and method."""
    m, a, c = MODELS.index(model), ("none", "bn", "tent", "rpl").index(adaptation), ALL_CORRUPTIONS.index(corruption)
    return round(30.0 + 8.0 * severity + 0.7 * c + 6.0 * m - 4.5 * a - 0.3 * a * severity, 3)


def grid_rows(run_id: str, model: str, adaptation: str, corruptions: tuple[str, ...]) -> list[dict]:
    rows = [{"run_id": run_id, "model": model, "dataset": DATASET, "corruption": c, "severity": s,
             "adaptation": adaptation, "metric": "error", "value": error_pct(model, adaptation, c, s)}
            for c in corruptions for s in SEVERITIES]
    rows.append({"run_id": run_id, "model": model, "dataset": DATASET, "corruption": None, "severity": 0,
                 "adaptation": adaptation, "metric": "error", "value": 20.0 + MODELS.index(model)})
    return rows


def build_eval_workspace(root: Path, *, partial: bool = True):
    """An empty workspace with two corruption evaluations (two models x none/bn/tent, full 15x5 grids plus
    the 4 hold-out), a partial grid, a not-applicable row, an unrelated zero-shot metric and the published
    numbers."""
    from core.reference import load_reference_results
    from core.workspace import Workspace

    ws = Workspace(root)
    start = datetime(2025, 1, 1, 12, 0)
    run_ids = [*RUNS.values()] + ([PARTIAL[0]] if partial else [])
    ws.catalog.insert("runs", [{"id": r, "kind": "eval-corruptions", "status": "done", "config_json": "{}", "seed": 0,
                                "started_at": start + timedelta(minutes=i), "ended_at": start + timedelta(minutes=i),
                                "run_dir": f"runs/{r}", "message": ""} for i, r in enumerate(run_ids)])
    rows = [r for model, run_id in RUNS.items() for a in ADAPTATIONS
            for r in grid_rows(run_id, model, a, ALL_CORRUPTIONS)]
    if partial:
        kept = tuple(c for c in ALL_CORRUPTIONS if c not in PARTIAL_GAPS)
        rows += grid_rows(*PARTIAL, kept)
    rows.append({"run_id": NOT_APPLICABLE[0], "model": NOT_APPLICABLE[1], "dataset": DATASET, "corruption": None,
                 "severity": 0, "adaptation": NOT_APPLICABLE[2], "metric": "not_applicable", "value": 1.0})
    rows.append({"run_id": "zs-1", "model": MODELS[1], "dataset": DATASET, "corruption": None, "severity": 0,
                 "adaptation": "none", "metric": "zeroshot_top1", "value": 0.5})
    ws.catalog.insert("metrics", rows)
    load_reference_results(ws)
    return ws


def expected_mce(model: str, adaptation: str, corruptions: tuple[str, ...] = ALL_CORRUPTIONS) -> float:
    """mCE by core.evaluate.robustness.mce on the same numbers (as fractions, as it expects)."""
    table = pd.DataFrame([{"corruption": c, "severity": s, "error": error_pct(model, adaptation, c, s) / 100}
                          for c in corruptions for s in SEVERITIES])
    return mce(table)


def expected_sev5(model: str, adaptation: str) -> float:
    return float(np.mean([error_pct(model, adaptation, c, 5) for c in TEST_CORRUPTIONS]))


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("robustness") / "ws"
    build_eval_workspace(root)
    return root


#: A column that tells each of the page's tables apart (AppTest does not expose a dataframe's key).
TABLES = {"headline": "grid", "diff": "B − A", "published": "source", "not_applicable": "run"}


def frame(at: AppTest, table: str) -> pd.DataFrame:
    """The page's ``table`` (see :data:`TABLES`); the not-applicable one is the only one with just 3 columns."""
    column = TABLES[table]
    found = [df.value for df in at.dataframe if column in df.value.columns]
    if table == "not_applicable":
        found = [df for df in found if len(df.columns) == 3]
    assert len(found) == 1, (table, [list(df.value.columns) for df in at.dataframe])
    return found[0]


def headline_of(table: pd.DataFrame, column: str, run_id: str, model: str, adaptation: str) -> float:
    row = table[(table["run"] == run_id) & (table["model"] == model) & (table["adaptation"] == adaptation)]
    assert len(row) == 1, (run_id, model, adaptation)
    return float(row[column].iloc[0])


def test_headlines_equal_core_mce(eval_root, open_page):
    at = open_page(PAGE, eval_root)
    assert not at.error, [e.value for e in at.error]
    table = frame(at, "headline")
    for model, run_id in RUNS.items():
        for adaptation in ADAPTATIONS:
            got = headline_of(table, "mCE (%)", run_id, model, adaptation)
            assert got == pytest.approx(expected_mce(model, adaptation), abs=0.006)
    assert set(table.loc[table["run"] != PARTIAL[0], "grid"]) == {"complete"}
    assert len(at.get("plotly_chart")) >= 6  # headline, gain, heat map, A, B, difference


def test_protocol_switch_shows_the_severity5_mean(eval_root, open_page):
    at = open_page(PAGE, eval_root)
    at.radio(key="robustness_protocol").set_value("sev5").run()
    assert not at.exception and not at.error
    table = frame(at, "headline")
    assert "mCE (%)" not in table.columns
    for model, run_id in RUNS.items():
        for adaptation in ADAPTATIONS:
            got = headline_of(table, "mean error, severity 5 (%)", run_id, model, adaptation)
            assert got == pytest.approx(expected_sev5(model, adaptation), abs=0.006)


def test_partial_grid_is_labelled_partial(eval_root, open_page):
    at = open_page(PAGE, eval_root)
    table = frame(at, "headline")
    row = table[table["run"] == PARTIAL[0]].iloc[0]
    assert "partial" in row["grid"] and "12 of 15" in row["grid"]
    assert all(c in row["missing"] for c in PARTIAL_GAPS)
    rest = [c for c in TEST_CORRUPTIONS if c not in PARTIAL_GAPS]
    table_rest = pd.DataFrame([{"corruption": c, "severity": s, "error": error_pct(MODELS[0], "rpl", c, s) / 100}
                               for c in rest for s in SEVERITIES])
    assert row["mCE (%)"] == pytest.approx(mce(table_rest, allow_partial=True).value, abs=0.006)


def test_side_by_side_difference_is_b_minus_a(eval_root, open_page):
    at = open_page(PAGE, eval_root)
    a = (RUNS[MODELS[0]], MODELS[0], "none")
    b = (RUNS[MODELS[1]], MODELS[1], "tent")
    at.selectbox(key="robustness_cmp_a").set_value(a).run()
    at.selectbox(key="robustness_cmp_b").set_value(b).run()
    assert not at.exception and not at.error
    diff = frame(at, "diff").set_index("corruption")
    assert list(diff.index) == list(ALL_CORRUPTIONS)
    assert diff.loc[list(HOLDOUT_CORRUPTIONS), "hold-out"].all()
    for c in ALL_CORRUPTIONS:
        want = np.mean([error_pct(MODELS[1], "tent", c, s) - error_pct(MODELS[0], "none", c, s) for s in SEVERITIES])
        assert diff.loc[c, "B − A"] == pytest.approx(want, abs=0.006)
    at.radio(key="robustness_protocol").set_value("sev5").run()
    diff = frame(at, "diff").set_index("corruption")
    c = TEST_CORRUPTIONS[4]
    assert diff.loc[c, "B − A"] == pytest.approx(error_pct(MODELS[1], "tent", c, 5) - error_pct(MODELS[0], "none", c, 5),
                                                abs=0.006)


def test_not_applicable_listed_and_downloads_present(eval_root, open_page):
    at = open_page(PAGE, eval_root)
    na = frame(at, "not_applicable")
    assert na.values.tolist() == [list(NOT_APPLICABLE)]
    table = frame(at, "headline")
    assert not ((table["model"] == MODELS[1]) & (table["adaptation"] == "rpl")).any()  # not shown as a zero
    assert len(at.get("download_button")) >= 6  # headline, gain, all runs, grid, difference, published
    published = frame(at, "published")
    assert {"rusak2020", "schneider2020"} <= set(published["source"])


def test_heatmap_metrics_for_the_chosen_grid(eval_root, open_page):
    at = open_page(PAGE, eval_root)
    at.selectbox(key="robustness_grid").set_value((RUNS[MODELS[0]], MODELS[0], "bn")).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Clean error"] == "20.0%"
    assert metrics["Cells evaluated"] == f"{len(ALL_CORRUPTIONS) * 5} of {len(ALL_CORRUPTIONS) * 5}"
    assert metrics["mCE"] == f"{expected_mce(MODELS[0], 'bn'):.1f}"
    assert metrics["Mean error, severity 5"] == f"{expected_sev5(MODELS[0], 'bn'):.1f}"


def test_empty_workspace_says_how_to_evaluate(small_workspace, open_page):
    at = open_page(PAGE, small_workspace.root)
    assert not at.error
    info = " ".join(i.value for i in at.info)
    assert "prunescope eval corruptions DATASET --model CHECKPOINT" in info and "prunescope demo" in info
    published = frame(at, "published")
    assert "mCE" in set(published["metric"])


def test_hostile_model_names_render_as_text(tmp_path, open_page, hostile_captions):
    from core.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.catalog.insert("runs", [{"id": "evil", "kind": "eval-corruptions", "status": "done", "config_json": "{}"}])
    rows = []
    for name in hostile_captions:
        rows += grid_rows("evil", MODELS[0], "none", TEST_CORRUPTIONS)
        for r in rows[-len(TEST_CORRUPTIONS) * 5 - 1:]:
            r["model"] = name
    ws.catalog.insert("metrics", rows)
    at = open_page(PAGE, tmp_path / "ws")
    assert not at.error, [e.value for e in at.error]
    assert set(frame(at, "headline")["model"]) == set(hostile_captions)
    assert not any("<script>" in m.value for m in at.markdown)


def test_switching_dataset_shows_only_its_grids(tmp_path, open_page):
    ws = build_eval_workspace(tmp_path / "ws", partial=False)
    other = [dict(r, dataset="other-c", run_id="eval-c-0009") for r in grid_rows("x", MODELS[1], "bn", TEST_CORRUPTIONS)]
    ws.catalog.insert("runs", [{"id": "eval-c-0009", "kind": "eval-corruptions", "status": "done", "config_json": "{}"}])
    ws.catalog.insert("metrics", other)
    at = open_page(PAGE, tmp_path / "ws")
    at.selectbox(key="robustness_cmp_b").set_value((RUNS[MODELS[1]], MODELS[1], "tent")).run()
    at.selectbox(key="robustness_dataset").set_value("other-c").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = frame(at, "headline")
    assert table[["run", "model", "adaptation"]].values.tolist() == [["eval-c-0009", MODELS[1], "bn"]]
    assert headline_of(table, "mCE (%)", "eval-c-0009", MODELS[1], "bn") == pytest.approx(
        expected_mce(MODELS[1], "bn", TEST_CORRUPTIONS), abs=0.006)
    assert at.selectbox(key="robustness_cmp_b").value == ("eval-c-0009", MODELS[1], "bn")


# -- detection (Michaelis et al. 2019) -------------------------------------------------------------------
DET_DATASET = "shapes-det"
#: (run id, model, full grid?) of each detection evaluation, oldest first.
DET_RUNS = (("det-0001", "frcnn-a", True), ("det-0002", "frcnn-b", False), ("det-0003", "frcnn-a", True))
#: Corruptions of the partial grid.
DET_PARTIAL = TEST_CORRUPTIONS[:4]


def det_ap(run: int, corruption: str | None, severity: int) -> float:
    """A known AP (fraction) per cell: falls with severity, differs per corruption and run."""
    if corruption is None:
        return 0.62 - 0.05 * run
    return round(0.55 - 0.07 * severity - 0.01 * TEST_CORRUPTIONS.index(corruption) - 0.03 * run, 4)


def det_results(run: int, model: str, full: bool) -> pd.DataFrame:
    names = TEST_CORRUPTIONS if full else DET_PARTIAL
    rows = [{"model": model, "corruption": "clean", "severity": 0, "n_images": 40, "ap": det_ap(run, None, 0),
             "ap50": min(1.0, 1.5 * det_ap(run, None, 0)), "ap75": 0.0}]
    rows += [{"model": model, "corruption": c, "severity": s, "n_images": 40, "ap": det_ap(run, c, s),
              "ap50": min(1.0, 1.5 * det_ap(run, c, s)), "ap75": 0.0} for c in names for s in SEVERITIES]
    return pd.DataFrame(rows)


def add_detection_runs(ws) -> None:
    """Detection runs written with the evaluation's own row writer (core.evaluate.detection.metric_rows)."""
    from core.evaluate.detection import RUN_KIND, metric_rows

    start = datetime(2025, 2, 1, 12, 0)
    ws.catalog.insert("runs", [{"id": r, "kind": RUN_KIND, "status": "done", "config_json": '{"metric": "ap"}',
                                "seed": 0, "started_at": start + timedelta(minutes=i), "run_dir": f"runs/{r}"}
                               for i, (r, _, _) in enumerate(DET_RUNS)])
    for i, (run_id, model, full) in enumerate(DET_RUNS):
        ws.catalog.insert("metrics", metric_rows(run_id, DET_DATASET, det_results(i, model, full), "ap"))


@pytest.fixture(scope="module")
def det_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detection") / "ws"
    ws = build_eval_workspace(root, partial=False)
    add_detection_runs(ws)
    return root


def det_table(at: AppTest) -> pd.DataFrame:
    found = [df.value for df in at.dataframe if "mPC (%)" in df.value.columns]
    assert len(found) == 1, [list(df.value.columns) for df in at.dataframe]
    return found[0]


def test_detection_table_equals_core_mpc_rpc_and_marks_published(det_root, open_page):
    from core.evaluate.robustness import mpc, rpc

    at = open_page(PAGE, det_root)
    assert not at.error, [e.value for e in at.error]
    table = det_table(at)
    ours = table[table["origin"] == "this workspace"]
    assert ours["run"].tolist() == ["det-0003", "det-0002", "det-0001"]  # newest first
    for i, (run_id, _model, full) in enumerate(DET_RUNS):
        row = ours[ours["run"] == run_id].iloc[0]
        assert row["P (%)"] == pytest.approx(100 * det_ap(i, None, 0), abs=0.006)
        assert row["metric"] == "AP"
        if full:
            cells = pd.DataFrame([{"corruption": c, "severity": s, "ap": 100 * det_ap(i, c, s)}
                                  for c in TEST_CORRUPTIONS for s in SEVERITIES])
            assert row["mPC (%)"] == pytest.approx(mpc(cells), abs=0.006)
            assert row["rPC (%)"] == pytest.approx(rpc(mpc(cells), 100 * det_ap(i, None, 0)), abs=0.006)
            assert row["corrupted cells"] == 75 and row["note"] == ""
        else:
            assert pd.isna(row["mPC (%)"]) and pd.isna(row["rPC (%)"])
            assert row["corrupted cells"] == 20 and "20 of 75" in row["note"]
    published = table[table["origin"] == "published, michaelis2019"].set_index("dataset")
    assert published.loc["coco", ["P (%)", "mPC (%)", "rPC (%)"]].tolist() == [36.3, 18.2, 50.2]
    assert published.loc["pascal", "metric"] == "AP50" and published.loc["pascal", "mPC (%)"] == 48.6
    # the classification sections are still there
    assert frame(at, "headline") is not None and frame(at, "published") is not None


def test_detection_bars_average_severities_per_corruption(det_root, open_page):
    at = open_page(PAGE, det_root)
    charts = [c for c in at.get("plotly_chart") if "per corruption, mean over severities" in c.proto.spec]
    assert len(charts) == 1
    import json

    fig = json.loads(charts[0].proto.spec)
    names = [t["name"] for t in fig["data"]]
    assert names == ["frcnn-a", "frcnn-b"]  # one bar trace per model: its newest run
    a = fig["data"][0]
    assert a["x"][0] == "clean" and a["x"][1:16] == list(TEST_CORRUPTIONS)
    assert a["y"][0] == pytest.approx(100 * det_ap(2, None, 0))
    c = TEST_CORRUPTIONS[6]
    assert a["y"][7] == pytest.approx(np.mean([100 * det_ap(2, c, s) for s in SEVERITIES]))
    b = fig["data"][1]
    assert b["y"][len(DET_PARTIAL) + 1] is None  # the partial grid has no bar where it has no cell
    at.radio(key="robustness_det_metric").set_value("AP50").run()
    fig = json.loads([c for c in at.get("plotly_chart") if "AP50 per corruption" in c.proto.spec][0].proto.spec)
    assert fig["data"][0]["y"][0] == pytest.approx(100 * min(1.0, 1.5 * det_ap(2, None, 0)))


def test_detection_empty_state_still_shows_published(small_workspace, open_page):
    at = open_page(PAGE, small_workspace.root)
    assert not at.error
    info = " ".join(i.value for i in at.info)
    assert "prunescope eval detection DATA --model" in info
    table = det_table(at)
    assert set(table["origin"]) == {"published, michaelis2019"} and len(table) == 3


def test_detection_hostile_model_names_render_as_text(tmp_path, open_page, hostile_captions):
    from core.evaluate.detection import metric_rows
    from core.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.catalog.insert("runs", [{"id": "evil-det", "kind": "eval-detection", "status": "done", "config_json": "{}"}])
    for name in hostile_captions:
        ws.catalog.insert("metrics", metric_rows("evil-det", "<b>data</b>", det_results(0, name, True), "ap"))
    at = open_page(PAGE, tmp_path / "ws")
    assert not at.error, [e.value for e in at.error]
    ours = det_table(at)
    assert set(ours.loc[ours["origin"] == "this workspace", "model"]) == set(hostile_captions)
    assert not any("<script>" in m.value or "<b>" in m.value for m in at.markdown)
    spec = [c for c in at.get("plotly_chart") if "per corruption" in c.proto.spec][0].proto.spec
    assert "<script>" not in spec and "&lt;script&gt;" in spec


def test_published_detection_joins_clean_and_corrupted_rows():
    from core.reference import reference_results
    from dashboard.robustness_charts import published_detection

    table = published_detection(reference_results()).set_index("dataset")
    assert sorted(table.index) == ["cityscapes", "coco", "pascal"]
    assert table.loc["cityscapes", ["P", "mPC", "rPC"]].tolist() == [36.4, 12.2, 33.4]
    assert table.loc["coco", "primary"] == "AP" and set(table["source"]) == {"michaelis2019"}
    # rPC as published is mPC / P (to the paper's rounding)
    assert (100 * table["mPC"] / table["P"] - table["rPC"]).abs().max() < 0.2


def test_corruption_ap_means_order_and_counts():
    from dashboard.robustness_charts import corruption_ap_means

    rows = pd.DataFrame([
        {"run_id": "r", "model": "m", "corruption": "fog", "severity": 1, "value": 10.0},
        {"run_id": "r", "model": "m", "corruption": "fog", "severity": 3, "value": 20.0},
        {"run_id": "r", "model": "m", "corruption": "speckle_noise", "severity": 2, "value": 5.0},
        {"run_id": "r", "model": "m", "corruption": "gaussian_noise", "severity": 5, "value": 1.0},
        {"run_id": "r", "model": "m", "corruption": None, "severity": 0, "value": 50.0},
    ])
    out = corruption_ap_means(rows)
    assert out["corruption"].tolist() == ["clean", "gaussian_noise", "fog", "speckle_noise"]
    assert out["value"].tolist() == [50.0, 1.0, 15.0, 5.0] and out["severities"].tolist() == [1, 1, 2, 1]
    assert corruption_ap_means(rows.iloc[:0]).empty
