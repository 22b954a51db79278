"""Dashboard entry point: ``streamlit run dashboard/app.py`` (or ``prunescope serve``).

Sets up the page, the shared sidebar (workspace in use, schema version) and the navigation built from
:data:`dashboard.app_pages.PAGES`. A workspace without a catalog gets a message saying how to build
one; a catalog this code cannot read gets a one-line error. Pages run only when the catalog is usable.
A page that fails anyway (a damaged file nobody anticipated) shows one line saying what failed, with the
traceback in the server log only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import streamlit as st

from core.errors import PrunescopeError
from dashboard import queries
from dashboard.app_pages import PAGES
from dashboard.widgets import md_plain

if TYPE_CHECKING:
    from streamlit.navigation.page import StreamlitPage

log = logging.getLogger("prunescope.dashboard")

st.set_page_config(page_title="prunescope", page_icon="✂️", layout="wide")


def _navigation() -> StreamlitPage:
    pages = [st.Page(p.path, title=p.title, icon=p.icon, url_path=p.url_path, default=p.default) for p in PAGES]
    return st.navigation(pages, position="sidebar")


def _catalog_ready(root: str) -> bool:
    """Show why the catalog cannot be used (in the main area) and return False; True when it can."""
    if not queries.catalog_exists(root):
        st.sidebar.caption("No catalog yet")
        st.title("prunescope")
        st.info(
            "This workspace has no catalog yet. Build the demo world and serve the dashboard with "
            "`make run`, or build it with `prunescope demo` (add `--workspace DIR` for another folder), "
            "then reload this page. The workspace in use is shown in the sidebar; choose another with "
            "the `PRUNESCOPE_WORKSPACE` environment variable.",
            icon=":material/info:",
        )
        return False
    try:
        version = queries.schema_version(root)
    except PrunescopeError as exc:
        st.sidebar.caption("Catalog unreadable")
        st.title("prunescope")
        st.error(md_plain(exc.one_line()), icon=":material/error:")
        return False
    st.sidebar.caption(f"Catalog schema v{version}")
    return True


def main() -> None:
    page = _navigation()
    root = queries.workspace_root()
    with st.sidebar:
        st.caption("Workspace")
        st.code(root, language=None, wrap_lines=True)
    if _catalog_ready(root):
        _run_guarded(page)


def _run_guarded(page: StreamlitPage) -> None:
    """Run ``page``; an error it did not handle becomes one line (Streamlit's own rerun/stop signals are
    BaseExceptions and pass through)."""
    try:
        page.run()
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()), icon=":material/error:")
    except Exception as exc:  # noqa: BLE001 - the last guard: a traceback never reaches the browser
        log.exception("page %s failed", page.title)
        st.error(md_plain(f"This page could not be drawn: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}. "
                          "The details are in the server log; a damaged workspace file is the usual cause "
                          "(re-run the stage that wrote it)."), icon=":material/error:")


main()
