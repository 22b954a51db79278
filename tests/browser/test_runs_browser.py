"""The Runs page in a real Chromium: launch a small cluster job from the form, watch it reach 100%, open its
result on the Clusters page."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serve
from test_overview_browser import save_shot

from tests.jobs.test_jobs import laion_workspace, write_release

pytestmark = pytest.mark.browser

METRIC_VALUES = """() => [...document.querySelectorAll('[data-testid="stMetricValue"]')]
                         .map(e => e.innerText)"""


@pytest.fixture(scope="module")
def runs_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A workspace with a 400-row LAION-style pool and its embedding set, no clustering yet."""
    root = tmp_path_factory.mktemp("runs")
    write_release(root / "laion", n=400, dim=16)
    ws, set_id = laion_workspace(root / "ws", root / "laion")
    return ws.root, set_id


@pytest.fixture(scope="module")
def runs_server(runs_workspace, tmp_path_factory) -> Iterator[str]:
    with serve(runs_workspace[0], tmp_path_factory.mktemp("server")) as base:
        yield base


def metric_values(page) -> list[str]:
    return page.evaluate(METRIC_VALUES)


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function("([l, v]) => [...document.querySelectorAll('input')].some("
                           "i => i.getAttribute('aria-label') === l && i.value === v)",
                           arg=[label, str(value)])
    time.sleep(0.5)  # let the rerun that the change triggers finish


def test_launch_a_cluster_job_watch_it_finish_and_open_its_result(browser, runs_server, runs_workspace,
                                                                   tmp_path):
    _, set_id = runs_workspace
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    try:
        page.goto(runs_server + "/runs", wait_until="domcontentloaded")
        page.get_by_text("No jobs yet").wait_for(timeout=60_000)  # the last element of the first run

        # choose the stage: another one first, then cluster
        page.get_by_role("combobox", name="Stage").click()
        page.get_by_role("option", name="embed", exact=True).click()
        page.get_by_role("combobox", name="dataset (required)").wait_for(timeout=30_000)
        page.get_by_role("combobox", name="Stage").click()
        page.get_by_role("option", name="cluster", exact=True).click()
        chosen = page.get_by_role("combobox", name="embedding_set (required)")
        chosen.wait_for(timeout=30_000)
        assert chosen.input_value() == set_id  # the catalog's embedding sets are offered
        set_number(page, "k", 4)
        set_number(page, "n_neighbors", 2)
        page.get_by_role("button", name="Queue job").click()
        page.get_by_text("Queued cluster job").wait_for(timeout=60_000)
        save_shot(page, tmp_path, "runs_queued.png")

        seen = set()
        deadline = time.monotonic() + 90
        while not {"done", "100%"} <= set(metric_values(page)):  # the page refreshes itself every ~2 s
            assert time.monotonic() < deadline, f"job not done after 90 s; statuses seen: {seen}"
            seen.update(metric_values(page))
            time.sleep(0.25)
        page.get_by_role("link", name="Open the result on the Clusters page").wait_for(timeout=30_000)
        time.sleep(1.0)
        save_shot(page, tmp_path, "runs_done.png")
        text = page.evaluate("() => document.body.innerText")
        assert f"Result: clustering {set_id}.k4.s1234" in text and "400 rows in 4 clusters" in text
        assert page.locator('[data-testid="stException"]').count() == 0

        page.get_by_role("link", name="Open the result on the Clusters page").click()
        page.wait_for_url("**/clusters", timeout=30_000)
        page.get_by_role("heading", name="Clusters").wait_for(timeout=60_000)
        page.locator('[data-testid="stMetricValue"]').first.wait_for(timeout=60_000)
        assert page.get_by_role("combobox", name="Clustering").input_value() == f"{set_id}.k4.s1234"
        time.sleep(1.0)
        save_shot(page, tmp_path, "runs_result_clusters.png")
        assert metric_values(page)[:2] == ["4", "400"]  # clusters, members
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        page.close()
