"""ImageNet-C style corruptions: one image, a dataset view, and an ImageNet-C folder tree.

The 15 benchmark corruptions and 4 hold-out ones of Hendrycks & Dietterich (ICLR 2019), at severities
1-5, computed by the ``imagecorruptions`` package (the maintained fork ``imagecorruptions-imaug``, see
ENV.md). Every call is seeded: the same (image, corruption, severity, seed) gives the same bytes, and
the caller's global NumPy random state is left exactly as it was.

Three ways in:
- :func:`corrupt_image` corrupts one uint8 image;
- :class:`CorruptedView` reads a registered dataset and corrupts each image on the fly (usable as a
  torch ``Dataset``), seeded per image by :func:`image_seed`;
- :func:`write_imagenet_c` writes corrupted copies of a dataset as an ImageNet-C tree
  ``out/<corruption>/<severity>/<class folder>/<image>.jpeg``, which the ``imagenet_c`` source reads.

Ref: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019); Michaelis et al., "Benchmarking Robustness in Object Detection" (2019) for
the ``imagecorruptions`` package.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from core import atomic
from core.errors import ConfigError, DataError, PathOutsideWorkspace
from core.registry import ParamSpec, Registry
from core.sources.base import IMAGE_EXTENSIONS, IssueReport, SampleError
from core.sources.imagenet_c import KNOWN_CORRUPTIONS
from core.sources.imagenet_c import SEVERITIES as _SOURCE_SEVERITIES

if TYPE_CHECKING:
    from core.datasets import Dataset
    from core.workspace import Workspace

log = logging.getLogger(__name__)

PAPER = ("Hendrycks & Dietterich, Benchmarking Neural Network Robustness to Common Corruptions and "
         "Perturbations (ICLR 2019)")

#: The 15 benchmark corruptions, in the order of the paper and of mCE tables.
TEST_CORRUPTIONS: tuple[str, ...] = KNOWN_CORRUPTIONS[:15]
#: The 4 hold-out ("validation") corruptions, for tuning without touching the 15.
HOLDOUT_CORRUPTIONS: tuple[str, ...] = KNOWN_CORRUPTIONS[15:]
ALL_CORRUPTIONS: tuple[str, ...] = TEST_CORRUPTIONS + HOLDOUT_CORRUPTIONS
SEVERITIES: tuple[int, ...] = _SOURCE_SEVERITIES
GROUPS = ("noise", "blur", "weather", "digital")
#: The library's smallest accepted side (pixels); smaller images are upsampled to it, see corrupt_image.
MIN_SIDE = 32
#: JPEG quality of the published ImageNet-C files (hendrycks/robustness make_imagenet_c.py).
IMAGENET_C_QUALITY = 85
#: Written beside the corruption folders of a labelled tree: class folders in label order (JSON list).
CLASSES_FILE = "classes.json"

assert len(TEST_CORRUPTIONS) == 15 and len(HOLDOUT_CORRUPTIONS) == 4 and SEVERITIES == (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    """One registered corruption; calling it corrupts an image (see :func:`corrupt_image`).

    ``random`` says whether the result depends on the seed (False: a fixed function of the image).
    """

    name: str
    group: str
    holdout: bool
    random: bool

    def __call__(self, img: np.ndarray | Image.Image, severity: int, seed: int = 0) -> np.ndarray:
        return corrupt_image(img, self.name, severity, seed)


CORRUPTIONS: Registry[Corruption] = Registry("corruption")

# name: (group, random, summary)
_TABLE: dict[str, tuple[str, bool, str]] = {
    "gaussian_noise": ("noise", True, "additive Gaussian noise (low-light sensor noise)"),
    "shot_noise": ("noise", True, "Poisson photon noise"),
    "impulse_noise": ("noise", True, "salt-and-pepper noise (bit errors)"),
    "defocus_blur": ("blur", False, "disk-kernel blur, as out of focus"),
    "glass_blur": ("blur", True, "frosted glass: local pixel shuffles between two Gaussian blurs"),
    "motion_blur": ("blur", True, "linear motion blur at a random angle"),
    "zoom_blur": ("blur", False, "radial blur from superposed zooms (camera moving to the object)"),
    "snow": ("weather", True, "falling snow flakes over a paled image"),
    "frost": ("weather", True, "frost crystals blended in from texture photographs"),
    "fog": ("weather", True, "plasma-fractal fog"),
    "brightness": ("weather", False, "brighter daylight: a shift of the HSV value"),
    "contrast": ("digital", False, "contrast pulled towards the image mean"),
    "elastic_transform": ("digital", True, "elastic local displacement of pixels"),
    "pixelate": ("digital", False, "box downsampling then upsampling"),
    "jpeg_compression": ("digital", False, "JPEG re-encoding at low quality"),
    "speckle_noise": ("noise", True, "multiplicative Gaussian noise (hold-out)"),
    "gaussian_blur": ("blur", False, "Gaussian blur (hold-out)"),
    "spatter": ("weather", True, "water drops or mud splashes occluding the image (hold-out)"),
    "saturate": ("digital", False, "saturation change in HSV (hold-out)"),
}
assert tuple(_TABLE) == ALL_CORRUPTIONS

_PARAMS = (
    ParamSpec("severity", "int", 3, "corruption strength", min=1, max=5, ticks=(1, 2, 3, 4, 5)),
    ParamSpec("seed", "int", 0, "base seed; each image gets its own seed derived from it", min=0),
)
for _name, (_group, _random, _summary) in _TABLE.items():
    CORRUPTIONS.register(_name, summary=_summary, paper=PAPER, params=_PARAMS, group=_group,
                         holdout=_name in HOLDOUT_CORRUPTIONS, random=_random)(
        Corruption(_name, _group, _name in HOLDOUT_CORRUPTIONS, _random))

# The library draws from NumPy's global random state; one lock serialises our use of it.
_RNG_LOCK = threading.Lock()
#: Corruptions whose library function ignores np.random.seed and takes its own ``seed`` argument
#: (impulse_noise: scikit-image's random_noise; glass_blur: a numba kernel with its own generator).
_OWN_SEED = frozenset({"impulse_noise", "glass_blur"})


# -- one image -----------------------------------------------------------------------------------------
def check_severity(severity: Any) -> int:
    """``severity`` as an int 1-5; ConfigError otherwise."""
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or int(severity) not in SEVERITIES:
        raise ConfigError(f"severity must be an integer 1-5; got {severity!r}")
    return int(severity)


def check_corruption(corruption: str) -> str:
    """``corruption`` if registered; UnknownName (a ConfigError) listing the 19 otherwise."""
    return CORRUPTIONS.entry(corruption).name


def to_rgb_uint8(img: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from an RGB, RGBA (alpha dropped), grey (H, W) / (H, W, 1) or grey+alpha image.

    Raises:
        DataError: not uint8, an empty side, or a channel count other than 1-4.
    """
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0-255); got {arr.dtype}",
                        hint="convert with (x * 255).round().astype(np.uint8) for [0, 1] floats")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise DataError(f"images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image has an empty side: shape {arr.shape}")
    if arr.shape[2] in (1, 2):  # grey, grey + alpha
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def corrupt_image(img: np.ndarray | Image.Image, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """One image corrupted as in ImageNet-C.

    Args:
        img: uint8 (H, W, 3); grey (H, W) / (H, W, 1) and RGBA are converted to RGB first (alpha is
            dropped), a PIL image is accepted too. Sides under 32 px (the library's minimum) are
            upsampled (bicubic, keeping the aspect ratio) until the shorter side is 32, corrupted, and
            resampled back (area averaging); noise is therefore partly averaged out on such images and
            blur radii are relative to the upsampled size.
        corruption: one of :data:`ALL_CORRUPTIONS`.
        severity: 1-5.
        seed: any int; only its value mod 2**32 matters. Use :func:`image_seed` for per-image seeds.

    Returns:
        (H, W, 3) uint8, the same height and width as ``img``. Identical bytes for identical arguments;
        NumPy's global random state is saved and restored around the call (thread-safe, under a lock).

    Raises:
        ConfigError: unknown corruption (UnknownName, with the alternatives) or severity not 1-5.
        DataError: an unusable image, or the library failed on this corruption (named).
    """
    name = check_corruption(corruption)
    severity = check_severity(severity)
    rgb = to_rgb_uint8(img)
    height, width = rgb.shape[:2]
    small = min(height, width) < MIN_SIDE
    work = _upsample(rgb) if small else rgb
    out = _run_library(work, name, severity, int(seed) % 2**32)
    if out.shape != work.shape:
        raise DataError(f"corruption '{name}' (severity {severity}) returned shape {out.shape} "
                        f"for an input of shape {work.shape}")
    return _downsample(out, width, height) if small else out


def _upsample(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` scaled (bicubic) so that its shorter side is :data:`MIN_SIDE`."""
    height, width = rgb.shape[:2]
    scale = MIN_SIDE / min(height, width)
    size = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def _downsample(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BOX))


def _run_library(rgb: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """The library's corruption under the global-RNG lock, the caller's random state restored."""
    import imagecorruptions  # imports numba, cv2, scikit-image: about a second, so only when needed

    kwargs = {"seed": seed} if name in _OWN_SEED else {}
    with _RNG_LOCK:
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            out = imagecorruptions.corrupt(rgb, corruption_name=name, severity=severity, **kwargs)
        except Exception as exc:  # the library raises anything (AttributeError for bad input, ...)
            raise DataError(f"corruption '{name}' failed at severity {severity} on a "
                            f"{rgb.shape[1]}x{rgb.shape[0]} image: {type(exc).__name__}: {exc}") from exc
        finally:
            np.random.set_state(state)
    return np.asarray(out, dtype=np.uint8)


def image_seed(base_seed: int, image_id: str, corruption: str, severity: int) -> int:
    """A stable seed in [0, 2**32) for one image under one corruption and severity.

    BLAKE2b of the four values, so it is the same in every process and Python version (unlike
    ``hash()``) and independent of the order in which images are visited.
    """
    key = f"{int(base_seed)}\x1f{image_id}\x1f{corruption}\x1f{int(severity)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ImageNet-C's preprocessing: shorter side resized to ``size * 256 / 224`` (bilinear), centre crop.

    With ``size=224`` this is torchvision's ``Resize(256)`` + ``CenterCrop(224)`` used to build ImageNet-C.
    """
    if size < 1:
        raise ConfigError(f"size must be a positive number of pixels; got {size}")
    short = round(size * 256 / 224)
    width, height = img.size
    scale = short / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    img = img.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


# -- a dataset view ------------------------------------------------------------------------------------
def _clean_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An index row with pandas' missing values (NA, NaN) as None, as sources expect."""
    import pandas as pd

    return {k: (None if not isinstance(v, list | tuple | np.ndarray) and pd.isna(v) else v) for k, v in row.items()}


def _label(row: Mapping[str, Any]) -> int:
    label = row.get("label")
    return -1 if label is None else int(label)


class CorruptedView:
    """A registered dataset seen through one corruption at one severity, computed on the fly.

    Image ``i`` is the dataset's image at index row ``i``, optionally preprocessed with
    :func:`center_crop`, corrupted with seed ``image_seed(seed, row id, corruption, severity)``; so
    the same view gives the same pixels in any order, any process, any number of workers.

    Usable as a torch ``Dataset``: ``len(view)``, ``view[i] -> (image, label)`` with image a uint8
    (H, W, 3) array (or what ``transform`` makes of it) and label the int label (-1 when unlabelled).
    Iterating yields ``(row, image)`` and skips unreadable images, counting them in ``self.report``.

    Args:
        dataset: a :class:`core.datasets.Dataset` with images.
        corruption, severity: what to apply (validated here).
        seed: base seed for :func:`image_seed`.
        size: if set, :func:`center_crop` to ``size`` x ``size`` before corrupting (224 = ImageNet-C).
        transform: applied to the corrupted array (e.g. a torchvision transform after ``Image.fromarray``).
    """

    def __init__(self, dataset: Dataset, corruption: str, severity: int, *, seed: int = 0,
                 size: int | None = None, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        if not dataset.has_images:
            raise DataError(f"dataset '{dataset.name}' has no local images to corrupt")
        self.dataset = dataset
        self.corruption = check_corruption(corruption)
        self.severity = check_severity(severity)
        self.seed = int(seed)
        if size is not None and size < 1:
            raise ConfigError(f"size must be a positive number of pixels; got {size}")
        self.size = size
        self.transform = transform
        self.report = IssueReport()

    def __len__(self) -> int:
        return len(self.dataset.index)

    def row(self, i: int) -> dict[str, Any]:
        """Index row ``i`` as a dict (None for missing values)."""
        return _clean_row(self.dataset.index.iloc[i].to_dict())

    def corrupt_row(self, row: Mapping[str, Any]) -> np.ndarray:
        """The corrupted (H, W, 3) uint8 image of one index row; SampleError when it cannot be read."""
        return self.apply(self.dataset.load_image(row), str(row["id"]))

    def apply(self, img: Image.Image, image_id: str) -> np.ndarray:
        """``img`` (already loaded) preprocessed and corrupted as this view does for ``image_id``."""
        if self.size is not None:
            img = center_crop(img, self.size)
        seed = image_seed(self.seed, image_id, self.corruption, self.severity)
        return corrupt_image(np.asarray(img.convert("RGB")), self.corruption, self.severity, seed)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = self.row(i)
        try:
            out = self.corrupt_row(row)
        except SampleError as exc:
            raise DataError(f"sample {row['id']!r} of dataset '{self.dataset.name}' cannot be read: "
                            f"{exc.reason} {exc.detail}".strip()) from None
        return (self.transform(out) if self.transform else out), _label(row)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        for row in self.dataset.iter_rows():
            try:
                img = self.dataset.load_image(row)
            except SampleError as exc:
                self.report.skip(exc.reason, str(row["id"]))
                continue
            except PathOutsideWorkspace:
                self.report.skip("path_outside_root", str(row["id"]))
                continue
            yield row, self.apply(img, str(row["id"]))


# -- an ImageNet-C tree on disk --------------------------------------------------------------------------
@dataclass
class WriteReport:
    """What :func:`write_imagenet_c` did. Counts are files, except ``n_images`` / ``unreadable`` (source images)."""

    out_dir: Path
    n_images: int = 0
    n_written: int = 0
    n_existing: int = 0
    unreadable: IssueReport = field(default_factory=IssueReport)
    n_unlabelled: int = 0

    @property
    def n_unreadable(self) -> int:
        return self.unreadable.n_skipped

    def summary(self) -> str:
        return (f"{self.n_images} images: {self.n_written} files written, {self.n_existing} already complete, "
                f"{self.n_unreadable} unreadable source images ({self.unreadable.summary()})")


def write_imagenet_c(dataset: Dataset | str, out_dir: str | Path, *, ws: Workspace | None = None,
                     corruptions: Sequence[str] = TEST_CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                     seed: int = 0, size: int | None = None, quality: int = IMAGENET_C_QUALITY,
                     progress: bool = False) -> WriteReport:
    """Write corrupted copies of a dataset as ``out/<corruption>/<severity>/<class folder>/<image>.jpeg``.

    The class folder is the row's ``class_name``, else its class name from the dataset's classes, else
    the label number; unlabelled rows go straight into ``<severity>/`` (the ``imagenet_c`` source reads
    both). A labelled dataset also gets ``out/classes.json`` (class folders in label order): register the
    tree with ``classes_file=out/classes.json`` to keep the original label numbers even when some classes
    are absent. File names keep the source name when it already ends in ``.jpeg`` (ImageNet val files),
    else ``<stem>.jpeg``. Pixels equal :class:`CorruptedView`'s with the same seed and size, saved as
    JPEG at ``quality`` (85 in ImageNet-C).

    Each file is written atomically; a file already present and ending with the JPEG end marker is kept,
    so an interrupted call resumes (one writer per ``out_dir``: leftover temporary files are deleted
    at the start). Unreadable source images are counted and skipped, never fatal.

    Args:
        dataset: a Dataset, or a dataset name with ``ws``.
        corruptions, severities: what to write (validated first; unknown names list the alternatives).
        seed: base seed of :func:`image_seed`.
        size: :func:`center_crop` to this size first (224 reproduces ImageNet-C); None keeps the size.
        progress: a tqdm bar over files.

    Returns:
        A :class:`WriteReport`.
    """
    ds = _resolve_dataset(dataset, ws)
    names = [check_corruption(c) for c in corruptions]
    levels = [check_severity(s) for s in severities]
    if not names or not levels:
        raise ConfigError("write_imagenet_c needs at least one corruption and one severity")
    if not 1 <= int(quality) <= 95:
        raise ConfigError(f"quality must be 1-95; got {quality}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_temp_files(out)
    report = WriteReport(out)
    classes = ds.classes()
    if classes:
        atomic.write_json(out / CLASSES_FILE, [_safe_part(c) for c in classes])
    _write_all(ds, out, names, levels, seed=seed, size=size, quality=int(quality), progress=progress,
               report=report, classes=classes)
    log.info("write_imagenet_c %s -> %s: %s", ds.name, out, report.summary())
    return report


def _resolve_dataset(dataset: Dataset | str, ws: Workspace | None) -> Dataset:
    from core.datasets import open_dataset

    if isinstance(dataset, str):
        if ws is None:
            raise ConfigError("pass ws= with a dataset name (or pass an opened Dataset)")
        dataset = open_dataset(ws, dataset)
    if not dataset.has_images:
        raise DataError(f"dataset '{dataset.name}' has no local images to corrupt")
    return dataset


def _write_all(ds: Dataset, out: Path, names: list[str], levels: list[int], *, seed: int, size: int | None,
               quality: int, progress: bool, report: WriteReport, classes: list[str] | None) -> None:
    """The loop over images (each decoded once) and, per image, over (corruption, severity)."""
    from tqdm.auto import tqdm

    combos = [(c, s) for c in names for s in levels]
    used: dict[str, set[str]] = {}
    bar = tqdm(total=int(ds.row["n_samples"]) * len(combos), desc=f"corrupting {ds.name}", unit="file",
               disable=not progress)
    try:
        for row in ds.iter_rows():
            report.n_images += 1
            rel = _relative_target(row, classes, used, report)
            todo = [(c, s) for c, s in combos if not _is_complete_jpeg(out / c / str(s) / rel)]
            report.n_existing += len(combos) - len(todo)
            if todo:
                _write_image(ds, row, out, rel, todo, seed=seed, size=size, quality=quality, report=report)
            bar.update(len(combos))
    finally:
        bar.close()


def _write_image(ds: Dataset, row: dict[str, Any], out: Path, rel: Path, todo: list[tuple[str, int]], *,
                 seed: int, size: int | None, quality: int, report: WriteReport) -> None:
    """Decode one source image and write its missing corrupted files (a read failure is counted)."""
    try:
        img = ds.load_image(row)
    except SampleError as exc:
        report.unreadable.skip(exc.reason, str(row["id"]))
        return
    except PathOutsideWorkspace:
        report.unreadable.skip("path_outside_root", str(row["id"]))
        return
    if size is not None:
        img = center_crop(img, size)
    rgb = np.asarray(img.convert("RGB"))
    for corruption, severity in todo:
        pixels = corrupt_image(rgb, corruption, severity, image_seed(seed, str(row["id"]), corruption, severity))
        with atomic.atomic_path(out / corruption / str(severity) / rel) as tmp:
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=quality, optimize=True)
        report.n_written += 1


def _relative_target(row: Mapping[str, Any], classes: list[str] | None, used: dict[str, set[str]],
                     report: WriteReport) -> Path:
    """``<class folder>/<file name>`` (or ``<file name>``) below a severity folder, unique per folder."""
    folder = _class_folder(row, classes)
    if folder is None:
        report.n_unlabelled += 1
    name = _file_name(str(row["id"]))
    taken = used.setdefault(folder or "", set())
    if name.lower() in taken:  # e.g. a.png and a.jpg in one class: disambiguate, deterministically
        digest = hashlib.blake2b(str(row["id"]).encode(), digest_size=4).hexdigest()
        name = f"{Path(name).stem}_{digest}.jpeg"
    taken.add(name.lower())
    return Path(folder, name) if folder else Path(name)


def _class_folder(row: Mapping[str, Any], classes: list[str] | None) -> str | None:
    if row.get("class_name"):
        return _safe_part(str(row["class_name"]))
    label = row.get("label")
    if label is None:
        return None
    if classes and 0 <= int(label) < len(classes):
        return _safe_part(classes[int(label)])
    return str(int(label))


def _file_name(image_id: str) -> str:
    """The output file name for an index id (a relative path, a key, ``corruption:row`` ...)."""
    last = _safe_part(image_id.replace("\\", "/").rsplit("/", 1)[-1])
    path = Path(last)
    if path.suffix.lower() == ".jpeg":
        return last
    stem = path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else last
    return f"{stem}.jpeg"


def _safe_part(text: str) -> str:
    """One path component: separators and a leading dot replaced (a hidden name would be ignored)."""
    part = "".join("_" if ch in '/\\:\0' else ch for ch in text).strip() or "_"
    return "_" + part[1:] if part.startswith(".") else part


def _is_complete_jpeg(path: Path) -> bool:
    """Whether ``path`` exists and ends with the JPEG end-of-image marker."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() < 4:
                return False
            f.seek(-2, 2)
            return f.read(2) == b"\xff\xd9"
    except OSError:
        return False
