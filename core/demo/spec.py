"""Shared pieces of the demo world generator: world sizes, the build context, parts, random streams.

Every random number of the world comes from ``np.random.default_rng([seed, stream, *ids])`` with a
fixed stream id per purpose (below), never from global state; so a part or a single image can be
rebuilt alone and comes out byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm import tqdm

from core.demo.concepts import Concept, choose_concepts

if TYPE_CHECKING:
    from core.demo.pool import PoolPlan

T = TypeVar("T")

#: Side of the square images of the world (pixels); detection scenes are twice as large.
IMAGE_SIZE = 64
SCENE_SIZE = 128

# Random stream ids (the second entry of every seed sequence). Stream 0 is choose_concepts'.
PLAN, POOL, NEAR, CAPTION, ORDER, LATENT, LATENT_BASIS = 1, 2, 3, 4, 5, 6, 7
REFERENCE, VAL, SKETCH, RENDITION, V2, HARD, DETECTION, RENDITION_CLASSES = 10, 11, 12, 13, 14, 15, 16, 17
DETECTION_TRAIN = 18


@dataclass(frozen=True)
class WorldSize:
    """How big a world is. ``*_per_class`` count images per class; benchmarks share one count.

    ``detection_scenes`` are the detection evaluation scenes, ``detection_train_scenes`` the separate
    training scenes of the demo detector (another random stream: no scene is in both).
    """

    name: str
    n_classes: int
    pool: int
    shard_size: int
    reference_per_class: int
    bench_per_class: int
    detection_scenes: int
    laion_partitions: int
    detection_train_scenes: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.shard_size <= 10_000:
            raise ValueError("shard_size must be in 1..10000 (keys are shard * 10^4 + index)")

    @property
    def n_shards(self) -> int:
        return -(-self.pool // self.shard_size)


SIZES: dict[str, WorldSize] = {
    "tiny": WorldSize("tiny", n_classes=12, pool=2000, shard_size=1000, reference_per_class=20,
                      bench_per_class=10, detection_scenes=40, laion_partitions=2,
                      detection_train_scenes=600),
    "small": WorldSize("small", n_classes=24, pool=20_000, shard_size=10_000, reference_per_class=40,
                       bench_per_class=20, detection_scenes=200, laion_partitions=3,
                       detection_train_scenes=2000),
    "full": WorldSize("full", n_classes=40, pool=100_000, shard_size=10_000, reference_per_class=60,
                      bench_per_class=30, detection_scenes=600, laion_partitions=4,
                      detection_train_scenes=5000),
}


@dataclass
class World:
    """What every part builder gets: the output folder, the size, the seed and derived state."""

    out: Path
    size: WorldSize
    seed: int
    progress: bool = False

    @cached_property
    def concepts(self) -> list[Concept]:
        return choose_concepts(self.seed, self.size.n_classes)

    @cached_property
    def plan(self) -> PoolPlan:
        from core.demo.pool import make_plan

        return make_plan(self)

    @cached_property
    def rendition_classes(self) -> list[int]:
        """The class indices the rendition benchmark covers (about 2/3, like ImageNet-R's 200/1000)."""
        k = self.size.n_classes
        m = max(1, round(k * 2 / 3)) if k > 1 else 1
        pick = self.rng(RENDITION_CLASSES).choice(k, size=m, replace=False)
        return sorted(int(i) for i in pick)

    def rng(self, stream: int, *ids: int) -> np.random.Generator:
        """The generator of one stream (and item ids within it)."""
        return np.random.default_rng([self.seed, stream, *ids])

    def bar(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a tqdm bar when the world was asked for progress."""
        return iter(tqdm(items, desc=desc, total=total, disable=not self.progress, leave=False, unit="img"))


@dataclass(frozen=True)
class Part:
    """A unit of the build that is written completely, then marked done.

    Args:
        name: marker name (``.done/<name>.json``).
        outputs: paths (relative to the world folder) the part writes; deleted before a rebuild.
        build: writes the outputs; returns the part's counts (merged into world.json's counts).
    """

    name: str
    outputs: tuple[str, ...]
    build: Callable[[World], dict[str, Any]]
