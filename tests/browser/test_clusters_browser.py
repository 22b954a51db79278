"""The Clusters page in a real Chromium: the concept map renders, and clicking a cluster opens its gallery."""

from __future__ import annotations

import time

import pytest
from test_overview_browser import THUMBS_LOADED, save_shot

pytestmark = pytest.mark.browser

MAP = "div.js-plotly-plot"
POINTS = ".scatterlayer .trace:first-of-type .point"


def map_points(page):
    """The concept map's markers (the page's first figure, its first trace)."""
    return page.locator(MAP).first.locator(POINTS)


def subheaders(page) -> list[str]:
    return page.locator('[data-testid="stHeadingWithActionElements"] h3').all_inner_texts()


def test_map_click_opens_the_cluster_and_its_gallery(browser, clusters_server, clustered_workspace, tmp_path):
    from core.clustering import load_assignments

    members = load_assignments(clustered_workspace, "web3").groupby("cluster")["id"].apply(set).to_dict()
    page = browser.new_page(viewport={"width": 1400, "height": 2600})
    try:
        page.goto(clusters_server + "/clusters", wait_until="domcontentloaded")
        page.wait_for_selector(POINTS, timeout=60_000)
        page.wait_for_function(THUMBS_LOADED, arg=1, timeout=60_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert map_points(page).count() == 3  # one marker per cluster
        first = next(h for h in subheaders(page) if h.startswith("Cluster "))
        current = int(first.split()[1])

        # the concept map's first figure: its first trace carries the cluster of each marker
        clusters = page.evaluate("() => document.querySelector('div.js-plotly-plot').data[0].customdata")
        target = next(i for i, c in enumerate(clusters) if c != current)
        box = map_points(page).nth(target).bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        want = f"Cluster {clusters[target]}"
        page.wait_for_function("h => [...document.querySelectorAll('h3')].some(e => e.innerText.startsWith(h))",
                               arg=want, timeout=30_000)
        page.wait_for_function(THUMBS_LOADED, arg=1, timeout=30_000)
        time.sleep(1.0)
        save_shot(page, tmp_path, "clusters.png")

        assert want in subheaders(page) and first not in subheaders(page)
        shown = " ".join(page.locator('[data-testid="stText"]').all_inner_texts())
        n_images = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stImageContainer"] img')]
                                    .filter(i => i.naturalWidth > 0).length""")
        # both ends of the gallery show the selected cluster's members (the active tab renders its images)
        assert n_images >= min(len(members[clusters[target]]), 6)
        assert "1 - cos = " in shown
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        page.close()
