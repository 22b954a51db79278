"""core.corrupt: every corruption at every severity, seeding, input forms, the dataset view and the
ImageNet-C tree written and read back by the ``imagenet_c`` source."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core import corrupt as C
from core.corrupt import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    HOLDOUT_CORRUPTIONS,
    SEVERITIES,
    TEST_CORRUPTIONS,
    CorruptedView,
    corrupt_image,
    image_seed,
    write_imagenet_c,
)
from core.datasets import open_dataset, register_dataset
from core.errors import ConfigError, DataError, UnknownName
from core.sources import IssueReport
from core.sources.imagenet_c import KNOWN_CORRUPTIONS, ImageNetCSource
from core.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]


def picture(size: int, seed: int = 0) -> np.ndarray:
    """A small deterministic RGB picture: a colour gradient with a dark disc and a light bar."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full((h, w), 90 + 40 * seed)], axis=2)
    pil = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    draw.ellipse([w // 5, h // 5, 3 * w // 5, 3 * h // 5], fill=(30, 30, 60))
    draw.rectangle([w // 2, 2 * h // 3, w - 2, h - 2], fill=(230, 220, 200))
    return np.asarray(pil)


IMG_32 = picture(32)
IMG_224 = picture(224)
GREY = np.full((48, 48, 3), 128, np.uint8)


# -- names and registry -----------------------------------------------------------------------------------
def test_names_match_the_library_and_the_source() -> None:
    import imagecorruptions

    assert ALL_CORRUPTIONS == KNOWN_CORRUPTIONS
    assert list(TEST_CORRUPTIONS) == imagecorruptions.get_corruption_names("common")
    assert list(HOLDOUT_CORRUPTIONS) == imagecorruptions.get_corruption_names("validation")
    assert set(HOLDOUT_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert SEVERITIES == (1, 2, 3, 4, 5)


def test_registry_lists_every_corruption_with_its_group() -> None:
    import imagecorruptions

    assert set(CORRUPTIONS.names()) == set(ALL_CORRUPTIONS) and len(CORRUPTIONS) == 19
    for group in ("noise", "blur", "weather", "digital"):
        in_group = [c for c in TEST_CORRUPTIONS if CORRUPTIONS.entry(c).extra["group"] == group]
        assert in_group == imagecorruptions.get_corruption_names(group)
    for entry in CORRUPTIONS:
        assert entry.summary and entry.extra["holdout"] == (entry.name in HOLDOUT_CORRUPTIONS)
        assert [p.name for p in entry.params] == ["severity", "seed"]
    assert CORRUPTIONS.entry("spatter").extra["group"] == "weather"
    np.testing.assert_array_equal(CORRUPTIONS.get("fog")(IMG_32, 2, 5), corrupt_image(IMG_32, "fog", 2, 5))


# -- every corruption at every severity ---------------------------------------------------------------------
@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("corruption", ALL_CORRUPTIONS)
@pytest.mark.parametrize("img", [IMG_32, IMG_224], ids=["32px", "224px"])
def test_every_corruption_and_severity(img: np.ndarray, corruption: str, severity: int) -> None:
    out = corrupt_image(img, corruption, severity, seed=1)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert not np.array_equal(out, img), "the image came back unchanged"


def test_non_square_image_keeps_its_shape() -> None:
    img = picture(96)[:40, :, :]
    for corruption in ALL_CORRUPTIONS:
        assert corrupt_image(img, corruption, 3, 0).shape == (40, 96, 3)


def test_noise_grows_with_severity() -> None:
    change = [np.abs(corrupt_image(GREY, "gaussian_noise", s, 0).astype(float) - 128).mean() for s in SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


# -- seeding ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", ALL_CORRUPTIONS)
def test_seeded_calls_reproduce_and_seeds_matter_only_for_random_ones(corruption: str) -> None:
    img = picture(48)
    a = corrupt_image(img, corruption, 3, seed=11)
    np.testing.assert_array_equal(a, corrupt_image(img, corruption, 3, seed=11))
    other = corrupt_image(img, corruption, 3, seed=12)
    assert (not np.array_equal(a, other)) == CORRUPTIONS.entry(corruption).extra["random"]


def test_global_numpy_random_state_is_untouched() -> None:
    np.random.seed(1234)
    expected = np.random.random(5)
    np.random.seed(1234)
    for corruption in ("gaussian_noise", "impulse_noise", "glass_blur", "frost", "fog"):
        corrupt_image(IMG_32, corruption, 4, seed=99)
    np.testing.assert_array_equal(np.random.random(5), expected)


def test_threads_get_the_same_pixels_as_a_serial_loop() -> None:
    jobs = [("gaussian_noise", s, seed) for s in (1, 5) for seed in range(4)] + [("glass_blur", 2, 3)]
    serial = [corrupt_image(IMG_32, c, s, seed) for c, s, seed in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda j: corrupt_image(IMG_32, *j), jobs))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_image_seed_is_stable_across_processes_and_distinct() -> None:
    seeds = {image_seed(0, f"img{i}", c, s) for i in range(5) for c in ("fog", "snow") for s in (1, 2)}
    assert len(seeds) == 20 and all(0 <= x < 2**32 for x in seeds)
    code = "from core.corrupt import image_seed; print(image_seed(7, 'a/b.jpg', 'fog', 3))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == image_seed(7, "a/b.jpg", "fog", 3)
    assert image_seed(7, "a/b.jpg", "fog", 3) != image_seed(8, "a/b.jpg", "fog", 3)


# -- input forms and errors -------------------------------------------------------------------------------
def test_grey_rgba_and_pil_inputs_become_rgb() -> None:
    grey = picture(40)[..., 0]
    rgb = np.repeat(grey[..., None], 3, axis=2)
    expected = corrupt_image(rgb, "shot_noise", 2, 5)
    np.testing.assert_array_equal(corrupt_image(grey, "shot_noise", 2, 5), expected)
    np.testing.assert_array_equal(corrupt_image(grey[..., None], "shot_noise", 2, 5), expected)
    color = picture(40)
    rgba = np.concatenate([color, np.full((40, 40, 1), 17, np.uint8)], axis=2)
    np.testing.assert_array_equal(corrupt_image(rgba, "fog", 3, 1), corrupt_image(color, "fog", 3, 1))
    np.testing.assert_array_equal(corrupt_image(Image.fromarray(color), "fog", 3, 1),
                                  corrupt_image(color, "fog", 3, 1))


@pytest.mark.parametrize("shape", [(1, 1, 3), (8, 8, 3), (5, 40, 3), (31, 31), (12, 90, 4)])
@pytest.mark.parametrize("corruption", ["gaussian_noise", "glass_blur", "frost", "zoom_blur", "pixelate"])
def test_tiny_images_are_upsampled_and_returned_at_their_size(shape: tuple[int, ...], corruption: str) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = corrupt_image(img, corruption, 5, 3)
    assert out.dtype == np.uint8 and out.shape == (*shape[:2], 3)
    np.testing.assert_array_equal(out, corrupt_image(img, corruption, 5, 3))


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3", None])
def test_bad_severity_is_a_config_error(severity: object) -> None:
    with pytest.raises(ConfigError, match=r"severity must be an integer 1-5; got"):
        corrupt_image(IMG_32, "fog", severity, 0)  # type: ignore[arg-type]


def test_unknown_corruption_lists_the_alternatives() -> None:
    with pytest.raises(UnknownName, match=r"corruption 'gausian_noise' not found \(did you mean 'gaussian_noise'\?\)"
                                          r".*available: .*brightness.*zoom_blur"):
        corrupt_image(IMG_32, "gausian_noise", 1, 0)


@pytest.mark.parametrize("img", [np.zeros((40, 40, 3), np.float32), np.zeros((0, 40, 3), np.uint8),
                                 np.zeros((40, 40, 5), np.uint8), np.zeros((2, 40, 40, 3), np.uint8)],
                         ids=["float", "empty", "5-channels", "batch"])
def test_unusable_images_are_data_errors(img: np.ndarray) -> None:
    with pytest.raises(DataError, match="image"):
        corrupt_image(img, "fog", 1, 0)


def test_a_library_failure_names_the_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    import imagecorruptions

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise ValueError("scikit-image changed again")

    monkeypatch.setattr(imagecorruptions, "corrupt", boom)
    state = np.random.get_state()
    with pytest.raises(DataError, match=r"corruption 'glass_blur' failed at severity 4 .*scikit-image changed"):
        corrupt_image(IMG_32, "glass_blur", 4, 0)
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])


# -- the dataset view and the ImageNet-C tree ------------------------------------------------------------------
def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> Path:
    for k, cls in enumerate(classes):
        for i in range(per_class):
            path = root / cls / f"{cls}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(40, seed=k + i)[:, :36]).save(path)
    return root


@pytest.fixture
def tiny(tmp_path: Path):
    """A workspace with ``tiny``: an image folder of 2 classes x 2 PNGs (40x36)."""
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "tiny", "image_folder", make_folder(tmp_path / "src"), role="benchmark")
    return ws, open_dataset(ws, "tiny")


def test_view_is_a_reproducible_torch_style_dataset(tiny) -> None:
    _, ds = tiny
    view = CorruptedView(ds, "shot_noise", 4, seed=3)
    assert len(view) == 4
    img, label = view[2]
    assert img.dtype == np.uint8 and img.shape == (40, 36, 3) and label == 1
    np.testing.assert_array_equal(img, CorruptedView(ds, "shot_noise", 4, seed=3)[2][0])
    assert not np.array_equal(img, CorruptedView(ds, "shot_noise", 4, seed=4)[2][0])
    rows = list(view)
    assert [r["id"] for r, _ in rows] == ds.index["id"].tolist() and view.report.n_skipped == 0
    np.testing.assert_array_equal(rows[2][1], img)
    source = np.asarray(ds.load_image(ds.index.iloc[2].to_dict()))
    expected = corrupt_image(source, "shot_noise", 4, image_seed(3, rows[2][0]["id"], "shot_noise", 4))
    np.testing.assert_array_equal(img, expected)
    assert CorruptedView(ds, "fog", 1, size=32, transform=lambda a: a.shape)[0] == ((32, 32, 3), 0)
    with pytest.raises(UnknownName):
        CorruptedView(ds, "smog", 1)


def test_view_works_with_a_torch_dataloader(tiny) -> None:
    torch = pytest.importorskip("torch")
    _, ds = tiny
    batch, labels = next(iter(torch.utils.data.DataLoader(CorruptedView(ds, "fog", 2), batch_size=4)))
    assert tuple(batch.shape) == (4, 40, 36, 3) and batch.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 1]


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=C.IMAGENET_C_QUALITY, optimize=True)
    return buf.getvalue()


