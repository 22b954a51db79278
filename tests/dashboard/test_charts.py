"""dashboard.charts: pure DataFrame -> Figure functions, tested without Streamlit."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import charts

DATASETS = pd.DataFrame({
    "name": ["web_pool", "val_bench", "sketch", "ref_clean"],
    "role": ["pool", "benchmark", "benchmark", "reference"],
    "n_samples": [1000, 90, 50, 40],
    "n_skipped": [12, 0, 3, 0],
})
ISSUES = pd.DataFrame({
    "dataset": ["web_pool", "web_pool", "web_pool", "sketch"],
    "reason": ["corrupt_image", "caption_not_utf8", "missing_file", "corrupt_image"],
    "action": ["skipped", "repaired", "skipped", "skipped"],
    "count": [10, 4, 2, 3],
})


def test_charts_module_does_not_import_streamlit():
    code = "import sys, dashboard.charts; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_samples_per_dataset_has_one_trace_per_role_and_skipped():
    fig = charts.samples_per_dataset(DATASETS)
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["pool", "benchmark", "reference", "skipped"]
    assert all(t.type == "bar" for t in fig.data)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["benchmark"].x) == ["val_bench", "sketch"]
    assert list(by_name["benchmark"].y) == [90, 50]
    assert list(by_name["pool"].y) == [1000]
    assert list(by_name["skipped"].x) == ["web_pool", "val_bench", "sketch", "ref_clean"]
    assert list(by_name["skipped"].y) == [12, 0, 3, 0]
    assert by_name["pool"].marker.color == charts.ROLE_COLORS["pool"]
    assert fig.layout.barmode == "stack"
    assert fig.layout.yaxis.title.text == "samples"
    assert list(fig.layout.xaxis.categoryarray) == DATASETS["name"].tolist()


def test_samples_per_dataset_keeps_unknown_roles():
    df = DATASETS.assign(role=["pool", "benchmark", "mystery", "reference"])
    names = [t.name for t in charts.samples_per_dataset(df).data]
    assert names == ["pool", "benchmark", "reference", "mystery", "skipped"]


def test_skip_reasons_sums_over_datasets_per_action():
    fig = charts.skip_reasons(ISSUES)
    assert [t.name for t in fig.data] == ["skipped", "repaired"]
    skipped = dict(zip(fig.data[0].y, fig.data[0].x, strict=True))
    assert skipped == {"corrupt_image": 13, "missing_file": 2}
    assert dict(zip(fig.data[1].y, fig.data[1].x, strict=True)) == {"caption_not_utf8": 4}
    assert all(t.orientation == "h" for t in fig.data)
    assert fig.layout.xaxis.title.text == "entries"
    # largest total at the top (plotly draws the first category at the bottom)
    assert list(fig.layout.yaxis.categoryarray) == ["missing_file", "caption_not_utf8", "corrupt_image"]
    assert fig.layout.showlegend is True


def test_small_counts_get_whole_number_ticks():
    fig = charts.skip_reasons(ISSUES.head(1).assign(count=1))
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == ",d"
    assert charts.samples_per_dataset(DATASETS).layout.yaxis.dtick is None


@pytest.mark.parametrize("build", [charts.samples_per_dataset, charts.skip_reasons])
def test_empty_input_gives_a_message_not_an_error(build):
    fig = build(pd.DataFrame(columns=["name", "role", "n_samples", "n_skipped", "reason", "action", "count"]))
    assert not fig.data
    assert fig.layout.annotations and fig.layout.annotations[0].text


def test_labels_are_escaped_so_plotly_cannot_render_tags_or_links():
    df = DATASETS.head(1).assign(name=['<a href="http://evil">x</a>'])
    fig = charts.samples_per_dataset(df)
    assert list(fig.data[0].x) == ['&lt;a href="http://evil"&gt;x&lt;/a&gt;']
    assert charts.plain("a & <b>") == "a &amp; &lt;b&gt;"


def test_samples_chart_switches_to_log_scale_for_wide_ranges():
    import pandas as pd

    from dashboard import charts

    wide = pd.DataFrame({"name": ["pool", "val"], "role": ["pool", "benchmark"], "n_samples": [20000, 300],
                         "n_skipped": [3, 0]})
    fig = charts.samples_per_dataset(wide)
    assert fig.layout.yaxis.type == "log" and "log scale" in fig.layout.title.text
    narrow = wide.assign(n_samples=[400, 300])
    assert charts.samples_per_dataset(narrow).layout.yaxis.type != "log"


def test_zeroshot_chart_groups_models_and_draws_chance():
    import pandas as pd

    from dashboard import charts

    df = pd.DataFrame({"model": ["a", "a", "b", "b", "a"], "dataset": ["val", "sketch", "val", "sketch", "val"],
                       "metric": ["zeroshot_top1"] * 4 + ["zeroshot_top5"], "value": [0.6, 0.1, 0.5, 0.2, 0.9]})
    fig = charts.zeroshot_accuracy(df, chance=1 / 12)
    assert [t.name for t in fig.data] == ["a", "b"]
    assert list(fig.data[0].x) == ["val", "sketch"] and list(fig.data[0].y) == pytest.approx([60.0, 10.0])
    assert any("chance" in (a.text or "") for a in fig.layout.annotations)
    assert charts.zeroshot_accuracy(df[df.metric == "none"]).layout.annotations[0].text == "no zero-shot evaluation yet"


# -- clusters ---------------------------------------------------------------------------------------
def _clusters(n: int, seed: int = 0) -> pd.DataFrame:
    import numpy as np

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"cluster": np.arange(n), "x": rng.normal(size=n), "y": rng.normal(size=n),
                         "size": rng.integers(1, 500, n), "complexity": rng.random(n), "d_intra": rng.random(n),
                         "label": [f"<b>c{i}</b>" for i in range(n)], "vocab_label": ["red square"] * n})


def test_cluster_map_carries_cluster_ids_and_escapes_labels():
    df = _clusters(30)
    fig = charts.cluster_map(df, color_by="size", selected=4)
    main = fig.data[0]
    assert list(main.customdata) == list(range(30))
    assert "<b>" not in " ".join(main.text) and "&lt;b&gt;c3&lt;/b&gt;" in main.text[3]
    assert list(main.marker.color) == df["size"].astype(float).tolist()
    assert len(fig.data) == 2 and fig.data[1].x[0] == df.loc[4, "x"]  # the selection ring
    sizes = list(main.marker.size)
    big, small = int(df["size"].idxmax()), int(df["size"].idxmin())
    assert sizes[big] == max(sizes) and sizes[small] == min(sizes)


def test_cluster_map_by_truth_has_one_trace_per_concept_largest_first():
    df = _clusters(6).assign(truth=["a", "b", "a", "(none)", "b", "a"], purity=0.9)
    df["size"] = [10, 50, 10, 5, 50, 10]
    fig = charts.cluster_map(df, color_by="truth")
    assert [t.name for t in fig.data] == ["b", "a", "(none)"]
    assert fig.data[2].marker.color == charts.OTHER_COLOR
    assert sorted(c for t in fig.data for c in t.customdata) == list(range(6))


def test_maps_above_the_point_cap_draw_density_tiles():
    df = _clusters(50)
    fig = charts.cluster_map(df, max_points=49)
    assert fig.data[0].type == "heatmap"
    total = sum(v for row in fig.data[0].z for v in row if v == v)
    assert total == 50
    members = df.assign(id=[str(i) for i in range(50)], dist_to_centroid=0.1)
    assert charts.member_map(members, title="m", max_points=10).data[0].type == "heatmap"
    assert charts.member_map(members, title="m").data[0].type == "scatter"


def test_large_maps_use_webgl():
    df = _clusters(charts.SVG_POINTS + 1)
    assert charts.cluster_map(df).data[0].type == "scattergl"


def test_member_map_colours_by_distance_and_escapes_ids():
    df = pd.DataFrame({"id": ["<i>x</i>", "b"], "x": [0.0, 1.0], "y": [0.0, 1.0], "dist_to_centroid": [0.1, 0.3]})
    fig = charts.member_map(df, title="<script>t</script>")
    assert list(fig.data[0].marker.color) == [0.1, 0.3]
    assert "<i>" not in fig.data[0].text[0] and "<script>" not in fig.layout.title.text


def test_stat_position_and_composition():
    stats = _clusters(20)
    fig = charts.stat_position(stats, "complexity", 0.5, title="complexity")
    assert fig.layout.shapes[0].x0 == 0.5 and len(fig.data[0].x) == 20
    comp = pd.DataFrame({"value": ["a", "<b>b</b>"], "count": [3, 1], "share": [0.75, 0.25]})
    bars = charts.composition(comp, title="t").data[0]
    assert list(bars.x) == [25.0, 75.0] and bars.y[0] == "&lt;b&gt;b&lt;/b&gt;"
    assert charts.composition(comp.iloc[:0], title="t").layout.annotations
