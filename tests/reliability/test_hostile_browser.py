"""Hostile user text on every dashboard page, in a real Chromium: captions, class names, file names, cluster
labels, model labels, dataset names, run messages and job log lines that are ``<script>``, ``<img onerror>``,
``<svg onload>``, Markdown links and styling, and 4000-character strings (see :mod:`tests.reliability.hostile`).

One ``streamlit run`` server on the hostile workspace; every page of :data:`dashboard.app_pages.PAGES` is
loaded, driven to where hostile text shows (cluster picker, map colours, gallery tabs, job log, grids, the
detection section, chart hover boxes and legends), and after each step no dialog fired, no frame has ``window.__pwned``, no frame holds an
injected element (``img[src=x]``, ``on*`` handlers, ``javascript:`` or evil.example links, a payload's
bold/italic/heading/colour marker isolated in its own element), the payload text is on screen literally, and
neither the page nor the server log shows an exception. The AppTest check is ``test_hostile_dashboard.py``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dashboard.app_pages import PAGES
from tests.browser.conftest import serve
from tests.reliability.hostile import CLASS_NAMES, EVAL_RUN, FLAG, LONG, PAYLOADS, hostile_workspace_once

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Why the page is not settled yet ('' when it is): no heading, a script run, stale elements, an element
#: still a loading placeholder (its frontend code not loaded yet), an undrawn chart or an image still loading (hidden ones, e.g. in an inactive tab, do not count).
BUSY = """() => {
    const main = document.querySelector('[data-testid="stMain"]');
    if (!main || !main.querySelector('h1')) return 'no heading';
    const status = document.querySelector('[data-testid="stStatusWidget"]');
    if (status && (status.innerText.includes('Running')
                   || status.querySelector('[data-testid="stStatusWidgetRunningIcon"]'))) return 'running';
    if (document.querySelector('[data-stale="true"]')) return 'stale';
    const shown = e => e.offsetParent !== null;
    if ([...document.querySelectorAll('[data-testid="stSkeleton"]')].some(shown)) return 'skeleton';
    if ([...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
            .some(c => shown(c) && !c.querySelector('.main-svg'))) return 'chart';
    if ([...document.querySelectorAll('[data-testid="stImageContainer"] img')]
            .some(i => shown(i) && !(i.complete && i.naturalWidth > 0))) return 'image';
    return '';
}"""
#: Text a payload's Markdown/HTML would put alone in an element of its own (<b>md-bold</b>, a link's text,
#: Plotly's bold tspan); rendered as plain text it is always part of a longer string.
ISOLATED = ("md-bold", "md-it", "md-red", "md-head", "md-math", "cls-bold", "cls-red", "svgbold", "click me",
            "evil link", "evil anchor", "cls link")
#: Everything a payload could inject into one frame: snippets of the offending elements.
INJECTED = """isolated => {
    const snip = e => e.outerHTML.slice(0, 200);
    const found = [...document.querySelectorAll(
        'img[src="x"], [onerror], [onload], a[href^="javascript:" i], [*|href^="javascript:" i], '
        + '[*|href*="evil.example" i], iframe[srcdoc]')].map(snip);
    for (const e of document.body.querySelectorAll('*')) {
        if (isolated.includes((e.textContent || '').trim().toLowerCase())) found.push(snip(e));
    }
    for (const e of document.querySelectorAll('b, strong, em, i, h1, h2, h3, h4, h5, h6, .katex, svg a')) {
        if (/svgbold|md-|cls-/.test(e.textContent)) found.push(snip(e));
    }
    for (const s of document.scripts) if (s.textContent.includes('__pwned')) found.push(snip(s));
    return found;
}"""
#: All the text on screen: the page's rendered text and the charts' SVG text (tick labels, legends, hover).
SHOWN = """within => within
    ? [...document.querySelectorAll(within)].map(e => e.textContent).join('\\n')
    : document.body.innerText + '\\n' + [...document.querySelectorAll('svg text')].map(t => t.textContent).join('\\n')"""
MAIN_HEADING = '[data-testid="stMain"] h1'
SETTLE_TIMEOUT_S = 60
QUIET_S = 0.5


@dataclass(frozen=True)
class Step:
    """One thing done on a page, then checked: ``act`` (None: just load) and the literal texts that must be
    on screen afterwards (proof that the hostile text was rendered, not dropped)."""

    what: str
    act: Callable[[object], None] | None = None
    shows: tuple[str, ...] = ()
    within: str | None = None  # a CSS selector: look for ``shows`` only in its elements' text (e.g. a hover box)


# -- waiting --------------------------------------------------------------------------------------------
class Wire:
    """Counts the websocket frames between the page and the server (an idle Streamlit page exchanges none)."""

    def __init__(self, page) -> None:
        self.sent = self.received = 0
        page.on("websocket", self._watch)

    def _watch(self, ws) -> None:
        ws.on("framesent", lambda _: setattr(self, "sent", self.sent + 1))
        ws.on("framereceived", lambda _: setattr(self, "received", self.received + 1))


def settle(page, wire: Wire, *, rerun_since: int | None = None) -> None:
    """Wait until the page is idle (see :data:`BUSY`) and nothing came from the server for :data:`QUIET_S`.
    With ``rerun_since`` (the received count before a widget change), first wait for the server's first
    answer, so that the quiet moment before a slow rerun starts is not taken for its end."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while rerun_since is not None and wire.received == rerun_since:
        assert time.monotonic() < deadline, f"no rerun within {SETTLE_TIMEOUT_S} s"
        page.wait_for_timeout(50)  # (a Playwright wait: events, and so the frame counts, are handled in it)
    quiet_since, seen = None, wire.received
    while True:
        busy = page.evaluate(BUSY) or ("receiving" if wire.received != seen else "")
        seen, now = wire.received, time.monotonic()
        quiet_since = None if busy else (quiet_since or now)
        if quiet_since is not None and now - quiet_since >= QUIET_S:
            return
        assert now < deadline, f"page not settled after {SETTLE_TIMEOUT_S} s: {busy}"
        page.wait_for_timeout(100)


def pick(page, label: str, option: str | re.Pattern[str]) -> None:
    """Choose ``option`` (its text, or a pattern of it) in the select box labelled ``label``."""
    page.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option).first.click()


