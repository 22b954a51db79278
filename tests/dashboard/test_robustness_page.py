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
