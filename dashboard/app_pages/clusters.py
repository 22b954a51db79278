"""Clusters: the concept map of a clustering, each cluster's members and gallery, and text search.

Everything here reads the workspace through :mod:`dashboard.queries`; the only writes are the UMAP
map caches that the "Compute" buttons ask :mod:`core.project` for. A cluster is selected by clicking
the map, clicking a table row, clicking a search hit, or the selector; all four set one session key.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from core.errors import PrunescopeError
from dashboard import charts, queries, widgets
from dashboard.widgets import md_plain

KEY = "clusters_"  # page-local session keys carry this prefix
GALLERY_SIZES = (6, 12, 24)
COLOR_LABELS = {"complexity": "complexity", "size": "size", "d_intra": "spread (d_intra)",
                "truth": "ground-truth concept"}

TABLE = {
    "cluster": st.column_config.NumberColumn("cluster", format="%d"),
    "label": st.column_config.TextColumn("caption terms", width="medium"),
    "vocab_label": st.column_config.TextColumn("best names", width="medium"),
    "truth": st.column_config.TextColumn("ground truth", width="small"),
    "purity": st.column_config.ProgressColumn("purity", format="percent", min_value=0.0, max_value=1.0),
    "size": st.column_config.NumberColumn("members", format="localized"),
    "d_intra": st.column_config.NumberColumn("d_intra", format="%.4f"),
    "d_inter": st.column_config.NumberColumn("d_inter", format="%.4f"),
    "complexity": st.column_config.NumberColumn("complexity", format="%.5f"),
}


def render() -> None:
    root = queries.workspace_root()
    st.title("Clusters")
    info = widgets.clustering_picker(root, key=KEY + "id", empty_hint=(
        "No clusterings yet. Cluster an embedding set with `prunescope cluster EMBEDDING_SET --k 100` "
        "(or build the demo with `prunescope demo`)."))
    if info is None:
        return
    cid = str(info.name)
    try:
        table, composition = _cluster_table(root, cid, str(info["dataset"]))
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    _metrics(root, cid, table)
    _map_section(root, cid, table)
    _table_section(table)
    cluster = _cluster_picker(table)
    _cluster_section(root, cid, str(info["dataset"]), table, composition, cluster)
    _search_section(root, cid, str(info["embedding_set"]), str(info["dataset"]), table)


# -- data ---------------------------------------------------------------------------------------------
def _cluster_table(root: str, cid: str, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The clusters table plus majority ground truth (``truth``, ``purity``) when the pool has one."""
    table = queries.cluster_table(root, cid)
    column = queries.truth_column(root, dataset)
    if column is None:
        return table, None
    comp = queries.truth_composition(root, cid, dataset, column)
    top = comp.groupby("cluster", sort=False).first().rename(columns={"value": "truth", "share": "purity"})
    return table.merge(top[["truth", "purity"]], left_on="cluster", right_index=True, how="left"), comp


def _metrics(root: str, cid: str, table: pd.DataFrame) -> None:
    meta = queries.clustering_meta(root, cid)
    skipped = sum(meta.get("skipped", {}).values())
    cols = st.columns(5)
    cols[0].metric("Clusters", f"{len(table):,}")
    cols[1].metric("Members", f"{int(table['size'].sum()):,}")
    cols[2].metric("Skipped rows", f"{skipped:,}", help="rows with NaN, infinite or zero embeddings")
    cols[3].metric("Median size", f"{int(table['size'].median()):,}")
    if "purity" in table:
        pure = float((table["purity"] * table["size"]).sum() / max(int(table["size"].sum()), 1))
        cols[4].metric("Ground-truth purity", f"{pure:.0%}", help="members sharing their cluster's majority concept")
    else:
        cols[4].metric("Empty clusters", f"{int((table['size'] == 0).sum()):,}")


# -- selection ----------------------------------------------------------------------------------------
def _select(cluster: Any) -> None:
    if cluster is not None:
        st.session_state[KEY + "cluster"] = int(cluster)


