"""Pure chart builders of the Robustness page: DataFrames in, Plotly figures (or chart data) out.

No Streamlit here (``tests/dashboard/test_robustness_charts.py`` tests each function on its own). Model,
run and corruption names are user-controlled text and pass through :func:`dashboard.charts.plain`.
Published numbers are always drawn apart from the user's (their own panel, hatched, "published, <source>"
in the legend), never mixed into the same bars.

Errors and headlines are in % (lower = better); a gain is ``headline(none) - headline(method)`` in points
(positive = the adaptation helps); a difference is ``B - A`` in points (negative = B is better).
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.corrupt import HOLDOUT_CORRUPTIONS, TEST_CORRUPTIONS
from dashboard.charts import (
    CATEGORY_COLORS,
    KEPT_COLOR,
    OTHER_COLOR,
    REMOVED_COLOR,
    _layout,
    empty_figure,
    plain,
)

#: Adaptation methods in display order (the source model first) and their colours.
ADAPTATIONS = ("none", "bn", "tent", "ent", "hard_pl", "soft_pl", "rpl")
ADAPTATION_COLORS = {"none": "#5B6070", "bn": "#4C5FD5", "tent": "#E8833A", "ent": "#3AA57A", "hard_pl": "#B5478C",
                     "soft_pl": "#2E9BC4", "rpl": "#8A6D3B"}
#: Hatching of published bars, one shape per source (cycled).
PUBLISHED_PATTERNS = ("/", "\\", "x", "-", "|", "+", ".")
PUBLISHED_COLORS = ("#8A8FA3", "#A7ACBD", "#6F7487", "#BFC3D0")
#: Hatching of a bar whose grid is incomplete (a partial mean).
PARTIAL_PATTERN = "."
ERROR_SCALE = "YlOrRd"
#: Tiles of cells a grid lacks.
MISSING_COLOR = "#E4E6EC"


def adaptation_order(names: object) -> list[str]:
    """The distinct adaptation names: :data:`ADAPTATIONS` order first, then others alphabetically."""
    present = set(map(str, names))  # type: ignore[call-overload]
    return [a for a in ADAPTATIONS if a in present] + sorted(present - set(ADAPTATIONS))


def adaptation_color(name: str, order: list[str]) -> str:
    """The method's colour; unknown methods cycle through the category colours."""
    return ADAPTATION_COLORS.get(name) or CATEGORY_COLORS[order.index(name) % len(CATEGORY_COLORS)]


def corruption_label(name: str) -> str:
    """``name`` escaped, hold-out corruptions marked ``(hold-out)``."""
    return plain(name) + (" (hold-out)" if name in HOLDOUT_CORRUPTIONS else "")


def wrap(text: object, width: int = 10, max_lines: int = 3, cut: int = 14) -> str:
    """``text`` escaped and broken into at most ``max_lines`` lines of about ``width`` characters (at spaces;
    words longer than ``cut`` are cut), for tick labels; what does not fit ends in an ellipsis."""
    lines: list[str] = []
    for word in str(text).split():
        chunks = [word[i : i + cut] for i in range(0, len(word), cut)] or [word]
        for chunk in chunks:
            if lines and len(lines[-1]) + 1 + len(chunk) <= width and chunk is chunks[0]:
                lines[-1] += " " + chunk
            else:
                lines.append(chunk)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][: cut - 1] + "…"]
    return "<br>".join(plain(line) for line in lines) or plain(text)


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


