"""AppTest of the Pruning page: the chain form, instant re-plan, saving and comparing manifests."""

from __future__ import annotations

import shutil

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import shown

PAGE = "app_pages/pruning.py"


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture()
def workspace_copy(clustered_workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(clustered_workspace.root, root)
    return root


def test_default_chain_previews_semdedup_then_dbp(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    assert not at.error, [e.value for e in at.error]
    m = metrics(at)
    assert m["Input rows"] == "10"
    assert int(m["Kept"]) + int(m["Removed"]) == 10
    assert at.selectbox(key="pruning_method").value == "dbp"
    assert len(at.get("plotly_chart")) >= 3  # eps curve, quotas, kept by cluster


def test_random_baseline_keeps_exactly_the_fraction(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    at.toggle(key="pruning_dedup").set_value(False).run()
    at.selectbox(key="pruning_method").set_value("random").run()
    at.slider(key="pruning_s2_random_keep_fraction").set_value(0.3).run()
    assert not at.exception and not at.error
    m = metrics(at)
    assert (m["Kept"], m["Removed"]) == ("3", "7")
    reasons = next(df.value for df in at.dataframe if "reason" in df.value.columns)
    assert reasons.set_index("reason")["removed"].to_dict() == {"random:not_sampled": 7} or reasons["removed"].sum() == 7


def test_eps_slider_changes_what_semdedup_removes(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    at.selectbox(key="pruning_method").set_value("(nothing)").run()
    kept = {}
    for eps in (1e-5, 0.3):
        at.select_slider(key="pruning_s1_eps").set_value(eps).run()
        assert not at.exception
        kept[eps] = int(metrics(at)["Kept"])
    assert kept[1e-5] >= kept[0.3] and kept[1e-5] >= 1


def test_bad_parameter_is_a_one_line_error(clustered_workspace, open_page):
    at = open_page(PAGE, clustered_workspace.root)
    at.selectbox(key="pruning_method").set_value("dbp").run()
    at.slider(key="pruning_s2_dbp_keep_fraction").set_value(0.0).run()
    assert not at.exception
    assert len(at.error) == 1 and "keep_fraction" in shown(at.error[0].value)


def test_save_manifest_registers_it_and_compare_appears(workspace_copy, open_page):
    from core.prune.manifest import list_prunings, load_manifest
    from core.workspace import Workspace

    at = open_page(PAGE, workspace_copy)
    at.toggle(key="pruning_dedup").set_value(False).run()
    at.selectbox(key="pruning_method").set_value("random").run()
    at.text_input(key="pruning_name").input("rand-a").run()
    at.button(key="pruning_save").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.success and "kept" in at.success[0].value
    at.slider(key="pruning_s2_random_keep_fraction").set_value(0.8).run()
    at.text_input(key="pruning_name").input("rand-b").run()
    at.button(key="pruning_save").click().run()
    ws = Workspace(workspace_copy, create=False)
    assert set(list_prunings(ws)["id"]) == {"rand-a", "rand-b"}
    manifest = load_manifest(ws, "rand-b")
    assert len(manifest) == 10 and int(manifest["kept"].sum()) == 8
    assert manifest.loc[~manifest["kept"], "reason"].notna().all()
    at.run()
    assert "Jaccard" in metrics(at)


def test_saved_pruning_prefills_the_form(workspace_copy, open_page):
    from core.prune.manifest import PruneConfig, run_pruning
    from core.workspace import Workspace

    run_pruning(Workspace(workspace_copy, create=False), PruneConfig(
        clustering_id="web3", chain=[("semdedup", {"eps": 0.02}), ("ssp", {"keep_fraction": 0.4})], pruning_id="saved"))
    at = open_page(PAGE, workspace_copy)
    assert at.selectbox(key="pruning_start").value == "saved"
    assert at.selectbox(key="pruning_method").value == "ssp"
    assert at.select_slider(key="pruning_s1_eps").value == 0.02
    assert at.slider(key="pruning_s2_ssp_keep_fraction").value == 0.4


def test_no_clusterings_says_what_to_do(small_workspace, open_page):
    at = open_page(PAGE, small_workspace.root)
    assert "prunescope cluster" in " ".join(i.value for i in at.info)
