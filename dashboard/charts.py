"""Pure chart builders: a DataFrame in, a Plotly figure out.

No Streamlit here, so every function is unit-tested on its own (``tests/dashboard/test_charts.py``).
Category labels (dataset names, reasons) are user-controlled text: Plotly renders a small HTML
subset in labels (``<a href>``, ``<b>``...), so :func:`plain` escapes ``<`` and ``>`` first.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

#: One colour per dataset role; the accent colour (pool) matches .streamlit/config.toml.
ROLE_COLORS = {"pool": "#4C5FD5", "benchmark": "#E8833A", "reference": "#3AA57A"}
OTHER_COLOR = "#8A8FA3"
SKIPPED_COLOR = "#C9CCD6"
ACTION_COLORS = {"skipped": "#D9534F", "repaired": "#E8B13A"}
MODEL_COLORS = ("#4C5FD5", "#E8833A", "#3AA57A", "#B5478C", "#2E9BC4", "#8A6D3B")
FONT = dict(family="sans-serif", size=13, color="#1F2430")


def plain(text: object) -> str:
    """``text`` with ``<``/``>``/``&`` escaped so Plotly shows it literally (no tags, no links)."""
    return html.escape(str(text), quote=False)


def _layout(fig: go.Figure, *, title: str, x_title: str, y_title: str, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=15)),
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=height,
        margin=dict(l=10, r=10, t=60, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1, title_text="",
                    traceorder="normal"),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        bargap=0.3,
    )
    # plotly.js leaves automargin off: without it long tick labels are clipped by the tight margins.
    fig.update_xaxes(automargin=True, gridcolor="#ECEEF3", zeroline=False)
    fig.update_yaxes(automargin=True, gridcolor="#ECEEF3", zeroline=False)
    return fig


def _count_ticks(largest: float) -> dict[str, object]:
    """Axis settings for counts: whole-number ticks (no 0.2 steps when the largest count is small)."""
    return dict(rangemode="tozero", tickformat=",d", **({"dtick": 1} if largest <= 8 else {}))


def empty_figure(message: str, *, height: int = 300) -> go.Figure:
    """A blank figure that says ``message`` (for an empty table), with no axes."""
    fig = go.Figure()
    fig.add_annotation(text=plain(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color=OTHER_COLOR))
    fig.update_layout(height=height, xaxis_visible=False, yaxis_visible=False, plot_bgcolor="white",
                      paper_bgcolor="white", margin=dict(l=10, r=10, t=30, b=10))
    return fig


def samples_per_dataset(datasets: pd.DataFrame) -> go.Figure:
    """Stacked bars per dataset: readable samples coloured by role, skipped entries on top in grey.

    Args:
        datasets: one row per dataset with ``name``, ``role``, ``n_samples``, ``n_skipped``.

    Returns:
        One bar trace per role present (named after the role) plus a ``skipped`` trace; x is the
        dataset name, y a count of samples.
    """
    if datasets.empty:
        return empty_figure("no datasets registered")
    names = [plain(n) for n in datasets["name"]]
    fig = go.Figure()
    roles = [r for r in ROLE_COLORS if r in set(datasets["role"])]
    roles += sorted(set(datasets["role"]) - set(ROLE_COLORS))
    for role in roles:
        mask = (datasets["role"] == role).to_numpy()
        sub = datasets[mask]
        fig.add_bar(
            name=plain(role), x=[n for n, m in zip(names, mask, strict=True) if m], y=sub["n_samples"].tolist(),
            marker_color=ROLE_COLORS.get(role, OTHER_COLOR),
            hovertemplate="%{x}<br>%{y:,} readable samples<extra>" + plain(role) + "</extra>",
        )
    fig.add_bar(
        name="skipped", x=names, y=datasets["n_skipped"].tolist(), marker_color=SKIPPED_COLOR,
        marker_pattern_shape="/", hovertemplate="%{x}<br>%{y:,} skipped<extra></extra>",
    )
    fig.update_layout(barmode="stack")
    fig.update_xaxes(categoryorder="array", categoryarray=names, showgrid=False)
    totals = datasets["n_samples"] + datasets["n_skipped"]
    largest = float(totals.max())
    title = "Samples per dataset"
    if largest > 30 * max(float(totals[totals > 0].min()), 1.0):
        # A 20k-sample pool beside 300-sample benchmarks flattens the benchmarks to nothing on a linear axis.
        lo = float(totals[totals > 0].min())
        ticks = [m * 10**e for e in range(0, 12) for m in (1, 3) if lo / 3 <= m * 10**e <= largest * 3]
        fig.update_yaxes(type="log", tickformat=",d", tickvals=ticks)
        title += " (log scale)"
    else:
        fig.update_yaxes(**_count_ticks(largest))
    return _layout(fig, title=title, x_title="", y_title="samples", height=380)


def skip_reasons(issues: pd.DataFrame) -> go.Figure:
    """Horizontal bars: entries skipped or repaired, per reason, summed over datasets.

    Args:
        issues: rows with ``reason``, ``action`` (skipped | repaired), ``count`` (and ``dataset``).

    Returns:
        One bar trace per action present; y is the reason, x the number of entries.
    """
    if issues.empty:
        return empty_figure("nothing was skipped or repaired")
    totals = issues.groupby(["action", "reason"], as_index=False)["count"].sum()
    order = totals.groupby("reason")["count"].sum().sort_values().index.tolist()
    fig = go.Figure()
    known = list(ACTION_COLORS)
    for action in sorted(totals["action"].unique(), key=lambda a: (known.index(a) if a in known else len(known), a)):
        sub = totals[totals["action"] == action]
        fig.add_bar(
            name=plain(action), y=[plain(r) for r in sub["reason"]], x=sub["count"].tolist(), orientation="h",
            marker_color=ACTION_COLORS.get(action, OTHER_COLOR),
            hovertemplate="%{y}<br>%{x:,} entries<extra>" + plain(action) + "</extra>",
        )
    fig.update_layout(barmode="stack", showlegend=True)
    fig.update_yaxes(categoryorder="array", categoryarray=[plain(r) for r in order], showgrid=False)
    fig.update_xaxes(**_count_ticks(float(totals.groupby("reason")["count"].sum().max())))
    fig = _layout(fig, title="Skipped and repaired entries by reason", x_title="entries", y_title="",
                  height=max(380, 140 + 36 * len(order)))
    # A lone reason would otherwise fill the plot with one slab of colour.
    fig.update_layout(bargap=0.3 if len(order) > 3 else 0.65)
    return fig


def zeroshot_accuracy(results: pd.DataFrame, *, chance: float | None = None) -> go.Figure:
    """Grouped bars: zero-shot top-1 (%) per dataset, one trace per model, with a chance line.

    Args:
        results: rows with ``model``, ``dataset``, ``metric`` (only ``zeroshot_top1`` is drawn) and
            ``value`` (a fraction).
        chance: top-1 of guessing (1 / classes), drawn as a dotted line when given.
    """
    top1 = results[results["metric"] == "zeroshot_top1"]
    if top1.empty:
        return empty_figure("no zero-shot evaluation yet")
    fig = go.Figure()
    for i, (model, sub) in enumerate(top1.groupby("model", sort=True)):
        fig.add_bar(name=plain(model), x=[plain(d) for d in sub["dataset"]], y=(sub["value"] * 100).tolist(),
                    marker_color=MODEL_COLORS[i % len(MODEL_COLORS)],
                    hovertemplate="%{x}<br>top-1 %{y:.1f}%<extra>" + plain(model) + "</extra>")
    if chance is not None:
        fig.add_hline(y=chance * 100, line_dash="dot", line_color=OTHER_COLOR,
                      annotation_text=f"chance {chance:.1%}", annotation_position="top right")
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 100], ticksuffix="%")
    return _layout(fig, title="Zero-shot top-1 by benchmark", x_title="", y_title="top-1 accuracy", height=360)


# -- clusters ---------------------------------------------------------------------------------------
#: No figure sends more points than this to the browser; above it maps draw density tiles.
MAX_POINTS = 200_000
#: Colour scales: complexity/size are "more = warmer"; distance to the centroid likewise.
SEQUENTIAL = "Viridis"
#: Categorical palette for ground-truth concepts (cycled); "(none)" and "(other)" are grey.
CATEGORY_COLORS = ("#4C5FD5", "#E8833A", "#3AA57A", "#B5478C", "#2E9BC4", "#8A6D3B", "#D9534F", "#6C8E2F",
                   "#9B59B6", "#E8B13A", "#1ABC9C", "#7F8C8D", "#C0392B", "#2C3E50", "#F39C12", "#16A085")
#: Up to this many points a map is drawn as SVG (exact clicks, crisp); above it with WebGL (fast).
SVG_POINTS = 5_000
#: What the cluster map can be coloured by: column -> legend title.
CLUSTER_COLOR_BY = {"complexity": "complexity", "size": "size", "d_intra": "d_intra", "truth": "ground truth"}


def _scatter(n: int) -> type[go.Scatter] | type[go.Scattergl]:
    return go.Scatter if n <= SVG_POINTS else go.Scattergl


def _marker_sizes(size: pd.Series, lo: float = 6.0, hi: float = 28.0) -> list[float]:
    """Marker diameters growing with sqrt(size) (area ~ members), between ``lo`` and ``hi`` px."""
    root = size.astype(float).clip(lower=0) ** 0.5
    span = float(root.max() - root.min())
    scaled = (root - root.min()) / span if span > 0 else root * 0 + 0.5
    return (lo + scaled * (hi - lo)).round(1).tolist()


def _cluster_hover(df: pd.DataFrame) -> list[str]:
    names = df["label"].where(df["label"].notna(), "(unnamed)") if "label" in df else pd.Series([""] * len(df))
    vocab = df["vocab_label"] if "vocab_label" in df else pd.Series([None] * len(df))
    truth = df["truth"] if "truth" in df else pd.Series([None] * len(df))
    out = []
    for (_, r), name, voc, tru in zip(df.iterrows(), names, vocab, truth, strict=True):
        lines = [f"cluster {int(r['cluster'])}: {plain(name)}"]
        if voc is not None and voc == voc:
            lines.append(f"names: {plain(voc)}")
        if tru is not None and tru == tru:
            lines.append(f"ground truth: {plain(tru)} ({float(r.get('purity', 0)):.0%})")
        lines.append(f"size {int(r['size']):,} · complexity {float(r['complexity']):.4f} · "
                     f"d_intra {float(r['d_intra']):.3f}")
        out.append("<br>".join(lines))
    return out


def cluster_map(df: pd.DataFrame, *, color_by: str = "complexity", selected: int | None = None,
                max_points: int = MAX_POINTS) -> go.Figure:
    """The concept map: one marker per cluster at its centroid's UMAP position.

    Args:
        df: one row per cluster with ``cluster, x, y, size, complexity, d_intra`` and optionally
            ``label, vocab_label`` and ``truth, purity`` (majority ground-truth value and its share).
        color_by: a key of :data:`CLUSTER_COLOR_BY`; ``truth`` needs the ``truth`` column.
        selected: a cluster to ring.
        max_points: above this many clusters the map draws density tiles instead of markers.

    Returns:
        A figure whose marker traces carry the cluster index as ``customdata`` (for click selection);
        marker area grows with cluster size.
    """
    if df.empty:
        return empty_figure("no map yet")
    if len(df) > max_points:
        return density_map(df, title=f"Concept map: {len(df):,} clusters (density)")
    fig = go.Figure()
    hover = _cluster_hover(df)
    sizes = _marker_sizes(df["size"])
    if color_by == "truth" and "truth" in df:
        _truth_traces(fig, df, hover, sizes)
    else:
        col = color_by if color_by in ("complexity", "size", "d_intra") else "complexity"
        fig.add_trace(_scatter(len(df))(
            x=df["x"], y=df["y"], mode="markers", customdata=df["cluster"].tolist(), text=hover,
            hovertemplate="%{text}<extra></extra>", showlegend=False,
            marker=dict(size=sizes, color=df[col].astype(float), colorscale=SEQUENTIAL, showscale=True,
                        colorbar=dict(title=CLUSTER_COLOR_BY[col], thickness=12),
                        line=dict(width=0.5, color="white"), opacity=0.9)))
    _ring(fig, df, selected)
    fig = _layout(fig, title="Concept map (UMAP of the centroids; area ~ members)", x_title="", y_title="",
                  height=520)
    if color_by == "truth":  # many concepts: a vertical legend beside the map, clear of the title
        fig.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top"))
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, scaleanchor="x")
    fig.update_layout(clickmode="event+select", dragmode="pan")
    return fig


def _truth_traces(fig: go.Figure, df: pd.DataFrame, hover: list[str], sizes: list[float]) -> None:
    """One trace per majority ground-truth value (legend = concepts), largest concepts first."""
    order = df.groupby("truth")["size"].sum().sort_values(ascending=False).index.tolist()
    sizes_s = pd.Series(sizes, index=df.index)
    hover_s = pd.Series(hover, index=df.index)
    for i, value in enumerate(order):
        mask = df["truth"] == value
        grey = value in ("(none)", "(other)")
        color = OTHER_COLOR if grey else CATEGORY_COLORS[i % len(CATEGORY_COLORS)]
        fig.add_trace(_scatter(len(df))(
            x=df.loc[mask, "x"], y=df.loc[mask, "y"], mode="markers", name=plain(value),
            customdata=df.loc[mask, "cluster"].tolist(), text=hover_s[mask].tolist(),
            hovertemplate="%{text}<extra></extra>",
            marker=dict(size=sizes_s[mask].tolist(), color=color, opacity=0.9, line=dict(width=0.5, color="white"))))


def _ring(fig: go.Figure, df: pd.DataFrame, selected: int | None) -> None:
    if selected is None or selected not in set(df["cluster"]):
        return
    row = df[df["cluster"] == selected].iloc[0]
    fig.add_scatter(x=[row["x"]], y=[row["y"]], mode="markers", hoverinfo="skip", showlegend=False,
                    marker=dict(size=36, color="rgba(0,0,0,0)", line=dict(width=3, color="#D9534F")))


def density_map(df: pd.DataFrame, *, title: str, bins: int = 120) -> go.Figure:
    """Density tiles of ``x, y`` (counts per bin): what a map shows above :data:`MAX_POINTS` points."""
    import numpy as np

    counts, xe, ye = np.histogram2d(df["x"].to_numpy(float), df["y"].to_numpy(float), bins=bins)
    z = np.where(counts.T > 0, counts.T, np.nan)
    fig = go.Figure(go.Heatmap(z=z, x=(xe[:-1] + xe[1:]) / 2, y=(ye[:-1] + ye[1:]) / 2, colorscale=SEQUENTIAL,
                               colorbar=dict(title="points", thickness=12),
                               hovertemplate="%{z:,} points<extra></extra>"))
    fig = _layout(fig, title=plain(title), x_title="", y_title="", height=480)
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False)
    return fig


def member_map(df: pd.DataFrame, *, title: str, max_points: int = MAX_POINTS) -> go.Figure:
    """One cluster's members at their UMAP positions, coloured by distance to the centroid.

    Args:
        df: ``x, y, dist_to_centroid`` (and ``id``) per member.
    """
    if df.empty:
        return empty_figure("this cluster has no members")
    if len(df) > max_points:
        return density_map(df, title=f"{title}: {len(df):,} members (density)")
    fig = go.Figure(_scatter(len(df))(
        x=df["x"], y=df["y"], mode="markers", text=[plain(i) for i in df["id"]],
        customdata=df["dist_to_centroid"].astype(float),
        hovertemplate="%{text}<br>1 - cos to centroid %{customdata:.3f}<extra></extra>",
        marker=dict(size=7, color=df["dist_to_centroid"].astype(float), colorscale=SEQUENTIAL, showscale=True,
                    colorbar=dict(title="1 - cos", thickness=12), opacity=0.85)))
    fig = _layout(fig, title=plain(title), x_title="", y_title="", height=420)
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, scaleanchor="x")
    return fig


def stat_position(stats: pd.DataFrame, column: str, value: float, *, title: str) -> go.Figure:
    """Histogram of one per-cluster statistic over all clusters, with a line at the selected cluster."""
    fig = go.Figure(go.Histogram(x=stats[column].astype(float), nbinsx=30, marker_color=ROLE_COLORS["pool"],
                                 opacity=0.75, hovertemplate="%{x}<br>%{y} clusters<extra></extra>"))
    fig.add_vline(x=float(value), line_color="#D9534F", line_width=3)
    fig = _layout(fig, title=plain(title), x_title=plain(column), y_title="clusters", height=240)
    fig.update_layout(bargap=0.05, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def composition(df: pd.DataFrame, *, title: str) -> go.Figure:
    """Horizontal bars: the share of each ground-truth value in one cluster (``value, count, share``)."""
    if df.empty:
        return empty_figure("no ground truth")
    df = df.sort_values("count")
    fig = go.Figure(go.Bar(y=[plain(v) for v in df["value"]], x=(df["share"] * 100).tolist(), orientation="h",
                           customdata=df["count"].tolist(), marker_color=ROLE_COLORS["benchmark"],
                           hovertemplate="%{y}<br>%{x:.1f}% (%{customdata:,} samples)<extra></extra>"))
    fig.update_xaxes(range=[0, 100], ticksuffix="%")
    return _layout(fig, title=plain(title), x_title="share of members", y_title="", height=120 + 28 * len(df))


# -- pruning ----------------------------------------------------------------------------------------
KEPT_COLOR = "#3AA57A"
REMOVED_COLOR = "#D9534F"


def eps_curve(curve: pd.DataFrame, *, eps: float | None, reference: pd.DataFrame | None = None) -> go.Figure:
    """SemDeDup: fraction kept against eps (log axis), the current eps marked, published points beside.

    Args:
        curve: ``eps, fraction_kept`` on this pool (eps > 0 drawn).
        eps: the slider's value (marked with a line), or None.
        reference: ``eps, kept_fraction`` published on LAION-440M (Abbas et al. 2023), drawn as markers.
    """
    curve = curve[curve["eps"] > 0]
    fig = go.Figure(go.Scatter(x=curve["eps"], y=curve["fraction_kept"] * 100, mode="lines+markers", name="this pool",
                               line=dict(color=ROLE_COLORS["pool"], width=2), marker=dict(size=5),
                               hovertemplate="eps %{x:.2g}: %{y:.1f}% kept<extra></extra>"))
    if reference is not None and not reference.empty:
        fig.add_scatter(x=reference["eps"], y=reference["kept_fraction"] * 100, mode="markers",
                        name="LAION-440M (SemDeDup paper)", marker=dict(symbol="diamond", size=9, color=OTHER_COLOR),
                        hovertemplate="eps %{x:.2g}: %{y:.1f}% kept (published)<extra></extra>")
    if eps is not None and eps > 0:
        fig.add_vline(x=float(eps), line_color=REMOVED_COLOR, line_dash="dot")
    ticks = [1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0]
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks],
                     title_text="eps (a row goes when its cosine to an earlier member > 1 - eps)")
    fig.update_yaxes(range=[0, 102], ticksuffix="%")
    return _layout(fig, title="SemDeDup: data kept against eps", x_title="eps", y_title="kept", height=340)


def quota_scatter(per_cluster: pd.DataFrame, *, kept_col: str = "kept", color_col: str | None = None) -> go.Figure:
    """Per cluster: kept (the quota) against input size, coloured by complexity when given.

    Args:
        per_cluster: ``cluster, size, <kept_col>`` and optionally ``<color_col>``.
    """
    if per_cluster.empty:
        return empty_figure("no clusters")
    color = per_cluster[color_col].astype(float) if color_col and color_col in per_cluster else ROLE_COLORS["pool"]
    hover = [f"cluster {int(c)}: keeps {int(k):,} of {int(n):,}" for c, k, n in
             zip(per_cluster["cluster"], per_cluster[kept_col], per_cluster["size"], strict=True)]
    marker: dict[str, object] = dict(size=8, color=color, opacity=0.85, line=dict(width=0.5, color="white"))
    if color_col and color_col in per_cluster:
        title = "complexity" if color_col.endswith("complexity") else color_col
        marker |= dict(colorscale=SEQUENTIAL, showscale=True, colorbar=dict(title=plain(title), thickness=12))
    fig = go.Figure(_scatter(len(per_cluster))(x=per_cluster["size"], y=per_cluster[kept_col], mode="markers",
                                               text=hover, hovertemplate="%{text}<extra></extra>", marker=marker,
                                               showlegend=False))
    top = float(per_cluster["size"].max())
    fig.add_scatter(x=[0, top], y=[0, top], mode="lines", line=dict(color=OTHER_COLOR, dash="dot"), hoverinfo="skip",
                    showlegend=False)
    return _layout(fig, title="Kept per cluster against its size (dotted: keep all)", x_title="members",
                   y_title="kept", height=360)


def kept_by_cluster(per_cluster: pd.DataFrame, *, top: int = 60) -> go.Figure:
    """Stacked bars of kept and removed members for the ``top`` largest clusters (largest first)."""
    if per_cluster.empty:
        return empty_figure("no clusters")
    df = per_cluster.sort_values("size", ascending=False).head(top)
    x = [str(int(c)) for c in df["cluster"]]
    fig = go.Figure()
    fig.add_bar(name="kept", x=x, y=df["kept"], marker_color=KEPT_COLOR,
                hovertemplate="cluster %{x}: %{y:,} kept<extra></extra>")
    fig.add_bar(name="removed", x=x, y=df["removed"], marker_color=REMOVED_COLOR,
                hovertemplate="cluster %{x}: %{y:,} removed<extra></extra>")
    fig.update_layout(barmode="stack", bargap=0.15)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x)
    title = "Kept and removed by cluster" + (f" (largest {top})" if len(per_cluster) > top else "")
    return _layout(fig, title=title, x_title="cluster", y_title="members", height=340)


def kept_by_truth(df: pd.DataFrame) -> go.Figure:
    """Horizontal bars: the fraction of each ground-truth category kept (``category, n, fraction_kept``)."""
    if df.empty:
        return empty_figure("no ground truth")
    labels = [f"{plain(c)} ({int(n):,})" for c, n in zip(df["category"], df["n"], strict=True)]
    colors = [KEPT_COLOR if c == "clean" else REMOVED_COLOR if "duplicate" in c else ROLE_COLORS["benchmark"]
              for c in df["category"]]
    fig = go.Figure(go.Bar(y=labels, x=(df["fraction_kept"] * 100).tolist(), orientation="h", marker_color=colors,
                           hovertemplate="%{y}: %{x:.1f}% kept<extra></extra>"))
    fig.update_xaxes(range=[0, 100], ticksuffix="%")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title="Kept by ground truth (demo world)", x_title="kept", y_title="",
                   height=140 + 34 * len(df))


def manifest_overlap(per_cluster: pd.DataFrame, names: tuple[str, str]) -> go.Figure:
    """Per cluster, rows kept by A against rows kept by B (``cluster, kept_a, kept_b``)."""
    if per_cluster.empty:
        return empty_figure("nothing to compare")
    hover = [f"cluster {int(c)}: {int(a):,} vs {int(b):,}" for c, a, b in
             zip(per_cluster["cluster"], per_cluster["kept_a"], per_cluster["kept_b"], strict=True)]
    fig = go.Figure(_scatter(len(per_cluster))(x=per_cluster["kept_a"], y=per_cluster["kept_b"], mode="markers",
                                               text=hover, hovertemplate="%{text}<extra></extra>",
                                               marker=dict(size=8, color=ROLE_COLORS["pool"], opacity=0.8),
                                               showlegend=False))
    top = float(max(per_cluster["kept_a"].max(), per_cluster["kept_b"].max()))
    fig.add_scatter(x=[0, top], y=[0, top], mode="lines", line=dict(color=OTHER_COLOR, dash="dot"), hoverinfo="skip",
                    showlegend=False)
    return _layout(fig, title="Kept per cluster: A against B", x_title=f"A: {plain(names[0])}",
                   y_title=f"B: {plain(names[1])}", height=380)


# -- train-test similarity ---------------------------------------------------------------------------
def similarity_histograms(test: pd.DataFrame, *, benchmark: str, bins: int = 40) -> go.Figure:
    """Per test sample, the cosine to its nearest pool sample beside the cosine to its nearest reference
    sample (``nn_pool_sim``, ``s_ref``), as two overlaid histograms (Mayilvahanan et al. ICLR 2024)."""
    if test.empty:
        return empty_figure("no test samples")
    lo = float(min(test["s_ref"].min(), test["nn_pool_sim"].min()))
    hi = float(max(test["s_ref"].max(), test["nn_pool_sim"].max()))
    size = max((hi - lo) / bins, 1e-6)
    fig = go.Figure()
    for column, name, role in (("s_ref", "reference → test", "reference"), ("nn_pool_sim", "pool → test", "pool")):
        fig.add_histogram(x=test[column], name=name, opacity=0.6, marker_color=ROLE_COLORS[role],
                          xbins=dict(start=lo, end=hi + size, size=size),
                          hovertemplate=f"{name}: %{{y:,}} test samples at %{{x}}<extra></extra>")
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(**_count_ticks(float(len(test))))
    return _layout(fig, title=f"Nearest-neighbour similarity of {plain(benchmark)}'s test samples",
                   x_title="cosine to the nearest neighbour", y_title="test samples", height=340)


def similarity_scatter(test: pd.DataFrame, *, benchmark: str) -> go.Figure:
    """One point per test sample: reference similarity (x) against pool similarity (y); above the diagonal
    the pool holds a sample closer than any reference sample."""
    if test.empty:
        return empty_figure("no test samples")
    closer = test["nn_pool_sim"] > test["s_ref"]
    fig = go.Figure()
    for mask, name, color in ((closer, "pool neighbour closer", REMOVED_COLOR), (~closer, "reference closer", KEPT_COLOR)):
        part = test[mask]
        hover = [f"{plain(i)}: pool {p:.4f}, reference {r:.4f}" for i, p, r in
                 zip(part["id"], part["nn_pool_sim"], part["s_ref"], strict=True)]
        fig.add_trace(_scatter(len(part))(x=part["s_ref"], y=part["nn_pool_sim"], mode="markers", name=name,
                                          text=hover, hovertemplate="%{text}<extra></extra>",
                                          marker=dict(size=6, color=color, opacity=0.75)))
    lo = float(min(test["s_ref"].min(), test["nn_pool_sim"].min()))
    hi = float(max(test["s_ref"].max(), test["nn_pool_sim"].max()))
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color=OTHER_COLOR, dash="dot"),
                    hoverinfo="skip", showlegend=False)
    return _layout(fig, title=f"{plain(benchmark)}: pool against reference, per test sample",
                   x_title="cosine to the nearest reference sample", y_title="cosine to the nearest pool sample",
                   height=340)


def share_closer(summary: pd.DataFrame) -> go.Figure:
    """Per benchmark, the share of test samples whose nearest pool sample is closer than their nearest
    reference sample (``benchmark, share_test_pool_closer, n_test``)."""
    if summary.empty:
        return empty_figure("no benchmarks")
    labels = [plain(b) for b in summary["benchmark"]]
    hover = [f"{plain(b)}: {s:.1%} of {int(n):,} test samples" for b, s, n in
             zip(summary["benchmark"], summary["share_test_pool_closer"], summary["n_test"], strict=True)]
    fig = go.Figure(go.Bar(x=labels, y=(summary["share_test_pool_closer"] * 100).tolist(), hovertext=hover,
                           hovertemplate="%{hovertext}<extra></extra>", marker_color=ROLE_COLORS["benchmark"]))
    fig.update_yaxes(range=[0, 100], ticksuffix="%")
    fig.update_xaxes(type="category")
    return _layout(fig, title="Test samples with a closer pool than reference neighbour",
                   x_title="benchmark", y_title="test samples", height=320)
