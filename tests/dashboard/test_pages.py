"""AppTest smoke tests of the dashboard: every registered page, the Overview's content, empty states."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.app_pages import PAGES

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def run_app(workspace: Path, monkeypatch: pytest.MonkeyPatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(workspace))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    return at


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


@pytest.mark.parametrize("spec", PAGES, ids=[p.url_path for p in PAGES])
def test_every_page_runs_without_exception(spec, small_workspace, monkeypatch):
    at = run_app(small_workspace.root, monkeypatch, spec.path)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_page_files_exist_and_one_is_default():
    assert sum(p.default for p in PAGES) == 1
    for spec in PAGES:
        assert (APP.parent / spec.path).is_file(), spec.path


def test_overview_shows_metrics_datasets_and_runs(small_workspace, monkeypatch):
    at = run_app(small_workspace.root, monkeypatch)
    assert not at.exception
    assert {m.label: m.value for m in at.metric} == {"Datasets": "3", "Samples": "23", "Skipped": "1", "Runs": "1"}
    table = at.dataframe[0].value
    assert table["name"].tolist() == ["web_pool", "val_bench", "ref_clean"]  # pools first
    assert table.set_index("name")["n_samples"].to_dict() == {"web_pool": 10, "val_bench": 9, "ref_clean": 4}
    assert table.set_index("name")["n_skipped"].to_dict() == {"web_pool": 1, "val_bench": 0, "ref_clean": 0}
    assert len(at.get("plotly_chart")) == 2
    issues = at.dataframe[1].value
    assert issues["reason"].tolist() in (["corrupt_image"], ["truncated_image"], ["unsupported_image"])
    assert "embed-web_pool-0001" in at.dataframe[2].value["id"].tolist()
    assert [c.value for c in at.code] == [str(small_workspace.root)]
    from core.store.catalog import SCHEMA_VERSION

    assert f"Catalog schema v{SCHEMA_VERSION}" in [c.value for c in at.caption]


def test_overview_thumbnails_show_captions_as_plain_text(small_workspace, hostile_captions, monkeypatch):
    at = run_app(small_workspace.root, monkeypatch)
    shown = texts(at)
    for caption in hostile_captions:
        assert caption in shown
    assert "a red ball on grass" in shown
    markdown = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "evil" not in markdown and "alert(1)" not in markdown


def test_selecting_a_labelled_dataset_shows_class_names(small_workspace, monkeypatch):
    at = run_app(small_workspace.root, monkeypatch)
    at.selectbox(key="overview_dataset").set_value("val_bench").run()
    assert not at.exception
    shown = texts(at)
    assert {"class: cat", "class: dog", "class: truck"} <= set(shown)
    assert shown.count("(no caption)") == 9
    assert [s.value for s in at.success]  # nothing skipped in val_bench


def test_image_gone_since_registration_shows_a_placeholder(build_workspace, tmp_path, monkeypatch):
    ws = build_workspace(tmp_path, with_run=False)
    shutil.rmtree(tmp_path / "src" / "ref_clean" / "dog")
    at = run_app(ws.root, monkeypatch)
    at.selectbox(key="overview_dataset").set_value("ref_clean").run()
    assert not at.exception
    assert texts(at).count("unreadable: missing file") == 2
    assert "class: cat" in texts(at)


def test_workspace_without_catalog_says_how_to_build_it(tmp_path, monkeypatch):
    at = run_app(tmp_path / "nothing-here", monkeypatch)
    assert not at.exception
    assert not at.error
    message = " ".join(i.value for i in at.info)
    assert "make run" in message and "prunescope demo" in message
    assert not (tmp_path / "nothing-here").exists()  # the dashboard never creates a workspace


def test_empty_workspace_shows_empty_states(tmp_path, monkeypatch):
    from core.workspace import Workspace

    Workspace(tmp_path / "ws")  # catalog, no datasets, no runs
    at = run_app(tmp_path / "ws", monkeypatch)
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Datasets"] == "0"
    infos = " ".join(i.value for i in at.info)
    assert "No datasets registered yet" in infos and "No runs yet" in infos


def test_schema_too_new_shows_one_line_error(tmp_path, monkeypatch):
    from core.store.catalog import utcnow
    from core.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.catalog.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [999, "999_future.sql", utcnow()])
    at = run_app(ws.root, monkeypatch)
    assert not at.exception
    assert len(at.error) == 1
    assert "schema version 999" in at.error[0].value and "upgrade prunescope" in at.error[0].value
    assert not at.metric  # the page did not run


def test_overview_models_section_shows_zeroshot_accuracy(build_workspace, tmp_path, monkeypatch):
    ws = build_workspace(tmp_path / "ws")
    rows = [{"run_id": "r1", "model": "demo-clip", "dataset": "val_bench", "corruption": None, "severity": 0,
             "adaptation": "none", "metric": m, "value": v} for m, v in (("zeroshot_top1", 0.62), ("zeroshot_top5", 0.97))]
    ws.catalog.insert("metrics", rows)
    at = run_app(ws.root, monkeypatch)
    assert not at.exception
    assert "Models" in [h.value for h in at.subheader]
    models = next(df.value for df in at.dataframe if "zeroshot_top1" in df.value.columns)
    row = models.set_index("dataset").loc["val_bench"]
    assert row["model"] == "demo-clip" and row["zeroshot_top1"] == 0.62 and row["chance"] == 1 / 3
    assert len(at.get("plotly_chart")) == 3
