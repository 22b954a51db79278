"""Small builders of on-disk datasets in every format the sources read (all in ``tmp_path``).

Each builder writes a few tiny images/arrays and returns what a test needs to check the result.
:data:`SOURCE_CASES` maps every registered source kind to a builder of a small valid dataset, so the
contract test in ``test_contract.py`` covers a new source as soon as it registers and has a case here.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.workspace import Workspace


# -- image bytes -------------------------------------------------------------------------------------
def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small solid-colour image encoded as ``fmt`` (JPEG, PNG, WEBP)."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~60-byte PNG whose header claims ``width`` x ``height`` pixels (never decodable, never decoded)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def corrupt_jpeg() -> bytes:
    """A JPEG whose headers are intact and whose entropy-coded data is random bytes."""
    data = image_bytes("JPEG", (64, 64))
    sos = data.index(b"\xff\xda")
    return data[:sos] + np.random.default_rng(0).integers(0, 256, len(data) - sos, dtype=np.uint8).tobytes()


def corrupt_png() -> bytes:
    """A PNG with one flipped byte in its IDAT chunk (the chunk checksum no longer matches)."""
    data = image_bytes("PNG", (64, 64))
    i = data.index(b"IDAT") + 6
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def truncated_jpeg() -> bytes:
    """A real JPEG cut in the middle of its entropy-coded data."""
    data = image_bytes("JPEG", (64, 64))
    return data[: len(data) // 2]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- image folders ------------------------------------------------------------------------------------
def make_image_folder(root: Path, classes: Sequence[str] = ("cat", "dog"), per_class: int = 2,
                      captions: bool = False) -> Path:
    """``root/<class>/<i>.jpg`` (+ ``<i>.txt`` captions), each class a different colour."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write(root / name / f"{i}.jpg", image_bytes(color=(20 * c % 255, 100, 7 * i)))
            if captions:
                write(root / name / f"{i}.txt", f"a photo of a {name} number {i}\n".encode())
    return root


