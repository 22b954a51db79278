"""Image folders: class sub-folders (``root/<class>/<image>``, ImageNet style) or a flat folder.

Labels come from the sub-folder names:
- ``label_from="auto"`` (default): numeric order when every folder name is an integer (ImageNetV2's
  ``0..999``: never sort those as text), else sorted names;
- ``"classes_file"``: a file listing folder names (or wnids) in label order, one per line or a JSON
  list, so that a subset of classes (ImageNet-R, -A) keeps the full label space;
- ``"none"``: no labels.
A caption is read from a ``<image>.txt`` beside the image when present.

Index rows: ``id`` = ``locator`` = the image path relative to the root; extras ``class_name``,
``width``, ``height`` (pixels; None without verification).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from core.errors import DataError, MissingFileError
from core.registry import ParamSpec
from core.sources.base import (
    IMAGE_EXTENSIONS,
    SOURCES,
    IssueReport,
    Source,
    common_params,
    decode_caption,
    index_row,
    read_local_file,
)

LABEL_MODES = ("auto", "sorted", "numeric", "classes_file", "none")


def read_class_list(path: Path) -> list[str]:
    """Folder names in label order from a .json list (strings or {"folder": ...}) or a text file."""
    if not path.exists():
        raise MissingFileError(f"classes file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"classes file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(items, list):
            raise DataError(f"classes file {path} must hold a JSON list of folder names")
        return [it["folder"] if isinstance(it, dict) and "folder" in it else str(it) for it in items]
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def list_images(folder: Path) -> list[Path]:
    """Image files directly below ``folder`` (hidden and temporary files ignored), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def list_subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def label_map(names: Iterable[str], mode: str = "auto", classes_file: str | Path | None = None) -> dict[str, int] | None:
    """Folder name -> label index, or None when unlabelled.

    Args:
        names: the class folder names found (any order, repeats allowed).
        mode: one of :data:`LABEL_MODES`; ``auto`` is numeric when every name is an integer.
        classes_file: the label order for ``mode="classes_file"`` (may list more classes than found).
    """
    found = sorted(set(names))
    if mode == "none" or (not found and mode != "classes_file"):
        return None
    if mode == "classes_file":
        if not classes_file:
            raise DataError("label_from=classes_file needs the classes_file option")
        return {n: i for i, n in enumerate(read_class_list(Path(classes_file)))}
    if mode == "numeric" or (mode == "auto" and all(n.isdigit() for n in found)):
        bad = [n for n in found if not n.isdigit()]
        if bad:
            raise DataError(f"label_from=numeric but folder {bad[0]!r} is not an integer")
        return {n: int(n) for n in found}
    return {n: i for i, n in enumerate(found)}


def class_list(labels: Mapping[str, int]) -> list[str]:
    """Class names by label index (gaps, e.g. missing numeric folders, are empty strings)."""
    out = [""] * (max(labels.values()) + 1 if labels else 0)
    for name, i in labels.items():
        if not out[i]:
            out[i] = name
    return out


def resolve_labels(options: Mapping[str, Any], names: Iterable[str]) -> dict[str, int] | None:
    """:func:`label_map` from a source's ``label_from`` / ``classes_file`` options."""
    mode = options.get("label_from") or "auto"
    classes_file = options.get("classes_file")
    if classes_file and mode == "auto":
        mode = "classes_file"  # giving a classes file is enough to use it
    return label_map(names, mode, classes_file)


def label_params() -> tuple[ParamSpec, ...]:
    """The ``label_from`` / ``classes_file`` options shared by folder-tree sources."""
    return (
        ParamSpec("label_from", "choice", "auto", "how folder names become labels", choices=LABEL_MODES),
        ParamSpec("classes_file", "path", None,
                  "folder names (or wnids) in label order, one per line or a JSON list; implies label_from=classes_file"),
    )


def read_sidecar_caption(image: Path, rel: str, report: IssueReport) -> str | None:
    """The caption in ``<image>.txt`` beside an image (non-UTF-8 repaired and counted), else None."""
    sidecar = image.with_suffix(".txt")
    try:
        raw = sidecar.read_bytes()
    except OSError:
        return None
    text = decode_caption(raw, report, rel)
    return text.strip() if text is not None else None


@SOURCES.register(
    "image_folder",
    summary="class sub-folders (root/<class>/<image>) or a flat folder of images",
    params=(*label_params(), *common_params()),
)
class ImageFolderSource(Source):
    kind = "image_folder"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self._classes: list[str] | None = None

    def _class_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise MissingFileError(f"image folder {self.root} does not exist or is not a folder")
        return list_subdirs(self.root)

    def _labels(self, dirs: list[Path]) -> dict[str, int] | None:
        labels = resolve_labels(self.options, [d.name for d in dirs])
        self._classes = class_list(labels) if labels is not None else None
        return labels

    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        dirs = self._class_dirs()
        labels = self._labels(dirs)
        if labels is None:
            # Unlabelled: images at the root and in every sub-folder.
            for folder in [self.root, *dirs]:
                yield from self._scan_folder(folder, None, report, verify)
            return
        for folder in sorted(dirs, key=lambda d: labels.get(d.name, -1)):
            if folder.name not in labels:
                report.skip("bad_label", folder.name)
                continue
            yield from self._scan_folder(folder, labels[folder.name], report, verify)

    def _scan_folder(self, folder: Path, label: int | None, report: IssueReport,
                     verify: bool) -> Iterator[dict[str, Any]]:
        class_name = folder.name if label is not None else None
        for path in list_images(folder):
            rel = path.relative_to(self.root).as_posix()
            probe = self.probe_file(self.root, rel, report, verify=verify)
            if probe is None:
                continue
            caption = read_sidecar_caption(path, rel, report)
            yield index_row(rel, rel, caption=caption, label=label, class_name=class_name, **probe)

    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        return read_local_file(self.root, str(row["locator"]), max_bytes=self.max_bytes)

    def classes(self) -> list[str] | None:
        if self._classes is None:
            self._labels(self._class_dirs())
        return self._classes
