"""Reusable dashboard pieces: the thumbnail grid and plain-text rendering of user text.

Everything a user's data controls (captions, class names, dataset names, ids) is shown with
``st.text`` / ``st.dataframe``, which never interpret Markdown or HTML, so a caption like
``[click](http://evil)`` or ``<script>`` appears literally. Never pass user text to ``st.markdown``,
``st.caption`` or a widget label, and never use ``unsafe_allow_html``.
"""

from __future__ import annotations

import io
import logging
import string
from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st
from PIL import Image, ImageOps

from core.errors import PrunescopeError
from core.sources import SampleError
from dashboard import queries

log = logging.getLogger(__name__)

THUMB_PX = 160
PLACEHOLDER_RGB = (214, 217, 224)
TILE_RGB = (243, 245, 250)  # the theme's secondary background
CAPTION_CHARS = 90


def shorten(text: object, limit: int = CAPTION_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters (an ellipsis marks a cut)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@st.cache_data(ttl=600, max_entries=5000, show_spinner=False)
def thumbnail(root: str, dataset: str, sample_id: str, _row: Mapping[str, Any],
              size: int = THUMB_PX) -> tuple[bytes | None, str]:
    """A square JPEG thumbnail of one sample (``size`` px, letterboxed), or (None, why it cannot be shown).

    Cached per (workspace, dataset, id, size); ``_row`` (the index row) is not part of the key.
    The image is read through the dataset's source, which only reads inside the registered root.
    """
    try:
        image = queries.dataset_handle(root, dataset).load_image(_row)
        # Fit the tile both ways: shrink large images, enlarge small ones (64 px demo images, CIFAR).
        scale = size / max(image.width, image.height)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
        # Centred on a square tile so the grid's rows line up whatever the aspect ratios.
        tile = Image.new("RGB", (size, size), TILE_RGB)
        tile.paste(image.convert("RGB"), ((size - image.width) // 2, (size - image.height) // 2))
        image = tile
    except SampleError as exc:
        return None, exc.reason.replace("_", " ")
    except PrunescopeError as exc:
        return None, exc.one_line()
    except Exception as exc:  # noqa: BLE001  a broken sample must cost one grey tile, never the page
        log.warning("thumbnail of %s/%s failed", dataset, sample_id, exc_info=True)
        return None, f"cannot read ({type(exc).__name__})"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), ""


@st.cache_data(show_spinner=False)
def placeholder(size: int = THUMB_PX) -> bytes:
    """A plain grey square shown in place of an image that cannot be read."""
    img = ImageOps.expand(Image.new("RGB", (size - 8, size - 8), PLACEHOLDER_RGB), border=4, fill=(190, 194, 204))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_grid(root: str, dataset: str, rows: pd.DataFrame, *, columns: int = 6) -> None:
    """Thumbnails of ``rows`` (index rows of ``dataset``) with class name and caption as plain text."""
    if rows.empty:
        st.info("This dataset has no readable samples to show.")
        return
    records = rows.to_dict("records")
    for start in range(0, len(records), columns):
        cells = st.columns(columns, gap="small")
        for cell, row in zip(cells, records[start : start + columns], strict=False):
            with cell:
                sample_tile(root, dataset, row)


#: URL schemes the browser may load gallery images from (never javascript:, data:, file:).
URL_SCHEMES = ("http://", "https://")


def safe_url(value: object) -> str | None:
    """``value`` when it is an http(s) URL without whitespace or quotes, else None."""
    if not isinstance(value, str):
        return None
    url = value.strip()
    if not url.lower().startswith(URL_SCHEMES) or any(c.isspace() or c in "\"'<>" for c in url):
        return None
    return url


def url_gallery(rows: pd.DataFrame, *, key: str) -> None:
    """Images of a URL-only pool (LAION-style), loaded by the user's browser straight from their URLs.

    A dead link leaves its image cell empty (the row, its caption and the link stay); URLs that are
    not http(s) are not loaded at all. Captions are plain text cells.
    """
    if rows.empty:
        st.info("No samples to show.")
        return
    urls = [safe_url(u) for u in rows.get("url", pd.Series([None] * len(rows)))]
    table = pd.DataFrame({
        "image": urls,
        "caption": [shorten(c) if c else "(no caption)" for c in rows.get("caption", [None] * len(rows))],
        "note": [str(n) if n else "" for n in rows.get("note", [None] * len(rows))],
        "link": urls,
    })
    st.dataframe(table, key=key, hide_index=True, width="stretch", row_height=96, column_config={
        "image": st.column_config.ImageColumn("image", width="small"),
        "caption": st.column_config.TextColumn("caption", width="large"),
        "note": st.column_config.TextColumn("", width="small"),
        "link": st.column_config.LinkColumn("url", width="medium"),
    })


def sample_tile(root: str, dataset: str, row: Mapping[str, Any], *, title: str | None = None) -> None:
    """One sample in a bordered tile: its thumbnail (or, for a URL-only pool, its http(s) image loaded by
    the browser), class, caption and ``row["note"]``, all as plain text."""
    with st.container(border=True):
        if title:
            st.text(title)
        data, reason = thumbnail(root, dataset, str(row["id"]), row)
        url = safe_url(row.get("url"))
        if data is None and url and not queries.dataset_has_images(root, dataset):
            st.image(url, width="stretch")
        elif data is None:
            st.image(placeholder(), width="stretch")
            st.text(f"unreadable: {shorten(reason, 80)}")
        else:
            st.image(data, width="stretch")
        if row.get("class_name"):
            st.text(f"class: {shorten(row['class_name'], 40)}")
        caption = row.get("caption")
        st.text(shorten(caption) if caption else "(no caption)")
        if row.get("note"):
            st.text(shorten(row["note"], 60))


def clustering_picker(root: str, *, key: str, empty_hint: str) -> pd.Series | None:
    """The clustering selector shared by the pages that work on one: its catalog row (``id``,
    ``embedding_set``, ``dataset``, ...), or None after showing the error or ``empty_hint``."""
    try:
        clusterings = queries.clusterings(root)
    except PrunescopeError as exc:
        st.error(exc.one_line())
        return None
    if clusterings.empty:
        st.info(empty_hint)
        return None
    cid = st.selectbox("Clustering", clusterings["id"].tolist(), key=key)
    return clusterings.set_index("id").loc[cid].rename(cid)


def param_form(params: Any, *, key: str, skip: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One widget per registry ParamSpec (slider, number, choice, toggle); returns ``{name: value}``.

    Widget ``f"{key}_{name}"`` starts at the spec's default unless its session key is already set (a
    page may pre-fill it, e.g. from a saved config). A parameter whose default is None and that is not
    required gets a toggle ``f"{key}_{name}_on"``; off means None (the method then uses its other
    option, e.g. clip_score's threshold vs keep_fraction). Labels are the specs' names (code-defined,
    never user data).
    """
    out: dict[str, Any] = {}
    for spec in params:
        if spec.name in skip:
            continue
        default = (defaults or {}).get(spec.name, spec.default)
        wkey = f"{key}_{spec.name}"
        if default is None and not spec.required:
            st.session_state.setdefault(wkey + "_on", False)
            if not st.toggle(f"set {spec.name}", key=wkey + "_on", help=spec.help):
                out[spec.name] = None
                continue
            default = spec.min if spec.min is not None else 0
        out[spec.name] = _param_widget(spec, default, wkey)
    return out


def _param_widget(spec: Any, default: Any, key: str) -> Any:
    """The widget of one spec; its session value is seeded with ``default`` (made valid for the widget)."""
    if spec.kind == "choice":
        st.session_state.setdefault(key, default)
        return st.selectbox(spec.name, list(spec.choices), key=key, help=spec.help)
    if spec.kind == "bool":
        st.session_state.setdefault(key, bool(default))
        return st.toggle(spec.name, key=key, help=spec.help)
    if spec.kind == "float" and spec.ticks:
        steps = spec.ticks
        current = st.session_state.get(key, default)
        st.session_state[key] = min(steps, key=lambda v: abs(v - float(current if current is not None else default)))
        return st.select_slider(spec.name, options=list(steps), key=key, help=spec.help, format_func=lambda v: f"{v:g}")
    if spec.kind == "float" and spec.min is not None and spec.max is not None:
        st.session_state.setdefault(key, float(default))
        return st.slider(spec.name, float(spec.min), float(spec.max), step=(spec.max - spec.min) / 100, key=key,
                         help=spec.help)
    if spec.kind in ("int", "float"):
        cast = int if spec.kind == "int" else float
        st.session_state.setdefault(key, cast(default))
        return st.number_input(spec.name, min_value=None if spec.min is None else cast(spec.min),
                               max_value=None if spec.max is None else cast(spec.max), key=key, help=spec.help)
    st.session_state.setdefault(key, "" if default is None else str(default))
    return st.text_input(spec.name, key=key, help=spec.help) or None


#: Characters Markdown (and Streamlit's ``:color[...]`` / ``:icon:`` directives) may interpret.
_MD_SPECIAL = frozenset(string.punctuation)


def md_plain(text: object) -> str:
    """``text`` with every ASCII punctuation character backslash-escaped, for the few elements that render
    Markdown (``st.error``/``st.warning``/``st.info``): an error message can quote a file name, a caption or
    what was typed into a form, and must stay text (no link, no emphasis, no directive, no HTML)."""
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in str(text))


def show_error(exc: PrunescopeError, where: Any = None) -> None:
    """``exc``'s one-line message as an error box (in ``where``, a container, or the page), as plain text."""
    (where or st).error(md_plain(exc.one_line()))

