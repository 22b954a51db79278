"""The dashboard's pages, as data: ``app.py`` turns each entry into an ``st.Page``.

Adding a page is one line here plus its file in this folder; the AppTest smoke test in
``tests/dashboard/test_pages.py`` parametrizes over :data:`PAGES`, so a new page is tested the moment
it is listed. Each page file renders under ``if __name__ == "__main__":`` (Streamlit runs page files
as ``__main__``), so importing one has no side effects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageSpec:
    """One navigation entry.

    Attributes:
        path: the page file, relative to ``dashboard/`` (the entry point's folder).
        title: shown in the navigation and the browser tab.
        icon: a Material icon (``:material/name:``).
        url_path: the page's URL segment.
        default: the page shown at ``/``.
    """

    path: str
    title: str
    icon: str
    url_path: str
    default: bool = False


PAGES: tuple[PageSpec, ...] = (
    PageSpec("app_pages/overview.py", "Overview", ":material/dashboard:", "overview", default=True),
    PageSpec("app_pages/clusters.py", "Clusters", ":material/bubble_chart:", "clusters"),
    PageSpec("app_pages/pruning.py", "Pruning", ":material/content_cut:", "pruning"),
    PageSpec("app_pages/similarity.py", "Similarity", ":material/compare_arrows:", "similarity"),
    PageSpec("app_pages/runs.py", "Runs", ":material/play_circle:", "runs"),
    PageSpec("app_pages/robustness.py", "Robustness", ":material/shield:", "robustness"),
)
