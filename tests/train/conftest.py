"""A small captioned image-folder dataset for the training tests (32 images, built in about a second)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw

N_IMAGES = 32
NO_CAPTION = {7, 15, 23, 31}      # no .txt sidecar: skipped as missing_caption
BLANK_CAPTION = {30}              # a whitespace-only caption: skipped too
CORRUPTED_LATER = "img_005.png"   # readable at registration, broken before training: skipped when read
SHAPES = ("circle", "rectangle", "triangle")


def make_image(path: Path, i: int, size: int = 72) -> None:
    """A deterministic picture: a coloured shape (circle, rectangle, triangle by i % 3) on a tinted ground."""
    hue = (37 * i) % 200
    img = Image.new("RGB", (size, size), (200, 200 - hue // 2, 150 + hue // 4))
    draw = ImageDraw.Draw(img)
    m, fg = 10 + i % 12, (hue, 255 - hue, (90 * i) % 256)
    if i % 3 == 0:
        draw.ellipse([m, m, size - m, size - m], fill=fg)
    elif i % 3 == 1:
        draw.rectangle([m, m, size - m, size - m], fill=fg)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@dataclass(frozen=True)
class CaptionedWorkspace:
    ws: object
    dataset: str
    manifest: Path
    kept_ids: frozenset[str]


def build_captioned_workspace(root: Path) -> CaptionedWorkspace:
    from core.datasets import register_dataset
    from core.workspace import Workspace

    src = root / "src"
    for i in range(N_IMAGES):
        make_image(src / f"img_{i:03d}.png", i)
        if i in BLANK_CAPTION:
            (src / f"img_{i:03d}.txt").write_text("   \n", encoding="utf-8")
        elif i not in NO_CAPTION:
            (src / f"img_{i:03d}.txt").write_text(f"a {SHAPES[i % 3]} number {i}", encoding="utf-8")
    ws = Workspace(root / "ws")
    register_dataset(ws, "captioned", "image_folder", src)
    (src / CORRUPTED_LATER).write_bytes(b"\x89PNG\r\n\x1a\n but the rest is gone")
    # A manifest in the pruning layout: kept rows and removed rows with a reason.
    ids = [f"img_{i:03d}.png" for i in range(N_IMAGES)]
    removed = set(ids[:4])
    manifest = ws.dir("manifests", "keep-most.parquet")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "reason": ["semdedup" if i in removed else None for i in ids]}).to_parquet(manifest)
    return CaptionedWorkspace(ws, "captioned", manifest, frozenset(set(ids) - removed))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> CaptionedWorkspace:
    """One captioned workspace per test module; tests add runs to it but never change the dataset."""
    return build_captioned_workspace(tmp_path_factory.mktemp("captioned"))
