"""A workspace whose every user-controlled string is an attack on the dashboard (shared by the AppTest and
the real-browser reliability tests).

Each payload, if the dashboard ever rendered it as HTML or Markdown, would set ``window.__pwned``, call
``alert``, inject an ``<img>``/``<svg>``/``<a>`` or style text; rendered as plain text it is inert.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

#: The flag a payload sets when its script runs.
FLAG = "__pwned"
#: Every payload; each carries a marker that never appears in the dashboard's own text.
PAYLOADS = (
    "<script>window.__pwned=1;alert('xss-script')</script>",
    "<img src=x onerror=\"window.__pwned=1;alert('xss-img')\">",
    "[click me](javascript:window.__pwned=1)",
    "[evil link](http://evil.example/md)",
    "<a href=\"http://evil.example/a\">evil anchor</a>",
    "<svg onload=\"window.__pwned=1\"><b>svgbold</b></svg>",
    "**md-bold** _md-it_ :red[md-red] :material/warning: $md-math$ # md-head",
)
#: A long string (with a payload at its end, past any truncation).
LONG = "L" * 4000 + " <img src=x onerror=window.__pwned=1>"
#: Class folder names: no ``/`` is possible in a file name, so these are the slash-free payloads.
CLASS_NAMES = (
    "<img src=x onerror=window.__pwned=1>",
    "[cls link](javascript:window.__pwned=1)",
    "**cls-bold** :red[cls-red] " + "C" * 150,
)
#: Substrings that identify hostile text wherever it ends up (and never occur in the dashboard's own text).
MARKERS = ("__pwned", "evil.example", "onerror", "onload", "md-bold", "md-red", "cls-bold", "cls link", "LLLLLLLL")

POOL = "hostile_pool"
CLUSTERING = "hostile3"
PRUNING = "hostile.prune"
EVAL_RUN = "eval-hostile-0001"
DET_RUN = "det-hostile-0001"


def build_hostile_workspace(root: Path):
    """The workspace under ``root/ws`` (returns the Workspace): a labelled pool whose class names, file names
    and captions are payloads (plus a corrupt image with a hostile name), embedded by a random demo CLIP,
    clustered (k=3, hostile cluster labels, maps cached), a saved manifest, a similarity analysis, zero-shot,
    corruption and detection metrics under hostile model labels, runs with hostile messages and a failed job
    whose message and log lines are payloads."""
    from core.embed import EmbedConfig, embed_dataset
    from core.similarity_stage import SimilarityConfig, run_similarity
    from core.workspace import Workspace
    from tests.conftest import cluster_with_maps, make_image

    src = root / "src"
    captions = [*PAYLOADS, LONG]
    for i in range(12):
        cls = CLASS_NAMES[i % len(CLASS_NAMES)]
        name = f"{i:02d} <img src=x onerror=window.__pwned=1> [f](javascript:x).png"
        make_image(src / "pool" / cls / name, i)
        (src / "pool" / cls / name).with_suffix(".txt").write_text(captions[i % len(captions)], encoding="utf-8")
    (src / "pool" / CLASS_NAMES[0] / "zz <svg onload=window.__pwned=1>.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    for c in ("cat", "dog"):
        for j in range(2):
            make_image(src / "ref" / c / f"{c}{j}.png", 40 + j)
            make_image(src / "bench" / c / f"{c}{j}.png", 50 + j)

    from core.datasets import register_dataset

    ws = Workspace(root / "ws")
    register_dataset(ws, POOL, "image_folder", src / "pool", role="pool")
    register_dataset(ws, "hostile_ref", "image_folder", src / "ref", role="reference")
    register_dataset(ws, "hostile_bench", "image_folder", src / "bench", role="benchmark")
    sets = {name: embed_dataset(ws, EmbedConfig(dataset=name, model="demo-vit-tiny", modality=modality,
                                                num_workers=0)).id
            for name, modality in ((POOL, "both"), ("hostile_ref", "image"), ("hostile_bench", "image"))}
    cluster_with_maps(ws, sets[POOL], 3, CLUSTERING)
    labels = [PAYLOADS[0], PAYLOADS[1], PAYLOADS[3]]
    for cluster, label in enumerate(labels):
        ws.catalog.execute("UPDATE clusters SET label = ?, vocab_label = ? WHERE clustering_id = ? AND cluster = ?",
                           [label, PAYLOADS[4], CLUSTERING, cluster])
    from core.prune.manifest import PruneConfig, run_pruning

    run_pruning(ws, PruneConfig(clustering_id=CLUSTERING, chain=[("random", {"keep_fraction": 0.5})],
                                pruning_id=PRUNING))
    run_similarity(ws, SimilarityConfig(pool_set=sets[POOL], reference_set=sets["hostile_ref"],
                                        benchmark_sets=(sets["hostile_bench"],), analysis_id="hostile.sim"))
    _hostile_metrics(ws)
    _hostile_runs(ws, sets[POOL])
    return ws


def _hostile_metrics(ws) -> None:
    """Zero-shot, corruption-grid and detection metrics whose model labels are payloads."""
    from core.corrupt import SEVERITIES, TEST_CORRUPTIONS

    start = datetime(2025, 1, 1, 12, 0)
    ws.catalog.insert("runs", [
        {"id": EVAL_RUN, "kind": "eval-corruptions", "status": "done", "config_json": "{}", "seed": 0,
         "started_at": start, "ended_at": start, "run_dir": f"runs/{EVAL_RUN}", "message": PAYLOADS[2]},
        {"id": DET_RUN, "kind": "eval-detection", "status": "done", "config_json": json.dumps({"metric": "ap"}),
         "seed": 0, "started_at": start, "ended_at": start, "run_dir": f"runs/{DET_RUN}", "message": PAYLOADS[5]},
    ])
    rows = []
    for m, model in enumerate(PAYLOADS[:3]):
        rows.append({"run_id": "zs-hostile", "model": model, "dataset": "hostile_bench", "corruption": None,
                     "severity": 0, "adaptation": "none", "metric": "zeroshot_top1", "value": 0.3 + 0.1 * m})
        for adaptation in ("none", PAYLOADS[6]):
            rows += [{"run_id": EVAL_RUN, "model": model, "dataset": "hostile_bench", "corruption": c, "severity": s,
                      "adaptation": adaptation, "metric": "error", "value": 30.0 + s + m}
                     for c in TEST_CORRUPTIONS for s in SEVERITIES]
            rows.append({"run_id": EVAL_RUN, "model": model, "dataset": "hostile_bench", "corruption": PAYLOADS[3],
                         "severity": 1, "adaptation": adaptation, "metric": "error", "value": 50.0})
        rows += [{"run_id": DET_RUN, "model": model, "dataset": PAYLOADS[4], "corruption": c, "severity": s,
                  "adaptation": "none", "metric": "AP", "value": 20.0 - s}
                 for c in (None, *TEST_CORRUPTIONS[:2]) for s in ((0,) if c is None else (1, 2))]
    ws.catalog.insert("metrics", rows)


def _hostile_runs(ws, pool_set: str) -> None:
    """A run with a hostile message and a failed cluster job whose message and log lines are payloads."""
    from core import jobs

    now = datetime(2025, 1, 2, 9, 0)
    ws.catalog.insert("runs", [{"id": "embed-hostile-0001", "kind": "embed", "status": "done", "config_json": "{}",
                                "seed": 0, "started_at": now, "ended_at": now + timedelta(seconds=5),
                                "run_dir": "runs/embed-hostile-0001", "message": PAYLOADS[1] + " " + LONG}])
    run_id = jobs.submit(ws, "cluster", {"embedding_set": pool_set, "k": 2, "n_neighbors": 2})
    ws.catalog.execute("UPDATE runs SET status = 'failed', message = ?, ended_at = ? WHERE id = ?",
                       [PAYLOADS[0] + " " + PAYLOADS[3], now, run_id])
    (ws.dir("runs", run_id) / jobs.LOG_FILE).write_text("\n".join([*PAYLOADS, LONG]) + "\n", encoding="utf-8")


_BUILT: dict[str, object] = {}


def hostile_workspace_once(tmp_path_factory):
    """:func:`build_hostile_workspace`, built once per test session (the AppTest and browser modules share it;
    tests must not modify it)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = build_hostile_workspace(tmp_path_factory.mktemp("hostile"))
    return _BUILT[key]