# -- chart data -------------------------------------------------------------------------------------------
def latest(headlines: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, adaptation): the newest run's (``started_at`` descending, ties: first row), the
    rows kept in their input order.

    Args:
        headlines: ``run_id, started_at, model, adaptation, value, partial`` (one row per grid).
    """
    rows = headlines.reset_index(drop=True)
    if rows.empty:
        return rows
    order = rows.assign(_t=pd.to_datetime(rows["started_at"], errors="coerce"))
    order = order.sort_values("_t", ascending=False, na_position="last", kind="stable")
    winners = order.drop_duplicates(["model", "adaptation"], keep="first").index
    return rows[rows.index.isin(winners)].reset_index(drop=True)


def gain_table(headlines: pd.DataFrame) -> pd.DataFrame:
    """Each adaptation's gain over its source model: ``model, adaptation, source, adapted, gain, partial``.

    ``gain = source - adapted`` (headline of ``none`` minus the method's, positive = better), from the newest
    run of each (model, adaptation) (:func:`latest`); models without a ``none`` grid give no rows.
    """
    columns = ["model", "adaptation", "source", "adapted", "gain", "partial"]
    best = latest(headlines)
    if best.empty:
        return pd.DataFrame(columns=columns)
    source = best[best["adaptation"] == "none"].set_index("model")
    adapted = best[(best["adaptation"] != "none") & best["model"].isin(source.index)]
    out = pd.DataFrame({
        "model": adapted["model"], "adaptation": adapted["adaptation"],
        "source": adapted["model"].map(source["value"]).astype(float), "adapted": adapted["value"].astype(float),
        "partial": adapted["partial"].astype(bool) | adapted["model"].map(source["partial"]).astype(bool)})
    out["gain"] = out["source"] - out["adapted"]
    return out[columns].reset_index(drop=True)


def published_mce(reference: pd.DataFrame) -> pd.DataFrame:
    """The published mCE rows (over severities 1-5, corruption empty): ``source, model, dataset, adaptation,
    value`` in %."""
    rows = reference[(reference["metric"] == "mCE") & reference["corruption"].isna()]
    return rows[["source", "model", "dataset", "adaptation", "value"]].reset_index(drop=True)


def protocol_means(grid: pd.DataFrame, severities: tuple[int, ...]) -> pd.Series:
    """Mean error per corruption over ``severities`` (NaN where a cell is missing), in the grid's order."""
    cols = [s for s in severities if s in grid.columns]
    if not cols:
        return pd.Series(float("nan"), index=grid.index)
    return grid[cols].mean(axis=1, skipna=False)


def difference_table(grid_a: pd.DataFrame, grid_b: pd.DataFrame, severities: tuple[int, ...]) -> pd.DataFrame:
    """Per corruption of either grid: ``corruption, hold_out, a, b, difference`` with ``difference = b - a``
    (mean error over ``severities``, points; negative = B better; NaN where either lacks a cell)."""
    a, b = protocol_means(grid_a, severities), protocol_means(grid_b, severities)
    names = list(dict.fromkeys([*a.index, *b.index]))
    order = [c for c in (*TEST_CORRUPTIONS, *HOLDOUT_CORRUPTIONS) if c in names]
    names = order + sorted(set(names) - set(order))
    out = pd.DataFrame({"corruption": names, "hold_out": [c in HOLDOUT_CORRUPTIONS for c in names],
                        "a": a.reindex(names).to_numpy(float), "b": b.reindex(names).to_numpy(float)})
    out["difference"] = out["b"] - out["a"]
    return out


# -- figures ------------------------------------------------------------------------------------------
def headline_bars(headlines: pd.DataFrame, published: pd.DataFrame | None = None, *, metric: str) -> go.Figure:
    """Grouped bars of the headline per model (x) and adaptation (colour); published numbers in a panel
    of their own on the same y axis, hatched and named ``published, <source>``.

    Args:
        headlines: ``model, adaptation, value, partial`` (one row per (model, adaptation); see :func:`latest`).
        published: ``source, model, adaptation, value`` (see :func:`published_mce`), or None.
        metric: the y axis title, e.g. ``mCE (%)``.
    """
    ours = headlines[headlines["value"].notna()] if not headlines.empty else headlines
    pub = published if published is not None and not published.empty else None
    if ours.empty and pub is None:
        return empty_figure("no headline to show")
    if pub is None:
        fig = go.Figure()
        _our_bars(fig, ours, col=None)
    else:
        # room per panel: one unit per bar, at least two per model so wrapped names do not collide
        n_ours = max(0.7 * len(ours), 2 * ours["model"].nunique(), 3) if not ours.empty else 2
        fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.03,
                            column_widths=[n_ours, max(len(pub), 1)],
                            subplot_titles=("your runs", "published (ImageNet-C, hatched)"))
        _our_bars(fig, ours, col=1)
        _published_bars(fig, pub)
        fig.update_annotations(font=dict(size=12, color=OTHER_COLOR))
    fig.update_layout(barmode="group", bargap=0.2, bargroupgap=0.05)
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(type="category", showgrid=False, tickangle=0, tickfont=dict(size=10))
    fig = _layout(fig, title=f"{plain(metric)} per model and adaptation (lower = better)", x_title="",
                  y_title=plain(metric), height=460)
    fig.update_layout(legend=dict(orientation="v", x=1.01, y=1, xanchor="left", yanchor="top"))
    return fig


