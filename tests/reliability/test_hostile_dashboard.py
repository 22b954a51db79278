"""Hostile user text on every dashboard page (AppTest): captions, class names, file names, cluster labels, model
labels, run messages, job messages and log lines that are scripts, ``<img onerror>``, Markdown links,
Streamlit's colour/icon directives and very long strings. Each page must run without an exception, and no
payload may reach an element that interprets Markdown or HTML (Markdown, captions, alerts, titles, labels,
radio options, tabs, metrics); Plotly figures may carry it only escaped. The real-browser check is
``test_hostile_browser.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.app_pages import PAGES
from tests.reliability.hostile import CLASS_NAMES, CLUSTERING, MARKERS, PAYLOADS, hostile_workspace_once

#: Elements that show their values as plain text (Streamlit never interprets Markdown or HTML there).
PLAIN = {"text", "code", "dataframe", "arrow_data_frame", "json", "image", "imgs"}
#: Widgets whose options are plain text (only their label and help are Markdown).
PLAIN_OPTIONS = {"selectbox", "multiselect", "select_slider"}
#: What Plotly's pseudo-HTML would turn into markup if a payload reached a figure unescaped.
RAW_TAGS = ("<script", "<img", "<svg", "<a ", "<a\u00a0")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return hostile_workspace_once(tmp_path_factory)


def elements(node) -> Iterator[object]:
    children = getattr(node, "children", None)
    for child in (children.values() if isinstance(children, dict) else children or []):
        yield child
        yield from elements(child)


def interpreted_text(at: AppTest) -> list[tuple[str, str]]:
    """(element type, text) of every place in the page where Streamlit interprets Markdown/HTML."""
    out = []
    for el in elements(at._tree):
        kind = getattr(el, "type", "")
        proto = getattr(el, "proto", None)
        if proto is None or kind in PLAIN:
            continue
        if kind == "plotly_chart":
            continue  # checked by figure_strings
        if kind in PLAIN_OPTIONS:
            out.append((kind, f"{getattr(proto, 'label', '')} {getattr(proto, 'help', '')}"))
            continue
        out.append((kind, str(proto)))
    return out


def figure_strings(at: AppTest) -> list[str]:
    """Every string inside every Plotly figure's spec."""
    found: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for el in elements(at._tree):
        if getattr(el, "type", "") == "plotly_chart":
            collect(json.loads(el.proto.spec))
    return found


def shown_as_text(at: AppTest) -> str:
    """All the page's plain text: st.text values, dataframe cells, code."""
    parts = [t.value for t in at.text] + [c.value for c in at.code]
    for df in at.dataframe:
        parts.append(df.value.astype(str).to_string())
    return "\n".join(parts)


def assert_inert(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    leaks = [(kind, m, text[:300]) for kind, text in interpreted_text(at) for m in MARKERS if m in text]
    assert not leaks, leaks
    raw = [s[:200] for s in figure_strings(at) if any(tag in s.lower() for tag in RAW_TAGS)]
    assert not raw, raw


def open_hostile(ws, page: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(ws.root))
    at = AppTest.from_file(str(ws_app()), default_timeout=120)
    at.run()
    at.switch_page(page)
    at.run()
    return at


def ws_app():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.mark.parametrize("spec", PAGES, ids=[p.url_path for p in PAGES])
def test_every_page_renders_hostile_text_inert(spec, hostile, monkeypatch):
    at = open_hostile(hostile, spec.path, monkeypatch)
    assert_inert(at)
    assert not at.error, [e.value for e in at.error]


def test_overview_shows_captions_class_and_file_names_literally(hostile, monkeypatch):
    at = open_hostile(hostile, "app_pages/overview.py", monkeypatch)
    text = shown_as_text(at)
    for payload in PAYLOADS:
        assert payload in text, payload
    assert any(f"class: {CLASS_NAMES[0]}" == t.value for t in at.text)
    assert "zz <svg onload=window.__pwned=1>.jpg" in text  # the corrupt file's name in the issues table
    assert any(t.value.endswith("…") and len(t.value) <= 90 for t in at.text)  # the long caption, shortened


def test_clusters_page_every_cluster_and_gallery_tab(hostile, monkeypatch):
    at = open_hostile(hostile, "app_pages/clusters.py", monkeypatch)
    assert at.selectbox(key="clusters_id").value == CLUSTERING
    for cluster in (0, 1, 2):
        at.selectbox(key="clusters_cluster").set_value(cluster).run()
        assert_inert(at)
    options = at.selectbox(key="clusters_cluster").options
    assert any(PAYLOADS[0][:40] in o for o in options)  # labels are offered as plain option text
    from dashboard.app_pages.clusters import COLOR_LABELS

    for color in COLOR_LABELS:
        if color == "truth" and COLOR_LABELS[color] not in at.radio(key="clusters_color").options:
            continue
        at.radio(key="clusters_color").set_value(color).run()
        assert_inert(at)


def test_clusters_text_search_echoes_hostile_query_as_text(hostile, monkeypatch):
    at = open_hostile(hostile, "app_pages/clusters.py", monkeypatch)
    search = next(t for t in at.text_input)
    search.set_value(PAYLOADS[3] + " " + PAYLOADS[1]).run()
    assert_inert(at)


def test_pruning_page_views_and_compare(hostile, monkeypatch):
    at = open_hostile(hostile, "app_pages/pruning.py", monkeypatch)
    assert_inert(at)
    for key in ("pruning_cluster", "pruning_cmp_a"):
        if any(s.key == key for s in at.selectbox):
            for option in at.selectbox(key=key).options[:3]:
                at.selectbox(key=key).set_value(option).run()
                assert_inert(at)


def test_robustness_page_every_grid(hostile, monkeypatch):
    at = open_hostile(hostile, "app_pages/robustness.py", monkeypatch)
    grid = at.selectbox(key="robustness_grid")
    for option in grid.options:
        grid.set_value(option).run()
        assert_inert(at)
    text = shown_as_text(at)
    assert PAYLOADS[0] in text and PAYLOADS[6] in text  # model and adaptation labels, as table cells


def test_runs_page_shows_job_message_and_log_as_text(hostile, monkeypatch):
    from core import jobs

    monkeypatch.setattr(jobs, "schedule", lambda ws, **kw: [])  # nothing may start in a read-only fixture
    at = open_hostile(hostile, "app_pages/runs.py", monkeypatch)
    assert_inert(at)
    text = shown_as_text(at)
    for payload in PAYLOADS:
        assert payload in text, payload
    for tab_key in ("runs_job",):
        assert any(s.key == tab_key for s in at.selectbox)
