"""Dashboard entry point: ``streamlit run dashboard/app.py`` (or ``prunescope serve``).

Sets up the page, the shared sidebar (workspace in use, schema version) and the navigation built from
:data:`dashboard.app_pages.PAGES`. A workspace without a catalog gets a message saying how to build
one; a catalog this code cannot read gets a one-line error. Pages run only when the catalog is usable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import streamlit as st

from core.errors import PrunescopeError
from dashboard import queries
from dashboard.app_pages import PAGES

if TYPE_CHECKING:
    from streamlit.navigation.page import StreamlitPage

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
        st.error(exc.one_line(), icon=":material/error:")
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
        page.run()


main()