def _our_bars(fig: go.Figure, ours: pd.DataFrame, *, col: int | None) -> None:
    """One bar trace per adaptation; partial means hatched and labelled."""
    if ours.empty:
        return
    models = list(dict.fromkeys(ours["model"]))
    x_all = [wrap(m) for m in models]
    methods = adaptation_order(ours["adaptation"])
    for method in methods:
        sub = ours[ours["adaptation"] == method].set_index("model").reindex(models)
        values = sub["value"].astype(float).tolist()
        partial = sub["partial"].fillna(False).astype(bool).tolist()
        text = [("" if not math.isfinite(v) else _fmt(v) + ("<br>partial" if p else "")) for v, p in
                zip(values, partial, strict=True)]
        trace = go.Bar(name=plain(method), x=x_all, y=values, text=text, textposition="outside",
                       textangle=-90 if len(methods) >= 3 else 0,  # narrow bars: upright labels would overlap
                       constraintext="none", textfont=dict(size=10), cliponaxis=False,
                       marker=dict(color=adaptation_color(method, methods),
                                   pattern=dict(shape=[PARTIAL_PATTERN if p else "" for p in partial])),
                       hovertemplate="%{x}<br>" + plain(method) + ": %{y:.2f}<extra></extra>")
        fig.add_trace(trace, **({} if col is None else {"row": 1, "col": col}))
    if col is None:
        fig.update_xaxes(categoryorder="array", categoryarray=x_all)


def _published_bars(fig: go.Figure, pub: pd.DataFrame) -> None:
    """One hatched grey trace per source, all in one bar slot (offsetgroup) of the second panel."""
    for i, (source, rows) in enumerate(pub.groupby("source", sort=False)):
        labels = [wrap(m) + ("" if a in (None, "none") or pd.isna(a) else "<br>" + plain(a))
                  for m, a in zip(rows["model"], rows["adaptation"], strict=True)]
        values = rows["value"].astype(float).tolist()
        fig.add_trace(go.Bar(
            name=f"published, {plain(source)}", x=labels, y=values, text=[_fmt(v) for v in values],
            textposition="outside", offsetgroup="published",
            marker=dict(color=PUBLISHED_COLORS[i % len(PUBLISHED_COLORS)], line=dict(color="#4A4E5C", width=1),
                        pattern=dict(shape=PUBLISHED_PATTERNS[i % len(PUBLISHED_PATTERNS)], fgcolor="#4A4E5C")),
            hovertemplate="%{x}<br>%{y:.1f} (published, " + plain(source) + ")<extra></extra>"), row=1, col=2)


def gain_bars(gains: pd.DataFrame, *, unit: str) -> go.Figure:
    """Bars of each adaptation's gain over the source model, per model (x) and adaptation (colour).

    Args:
        gains: ``model, adaptation, gain, partial`` (see :func:`gain_table`).
        unit: the y axis' unit, e.g. ``mCE points``.
    """
    if gains.empty:
        return empty_figure("no gain to show: evaluate the source model (--adapt none) beside a method")
    models = list(dict.fromkeys(gains["model"]))
    x_all = [wrap(m) for m in models]
    fig = go.Figure()
    methods = adaptation_order(gains["adaptation"])
    for method in methods:
        sub = gains[gains["adaptation"] == method].set_index("model").reindex(models)
        values = sub["gain"].astype(float).tolist()
        partial = sub["partial"].fillna(False).astype(bool).tolist()
        text = ["" if not math.isfinite(v) else f"{v:+.1f}" + ("<br>partial" if p else "")
                for v, p in zip(values, partial, strict=True)]
        fig.add_bar(name=plain(method), x=x_all, y=values, text=text, textposition="outside",
                    marker=dict(color=adaptation_color(method, methods),
                                pattern=dict(shape=[PARTIAL_PATTERN if p else "" for p in partial])),
                    hovertemplate="%{x}<br>" + plain(method) + ": %{y:+.2f}<extra></extra>")
    fig.add_hline(y=0, line_color="#4A4E5C", line_width=1)
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x_all, showgrid=False, tickangle=0)
    return _layout(fig, title="Gain over the source model (none − method; positive = better)", x_title="",
                   y_title=plain(unit), height=440)


