"""Detection data: COCO and Pascal VOC annotations, a corrupted view, and corrupted copies on disk.

- :func:`read_coco` / :func:`read_voc` / :func:`open_detection` read ground truth into a
  :class:`DetectionSet` (boxes as float32 ``xyxy`` pixels, 0-based, the right/bottom edge exclusive);
- :class:`CorruptedDetection` applies one ImageNet-C corruption on the fly (boxes unchanged, as in
  Michaelis et al. 2019: the corruptions move no object);
- :func:`write_corrupted_detection` writes ``out/<corruption>/<severity>/<file_name>`` plus one COCO
  ``annotations.json`` (also for VOC input); :func:`open_corrupted_tree` reads one domain back.

Bad annotations never pass silently: whole-file problems raise :class:`~core.errors.DataError`,
single bad entries are skipped and counted on ``DetectionSet.skipped`` (by reason) and logged.

Ref: Lin et al., Microsoft COCO (2014) for the format; Everingham et al., The Pascal VOC Challenge
(2010); Michaelis et al., Benchmarking Robustness in Object Detection (2019).
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core import atomic
from core.corrupt import check_corruption, check_severity, corrupt_image, image_seed
from core.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

#: The 20 Pascal VOC classes in the standard order; category id = position + 1.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
#: File written beside the corruption folders of :func:`write_corrupted_detection`.
ANNOTATIONS_FILE = "annotations.json"
#: JPEG quality of corrupted copies of JPEG sources.
JPEG_QUALITY = 95
_JPEG_SUFFIXES = (".jpg", ".jpeg")


# -- the data model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionImage:
    """One image and its ground-truth objects.

    ``boxes``: (n, 4) float32 ``[x0, y0, x1, y1]`` pixels (COCO ``xywh`` converted; VOC's 1-based
    inclusive corners made 0-based with an exclusive right/bottom edge). ``category_ids``: (n,) int64,
    the dataset's own ids (COCO's are not contiguous). ``iscrowd``: (n,) bool (VOC ``difficult`` -> True,
    so COCOeval neither rewards nor penalises detections of it). ``areas``: (n,) float32 object areas
    (COCO's ``area`` field: the segment's; else the box's), used by COCOeval's size ranges.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def box_areas(self) -> np.ndarray:
        """(n,) float32: ``areas`` when known, else box width x height."""
        if self.areas is not None:
            return self.areas
        return ((self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])).astype(np.float32)