def test_write_imagenet_c_round_trips_through_the_source(tiny, tmp_path: Path) -> None:
    ws, ds = tiny
    out = tmp_path / "tiny-c"
    report = write_imagenet_c(ds, out, corruptions=("gaussian_noise", "fog"), severities=(1, 5), seed=3)
    assert (report.n_images, report.n_written, report.n_existing, report.n_unreadable) == (4, 16, 0, 0)
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]

    scanned = IssueReport()
    rows = list(ImageNetCSource(out).scan(scanned))
    assert len(rows) == 16 and scanned.n_skipped == 0
    got = {(r["corruption"], r["severity"], r["class_name"], r["label"], Path(r["id"]).name) for r in rows}
    want = {(c, s, cls, k, f"{cls}_{i}.jpeg") for c in ("gaussian_noise", "fog") for s in (1, 5)
            for k, cls in enumerate(("cat", "dog")) for i in range(2)}
    assert got == want
    # the files hold exactly the view's pixels, JPEG-encoded as ImageNet-C
    view = CorruptedView(ds, "fog", 5, seed=3)
    assert (out / "fog" / "5" / "dog" / "dog_1.jpeg").read_bytes() == jpeg_bytes(view[3][0])

    register_dataset(ws, "tiny_c", "imagenet_c", out, role="benchmark")
    index = open_dataset(ws, "tiny_c").index
    assert len(index) == 16 and set(index["corruption"]) == {"gaussian_noise", "fog"}
    assert sorted(index["severity"].unique().tolist()) == [1, 5]