# -- parquet -------------------------------------------------------------------------------------------
def write_parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def make_local_parquet(root: Path, n: int = 4) -> Path:
    """``root/meta.parquet`` with ``image_path``/``caption``/``similarity`` and ``root/img/<i>.png``."""
    for i in range(n):
        write(root / "img" / f"{i}.png", image_bytes("PNG", color=(i * 40, 0, 0)))
    return write_parquet(root / "meta.parquet", {
        "key": [f"k{i}" for i in range(n)],
        "image_path": [f"img/{i}.png" for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
        "similarity": [0.3 + i / 100 for i in range(n)],
    })


def make_url_parquet(path: Path, n: int = 5) -> Path:
    """LAION-400M style URL+text parquet (upper-case columns, NSFW, similarity)."""
    return write_parquet(path, {
        "SAMPLE_ID": list(range(100, 100 + n)),
        "URL": [f"https://example.com/{i}.jpg" for i in range(n)],
        "TEXT": [f"text {i}" for i in range(n)],
        "HEIGHT": [64] * n, "WIDTH": [48] * n,
        "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * n,
        "similarity": [0.31] * n,
    })


# -- webdataset ----------------------------------------------------------------------------------------
def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar with ``members`` (name, data) in this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def wds_sample(key: str, *, caption: str | None = "a caption", meta: dict[str, Any] | None = None,
               image: bytes | None = None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    """The members of one img2dataset sample: ``{key}.jpg``, ``{key}.txt``, ``{key}.json``."""
    out = [(f"{key}.{ext}", image if image is not None else image_bytes())]
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    out.append((f"{key}.json", json.dumps(meta if meta is not None else {"key": key, "status": "success"}).encode()))
    return out


def make_webdataset(root: Path, shards: Sequence[int] = (0, 1), per_shard: int = 3) -> dict[str, bytes]:
    """img2dataset-style shards ``root/{shard:05d}.tar``; returns key -> image bytes."""
    images: dict[str, bytes] = {}
    for shard in shards:
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            images[key] = image_bytes(color=(shard * 50 % 255, i * 60, 9))
            members += wds_sample(key, caption=f"shard {shard} sample {i}", image=images[key],
                                  meta={"key": key, "url": f"https://x/{key}.jpg", "width": 16, "height": 12,
                                        "exif": None, "nested": {"a": 1}})
        write_tar(root / f"{shard:05d}.tar", members)
    return images


# -- laion embedding releases ------------------------------------------------------------------------------
def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_laion(root: Path, parts: dict[str, int] | None = None, dim: int = 8, text: bool = True,
               meta_dir: str = "metadata", seed: int = 0) -> dict[str, np.ndarray]:
    """A clip-retrieval release: partition label (as in the file name) -> rows; returns the img arrays."""
    rng = np.random.default_rng(seed)
    parts = parts if parts is not None else {"0": 3, "1": 2}
    out = {}
    for p, n in parts.items():
        (root / "img_emb").mkdir(parents=True, exist_ok=True)
        out[p] = unit_rows(rng, n, dim)
        np.save(root / "img_emb" / f"img_emb_{p}.npy", out[p])
        if text:
            (root / "text_emb").mkdir(parents=True, exist_ok=True)
            np.save(root / "text_emb" / f"text_emb_{p}.npy", unit_rows(rng, n, dim))
        write_parquet(root / meta_dir / f"metadata_{p}.parquet", {
            "image_path": [f"{int(p):05d}{i:04d}" for i in range(n)],
            "caption": [f"laion caption {p}/{i}" for i in range(n)],
            "url": [f"https://laion.example/{p}/{i}.jpg" for i in range(n)],
            "NSFW": ["UNLIKELY"] * n,
            "similarity": [0.33] * n,
        })
    return out


# -- corruption benchmarks ------------------------------------------------------------------------------
def make_imagenet_c(root: Path, corruptions: Sequence[str] = ("fog", "snow"), severities: Sequence[int] = (1, 2),
                    classes: Sequence[str] = ("n01440764", "n01443537"), per_class: int = 1) -> Path:
    for c in corruptions:
        for s in severities:
            for k, wnid in enumerate(classes):
                for i in range(per_class):
                    write(root / c / str(s) / wnid / f"ILSVRC2012_val_{k}{i:07d}.JPEG",
                          image_bytes(color=(s * 40, k * 90, i)))
    return root


def make_cifar_c(root: Path, corruptions: Sequence[str] = ("fog", "snow"), block: int = 3,
                 n_classes: int = 10) -> dict[str, np.ndarray]:
    """``<corruption>.npy`` uint8 (5*block, 32, 32, 3) + ``labels.npy``; returns the arrays."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    labels = np.tile(np.arange(block) % n_classes, 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    out = {}
    for c in corruptions:
        out[c] = rng.integers(0, 256, size=(5 * block, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{c}.npy", out[c])
    return out


# -- one small valid dataset per registered source kind ---------------------------------------------------
@dataclass
class SourceCase:
    """A built dataset: where it is, the options to read it with, and the rows a scan must yield."""

    uri: Path
    n_samples: int
    options: dict[str, Any] = field(default_factory=dict)
    has_images: bool = True
    labelled: bool = False


def _case_image_folder(tmp: Path) -> SourceCase:
    return SourceCase(make_image_folder(tmp / "folder", per_class=2, captions=True), 4, labelled=True)


def _case_parquet(tmp: Path) -> SourceCase:
    make_local_parquet(tmp / "pq", n=3)
    return SourceCase(tmp / "pq", 3)


def _case_webdataset(tmp: Path) -> SourceCase:
    make_webdataset(tmp / "wds", shards=(0, 1), per_shard=2)
    return SourceCase(tmp / "wds", 4)


def _case_laion(tmp: Path) -> SourceCase:
    make_laion(tmp / "laion", {"0": 3, "1": 2})
    return SourceCase(tmp / "laion", 5, has_images=False)


def _case_imagenet_c(tmp: Path) -> SourceCase:
    return SourceCase(make_imagenet_c(tmp / "inc"), 8, labelled=True)


def _case_cifar_c(tmp: Path) -> SourceCase:
    make_cifar_c(tmp / "cc", ("fog",), block=2)
    return SourceCase(tmp / "cc", 10, labelled=True)


SOURCE_CASES: dict[str, Callable[[Path], SourceCase]] = {
    "image_folder": _case_image_folder,
    "parquet": _case_parquet,
    "webdataset": _case_webdataset,
    "laion": _case_laion,
    "imagenet_c": _case_imagenet_c,
    "cifar_c": _case_cifar_c,
}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A fresh workspace in ``tmp_path/ws``."""
    return Workspace(tmp_path / "ws")


@pytest.fixture
def build() -> Any:
    """The builders of this module, as attributes (``build.image_bytes(...)``, ``build.make_laion(...)``)."""
    import sys

    return sys.modules[__name__]