def click_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    page.wait_for_selector(f'[role="tab"][aria-selected="true"]:has-text("{name}")', timeout=10_000)


def click_radio(page, name: str) -> None:
    page.get_by_role("radio", name=name, exact=True).check(force=True)


def hover_first(page, chart: str, mark: str) -> None:
    """Hover the first ``mark`` of the Plotly figure ``chart`` (a selector) and wait for its hover box."""
    target = page.locator(chart).locator(mark).first
    target.scroll_into_view_if_needed()
    box = target.bounding_box()
    assert box is not None, f"no {mark} in {chart}"
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.locator(chart).locator(".hoverlayer .hovertext").first.wait_for(timeout=10_000)


def chart(key: str) -> str:
    """The selector of the Plotly figure a page drew with ``st.plotly_chart(..., key=key)``."""
    return f".st-key-{key} div.js-plotly-plot"


# -- per-page scenarios ----------------------------------------------------------------------------------
MODEL_IMG = PAYLOADS[1]  # a model label (zero-shot, corruption and detection rows)
HOVER, BAR = ".hoverlayer", ".barlayer .point path"
ZEROSHOT_CHART = 'div.js-plotly-plot:has-text("Zero-shot top-1 by benchmark")'  # (drawn without a key)
SCENARIOS: dict[str, tuple[Step, ...]] = {
    "overview": (
        Step("load: thumbnails with hostile class names and captions",
             shows=(*PAYLOADS, f"class: {CLASS_NAMES[0]}", f"class: {CLASS_NAMES[1]}", "LLLLLLLL…")),
        Step("hover a zero-shot bar (model label in the hover box)",
             lambda p: hover_first(p, ZEROSHOT_CHART, BAR), shows=(MODEL_IMG,), within=HOVER),
    ),
    "clusters": (
        Step("load: the largest cluster, its gallery", shows=(f"best-matching names: {PAYLOADS[4]}", "class: ")),
        Step("hover a concept-map marker (cluster labels in the hover box)",
             lambda p: hover_first(p, chart("clusters_map"), ".scatterlayer .point"),
             shows=(f"names: {PAYLOADS[4]}",), within=HOVER),
        Step("pick the cluster labelled <img onerror>", lambda p: pick(p, "Cluster", re.compile(r"^1: ")),
             shows=(f"caption terms: {PAYLOADS[1]}", f"best-matching names: {PAYLOADS[4]}")),
        Step("colour the map by ground truth (class names in the legend)",
             lambda p: click_radio(p, "ground-truth concept"), shows=(CLASS_NAMES[2][:40],),
             within=chart("clusters_map") + " .legend"),
        Step("open the atypical gallery tab", lambda p: click_tab(p, "Most atypical (farthest)"),
             shows=("class: ",)),
    ),
    "pruning": (
        Step("load: the cluster gallery", shows=("class: ",)),
        Step("pick the cluster labelled [evil link]", lambda p: pick(p, "Cluster", re.compile(r"^2: "))),
        Step("open its kept tab", lambda p: click_tab(p, "Kept"), shows=("class: ", "1 - cos = ")),
    ),
    "similarity": (
        Step("load: test samples beside hostile pool neighbours",
             shows=(f"class: {CLASS_NAMES[0]}", PAYLOADS[3], PAYLOADS[2])),
        Step("reorder the gallery", lambda p: pick(p, "Order", "pool neighbour least similar first"),
             shows=(f"class: {CLASS_NAMES[0]}", PAYLOADS[3])),
    ),
    "runs": (
        Step("load: the failed job, its message",
             shows=(PAYLOADS[0] + " " + PAYLOADS[3],)),
        Step("open the failed job's log", lambda p: click_tab(p, "Log"), shows=(*PAYLOADS, LONG[-60:])),
        Step("open its parameters", lambda p: click_tab(p, "Parameters"), shows=('"embedding_set"',)),
    ),
    "robustness": (
        Step("load: headline and gain charts, one grid", shows=("<script>window.__pwned",)),
        Step("pick another grid with a hostile model and adaptation",
             lambda p: pick(p, "Run · model · adaptation", re.compile(r"xss-script.*md-bold")),
             shows=(f"{PAYLOADS[0]} · {PAYLOADS[6]} · {EVAL_RUN}",)),
        Step("switch to the severity-5 protocol", lambda p: click_radio(p, "severity 5 only (TTA benchmarks)"),
             shows=("<script>window.__pwned",)),
        Step("hover a headline bar", lambda p: hover_first(p, chart("robustness_headline_chart"), BAR),
             shows=("window.__pwned",), within=HOVER),
        Step("detection section: AP per corruption, hostile model labels in the legend",
             shows=("AP per corruption", PAYLOADS[0][:40]), within=chart("robustness_det_chart")),
        Step("hover a detection bar", lambda p: hover_first(p, chart("robustness_det_chart"), BAR),
             shows=(MODEL_IMG,), within=chart("robustness_det_chart") + " " + HOVER),
    ),
}


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The dashboard on the hostile workspace: (base URL, server log). No file watcher: another checkout's
    edits must not put a 'source changed' prompt on the page."""
    ws = hostile_workspace_once(tmp_path_factory)
    log_dir = tmp_path_factory.mktemp("hostile_server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMLIT_SERVER_FILE_WATCHER_TYPE", "none")
        with serve(ws.root, log_dir) as base:
            yield base, log_dir / "streamlit.log"


@pytest.fixture(scope="module")
def hostile_context(browser) -> Iterator[object]:
    """One browser context on the session's Chromium (tests/conftest.py) for the module."""
    context = browser.new_context(viewport={"width": 1400, "height": 2200})
    yield context
    context.close()