def test_write_imagenet_c_resumes(tiny, tmp_path: Path) -> None:
    ws, _ = tiny
    out = tmp_path / "c"
    kw = {"ws": ws, "corruptions": ("impulse_noise",), "severities": (2, 3), "seed": 0}
    first = write_imagenet_c("tiny", out, **kw)
    assert first.n_written == 8
    victim, truncated = out / "impulse_noise" / "2" / "cat" / "cat_0.jpeg", out / "impulse_noise" / "3" / "dog" / "dog_1.jpeg"
    original = truncated.read_bytes()
    victim.unlink()
    truncated.write_bytes(original[: len(original) // 2])
    (truncated.parent / f".{truncated.name}.tmp-1-dead").write_bytes(b"junk")  # a crashed writer's leftover
    second = write_imagenet_c("tiny", out, **kw)
    assert (second.n_written, second.n_existing) == (2, 6)
    assert truncated.read_bytes() == original and victim.exists()
    assert not list(out.rglob(".*tmp-*"))
    assert write_imagenet_c("tiny", out, **kw).n_written == 0


def test_write_imagenet_c_counts_unreadable_images_and_keeps_labels(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    src = make_folder(tmp_path / "src", classes=("ant", "cat", "dog"), per_class=1)
    register_dataset(ws, "three", "image_folder", src)
    (src / "ant" / "ant_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken after registration")
    report = write_imagenet_c(open_dataset(ws, "three"), tmp_path / "c", corruptions=("contrast",),
                              severities=(1,), progress=True)
    assert (report.n_images, report.n_written, report.n_unreadable) == (3, 2, 1)
    assert report.unreadable.skipped["corrupt_image"] == 1 and "unreadable" in report.summary()
    # without the classes file, 'cat' would become label 0 now that 'ant' has no folder
    rows = list(ImageNetCSource(tmp_path / "c", classes_file=str(tmp_path / "c" / "classes.json")).scan(IssueReport()))
    assert sorted((r["class_name"], r["label"]) for r in rows) == [("cat", 1), ("dog", 2)]


def test_write_imagenet_c_validates_before_writing(tiny, tmp_path: Path) -> None:
    ws, ds = tiny
    with pytest.raises(UnknownName, match="available"):
        write_imagenet_c(ds, tmp_path / "x", corruptions=("fog", "smog"))
    with pytest.raises(ConfigError, match="severity"):
        write_imagenet_c(ds, tmp_path / "x", severities=(0,))
    with pytest.raises(ConfigError, match="ws="):
        write_imagenet_c("tiny", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_center_crop_gives_imagenet_c_geometry(tiny, tmp_path: Path) -> None:
    _, ds = tiny
    report = write_imagenet_c(ds, tmp_path / "c", corruptions=("pixelate",), severities=(5,), size=32)
    assert report.n_written == 4
    with Image.open(tmp_path / "c" / "pixelate" / "5" / "cat" / "cat_0.jpeg") as im:
        assert im.size == (32, 32)
    assert C.center_crop(Image.new("RGB", (300, 500)), 224).size == (224, 224)
