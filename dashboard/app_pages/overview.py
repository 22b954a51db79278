"""Overview: what the workspace holds (datasets, their skips, a look at samples) and the runs so far."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.errors import PrunescopeError
from dashboard import charts, queries, widgets
from dashboard.widgets import md_plain

N_THUMBS = 12

DATASET_TABLE = {
    "name": st.column_config.TextColumn("name"),
    "kind": st.column_config.TextColumn("kind"),
    "role": st.column_config.TextColumn("role"),
    "n_samples": st.column_config.NumberColumn("samples", format="localized"),
    "n_skipped": st.column_config.NumberColumn("skipped", format="localized"),
    "n_classes": st.column_config.NumberColumn("classes"),
    "has_captions": st.column_config.CheckboxColumn("captions"),
    "created_at": st.column_config.DatetimeColumn("registered", format="YYYY-MM-DD HH:mm"),
}
ISSUE_TABLE = {
    "reason": st.column_config.TextColumn("reason"),
    "action": st.column_config.TextColumn("action"),
    "count": st.column_config.NumberColumn("entries"),
    "meaning": st.column_config.TextColumn("meaning", width="large"),
    "example": st.column_config.TextColumn("example", width="medium"),
}


def render() -> None:
    root = queries.workspace_root()
    st.title("Overview")
    try:
        counts = queries.summary(root)
        datasets = queries.datasets(root)
        issues = queries.issues(root)
        runs = queries.runs(root)
        zeroshot = queries.zeroshot_results(root)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    _metrics(counts)
    if datasets.empty:
        st.info("No datasets registered yet. Build the demo with `prunescope demo`, or register your own data "
                "with `prunescope datasets add NAME KIND PATH`.")
    else:
        _datasets_section(datasets, issues)
        _models_section(zeroshot)
        _inspect_section(root, datasets)
    _runs_section(runs)


def _metrics(counts: dict[str, int]) -> None:
    cols = st.columns(4)
    cols[0].metric("Datasets", f"{counts['datasets']:,}")
    cols[1].metric("Samples", f"{counts['samples']:,}")
    cols[2].metric("Skipped", f"{counts['skipped']:,}")
    cols[3].metric("Runs", f"{counts['runs']:,}")


def _datasets_section(datasets: pd.DataFrame, issues: pd.DataFrame) -> None:
    st.subheader("Datasets")
    st.dataframe(datasets, column_config=DATASET_TABLE, hide_index=True, width="stretch")
    left, right = st.columns([3, 2])
    left.plotly_chart(charts.samples_per_dataset(datasets), width="stretch", theme=None)
    right.plotly_chart(charts.skip_reasons(issues), width="stretch", theme=None)


def _models_section(zeroshot: pd.DataFrame) -> None:
    st.subheader("Models")
    if zeroshot.empty:
        st.info("No model evaluated yet. `prunescope eval zeroshot DATASET ...` (or `prunescope demo`) adds "
                "zero-shot accuracy here.")
        return
    table = zeroshot.pivot_table(index=["model", "dataset"], columns="metric", values="value").reset_index()
    table = table.merge(zeroshot[["dataset", "n_classes"]].drop_duplicates("dataset"), on="dataset", how="left")
    table["chance"] = 1.0 / table["n_classes"]
    classes = table["n_classes"].dropna().unique()
    chance = 1.0 / float(classes[0]) if len(classes) == 1 else None
    left, right = st.columns([3, 2])
    left.plotly_chart(charts.zeroshot_accuracy(zeroshot, chance=chance), width="stretch", theme=None)
    right.dataframe(table, hide_index=True, width="stretch", column_config={
        "model": st.column_config.TextColumn("model"),
        "dataset": st.column_config.TextColumn("benchmark"),
        "zeroshot_top1": st.column_config.NumberColumn("top-1", format="percent"),
        "zeroshot_top5": st.column_config.NumberColumn("top-5", format="percent"),
        "n_classes": st.column_config.NumberColumn("classes"),
        "chance": st.column_config.NumberColumn("chance", format="percent"),
    })


def _inspect_section(root: str, datasets: pd.DataFrame) -> None:
    st.subheader("Inspect a dataset")
    name = st.selectbox("Dataset", datasets["name"].tolist(), key="overview_dataset")
    if name is None:
        return
    try:
        issues = queries.issues(root, name)
        has_images = queries.dataset_has_images(root, name)
        rows = queries.sample_rows(root, name, N_THUMBS) if has_images else None
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    if issues.empty:
        st.success("Registration skipped or repaired nothing in this dataset.")
    else:
        st.dataframe(issues.drop(columns=["dataset"]), column_config=ISSUE_TABLE, hide_index=True, width="stretch")
    if rows is None:
        st.info("This dataset has no images to show (embeddings only).")
    else:
        st.caption(f"A fixed random sample of up to {N_THUMBS} readable samples, with class and caption.")
        widgets.thumbnail_grid(root, name, rows)


def _runs_section(runs: pd.DataFrame) -> None:
    st.subheader("Runs so far")
    if runs.empty:
        st.info("No runs yet. Training and evaluation runs appear here once launched "
                "(`prunescope demo` runs every stage on the demo world).")
        return
    st.dataframe(runs, hide_index=True, width="stretch")


if __name__ == "__main__":
    render()
