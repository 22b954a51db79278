"""Shared fixtures: small workspaces built from generated images (no demo build, a second or less)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

# Tests never reach a model hub, however pytest is started (the machines have no network to one).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Captions a user's data could carry to attack the dashboard; they must show as literal text.
HOSTILE_CAPTIONS = (
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](http://evil)",
)
PALETTE = [(220, 60, 60), (60, 140, 220), (60, 180, 90), (240, 180, 40), (150, 80, 200), (40, 180, 180)]


def make_image(path: Path, seed: int, size: int = 96) -> None:
    """A small deterministic picture: coloured background with a contrasting shape."""
    bg = PALETTE[seed % len(PALETTE)]
    fg = PALETTE[(seed * 7 + 3) % len(PALETTE)]
    img = Image.new("RGB", (size, size), tuple(int(c * 0.35 + 160) for c in bg))
    draw = ImageDraw.Draw(img)
    m = 12 + (seed * 5) % 20
    if seed % 3 == 0:
        draw.ellipse([m, m, size - m, size - m], fill=fg)
    elif seed % 3 == 1:
        draw.rectangle([m, m + 8, size - m, size - m - 8], fill=fg)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def load_script(path: Path, name: str):
    """A script of benchmarks/ as a module (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def build_small_workspace(root: Path, *, with_run: bool = True):
    """A workspace with three image-folder datasets (returns the Workspace).

    - ``web_pool`` (pool, flat folder, 10 images with .txt captions, three of them hostile, plus one
      corrupt file that registration skips);
    - ``val_bench`` (benchmark, 3 classes x 3 images, no captions);
    - ``ref_clean`` (reference, 2 classes x 2 images).
    """
    from core.datasets import register_dataset
    from core.store.catalog import utcnow
    from core.workspace import Workspace

    src = root / "src"
    pool = src / "web_pool"
    captions = [*HOSTILE_CAPTIONS, "a red ball on grass", "IMG_2041.jpg", "photo of a blue square",
                "cheap watches buy now", "a yellow triangle", "a green circle at dusk", "two shapes, one purple"]
    for i, caption in enumerate(captions):
        make_image(pool / f"img_{i:03d}.png", i)
        (pool / f"img_{i:03d}.txt").write_text(caption, encoding="utf-8")
    (pool / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    for c, cls in enumerate(("cat", "dog", "truck")):
        for j in range(3):
            make_image(src / "val_bench" / cls / f"{cls}_{j}.png", 10 + 3 * c + j)
    for c, cls in enumerate(("cat", "dog")):
        for j in range(2):
            make_image(src / "ref_clean" / cls / f"{cls}_{j}.png", 30 + 2 * c + j)

    ws = Workspace(root / "ws")
    register_dataset(ws, "web_pool", "image_folder", pool, role="pool")
    register_dataset(ws, "val_bench", "image_folder", src / "val_bench", role="benchmark")
    register_dataset(ws, "ref_clean", "image_folder", src / "ref_clean", role="reference")
    if with_run:
        now = utcnow()
        ws.catalog.insert("runs", [{"id": "embed-web_pool-0001", "kind": "embed", "status": "done",
                                    "config_json": "{}", "seed": 0, "started_at": now, "ended_at": now,
                                    "run_dir": "runs/embed-web_pool-0001", "message": "10 samples embedded"}])
    return ws


@pytest.fixture(scope="session")
def build_workspace():
    """The builder itself, for tests that need their own (modifiable) copy: ``build_workspace(tmp_path)``."""
    return build_small_workspace


@pytest.fixture(scope="session")
def hostile_captions() -> tuple[str, ...]:
    return HOSTILE_CAPTIONS


@pytest.fixture(scope="session")
def small_workspace(tmp_path_factory: pytest.TempPathFactory):
    """A read-only shared workspace (see :func:`build_small_workspace`); tests must not modify it."""
    return build_small_workspace(tmp_path_factory.mktemp("small"))


# -- clustered workspaces (Clusters page, browser tests) ------------------------------------------------

def fast_projection(X, **_kwargs):
    """A stand-in for UMAP in page tests (the page reads cached maps; UMAP itself is tested in tests/cluster)."""
    X = np.asarray(X, np.float32)
    if len(X) == 0:
        return np.zeros((0, 2), np.float32)
    centred = X - X.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((len(X), 2), np.float32)
    out[:, : min(2, vt.shape[0])] = centred @ vt[:2].T
    return out


def cluster_with_maps(ws, set_id: str, k: int, clustering_id: str) -> str:
    from core.clustering import ClusterConfig, run_clustering
    from core.project import compute_maps

    run_clustering(ws, ClusterConfig(embedding_set=set_id, k=k, seed=0, n_neighbors=2, clustering_id=clustering_id))
    with mock.patch("core.project.umap_2d", fast_projection):
        compute_maps(ws, clustering_id)
    return clustering_id


@pytest.fixture(scope="session")
def clustered_workspace(tmp_path_factory: pytest.TempPathFactory):
    """The small workspace plus web_pool embedded by a randomly initialised demo CLIP (both towers, so text
    search works), clustered into k=3 with every map cached. Tests must not modify it."""
    from core.embed import EmbedConfig, embed_dataset

    ws = build_small_workspace(tmp_path_factory.mktemp("clustered"))
    info = embed_dataset(ws, EmbedConfig(dataset="web_pool", model="demo-vit-tiny", modality="both", num_workers=0))
    cluster_with_maps(ws, info.id, 3, "web3")
    return ws


URL_CONCEPTS = ("red triangle", "blue star", "green circle")


@pytest.fixture(scope="session")
def url_workspace(tmp_path_factory: pytest.TempPathFactory):
    """A LAION-style release: embeddings + metadata with image URLs only (no pixels), and a ground-truth
    ``concept_name`` column; clustered into k=3 with maps. Its model name is not a real one, so text
    search must fail with a one-line error."""
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings
    from core.workspace import Workspace

    root: Path = tmp_path_factory.mktemp("urlpool")
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(16, 16)))[0][:3]
    X = np.concatenate([centres[c] + 0.1 * rng.normal(size=(20, 16)) for c in range(3)]).astype(np.float16)
    names = [URL_CONCEPTS[i // 20] for i in range(60)]
    urls = [f"https://example.invalid/img/{i}.jpg" for i in range(60)]
    urls[0] = "javascript:alert(1)"
    (root / "laion" / "img_emb").mkdir(parents=True)
    (root / "laion" / "metadata").mkdir(parents=True)
    np.save(root / "laion" / "img_emb" / "img_emb_0.npy", X)
    pq.write_table(pa.table({"key": [f"u{i:03d}" for i in range(60)], "url": urls,
                             "caption": [f"a {n} <b>bold</b> {i}" for i, n in enumerate(names)],
                             "concept_name": names}), root / "laion" / "metadata" / "metadata_0.parquet")
    ws = Workspace(root / "ws")
    register_dataset(ws, "urlpool", "laion", root / "laion")
    info = import_laion_embeddings(ws, "urlpool", model="synthetic")
    cluster_with_maps(ws, info.id, 3, "url3")
    return ws


@pytest.fixture()
def open_page(monkeypatch: pytest.MonkeyPatch):
    """``open_page(page, workspace_root) -> AppTest``: the dashboard switched to ``page`` (a path under
    ``dashboard/``, e.g. ``app_pages/clusters.py``) on that workspace, asserted free of exceptions."""
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"

    def run(page: str, root: Path) -> AppTest:
        monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(root))
        at = AppTest.from_file(str(app), default_timeout=120)
        at.run()
        at.switch_page(page)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


def shown(markdown: str) -> str:
    """The text a Markdown source displays, backslash escapes removed (``keep\\_fraction`` -> ``keep_fraction``):
    the dashboard escapes every punctuation character of messages that quote user text."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)


# -- the browser (session-wide: Playwright's sync API runs one event loop per thread, so every browser test,
# tests/browser and tests/reliability alike, shares this one Chromium) --------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Debian Chromium for every browser test (never a Playwright-downloaded browser)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