def error_heatmap(grid: pd.DataFrame, *, title: str, subtitle: str = "",
                  zrange: tuple[float, float] | None = None) -> go.Figure:
    """Heat map of error (%) by corruption (y, top to bottom in the grid's order) and severity (x).

    Args:
        grid: corruptions (index) x severities (columns), in %; NaN cells stay blank.
        title: the figure title (escaped here), e.g. with the clean error.
        subtitle: a second, smaller title line (escaped here), e.g. model, adaptation and run.
        zrange: the colour scale's (min, max), to share one scale between heat maps.
    """
    if grid.empty:
        return empty_figure("no per-corruption errors")
    y = [corruption_label(str(c)) for c in grid.index]
    x = [str(s) for s in grid.columns]
    z = grid.to_numpy(float)
    lo, hi = zrange if zrange is not None else (None, None)
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, zmin=lo, zmax=hi, colorscale=ERROR_SCALE, texttemplate="%{z:.1f}",
        textfont=dict(size=11), xgap=2, ygap=2, colorbar=dict(title="error %", thickness=12),
        hovertemplate="%{y}, severity %{x}: %{z:.2f}% error<extra></extra>"))
    if pd.isna(z).any():
        fig.add_trace(_missing_cells(z, x, y))
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    fig.update_xaxes(type="category", side="bottom", showgrid=False)
    holdout = [i for i, c in enumerate(grid.index) if c in HOLDOUT_CORRUPTIONS]
    if holdout and holdout[0] > 0:
        fig.add_hline(y=holdout[0] - 0.5, line_color="#1F2430", line_width=2)
    text = plain(title) + (f"<br><span style='font-size:12px'>{plain(subtitle)}</span>" if subtitle else "")
    fig = _layout(fig, title=text, x_title="severity", y_title="", height=170 + 26 * len(y))
    fig.update_layout(margin=dict(l=10, r=10, t=70, b=10))
    return fig


def _missing_cells(z: object, x: list[str], y: list[str]) -> go.Heatmap:
    """Grey "n/a" tiles over the cells a grid lacks (a blank cell would read as an unseen colour)."""
    missing = pd.isna(z)
    grey = [[0.0, MISSING_COLOR], [1.0, MISSING_COLOR]]
    return go.Heatmap(z=[[1.0 if m else None for m in row] for row in missing], x=x, y=y, colorscale=grey,
                      showscale=False, xgap=2, ygap=2, text=[["n/a" if m else "" for m in row] for row in missing],
                      texttemplate="%{text}", textfont=dict(size=10, color=OTHER_COLOR),
                      hovertemplate="%{y}, severity %{x}: not evaluated<extra></extra>")


def difference_bars(diff: pd.DataFrame, *, what: str) -> go.Figure:
    """Horizontal bars of ``b - a`` per corruption (green: B better, red: B worse); hold-out ones marked.

    Args:
        diff: ``corruption, difference`` (see :func:`difference_table`).
        what: what was averaged, for the axis title (e.g. ``mean error over severities 1-5``).
    """
    rows = diff[diff["difference"].notna()]
    if rows.empty:
        return empty_figure("no corruption evaluated in both")
    values = rows["difference"].astype(float).tolist()
    labels = [corruption_label(str(c)) for c in rows["corruption"]]
    fig = go.Figure(go.Bar(
        y=labels, x=values, orientation="h", text=[f"{v:+.1f}" for v in values], textposition="outside",
        marker_color=[KEPT_COLOR if v < 0 else REMOVED_COLOR if v > 0 else OTHER_COLOR for v in values],
        hovertemplate="%{y}: B − A = %{x:+.2f} points<extra></extra>"))
    fig.add_vline(x=0, line_color="#4A4E5C", line_width=1)
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    span = max(abs(v) for v in values) or 1.0
    fig.update_xaxes(range=[-1.25 * span, 1.25 * span])
    return _layout(fig, title="B − A per corruption (negative = B is better)",
                   x_title=f"{plain(what)}, B − A (points)", y_title="", height=170 + 26 * len(labels))


# -- detection (Michaelis et al. 2019) ----------------------------------------------------------------
#: The dataset a published detection number was measured on -> the metric it reports (Michaelis et al. 2019).
PUBLISHED_DETECTION_METRIC = {"pascal": "AP50", "coco": "AP", "cityscapes": "AP"}
#: Columns of :func:`published_detection` (the shape of ``detection_summary``'s rows, plus ``source``).
PUBLISHED_DETECTION_COLUMNS = ["source", "model", "dataset", "primary", "P", "mPC", "rPC"]