def _on_map_select() -> None:
    points = st.session_state.get(KEY + "map", {}).get("selection", {}).get("points", [])
    if points and points[0].get("customdata") is not None:
        data = points[0]["customdata"]
        _select(data[0] if isinstance(data, list) else data)


def _on_table_select(key: str, clusters: list[int]) -> None:
    rows = st.session_state.get(key, {}).get("selection", {}).get("rows", [])
    if rows:
        _select(clusters[rows[0]])


def _cluster_picker(table: pd.DataFrame) -> int:
    """The selected cluster (default: the largest); the selector shows and changes it."""
    clusters = table["cluster"].astype(int).tolist()
    if st.session_state.get(KEY + "cluster") not in clusters:
        st.session_state[KEY + "cluster"] = int(table.sort_values("size", ascending=False)["cluster"].iloc[0])
    names = dict(zip(clusters, table["label"].where(table["label"].notna(), ""), strict=True))
    st.divider()
    return int(st.selectbox("Cluster", clusters, key=KEY + "cluster",
                            format_func=lambda c: f"{c}: {widgets.shorten(names.get(c, ''), 50)}"))


# -- sections -----------------------------------------------------------------------------------------
def _map_section(root: str, cid: str, table: pd.DataFrame) -> None:
    st.subheader("Concept map")
    positions = queries.centroid_map(root, cid)
    if positions is None:
        st.info("The concept map (UMAP of the centroids) has not been computed for this clustering yet.")
        if st.button("Compute the concept map", key=KEY + "compute_map"):
            with st.spinner("Running UMAP on the centroids..."):
                queries.compute_maps(root, cid, clusters=[])
            st.rerun()
        return
    options = [c for c in COLOR_LABELS if c != "truth" or "truth" in table]
    color_by = st.radio("Colour by", options, key=KEY + "color", horizontal=True, format_func=COLOR_LABELS.get)
    df = positions.merge(table, on="cluster", how="inner")
    fig = charts.cluster_map(df, color_by=str(color_by), selected=st.session_state.get(KEY + "cluster"))
    st.plotly_chart(fig, key=KEY + "map", on_select=_on_map_select, selection_mode="points",
                    config={"displaylogo": False})
    st.caption("Click a cluster to open it below. Marker area grows with the number of members.")


def _table_section(table: pd.DataFrame) -> None:
    with st.expander(f"All {len(table):,} clusters (sortable; click a row to open it)", expanded=False):
        cols = [c for c in TABLE if c in table.columns]
        key = KEY + "table"
        st.dataframe(table[cols], key=key, hide_index=True, column_config=TABLE, on_select=lambda: _on_table_select(
            key, table["cluster"].astype(int).tolist()), selection_mode="single-row", width="stretch")


def _cluster_section(root: str, cid: str, dataset: str, table: pd.DataFrame, composition: pd.DataFrame | None,
                     cluster: int) -> None:
    row = table[table["cluster"] == cluster].iloc[0]
    st.subheader(f"Cluster {cluster}")
    st.text(f"caption terms: {row['label'] or '(none)'}")
    if row.get("vocab_label"):
        st.text(f"best-matching names: {row['vocab_label']}")
    _stats(table, row)
    left, right = st.columns([3, 2])
    with left:
        _member_map(root, cid, cluster)
    with right:
        if composition is not None:
            sub = composition[composition["cluster"] == cluster]
            st.plotly_chart(charts.composition(sub, title="Ground truth of its members"), key=KEY + "comp")
    _gallery(root, cid, dataset, cluster, int(row["size"]))


