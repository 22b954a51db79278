"""A small generic registry: name -> object, with metadata the dashboard renders as forms.

Every family of pluggable things (data sources, pruning methods, losses, corruptions, adaptation
methods) gets one :class:`Registry`. Looking up an unknown name fails loudly and lists the
alternatives (cleanlab / timm style)::

    SOURCES = Registry("data source")

    @SOURCES.register("image_folder", summary="class sub-folders or a flat folder")
    class ImageFolderSource: ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from core.errors import ConfigError, UnknownName

T = TypeVar("T")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a registered entry, enough to draw a form widget and validate a value.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``str``, ``choice``, ``path``. ``ticks`` are the
    values a form's slider offers when the useful ones span decades (e.g. SemDeDup's eps); any value in
    [min, max] stays valid.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()
    required: bool = False
    ticks: tuple[float, ...] = ()

    def validate(self, value: Any) -> Any:
        """Returns the value coerced to ``kind``; raises ConfigError when it is out of range."""
        if value is None:
            if self.required:
                raise ConfigError(f"parameter '{self.name}' is required")
            return self.default
        value = self._coerce(value)
        if self.kind == "choice" and value not in self.choices:
            opts = ", ".join(map(str, self.choices))
            raise ConfigError(f"parameter '{self.name}' must be one of {opts}; got {value!r}")
        if self.min is not None and value < self.min:
            raise ConfigError(f"parameter '{self.name}' must be >= {self.min}; got {value}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"parameter '{self.name}' must be <= {self.max}; got {value}")
        return value

    def _coerce(self, value: Any) -> Any:
        try:
            if self.kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return int(value)
            if self.kind == "float":
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
                if out != out:  # NaN
                    raise ValueError
                return out
            if self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() in {"1", "true", "yes", "on"}:
                        return True
                    if value.lower() in {"0", "false", "no", "off"}:
                        return False
                    raise ValueError
                return bool(value)
            if self.kind in {"str", "path", "choice"}:
                return value if self.kind == "choice" and not isinstance(value, str) else str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter '{self.name}' must be a {self.kind}; got {value!r}") from None
        raise ConfigError(f"parameter '{self.name}' has an unknown kind {self.kind!r}")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object and its metadata."""

    name: str
    obj: T
    summary: str = ""
    paper: str = ""
    params: tuple[ParamSpec, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def validate_params(self, values: dict[str, Any]) -> dict[str, Any]:
        """Returns every parameter resolved (defaults filled in); unknown names raise ConfigError."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) for '{self.name}': {', '.join(unknown)}; "
                f"known: {', '.join(known) or 'none'}"
            )
        return {name: spec.validate(values.get(name)) for name, spec in known.items()}


class Registry(Generic[T]):
    """Name -> :class:`Entry`. ``what`` names the family in error messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        *,
        summary: str = "",
        paper: str = "",
        params: Sequence[ParamSpec] = (),
        **extra: Any,
    ) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; registering a name twice is an error."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = Entry(name, obj, summary, paper, tuple(params), dict(extra))
            return obj

        return deco

    def entry(self, name: str) -> Entry[T]:
        """Returns the entry; raises UnknownName listing the alternatives (closest first)."""
        try:
            return self._entries[name]
        except KeyError:
            names = sorted(self._entries)
            close = difflib.get_close_matches(str(name), names, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise UnknownName(
                f"{self.what} '{name}' not found{guess}; available: {', '.join(names) or 'none'}"
            ) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
