"""Load time of a dashboard page in headless Chromium, on any workspace (e.g. the 1M-row synthetic one).

Starts ``streamlit run dashboard/app.py`` on the workspace, opens the page in Debian's Chromium and
times, per load: until the first chart is drawn, and until the script has finished (no "running"
status widget, the last expected element present). Loads: ``cold`` (fresh server: catalog reads,
parquet scans, index load), then ``warm`` reloads of the same page (Streamlit's caches filled).
Before that it precomputes what the page reads from disk caches (for the Clusters page: the UMAP
map of the centroids and of the largest cluster's members) and reports those times too.

    python benchmarks/synthetic.py /tmp/ws1m --n 1000000 --dim 512 --concepts 1000
    python benchmarks/cluster.py --workspace /tmp/ws1m      # registers clustering(s)
    python benchmarks/page_load.py /tmp/ws1m --page clusters [--clustering ID] [--warm 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Finished = no element of the script-running status, and at least one chart on the page.
DONE_JS = """() => !document.querySelector('[data-testid="stStatusWidget"]')
    && document.querySelectorAll('div.js-plotly-plot').length > 0
    && !document.querySelector('[data-testid="stSpinner"]')"""


def precompute(workspace: Path, clustering: str | None) -> tuple[str, list[tuple[str, float, str]]]:
    """Make the Clusters page's disk caches (centroid map, largest cluster's member map); timed rows."""
    from core.clustering import list_clusterings
    from core.project import compute_maps
    from core.workspace import Workspace

    ws = Workspace(workspace, create=False)
    cid = clustering or str(list_clusterings(ws)["id"].iloc[0])
    sizes = ws.catalog.query("SELECT cluster, size FROM clusters WHERE clustering_id = ? ORDER BY size DESC", [cid])
    largest = int(sizes["cluster"].iloc[0])
    rows = []
    t = time.perf_counter()
    counts = compute_maps(ws, cid, clusters=[])
    rows.append(("centroid map (UMAP)", time.perf_counter() - t, f"k={len(sizes)}, {counts}"))
    t = time.perf_counter()
    counts = compute_maps(ws, cid, clusters=[largest])
    rows.append(("largest cluster's member map", time.perf_counter() - t,
                 f"cluster {largest}, {int(sizes['size'].iloc[0]):,} members, {counts}"))
    return cid, rows


def serve(workspace: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PRUNESCOPE_WORKSPACE=str(workspace))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless",
                             "true", "--server.address", "127.0.0.1", "--server.port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(base + "/_stcore/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("streamlit did not become healthy")


def load(page: object, url: str, timeout_s: float) -> tuple[float, float]:
    """(seconds to the first chart, seconds to the finished page) for one navigation."""
    t0 = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded")  # type: ignore[attr-defined]
    page.wait_for_selector("div.js-plotly-plot", timeout=timeout_s * 1000)  # type: ignore[attr-defined]
    first = time.perf_counter() - t0
    page.wait_for_function(DONE_JS, timeout=timeout_s * 1000, polling=50)  # type: ignore[attr-defined]
    done = time.perf_counter() - t0
    errors = page.locator('[data-testid="stException"]').count()  # type: ignore[attr-defined]
    if errors:
        raise SystemExit(f"the page raised {errors} exception(s)")
    return first, done


def slider_round_trips(page: Any, n: int, timeout_s: float, index: int) -> list[tuple[str, float, str]]:
    """Move the page's ``index``-th slider one step at a time (on the Pruning page: 0 = SemDeDup's eps,
    1 = DBP's keep_fraction); each row is the time from the key press to the re-planned page (the
    "Kept" metric changed and the script finished). Pick a slider whose step changes what is kept."""
    slider = page.get_by_role("slider").nth(index)
    rows = []
    for i in range(n):
        before = page.locator('[data-testid="stMetricValue"]').nth(1).inner_text()
        key = "ArrowLeft" if i % 2 else "ArrowRight"
        slider.focus()
        t0 = time.perf_counter()
        page.keyboard.press(key)
        page.wait_for_function(
            """b => { const m = document.querySelectorAll('[data-testid="stMetricValue"]');
                      return m.length > 1 && m[1].innerText !== b; }""",
            arg=before, timeout=timeout_s * 1000, polling="raf")
        shown = time.perf_counter() - t0
        page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                               timeout=timeout_s * 1000, polling="raf")
        done = time.perf_counter() - t0
        after = page.locator('[data-testid="stMetricValue"]').nth(1).inner_text()
        replan = page.locator('[data-testid="stMetricValue"]').nth(3).inner_text()
        rows.append((f"slider round trip {i + 1} ({key}): new numbers shown", shown,
                     f"kept {before} -> {after}; server re-plan {replan}"))
        rows.append((f"slider round trip {i + 1} ({key}): page finished", done, ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--page", default="clusters")
    ap.add_argument("--clustering", default=None)
    ap.add_argument("--warm", type=int, default=3, help="warm reloads after the cold one")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--shot", type=Path, default=None, help="save a full-page screenshot here")
    ap.add_argument("--round-trips", type=int, default=0, help="slider moves to time after the loads")
    ap.add_argument("--slider", type=int, default=1, help="which slider to move (0-based, page order)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    rows: list[tuple[str, float, str]] = []
    if args.page == "clusters":
        _cid, rows = precompute(args.workspace, args.clustering)
    proc, base = serve(args.workspace)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 2600})
            url = f"{base}/{args.page}"
            for i in range(1 + args.warm):
                first, done = load(page, url, args.timeout)
                label = "cold load" if i == 0 else f"warm load {i}"
                rows.append((f"{label}: first chart", first, ""))
                rows.append((f"{label}: page finished", done, ""))
            if args.round_trips:
                rows += slider_round_trips(page, args.round_trips, 120.0, args.slider)
            if args.shot:
                page.screenshot(path=str(args.shot), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"\n{args.page} page on {args.workspace} ({os.cpu_count()} cores)\n")
    print("| step | seconds | detail |\n|---|---:|---|")
    for name, secs, detail in rows:
        print(f"| {name} | {secs:.2f} | {detail} |")


if __name__ == "__main__":
    main()