def _stats(table: pd.DataFrame, row: pd.Series) -> None:
    """Where the cluster sits in the whole pool's distribution of size, spread and complexity."""
    cols = st.columns(3)
    for col, (name, title) in zip(cols, (("size", "members"), ("d_intra", "spread (d_intra)"),
                                         ("complexity", "complexity")), strict=True):
        value = float(row[name]) if pd.notna(row[name]) else float("nan")
        below = float((table[name] < value).mean()) if pd.notna(row[name]) else float("nan")
        with col:
            st.metric(title, f"{value:,.0f}" if name == "size" else f"{value:.4f}",
                      help=f"higher than {below:.0%} of clusters" if below == below else None)
            st.plotly_chart(charts.stat_position(table, name, value, title=f"{title}: above {below:.0%}"),
                            key=f"{KEY}stat_{name}", config={"displayModeBar": False})


def _member_map(root: str, cid: str, cluster: int) -> None:
    points = queries.member_map(root, cid, cluster)
    if points is None:
        st.info("The member map of this cluster has not been computed yet.")
        if st.button("Compute the member map", key=KEY + "compute_members"):
            with st.spinner("Running UMAP on the members..."):
                queries.compute_maps(root, cid, clusters=[cluster])
            st.rerun()
        return
    st.plotly_chart(charts.member_map(points, title=f"Members of cluster {cluster} (UMAP)"), key=KEY + "members")


def _gallery(root: str, cid: str, dataset: str, cluster: int, size: int) -> None:
    n = st.segmented_control("Images per end", GALLERY_SIZES, default=12, key=KEY + "n") or 12
    proto, atyp = st.tabs(["Most prototypical (nearest the centroid)", "Most atypical (farthest)"])
    for tab, end in ((proto, "prototypical"), (atyp, "atypical")):
        with tab:
            try:
                rows = queries.members(root, cid, dataset, cluster, end, int(n))
            except PrunescopeError as exc:
                st.error(md_plain(exc.one_line()))
                continue
            rows["note"] = [f"1 - cos = {d:.3f}" for d in rows["dist_to_centroid"]]
            _show_samples(root, dataset, rows, key=f"{KEY}gallery_{end}")
    if size == 0:
        st.caption("This cluster is empty: k-means left no row nearest to its centroid.")


def _show_samples(root: str, dataset: str, rows: pd.DataFrame, *, key: str) -> None:
    """Local images as thumbnails; URL-only pools through the browser; else captions only."""
    try:
        local = queries.dataset_has_images(root, dataset)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    if local:
        widgets.thumbnail_grid(root, dataset, rows, columns=6)
    elif "url" in rows.columns:
        widgets.url_gallery(rows, key=key)
    else:
        st.dataframe(rows[[c for c in ("id", "caption", "note") if c in rows.columns]], hide_index=True, key=key)


def _search_section(root: str, cid: str, embedding_set: str, dataset: str, table: pd.DataFrame) -> None:
    st.divider()
    st.subheader("Search by text")
    text = st.text_input("Describe what to find (through the CLIP text tower)", key=KEY + "query",
                         placeholder="a red triangle")
    if not text.strip():
        return
    try:
        with st.spinner("Encoding the query..."):
            near, samples = queries.text_search(root, cid, embedding_set, text)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    left, right = st.columns([2, 3])
    with left:
        hits = near.merge(table[["cluster", "label", "size"]], on="cluster", how="left")
        key = KEY + "search_clusters"
        st.dataframe(hits, key=key, hide_index=True, on_select=lambda: _on_table_select(
            key, hits["cluster"].astype(int).tolist()), selection_mode="single-row", column_config={
                "similarity": st.column_config.NumberColumn("cosine", format="%.3f"),
                "label": st.column_config.TextColumn("caption terms"),
                "size": st.column_config.NumberColumn("members", format="localized")})
        st.caption("Click a row to open that cluster above.")
    with right:
        index = queries.dataset_handle(root, dataset).index
        rows = index.iloc[samples["row"].to_numpy()].reset_index(drop=True)
        rows = rows.astype(object).where(rows.notna(), None)
        rows["note"] = [f"cluster {c} · cos {s:.3f}" for c, s in zip(samples["cluster"], samples["similarity"],
                                                                     strict=True)]
        _show_samples(root, dataset, rows.head(12), key=KEY + "search_gallery")


if __name__ == "__main__":
    render()
