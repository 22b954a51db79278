"""The Overview page in a real Chromium: charts drawn, thumbnails loaded, hostile captions inert."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

BAR_TRACE = "div.js-plotly-plot .barlayer .trace"
THUMBS_LOADED = """n => {
    const imgs = [...document.querySelectorAll('[data-testid="stImageContainer"] img')];
    return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


def save_shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("PRUNESCOPE_SHOTS"):
        folder = Path(os.environ["PRUNESCOPE_SHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def test_overview_in_chromium(browser, streamlit_server, hostile_captions, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(streamlit_server, wait_until="domcontentloaded")
        page.wait_for_selector(BAR_TRACE, timeout=60_000)
        page.wait_for_function(THUMBS_LOADED, arg=10, timeout=60_000)
        time.sleep(0.5)  # let any late script (there must be none) fire a dialog
        save_shot(page, tmp_path, "overview.png")

        assert page.locator('[data-testid="stException"]').count() == 0
        metrics = page.locator('[data-testid="stMetricValue"]').all_inner_texts()
        assert metrics == ["3", "23", "1", "1"]
        text = page.evaluate("() => document.body.innerText")
        for name in ("web_pool", "val_bench", "ref_clean"):
            assert name in text
        assert page.locator(BAR_TRACE).count() >= 4  # pool, benchmark, reference, skipped (+ reasons)

        n_thumbs = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stImageContainer"] img')]
                                    .filter(i => i.naturalWidth > 0).length""")
        assert n_thumbs == 10  # every readable sample of web_pool

        shown = page.locator('[data-testid="stText"]').all_inner_texts()
        for caption in hostile_captions:
            assert caption in shown, f"caption {caption!r} not shown as text"
        assert page.evaluate("() => [...document.scripts].some(s => s.textContent.includes('alert(1)'))") is False
        assert page.locator('img[src="x"]').count() == 0
        assert page.locator('a[href*="evil"]').count() == 0
        assert dialogs == []
    finally:
        page.close()
