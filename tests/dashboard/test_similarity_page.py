"""AppTest of the Similarity page: summary, histograms, the neighbour gallery, the pruning preview and save."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

PAGE = "app_pages/similarity.py"


@pytest.fixture(scope="module")
def similarity_workspace(tmp_path_factory):
    """The small workspace's pool, benchmark and reference embedded by one (randomly initialised) demo CLIP,
    the pool clustered (k=3), and one analysis ``web.vs.ref``."""
    from core.embed import EmbedConfig, embed_dataset
    from core.similarity_stage import SimilarityConfig, run_similarity
    from tests.conftest import build_small_workspace, cluster_with_maps

    ws = build_small_workspace(tmp_path_factory.mktemp("similarity"))
    sets = {name: embed_dataset(ws, EmbedConfig(dataset=name, model="demo-vit-tiny", modality=modality,
                                                num_workers=0)).id
            for name, modality in (("web_pool", "both"), ("val_bench", "image"), ("ref_clean", "image"))}
    cluster_with_maps(ws, sets["web_pool"], 3, "web3")
    run_similarity(ws, SimilarityConfig(pool_set=sets["web_pool"], reference_set=sets["ref_clean"],
                                        benchmark_sets=(sets["val_bench"],), analysis_id="web.vs.ref"))
    return ws


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(at) -> list[str]:
    return [t.value for t in at.text]


def test_page_shows_summary_charts_gallery_and_preview(similarity_workspace, open_page, hostile_captions):
    from core.similarity_stage import load_similarity

    at = open_page(PAGE, similarity_workspace.root)
    assert not at.error, [e.value for e in at.error]
    summary = at.dataframe[0].value
    test = load_similarity(similarity_workspace, "web.vs.ref", "val_bench", "test")
    assert summary["test samples"].tolist() == [len(test)] == [9]
    assert summary["share with a closer pool neighbour"].iloc[0] == pytest.approx(
        float(np.mean(test["nn_pool_sim"] > test["s_ref"])))
    assert len(at.get("plotly_chart")) == 4  # share, histograms, scatter, kept by cluster
    shown = texts(at)
    for title in ("test sample", "nearest pool sample", "nearest reference sample"):
        assert shown.count(title) == 6  # one page of pairs
    pool = load_similarity(similarity_workspace, "web.vs.ref", "val_bench", "pool")
    m = metrics(at)
    assert int(m["Removed"].replace(",", "")) == int(pool["closer"].sum())
    assert int(m["Pool rows"]) == len(pool)
    assert not any(c in md.value for md in at.markdown for c in hostile_captions)


@pytest.mark.parametrize(("order", "pick"), [("pool neighbour most similar first", max),
                                             ("pool neighbour least similar first", min)])
def test_gallery_order(similarity_workspace, open_page, order, pick):
    from core.similarity_stage import load_similarity

    test = load_similarity(similarity_workspace, "web.vs.ref", "val_bench", "test")
    at = open_page(PAGE, similarity_workspace.root)
    at.selectbox(key="similarity_order").set_value(order).run()
    first_cos = next(t for t in texts(at) if t.startswith("cos "))
    assert float(first_cos.split()[1].rstrip(",")) == pytest.approx(pick(test["nn_pool_sim"]), abs=1e-4)
    at.number_input(key="similarity_page").set_value(2).run()
    assert texts(at).count("test sample") == 3  # 9 test samples: 6 + 3


def test_only_closer_filter_and_benchmark_choice(similarity_workspace, open_page):
    from core.similarity_stage import load_similarity

    test = load_similarity(similarity_workspace, "web.vs.ref", "val_bench", "test")
    at = open_page(PAGE, similarity_workspace.root)
    at.toggle(key="similarity_only_closer").set_value(True).run()
    n_closer = int((test["nn_pool_sim"] > test["s_ref"]).sum())
    assert texts(at).count("test sample") == min(6, n_closer) or (n_closer == 0 and at.info)
    at.multiselect(key="similarity_benchmarks").set_value([]).run()
    assert any("at least one benchmark" in i.value for i in at.info)


def test_save_writes_the_manifest_of_the_closer_samples(similarity_workspace, open_page, tmp_path):
    from core.prune.manifest import load_manifest
    from core.similarity_stage import load_similarity
    from core.workspace import Workspace

    root = tmp_path / "ws"
    shutil.copytree(similarity_workspace.root, root)
    at = open_page(PAGE, root)
    at.text_input(key="similarity_name").set_value("near-val").run()
    at.button(key="similarity_save").click().run()
    assert not at.error and any("Saved near-val" in s.value for s in at.success)
    ws = Workspace(root)
    manifest = load_manifest(ws, "near-val")
    pool = load_similarity(ws, "web.vs.ref", "val_bench", "pool")
    assert set(manifest.loc[~manifest["kept"], "id"]) == set(pool.loc[pool["closer"], "id"])


def test_no_analysis_says_how_to_make_one(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    assert not at.error
    assert any("prunescope similarity" in i.value for i in at.info)


def test_a_damaged_analysis_is_named_and_the_readable_one_still_opens(similarity_workspace, open_page, tmp_path):
    from core.workspace import Workspace
    from tests.conftest import shown

    ws = Workspace(shutil.copytree(similarity_workspace.root, tmp_path / "ws"), create=False)
    good = ws.dir("similarity", "web.vs.ref")
    for name, text in (("aa.truncated", '{"config": {"pool_set": '), ("ab.no-summary", '{"config": {}}'),
                       ("zz.not-a-dict", "[1, 2]")):
        shutil.copytree(good, ws.dir("similarity", name))
        (ws.dir("similarity", name) / "meta.json").write_text(text)
    at = open_page(PAGE, ws.root)
    assert not at.error and not at.exception, [e.value for e in at.error]
    warned = " ".join(shown(w.value) for w in at.warning)
    for name in ("aa.truncated", "ab.no-summary", "zz.not-a-dict"):
        assert f"similarity analysis '{name}'" in warned, warned
    assert at.selectbox(key="similarity_analysis").options == ["web.vs.ref"]
    assert at.dataframe[0].value["test samples"].tolist() == [9]