# -- checks ---------------------------------------------------------------------------------------------
def assert_inert(page, dialogs: list[str], log: Path, step: str) -> None:
    assert dialogs == [], f"{step}: a script ran and opened a dialog: {dialogs}"
    for frame in page.frames:
        assert frame.evaluate(f"() => typeof window.{FLAG}") == "undefined", f"{step}: {FLAG} set in {frame.url}"
        injected = frame.evaluate(INJECTED, list(ISOLATED))
        assert injected == [], f"{step}: injected into {frame.url}: {injected}"
    assert page.locator('[data-testid="stException"]').count() == 0, f"{step}: the page shows an exception"
    assert "Traceback" not in log.read_text(errors="replace"), f"{step}: server log:\n{log.read_text()[-3000:]}"


def assert_shown(page, texts: tuple[str, ...], within: str | None, step: str) -> None:
    shown = page.evaluate(SHOWN, within)
    missing = [t[:80] for t in texts if t not in shown]
    assert not missing, f"{step}: not on screen as text: {missing}"


def save_shot(page, name: str) -> None:
    folder = os.environ.get("PRUNESCOPE_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"hostile_{name}.png"), full_page=True)


# -- the test -------------------------------------------------------------------------------------------
def test_every_page_has_a_scenario():
    assert {p.url_path for p in PAGES} <= set(SCENARIOS), "add the new page's steps to SCENARIOS"


@pytest.mark.parametrize("spec", PAGES, ids=[p.url_path for p in PAGES])
def test_page_renders_hostile_text_inert(spec, hostile_server, hostile_context):
    base, log = hostile_server
    page = hostile_context.new_page()
    wire = Wire(page)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(base + "/" + ("" if spec.default else spec.url_path), wait_until="domcontentloaded")
        page.wait_for_selector(MAIN_HEADING, timeout=SETTLE_TIMEOUT_S * 1000)
        settle(page, wire)
        heading = page.locator(MAIN_HEADING).first.inner_text()
        assert spec.title.lower() in heading.lower(), f"{spec.url_path}: heading {heading!r}"
        for step in SCENARIOS.get(spec.url_path, (Step("load"),)):
            if step.act is not None:
                sent, received = wire.sent, wire.received
                step.act(page)
                settle(page, wire, rerun_since=received if wire.sent > sent else None)
            assert_inert(page, dialogs, log, f"{spec.url_path}: {step.what}")
            assert_shown(page, step.shows, step.within, f"{spec.url_path}: {step.what}")
        save_shot(page, spec.url_path)
    finally:
        page.close()