class DetectionSet:
    """Images with boxes, from a COCO json or a VOC split.

    Attributes:
        name: short name (the annotation folder's, e.g. ``detection`` for the demo scenes).
        images_dir: where ``DetectionImage.file_name`` is relative to.
        images: in file order.
        categories: ``[{"id", "name"}]`` sorted by id.
        skipped: entries left out while reading, by reason; repaired: entries fixed (boxes clipped).
    """

    def __init__(self, name: str, images_dir: str | Path, images: list[DetectionImage], categories: list[dict],
                 *, skipped: dict[str, int] | None = None, repaired: dict[str, int] | None = None) -> None:
        self.name = name
        self.images_dir = Path(images_dir)
        self.images = list(images)
        cats: list[dict[str, Any]] = [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]
        self.categories = sorted(cats, key=lambda c: int(c["id"]))
        self.skipped = dict(skipped or {})
        self.repaired = dict(repaired or {})

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"DetectionSet({self.name!r}, {len(self)} images, {self.n_boxes} boxes, "
                f"{len(self.categories)} categories)")

    @property
    def n_boxes(self) -> int:
        return sum(len(im) for im in self.images)

    @property
    def category_names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories}

    def image_path(self, i: int) -> Path:
        return self.images_dir / self.images[i].file_name

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB. Raises DataError naming the file when it is missing or unreadable."""
        path = self.image_path(i)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"detection image {path} is missing",
                            hint=f"check images_dir ({self.images_dir}) of dataset {self.name!r}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"detection image {path} cannot be read ({type(exc).__name__}: {exc})") from None

    def coco_gt(self) -> dict[str, Any]:
        """COCO-format ground truth ready for ``pycocotools.COCO`` (annotation ids 1..N in order)."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for im in self.images:
            images.append({"id": im.image_id, "file_name": im.file_name, "width": im.width, "height": im.height})
            for box, cat, crowd, area in zip(im.boxes, im.category_ids, im.iscrowd, im.box_areas, strict=True):
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": im.image_id, "category_id": int(cat),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(bool(crowd)),
                })
        return {"info": {"description": f"prunescope detection set {self.name}"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": [dict(c) for c in self.categories]}

    def with_images_dir(self, images_dir: str | Path) -> DetectionSet:
        """The same annotations over other pixels (e.g. a pre-corrupted tree)."""
        return DetectionSet(self.name, images_dir, self.images, self.categories,
                            skipped=self.skipped, repaired=self.repaired)

    def subset(self, n: int) -> DetectionSet:
        """The first ``n`` images (all when ``n`` >= len)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"subset size must be a positive integer; got {n!r}")
        return DetectionSet(self.name, self.images_dir, self.images[:n], self.categories,
                            skipped=self.skipped, repaired=self.repaired)


# -- boxes ---------------------------------------------------------------------------------------------------
@dataclass
class _Counts:
    skipped: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)


def _check_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int,
               counts: _Counts) -> tuple[float, float, float, float] | None:
    """The box clipped to the image, or None (counted) when it is degenerate or entirely outside."""
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        counts.skipped["box_not_finite"] += 1
        return None
    if x1 <= x0 or y1 <= y0:
        counts.skipped["box_empty"] += 1
        return None
    cx0, cy0 = min(max(x0, 0.0), float(width)), min(max(y0, 0.0), float(height))
    cx1, cy1 = min(max(x1, 0.0), float(width)), min(max(y1, 0.0), float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        counts.skipped["box_outside_image"] += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        counts.repaired["box_clipped"] += 1
    return cx0, cy0, cx1, cy1


def _make_image(image_id: int, file_name: str, width: int, height: int,
                objects: list[tuple[tuple[float, float, float, float], int, bool, float]]) -> DetectionImage:
    boxes = np.array([o[0] for o in objects], np.float32).reshape(-1, 4)
    return DetectionImage(
        image_id, file_name, width, height, boxes,
        np.array([o[1] for o in objects], np.int64), np.array([o[2] for o in objects], bool),
        np.array([o[3] for o in objects], np.float32),
    )


def _log_counts(what: str, counts: _Counts) -> None:
    if counts.skipped:
        log.warning("%s: skipped %s", what, dict(counts.skipped))
    if counts.repaired:
        log.info("%s: repaired %s", what, dict(counts.repaired))


# -- COCO ----------------------------------------------------------------------------------------------------
def read_coco(annotations: str | Path, images_dir: str | Path | None = None) -> DetectionSet:
    """A COCO ``instances_*.json`` (or the demo's ``annotations.json``) as a :class:`DetectionSet`.

    Args:
        annotations: the json file.
        images_dir: default ``<json dir>/images`` when it exists, else the json's folder.

    Boxes with w <= 0 or h <= 0, entirely outside the image or not finite, annotations of unknown images or
    categories, and malformed entries are skipped and counted (``skipped``); boxes partly outside are
    clipped (``repaired``). Images without objects are kept (they count for false positives).

    Raises:
        MissingFileError: no such file. DataError: not JSON, or no ``images`` / ``annotations`` /
            ``categories`` lists.
    """
    path = Path(annotations).expanduser()
    if not path.is_file():
        raise MissingFileError(f"COCO annotations {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not a readable JSON file ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path} is not COCO detection ground truth: no {', '.join(missing)} list",
                        hint="expected a COCO instances json with images, annotations and categories")
    if images_dir is None:
        images_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    counts = _Counts()
    categories = _coco_categories(data["categories"], path)
    images, objects = _coco_images(data["images"], counts)
    _coco_annotations(data["annotations"], images, {c["id"] for c in categories}, objects, counts)
    name = path.parent.name if path.name == ANNOTATIONS_FILE else path.stem
    out = [_make_image(i, *images[i], objects[i]) for i in images]
    _log_counts(f"COCO {path}", counts)
    return DetectionSet(name or "coco", images_dir, out, categories,
                        skipped=dict(counts.skipped), repaired=dict(counts.repaired))


def _coco_categories(raw: list[Any], path: Path) -> list[dict]:
    cats: dict[int, str] = {}
    for c in raw:
        try:
            cats[int(c["id"])] = str(c["name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: a category has no integer id and name: {str(c)[:200]}") from None
    if not cats:
        raise DataError(f"{path} lists no categories")
    return [{"id": k, "name": v} for k, v in sorted(cats.items())]


def _coco_images(raw: list[Any], counts: _Counts) -> tuple[dict[int, tuple[str, int, int]], dict[int, list]]:
    images: dict[int, tuple[str, int, int]] = {}
    for im in raw:
        try:
            image_id, entry = int(im["id"]), (str(im["file_name"]), int(im["width"]), int(im["height"]))
        except (KeyError, TypeError, ValueError):
            counts.skipped["bad_image_entry"] += 1
            continue
        if entry[1] <= 0 or entry[2] <= 0:
            counts.skipped["bad_image_entry"] += 1
        elif image_id in images:
            counts.skipped["duplicate_image_id"] += 1
        else:
            images[image_id] = entry
    return images, {i: [] for i in images}


def _coco_annotations(raw: list[Any], images: dict[int, tuple[str, int, int]], category_ids: set[int],
                      objects: dict[int, list], counts: _Counts) -> None:
    for ann in raw:
        try:
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            counts.skipped["bad_annotation"] += 1
            continue
        if image_id not in images:
            counts.skipped["unknown_image"] += 1
            continue
        if cat not in category_ids:
            counts.skipped["unknown_category"] += 1
            continue
        _, width, height = images[image_id]
        box = _check_box(x, y, x + w, y + h, width, height, counts)
        if box is None:
            continue
        area = ann.get("area")
        area = float(area) if isinstance(area, int | float) and area > 0 else (box[2] - box[0]) * (box[3] - box[1])
        objects[image_id].append((box, cat, bool(ann.get("iscrowd", 0)), area))


# -- Pascal VOC ----------------------------------------------------------------------------------------------
def read_voc(root: str | Path, split: str = "val", year: str | None = None) -> DetectionSet:
    """A Pascal VOC split (``ImageSets/Main/<split>.txt``) as a :class:`DetectionSet`.

    Args:
        root: ``VOCdevkit`` (then ``year`` picks ``VOC<year>``; optional when there is only one) or
            ``VOCdevkit/VOC20xx`` itself.
        split: train | val | trainval | test (any list file in ``ImageSets/Main``).

    Boxes: ``(xmin - 1, ymin - 1, xmax, ymax)`` (1-based inclusive -> 0-based, exclusive right edge);
    ``difficult`` objects get iscrowd=True; category ids 1..20 in :data:`VOC_CLASSES` order; image ids
    1..N in list order (``file_name`` keeps VOC's own id). Unknown class names, bad boxes and unreadable
    XML files are skipped and counted.

    Raises:
        MissingFileError: no VOC folder, split list. ConfigError: several years and none chosen.
    """
    voc = _voc_dir(Path(root).expanduser(), year)
    listing = voc / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        have = sorted(p.stem for p in (voc / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise MissingFileError(f"VOC split list {listing} not found; available splits: {', '.join(have) or 'none'}")
    ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = _Counts()
    images: list[DetectionImage] = []
    for stem in ids:
        im = _voc_image(voc, stem, len(images) + 1, counts)
        if im is not None:
            images.append(im)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)]
    _log_counts(f"VOC {voc} {split}", counts)
    return DetectionSet(f"{voc.name.lower()}_{split}", voc / "JPEGImages", images, categories,
                        skipped=dict(counts.skipped), repaired=dict(counts.repaired))


def _voc_dir(root: Path, year: str | None) -> Path:
    if not root.is_dir():
        raise MissingFileError(f"VOC folder {root} not found")
    if (root / "Annotations").is_dir():
        return root
    base = root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root
    years = sorted(p.name for p in base.glob("VOC20*") if (p / "Annotations").is_dir())
    if year is not None:
        if f"VOC{year}" not in years:
            raise MissingFileError(f"VOC{year} not found in {base}; available: {', '.join(years) or 'none'}")
        return base / f"VOC{year}"
    if len(years) == 1:
        return base / years[0]
    if not years:
        raise MissingFileError(f"{root} holds no VOC20xx folder with Annotations/",
                               hint="pass VOCdevkit or VOCdevkit/VOC2007")
    raise ConfigError(f"{base} holds several VOC years ({', '.join(years)}); choose one with year=")


def _voc_image(voc: Path, stem: str, image_id: int, counts: _Counts) -> DetectionImage | None:
    xml = voc / "Annotations" / f"{stem}.xml"
    try:
        tree = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        counts.skipped["unreadable_annotation"] += 1
        return None
    file_name = (tree.findtext("filename") or f"{stem}.jpg").strip()
    try:
        width, height = int(float(tree.findtext("size/width") or 0)), int(float(tree.findtext("size/height") or 0))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        try:
            with Image.open(voc / "JPEGImages" / file_name) as img:
                width, height = img.size
        except OSError:
            counts.skipped["bad_image_entry"] += 1
            return None
    objects = []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            counts.skipped["unknown_category"] += 1
            continue
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}") or "nan")
                                      for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            counts.skipped["bad_annotation"] += 1
            continue
        box = _check_box(xmin - 1, ymin - 1, xmax, ymax, width, height, counts)
        if box is not None:
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            objects.append((box, VOC_CLASSES.index(name) + 1, difficult, (box[2] - box[0]) * (box[3] - box[1])))
    return _make_image(image_id, file_name, width, height, objects)


# -- auto-detection ------------------------------------------------------------------------------------------
def open_detection(path: str | Path, *, split: str = "val") -> DetectionSet:
    """Read detection ground truth of either format.

    A ``.json`` file or a folder with ``annotations.json`` -> COCO; a folder with ``Annotations/``,
    ``VOC20xx/`` or ``VOCdevkit/`` -> VOC (``split``).

    Raises:
        MissingFileError: ``path`` does not exist. ConfigError: neither format.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"detection data {p} not found")
    if p.is_file():
        if p.suffix.lower() == ".json":
            return read_coco(p)
        raise ConfigError(f"{p} is not a COCO .json file", hint="pass a COCO json, a COCO folder or a VOC root")
    if (p / ANNOTATIONS_FILE).is_file():
        return read_coco(p / ANNOTATIONS_FILE)
    if (p / "Annotations").is_dir() or (p / "VOCdevkit").is_dir() or any(p.glob("VOC20*")):
        return read_voc(p, split)
    raise ConfigError(f"{p} is neither COCO (annotations.json) nor Pascal VOC (Annotations/, VOCdevkit/)",
                      hint="pass a COCO json, a folder with annotations.json, or VOCdevkit/VOC20xx")


# -- corrupted views -----------------------------------------------------------------------------------------
class CorruptedDetection:
    """Corrupted view: (corruption, severity) applied on the fly to every image, boxes unchanged.

    Item ``i`` is ``(pixels, image)``: (H, W, 3) uint8 of the source's size, seeded per image with
    :func:`core.corrupt.image_seed` (seed, image id, corruption, severity), so it does not depend on the
    order of access.
    """

    def __init__(self, ds: DetectionSet, corruption: str, severity: int, *, seed: int = 0) -> None:
        self.ds = ds
        self.corruption = check_corruption(corruption)
        self.severity = check_severity(severity)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[np.ndarray, DetectionImage]:
        im = self.ds.images[i]
        return self.apply(np.asarray(self.ds.load_image(i)), im.image_id), im

    def apply(self, rgb: np.ndarray, image_id: int) -> np.ndarray:
        """Corrupt one decoded image the way item access does."""
        seed = image_seed(self.seed, str(image_id), self.corruption, self.severity)
        return corrupt_image(rgb, self.corruption, self.severity, seed)


@dataclass
class DetectionWriteReport:
    """What :func:`write_corrupted_detection` did; counts are files except ``n_images`` / ``unreadable``."""

    out_dir: Path
    n_images: int = 0
    written: int = 0
    skipped: int = 0
    unreadable: int = 0
    unreadable_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.n_images} images: {self.written} files written, {self.skipped} already complete, "
                f"{self.unreadable} unreadable source images")


def write_corrupted_detection(ds: DetectionSet, out_dir: str | Path, *, corruptions: Sequence[str],
                              severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0,
                              progress: bool = False) -> DetectionWriteReport:
    """Write ``out_dir/<corruption>/<severity>/<file_name>`` and ``out_dir/annotations.json``.

    Pixels equal :class:`CorruptedDetection`'s with the same seed; JPEG sources are saved as JPEG
    (quality 95), others (PNG) in their own format. Each file is written atomically and a complete one is
    kept, so an interrupted call resumes; unreadable source images are counted, never fatal. The
    annotations file is the COCO ground truth (also for VOC input); read a domain back with
    :func:`open_corrupted_tree`.
    """
    from tqdm.auto import tqdm

    from core.workspace import safe_join

    names = [check_corruption(c) for c in corruptions]
    levels = [check_severity(s) for s in severities]
    if not names or not levels:
        raise ConfigError("write_corrupted_detection needs at least one corruption and one severity")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_temp_files(out)
    atomic.write_json(out / ANNOTATIONS_FILE, ds.coco_gt())
    report = DetectionWriteReport(out)
    combos = [(c, s) for c in names for s in levels]
    with tqdm(total=len(ds) * len(combos), desc=f"corrupting {ds.name}", unit="file", disable=not progress) as bar:
        for i, im in enumerate(ds.images):
            report.n_images += 1
            targets = {(c, s): safe_join(out, f"{c}/{s}/{im.file_name}") for c, s in combos}
            todo = [k for k, p in targets.items() if not _is_complete(p)]
            report.skipped += len(combos) - len(todo)
            if todo:
                _write_one(ds, i, todo, targets, seed, report)
            bar.update(len(combos))
    log.info("write_corrupted_detection %s -> %s: %s", ds.name, out, report.summary())
    return report


def _write_one(ds: DetectionSet, i: int, todo: list[tuple[str, int]], targets: dict[tuple[str, int], Path],
               seed: int, report: DetectionWriteReport) -> None:
    try:
        rgb = np.asarray(ds.load_image(i))
    except DataError as exc:
        report.unreadable += 1
        report.unreadable_files.append(ds.images[i].file_name)
        log.warning("skipping an unreadable image: %s", exc)
        return
    for corruption, severity in todo:
        pixels = CorruptedDetection(ds, corruption, severity, seed=seed).apply(rgb, ds.images[i].image_id)
        dest = targets[(corruption, severity)]
        with atomic.atomic_path(dest) as tmp:
            if dest.suffix.lower() in _JPEG_SUFFIXES:
                Image.fromarray(pixels).save(tmp, format="JPEG", quality=JPEG_QUALITY)
            else:
                Image.fromarray(pixels).save(tmp, format=Image.registered_extensions().get(dest.suffix.lower(), "PNG"))
        report.written += 1


def _is_complete(path: Path) -> bool:
    """Whether ``path`` exists and ends like a whole JPEG / PNG (other formats: non-empty)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            if size < 12:
                return False
            f.seek(-12, 2)
            tail = f.read(12)
    except OSError:
        return False
    suffix = path.suffix.lower()
    if suffix in _JPEG_SUFFIXES:
        return tail.endswith(b"\xff\xd9")
    if suffix == ".png":
        return tail[4:8] == b"IEND"
    return True


def open_corrupted_tree(out_dir: str | Path, corruption: str, severity: int) -> DetectionSet:
    """One domain of a tree written by :func:`write_corrupted_detection` (annotations + its images).

    Raises:
        MissingFileError: no ``annotations.json`` or no ``<corruption>/<severity>`` folder in ``out_dir``.
    """
    out = Path(out_dir).expanduser()
    name, level = check_corruption(corruption), check_severity(severity)
    if not (out / ANNOTATIONS_FILE).is_file():
        raise MissingFileError(f"{out} is not a corrupted detection tree (no {ANNOTATIONS_FILE})",
                               hint="write one with write_corrupted_detection")
    folder = out / name / str(level)
    if not folder.is_dir():
        raise MissingFileError(f"{folder} not found: the tree has no {name} severity {level}")
    ds = read_coco(out / ANNOTATIONS_FILE, images_dir=folder)
    ds.name = out.name
    return ds


def is_corrupted_tree(path: str | Path) -> bool:
    """Whether ``path`` looks like a :func:`write_corrupted_detection` output folder."""
    p = Path(path)
    return (p / ANNOTATIONS_FILE).is_file() and any(
        (p / c).is_dir() for c in _registered_corruptions())


def _registered_corruptions() -> tuple[str, ...]:
    from core.corrupt import ALL_CORRUPTIONS

    return ALL_CORRUPTIONS


__all__ = [
    "ANNOTATIONS_FILE", "VOC_CLASSES", "CorruptedDetection", "DetectionImage", "DetectionSet",
    "DetectionWriteReport", "is_corrupted_tree", "open_corrupted_tree", "open_detection", "read_coco",
    "read_voc", "write_corrupted_detection",
]
