"""Image folders: class sub-folders (``root/<class>/<image>``, ImageNet style) or a flat folder.

Labels come from the sub-folder names:
- ``label_from="auto"`` (default): numeric order when every folder name is an integer (ImageNetV2's
  ``0..999``: never sort those as text), else sorted names;
- ``"classes_file"``: a file listing folder names (or wnids) in label order, one per line or a JSON
  list, so that a subset of classes (ImageNet-R, -A) keeps the full label space;
- ``"none"``: no labels.
A caption is read from a ``<image>.txt`` beside the image when present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from core.errors import DataError, MissingFileError
from core.registry import ParamSpec
from core.sources.base import (
    IMAGE_EXTENSIONS,
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    common_params,
    decode_caption,
    open_image_bytes,
)
from core.workspace import safe_join


def read_class_list(path: Path) -> list[str]:
    """Folder names in label order from a .json list (strings or {"folder": ...}) or a text file."""
    if not path.exists():
        raise MissingFileError(f"classes file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(text)
        return [it["folder"] if isinstance(it, dict) else str(it) for it in items]
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def list_images(folder: Path) -> list[Path]:
    """Image files directly below ``folder`` (hidden and temporary files ignored), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


@SOURCES.register(
    "image_folder",
    summary="class sub-folders (root/<class>/<image>) or a flat folder of images",
    params=(
        ParamSpec("label_from", "choice", "auto", "how folder names become labels",
                  choices=("auto", "sorted", "numeric", "classes_file", "none")),
        ParamSpec("classes_file", "path", None, "folder names in label order (label_from=classes_file)"),
        *common_params(),
    ),
)
class ImageFolderSource(Source):
    kind = "image_folder"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self._classes: list[str] | None = None

    def _class_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise MissingFileError(f"image folder {self.root} does not exist or is not a folder")
        return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def _label_map(self, dirs: list[Path]) -> dict[str, int] | None:
        names = [d.name for d in dirs]
        mode = self.options.get("label_from", "auto")
        if mode == "none" or not names:
            return None
        if mode == "classes_file":
            if not self.options.get("classes_file"):
                raise DataError("label_from=classes_file needs the classes_file option")
            order = read_class_list(Path(self.options["classes_file"]))
            return {n: i for i, n in enumerate(order)}
        if mode == "numeric" or (mode == "auto" and all(n.isdigit() for n in names)):
            bad = [n for n in names if not n.isdigit()]
            if bad:
                raise DataError(f"label_from=numeric but folder {bad[0]!r} is not an integer")
            return {n: int(n) for n in names}
        return {n: i for i, n in enumerate(sorted(names))}

    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        dirs = self._class_dirs()
        labels = self._label_map(dirs)
        if labels is not None:
            self._classes = [""] * (max(labels.values()) + 1)
            for name, i in labels.items():
                self._classes[i] = name
        groups = sorted(dirs, key=lambda d: (labels or {}).get(d.name, 0)) if dirs else [self.root]
        for folder in groups:
            label = labels.get(folder.name) if labels is not None and folder != self.root else None
            if labels is not None and folder != self.root and label is None:
                report.skip("bad_label", folder.name)
                continue
            for path in list_images(folder):
                row = self._row(path, label, report, verify)
                if row is not None:
                    yield row

    def _row(self, path: Path, label: int | None, report: IssueReport, verify: bool) -> dict[str, Any] | None:
        rel = path.relative_to(self.root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            report.skip("unreadable_file", f"{rel}: {exc.strerror}")
            return None
        try:
            width, height = open_image_bytes(data, max_pixels=self.options.get("max_pixels", 64_000_000),
                                             min_side=self.options.get("min_side", 1), verify_only=True) \
                if verify else (None, None)
        except SampleError as exc:
            report.skip(exc.reason, rel)
            return None
        caption = None
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            caption = decode_caption(sidecar.read_bytes(), report, rel).strip()
        return {"id": rel, "locator": rel, "caption": caption, "label": label,
                "class_name": path.parent.name if label is not None else None,
                "width": width, "height": height}

    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        path = safe_join(self.root, str(row["locator"]))
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise SampleError("missing_file", str(row["locator"])) from None
        except OSError as exc:
            raise SampleError("unreadable_file", f"{row['locator']}: {os.strerror(exc.errno or 0)}") from None

    def classes(self) -> list[str] | None:
        if self._classes is None:
            labels = self._label_map(self._class_dirs())
            if labels is None:
                return None
            self._classes = [""] * (max(labels.values()) + 1)
            for name, i in labels.items():
                self._classes[i] = name
        return self._classes
