"""Corruption benchmarks: the ImageNet-C folder tree and CIFAR-10-C's npy arrays.

``imagenet_c``: ``root/<corruption>/<severity 1-5>/<class folder>/<image>`` (ImageNet-C,
Tiny-ImageNet-C). Labels come from the class folder names exactly as in ``image_folder`` (sorted
wnids, integer folders by value, or ``classes_file``). Index rows: ``id`` = ``locator`` = the path
relative to the root; extras ``corruption``, ``severity`` (1-5), ``class_name``, ``width``, ``height``.
Options ``corruptions`` / ``severities`` (comma lists) restrict what is indexed. Corruption names
outside Hendrycks & Dietterich's 19 are allowed and listed in the log.

``cifar_c``: a folder of ``<corruption>.npy`` uint8 (N, 32, 32, 3) arrays, N = 5 severity blocks in
order 1..5 (50000 = 5 x 10000 for CIFAR-10-C), plus ``labels.npy`` (N,). Index rows: ``id`` =
``<corruption>:<row>``, ``locator`` = ``<corruption>.npy``, extras ``row``, ``corruption``,
``severity`` (= row // (N / 5) + 1). Images are read from the memory-mapped arrays.

Ref: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions" (ICLR 2019).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.errors import ConfigError, DataError, MissingFileError
from core.registry import ParamSpec
from core.sources.base import (
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    common_params,
    index_row,
    parse_list_option,
    read_local_file,
)
from core.sources.image_folder import (
    class_list,
    label_params,
    list_images,
    list_subdirs,
    read_sidecar_caption,
    resolve_labels,
)
from core.workspace import safe_join

log = logging.getLogger(__name__)

#: The 15 benchmark corruptions and the 4 held-out ones (Hendrycks & Dietterich 2019).
KNOWN_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
SEVERITIES = (1, 2, 3, 4, 5)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def selection_params() -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("corruptions", "str", None, "comma list of corruptions to index (default: all found)"),
        ParamSpec("severities", "str", None, "comma list of severities 1-5 to index (default: all)"),
    )


def parse_severities(value: Any) -> tuple[int, ...]:
    """The ``severities`` option (``"1,3,5"``) as integers 1-5; ConfigError otherwise."""
    items = parse_list_option(value)
    if items is None:
        return SEVERITIES
    bad = [s for s in items if not s.isdigit() or int(s) not in SEVERITIES]
    if bad:
        raise ConfigError(f"severities must be integers 1-5; got {', '.join(bad)}")
    return tuple(sorted({int(s) for s in items}))


def select_corruptions(found: list[str], option: Any, where: Path) -> list[str]:
    """The corruptions to index: all ``found`` or the ones the option names (each must exist)."""
    wanted = parse_list_option(option)
    if wanted is not None:
        missing = [c for c in wanted if c not in found]
        if missing:
            raise DataError(f"corruption(s) {', '.join(missing)} not in {where}; found: {', '.join(found) or 'none'}")
        found = [c for c in found if c in wanted]
    unknown = [c for c in found if c not in KNOWN_CORRUPTIONS]
    if unknown:
        log.info("corruptions outside the ImageNet-C set (kept): %s", ", ".join(unknown))
    return found


@SOURCES.register(
    "imagenet_c",
    summary="ImageNet-C tree: root/<corruption>/<severity 1-5>/<class>/<image>",
    paper="Hendrycks & Dietterich, Benchmarking Neural Network Robustness to Common Corruptions (ICLR 2019)",
    params=(*selection_params(), *label_params(), *common_params()),
)
class ImageNetCSource(Source):
    kind = "imagenet_c"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self._classes: list[str] | None = None
        self._labels: dict[str, int] | None = None
        self._labels_known = False

    def _severity_dirs(self) -> list[tuple[str, int, Path]]:
        """(corruption, severity, folder) for every selected folder, in name then severity order."""
        if not self.root.is_dir():
            raise MissingFileError(f"imagenet_c folder {self.root} does not exist or is not a folder")
        found = [d.name for d in list_subdirs(self.root)]
        if not found:
            raise DataError(f"{self.root} has no corruption folders (<corruption>/<severity>/<class>/<image>)")
        severities = parse_severities(self.options.get("severities"))
        out = []
        for corruption in select_corruptions(found, self.options.get("corruptions"), self.root):
            for sev_dir in list_subdirs(self.root / corruption):
                if not sev_dir.name.isdigit() or int(sev_dir.name) not in SEVERITIES:
                    log.warning("ignoring %s: severity folders are named 1-5", sev_dir)
                elif int(sev_dir.name) in severities:
                    out.append((corruption, int(sev_dir.name), sev_dir))
        return sorted(out, key=lambda t: (t[0], t[1]))

    def _label_map(self, sev_dirs: list[tuple[str, int, Path]]) -> dict[str, int] | None:
        """Labels from the union of class folder names over every selected severity folder."""
        if not self._labels_known:
            names = {d.name for _, _, sev in sev_dirs for d in list_subdirs(sev)}
            self._labels = resolve_labels(self.options, names)
            self._classes = class_list(self._labels) if self._labels is not None else None
            self._labels_known = True
        return self._labels

    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        sev_dirs = self._severity_dirs()
        labels = self._label_map(sev_dirs)
        for corruption, severity, sev_dir in sev_dirs:
            groups = list_subdirs(sev_dir) or [sev_dir]
            for folder in sorted(groups, key=lambda d: (labels or {}).get(d.name, -1)):
                label = labels.get(folder.name) if labels is not None and folder != sev_dir else None
                if labels is not None and folder != sev_dir and label is None:
                    report.skip("bad_label", folder.relative_to(self.root).as_posix())
                    continue
                extras = {"corruption": corruption, "severity": severity,
                          "class_name": folder.name if label is not None else None}
                yield from self._scan_folder(folder, label, extras, report, verify)

    def _scan_folder(self, folder: Path, label: int | None, extras: dict[str, Any], report: IssueReport,
                     verify: bool) -> Iterator[dict[str, Any]]:
        for path in list_images(folder):
            rel = path.relative_to(self.root).as_posix()
            probe = self.probe_file(self.root, rel, report, verify=verify)
            if probe is not None:
                caption = read_sidecar_caption(path, rel, report)
                yield index_row(rel, rel, caption=caption, label=label, **extras, **probe)

    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        return read_local_file(self.root, str(row["locator"]), max_bytes=self.max_bytes)

    def classes(self) -> list[str] | None:
        if not self._labels_known:
            self._label_map(self._severity_dirs())
        return self._classes


@SOURCES.register(
    "cifar_c",
    summary="CIFAR-10-C: <corruption>.npy uint8 (N, 32, 32, 3) in 5 severity blocks + labels.npy",
    paper="Hendrycks & Dietterich, Benchmarking Neural Network Robustness to Common Corruptions (ICLR 2019)",
    params=selection_params(),
)
class CifarCSource(Source):
    kind = "cifar_c"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self._arrays: dict[str, np.ndarray] = {}
        self._label_array: np.ndarray | None = None

    def _mmap(self, name: str) -> np.ndarray:
        """The memory-mapped array ``root/name`` (cached); DataError naming a bad file."""
        if name not in self._arrays:
            path = safe_join(self.root, name)
            if not path.is_file():
                raise MissingFileError(f"{path} does not exist")
            try:
                self._arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"{name} is not a readable .npy file: {str(exc).splitlines()[0][:200]}") from None
        return self._arrays[name]

    def labels(self) -> np.ndarray:
        """(N,) int64 labels from ``labels.npy``."""
        if self._label_array is None:
            if not self.root.is_dir():
                raise MissingFileError(f"cifar_c folder {self.root} does not exist or is not a folder")
            raw = self._mmap("labels.npy")
            if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer) or (len(raw) and raw.min() < 0):
                raise DataError(f"labels.npy must be a 1-D array of integers >= 0; it is {raw.dtype} {raw.shape}")
            self._label_array = np.asarray(raw, dtype=np.int64)
        return self._label_array

    def _corruption_files(self) -> list[str]:
        found = sorted(p.stem for p in self.root.glob("*.npy") if p.name != "labels.npy" and not p.name.startswith("."))
        if not found:
            raise DataError(f"{self.root} has no <corruption>.npy files")
        return select_corruptions(found, self.options.get("corruptions"), self.root)

    def _checked(self, corruption: str, n_labels: int) -> int:
        """Rows per severity block of ``<corruption>.npy``; DataError when its shape does not fit."""
        arr = self._mmap(f"{corruption}.npy")
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)):
            raise DataError(f"{corruption}.npy must be uint8 (N, H, W, 3); it is {arr.dtype} {arr.shape}")
        if arr.shape[0] != n_labels or n_labels % 5:
            raise DataError(f"{corruption}.npy has {arr.shape[0]} images, labels.npy {n_labels} "
                            "(both must be 5 severity blocks of equal size)")
        return n_labels // 5

    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Index rows (no decoding needed: the arrays are pixels already)."""
        labels = self.labels()
        severities = parse_severities(self.options.get("severities"))
        for corruption in self._corruption_files():
            block = self._checked(corruption, len(labels))
            for severity in severities:
                for row in range((severity - 1) * block, severity * block):
                    yield index_row(f"{corruption}:{row}", f"{corruption}.npy", label=int(labels[row]),
                                    row=row, corruption=corruption, severity=severity)

    def load_image(self, row: Mapping[str, Any]) -> Image.Image:
        """The RGB image at ``row`` of the memory-mapped array (only that image is read)."""
        locator = str(row["locator"])
        try:
            arr = self._mmap(locator)
            pixels = np.asarray(arr[int(row["row"])])
        except (MissingFileError, FileNotFoundError):
            raise SampleError("missing_file", locator) from None
        except DataError as exc:
            raise SampleError("unreadable_file", exc.message) from None
        except (IndexError, TypeError, ValueError, KeyError):
            raise SampleError("missing_value", f"{row.get('id')}: no row {row.get('row')!r} in {locator}") from None
        return Image.fromarray(pixels.squeeze()).convert("RGB")

    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        """The image PNG-encoded (lossless)."""
        buf = io.BytesIO()
        self.load_image(row).save(buf, format="PNG")
        return buf.getvalue()

    def classes(self) -> list[str] | None:
        """CIFAR-10 names when labels fit in 10 classes, else the label numbers as text (CIFAR-100-C)."""
        labels = self.labels()
        n = int(labels.max()) + 1 if len(labels) else 0
        return list(CIFAR10_CLASSES) if n <= len(CIFAR10_CLASSES) else [str(i) for i in range(n)]
