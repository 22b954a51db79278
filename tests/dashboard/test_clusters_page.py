"""AppTest of the Clusters page: map, table, selecting a cluster, its gallery, text search, URL pools."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

PAGE = "app_pages/clusters.py"


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


def members_of(ws, clustering_id: str) -> dict[int, set[str]]:
    from core.clustering import load_assignments

    a = load_assignments(ws, clustering_id)
    return {int(c): set(g["id"]) for c, g in a.groupby("cluster")}


def test_page_shows_map_table_and_largest_cluster(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Clusters"] == "3" and metrics["Members"] == "10"
    charts = at.get("plotly_chart")
    assert len(charts) >= 5  # concept map, three stat histograms, member map
    table = at.dataframe[0].value
    assert sorted(table["cluster"]) == [0, 1, 2] and table["size"].sum() == 10
    sizes = table.set_index("cluster")["size"]
    assert at.selectbox(key="clusters_cluster").value == int(sizes.idxmax())
    assert f"Cluster {int(sizes.idxmax())}" in [h.value for h in at.subheader]


def test_selecting_a_cluster_shows_its_own_members(clustered_workspace, open_page):
    members = members_of(clustered_workspace, "web3")
    captions = {p.stem: p.with_suffix(".txt").read_text() for p in (clustered_workspace.root.parent / "src" / "web_pool").glob("*.png")}
    at = open_page(PAGE, clustered_workspace.root)
    for cluster, ids in members.items():
        at.selectbox(key="clusters_cluster").set_value(cluster).run()
        assert not at.exception
        assert f"Cluster {cluster}" in [h.value for h in at.subheader]
        shown = set(texts(at))
        # every member's caption is in the gallery (both ends show a small cluster whole) ...
        for sample_id in ids:
            stem = Path(sample_id).stem
            assert captions[stem][:60] in " ".join(shown), (cluster, sample_id)
        # ... and no other cluster's caption that is unique to it
        others = {Path(i).stem for c, other in members.items() if c != cluster for i in other}
        own = {captions[Path(i).stem] for i in ids}
        for stem in others:
            if captions[stem] not in own and len(captions[stem]) > 8:
                assert captions[stem] not in shown, (cluster, stem)


def test_gallery_shows_hostile_captions_as_plain_text(clustered_workspace, hostile_captions, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    seen: set[str] = set()
    for cluster in range(3):
        at.selectbox(key="clusters_cluster").set_value(cluster).run()
        seen |= set(texts(at))
    for caption in hostile_captions:
        assert caption in seen
    markdown = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "alert(1)" not in markdown and "evil" not in markdown


def test_colour_by_options_and_atypical_end(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    radio = at.radio(key="clusters_color")
    assert list(radio.options) == ["complexity", "size", "spread (d_intra)"]  # no ground truth here
    radio.set_value("size").run()
    assert not at.exception
    notes = [t for t in texts(at) if t.startswith("1 - cos = ")]
    assert notes, "gallery tiles carry their distance to the centroid"


def test_text_search_lists_nearest_clusters_and_samples(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    at.text_input(key="clusters_query").input("a red ball on grass").run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    hits = next(df.value for df in at.dataframe if "similarity" in df.value.columns)
    assert sorted(hits["cluster"]) == [0, 1, 2]
    assert hits["similarity"].is_monotonic_decreasing
    notes = [t for t in texts(at) if t.startswith("cluster ") and " · cos " in t]
    assert len(notes) == 10  # every sample of this 10-row pool, best first


def test_empty_query_does_nothing_and_long_query_is_refused(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    at.text_input(key="clusters_query").input("   ").run()
    assert not at.error
    at.text_input(key="clusters_query").input("x" * 400).run()
    assert len(at.error) == 1 and "characters" in at.error[0].value


def test_url_pool_gallery_uses_urls_and_ground_truth(url_workspace, open_page):
    at = open_page(PAGE, url_workspace.root)
    assert not at.exception
    radio = at.radio(key="clusters_color")
    assert "ground-truth concept" in list(radio.options)
    radio.set_value("truth").run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Ground-truth purity"] == "100%"
    gallery = next(df.value for df in at.dataframe if "image" in df.value.columns)
    assert len(gallery) == 12
    assert all(u is None or u.startswith("https://example.invalid/") for u in gallery["image"])
    assert all("<b>bold</b>" in c for c in gallery["caption"])  # literal text in a grid cell, not markup


def test_url_pool_refuses_javascript_urls():
    from dashboard.widgets import safe_url

    assert safe_url("javascript:alert(1)") is None
    assert safe_url("https://ok.example/a.jpg") == "https://ok.example/a.jpg"
    assert safe_url('https://x.example/a.jpg" onerror="x') is None
    assert safe_url(None) is None


def test_text_search_without_weights_is_a_one_line_error(url_workspace, open_page):
    at = open_page(PAGE, url_workspace.root)
    at.text_input(key="clusters_query").input("a red triangle").run()
    assert not at.exception
    assert len(at.error) == 1 and "synthetic" in at.error[0].value


def test_missing_maps_offer_to_compute(clustered_workspace, tmp_path, open_page):
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(clustered_workspace.root, root)
    shutil.rmtree(root / "clusters" / "web3" / "maps")
    at = open_page(PAGE, root)
    assert not at.error
    labels = [b.label for b in at.button]
    assert "Compute the concept map" in labels and "Compute the member map" in labels


def test_no_clusterings_says_how_to_make_one(small_workspace, open_page):
    at = open_page(PAGE, small_workspace.root)
    assert "prunescope cluster" in " ".join(i.value for i in at.info)