def published_detection(reference: pd.DataFrame) -> pd.DataFrame:
    """The published P / mPC / rPC rows, one per (source, model, dataset): :data:`PUBLISHED_DETECTION_COLUMNS`.

    ``reference_results`` stores P under the clean dataset (``coco``) and mPC / rPC under its corrupted
    version (``coco-c``); both become one row named by the clean dataset. Values in % as published.
    """
    rows = reference[reference["metric"].isin(["P", "mPC", "rPC"]) & reference["corruption"].isna()].copy()
    if rows.empty:
        return pd.DataFrame(columns=PUBLISHED_DETECTION_COLUMNS)
    rows["dataset"] = rows["dataset"].astype(str).str.replace(r"-c$", "", regex=True)
    table = rows.pivot_table(index=["source", "model", "dataset"], columns="metric", values="value", aggfunc="first",
                             sort=False).reset_index()
    table = table.reindex(columns=["source", "model", "dataset", "P", "mPC", "rPC"])
    table["primary"] = table["dataset"].map(PUBLISHED_DETECTION_METRIC).fillna("AP")
    return table[PUBLISHED_DETECTION_COLUMNS].reset_index(drop=True)


def corruption_ap_means(cells: pd.DataFrame) -> pd.DataFrame:
    """AP averaged over severities per (run, model, corruption), clean first: ``run_id, model, corruption,
    value, severities`` (% as given; ``severities`` = how many were averaged; clean keeps corruption
    ``clean``). Corruptions in test, then hold-out order, then others alphabetically.

    Args:
        cells: ``run_id, model, corruption (NULL = clean), severity, value`` rows of one AP metric.
    """
    columns = ["run_id", "model", "corruption", "value", "severities"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    df = cells.assign(corruption=cells["corruption"].fillna("clean"))
    out = df.groupby(["run_id", "model", "corruption"], sort=False)["value"].agg(["mean", "count"]).reset_index()
    out = out.rename(columns={"mean": "value", "count": "severities"})
    names = list(dict.fromkeys(out["corruption"]))
    order = ["clean", *[c for c in (*TEST_CORRUPTIONS, *HOLDOUT_CORRUPTIONS) if c in names]]
    order += sorted(set(names) - set(order))
    out["_o"] = out["corruption"].map({c: i for i, c in enumerate(order)})
    return out.sort_values(["_o"], kind="stable").drop(columns="_o")[columns].reset_index(drop=True)


def detection_corruption_bars(means: pd.DataFrame, *, metric: str) -> go.Figure:
    """Grouped bars of AP (%) per corruption (x; clean first, hatched) and model (colour): how much of the
    clean AP each corruption leaves (higher = better). Each bar is labelled, so an AP of 0 reads "0" and a
    cell not evaluated has no label.

    Args:
        means: ``model, corruption, value`` (see :func:`corruption_ap_means`), one row per (model, corruption).
        metric: ``AP`` or ``AP50``, for the titles.
    """
    rows = means[means["value"].notna()] if not means.empty else means
    if rows.empty:
        return empty_figure("no AP to show")
    corruptions = list(dict.fromkeys(rows["corruption"]))
    x_all = [corruption_label(c) for c in corruptions]
    models = list(dict.fromkeys(rows["model"]))
    fig = go.Figure()
    for i, model in enumerate(models):
        sub = rows[rows["model"] == model].set_index("corruption").reindex(corruptions)
        values = sub["value"].astype(float).tolist()
        fig.add_bar(name=wrap(model, width=30, max_lines=2, cut=40), x=x_all, y=values,
                    text=["" if not math.isfinite(v) else f"{v:.0f}" for v in values], textposition="outside",
                    textfont=dict(size=9), cliponaxis=False,
                    marker=dict(color=CATEGORY_COLORS[i % len(CATEGORY_COLORS)],
                                pattern=dict(shape=["/" if c == "clean" else "" for c in corruptions])),
                    customdata=[plain(model)] * len(values),
                    hovertemplate="%{customdata}<br>%{x}: %{y:.1f}<extra></extra>")
    fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05)
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x_all, showgrid=False, tickangle=-40)
    fig = _layout(fig, title=f"{plain(metric)} per corruption, mean over severities (clean hatched; higher = better)",
                  x_title="", y_title=f"{plain(metric)} (%)", height=460)
    # model labels are long (checkpoint paths): a vertical legend beside the bars, clear of the title
    fig.update_layout(legend=dict(orientation="v", x=1.01, y=1, xanchor="left", yanchor="top"))
    return fig
