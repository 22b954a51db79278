"""The demo world: a deterministic, offline, LAION-like world to run every stage on.

``core.demo.world.generate_world`` builds it (see that module for the layout); ``core.demo.pipeline``
runs the project's stages on it. Names are re-exported lazily so importing ``core.demo.pipeline``
does not load the generator.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SIZES", "WORLD_VERSION", "generate_world"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from core.demo import world

        return getattr(world, name)
    raise AttributeError(f"module 'core.demo' has no attribute {name!r}")
