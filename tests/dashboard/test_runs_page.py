"""AppTest of the Runs page: a form per job stage, refused parameters, a real cluster job from queue to
done, cancel and resume, re-run with edited parameters, and the Pruning / Similarity pages' "Train on this
manifest".

Jobs run as real processes (``python -m core.jobs run``) started by the page's scheduler; tests that only need
a queued job stop the scheduler (``core.jobs.schedule`` patched to do nothing) so that it stays queued.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import core.jobs as jobs
from core.workspace import Workspace
from dashboard.widgets import md_plain
from tests.conftest import shown
from tests.jobs.test_jobs import laion_workspace, write_release

PAGE = "app_pages/runs.py"
WIDGETS = ("selectbox", "multiselect", "text_input", "text_area", "number_input", "toggle")
#: Rows of the synthetic release: a cluster job on it takes a few seconds, most of them the process start.
N_ROWS = 400


def widget_keys(at: AppTest) -> set[str]:
    return {w.key for kind in WIDGETS for w in getattr(at, kind) if w.key}


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def n_runs(ws: Workspace) -> int:
    return int(ws.catalog.query("SELECT count(*) AS n FROM runs")["n"].iloc[0])


def config(ws: Workspace, run_id: str) -> dict:
    return jobs.job_status(ws, run_id) | {"config": jobs._params(ws, run_id)["job"]["config"]}


def rerun_until(at: AppTest, predicate: Callable[[AppTest], bool], timeout: float = 120.0) -> None:
    """Rerun the page (as its 2 s refresh does) until ``predicate`` holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate(at):
        if time.monotonic() > deadline:
            codes = [c.value for c in at.code]
            pytest.fail(f"timed out after {timeout:.0f} s; metrics {metrics(at)}, codes {codes}")
        time.sleep(0.5)
        at.run()
        assert not at.exception, [e.value for e in at.exception]


def stop_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued jobs stay queued: the page's scheduler starts nothing."""
    monkeypatch.setattr(jobs, "schedule", lambda ws, **kw: [])


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release") / "laion"
    write_release(root, n=N_ROWS, dim=16)
    return root


@pytest.fixture()
def laion(tmp_path: Path, release: Path) -> Iterator[tuple[Workspace, str]]:
    """A fresh workspace with the release as ``pool`` and its embedding set; no job outlives the test."""
    ws, set_id = laion_workspace(tmp_path / "ws", release)
    yield ws, set_id
    cancel_all(ws)


def cancel_all(ws: Workspace) -> None:
    for row in jobs.list_jobs(ws, statuses=jobs.ACTIVE).itertuples():
        jobs.cancel(ws, row.id, grace_s=1)


# -- the forms ---------------------------------------------------------------------------------------------
def test_stage_list_is_the_registry_and_every_stage_gets_its_form(laion, open_page):
    ws, set_id = laion
    at = open_page(PAGE, ws.root)
    assert at.selectbox(key="runs_stage").options == jobs.STAGES.names()
    assert at.selectbox(key="runs_p_cluster_embedding_set").value == set_id  # the catalog's names are offered
    assert "No jobs yet" in " ".join(i.value for i in at.info)
    for stage in jobs.STAGES.names():
        at.selectbox(key="runs_stage").set_value(stage).run()
        assert not at.exception and not at.error, (stage, [e.value for e in at.exception or at.error])
        want = {f"runs_p_{stage}_{p.name}" for p in jobs.STAGES.entry(stage).params}
        assert want <= widget_keys(at), (stage, sorted(want - widget_keys(at)))
        assert jobs.STAGES.entry(stage).summary in [c.value for c in at.caption]
    assert n_runs(ws) == 1  # the import's run only: showing forms queues nothing


def test_reference_fields_offer_the_stage_role_then_the_newest_first(laion, open_page):
    """Clustering offers the pool's embedding sets first, newest first: not an older set whose name sorts
    first, nor a newer set of a benchmark."""
    from datetime import datetime

    ws, set_id = laion
    assert ws.catalog.query("SELECT role FROM datasets WHERE name = 'pool'")["role"].item() == "pool"
    row = ws.catalog.query("SELECT * FROM embedding_sets WHERE id = ?", [set_id]).iloc[0].to_dict()
    ws.catalog.insert("datasets", [{**ws.catalog.query("SELECT * FROM datasets WHERE name = 'pool'").iloc[0].to_dict(),
                                    "name": "bench", "role": "benchmark"}])
    ws.catalog.insert("embedding_sets", [{**row, "id": "aaa.older.image", "created_at": datetime(2020, 1, 1)},
                                         {**row, "id": "bench.newer.image", "dataset": "bench",
                                          "created_at": datetime(2099, 1, 1)}])
    at = open_page(PAGE, ws.root)
    picker = at.selectbox(key="runs_p_cluster_embedding_set")
    assert picker.options == [set_id, "aaa.older.image", "bench.newer.image"] and picker.value == set_id
    at.selectbox(key="runs_stage").set_value("similarity").run()
    assert at.selectbox(key="runs_p_similarity_reference_set").options[0] == "bench.newer.image"  # no reference role
    assert at.multiselect(key="runs_p_similarity_benchmark_sets").options[0] == "bench.newer.image"


@pytest.mark.parametrize(("value", "message"), [("5", "must be an integer >= k (100); got 5"),
                                                ("ten", "must be a int; got 'ten'")])
def test_bad_parameter_is_one_line_and_nothing_is_queued(laion, open_page, value, message):
    ws, _ = laion
    before = n_runs(ws)
    at = open_page(PAGE, ws.root)
    at.text_input(key="runs_p_cluster_fit_sample").input(value).run()
    at.button(key="runs_queue").click().run()
    assert not at.exception
    assert len(at.error) == 1 and message in shown(at.error[0].value) and "\n" not in at.error[0].value
    assert n_runs(ws) == before and jobs.list_jobs(ws).empty


def test_typed_text_in_an_error_stays_text(laion, open_page):
    ws, _ = laion
    at = open_page(PAGE, ws.root)
    at.text_input(key="runs_p_cluster_clustering_id").input("[click](http://evil)").run()
    at.button(key="runs_queue").click().run()
    [error] = [e.value for e in at.error]
    assert md_plain("invalid clustering id '[click](http://evil)'") in error  # Markdown escaped: no link
    assert "invalid clustering id '[click](http://evil)'" in shown(error)
    assert jobs.list_jobs(ws).empty


def test_required_parameters_must_be_filled(laion, open_page):
    ws, _ = laion
    at = open_page(PAGE, ws.root)
    at.selectbox(key="runs_stage").set_value("prune").run()  # no clustering yet, and no chain typed
    at.button(key="runs_queue").click().run()
    assert [shown(e.value) for e in at.error] == ["Fill in the required parameter(s): clustering_id, chain."]
    assert jobs.list_jobs(ws).empty


# -- a real job ----------------------------------------------------------------------------------------------
def test_cluster_job_from_the_form_runs_to_done(laion, open_page):
    ws, set_id = laion
    at = open_page(PAGE, ws.root)
    at.number_input(key="runs_p_cluster_k").set_value(4).run()
    at.number_input(key="runs_p_cluster_n_neighbors").set_value(2).run()
    at.button(key="runs_queue").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Queued cluster job" in at.success[0].value
    [run_id] = jobs.list_jobs(ws)["id"].tolist()
    assert at.selectbox(key="runs_job").value == run_id
    assert metrics(at)["Status"] in ("queued", "running", "done")

    rerun_until(at, lambda a: metrics(a).get("Status") == "done")
    assert metrics(at)["Progress"] == "100%"
    assert at.get("progress")[0].proto.value == 100
    texts = [t.value for t in at.text]
    assert f"Result: clustering {set_id}.k4.s1234" in texts
    assert any("400 rows in 4 clusters" in t for t in texts)
    assert [link.proto.page for link in at.get("page_link")] == ["clusters"]
    rerun_until(at, lambda a: f"job {run_id} done" in at.code[0].value, timeout=10)  # the log's last line
    params_text = at.json[0].value
    assert '"k": 4' in params_text and '"n_neighbors": 2' in params_text
    assert jobs.job_status(ws, run_id)["status"] == "done"


# -- cancel, resume, re-run ---------------------------------------------------------------------------------
def test_cancel_then_resume_a_queued_job(laion, open_page, monkeypatch):
    ws, set_id = laion
    stop_scheduler(monkeypatch)
    run_id = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 4})
    at = open_page(PAGE, ws.root)
    assert at.selectbox(key="runs_job").value == run_id
    assert metrics(at)["Status"] == "queued"
    assert at.button(key="runs_resume").disabled and not at.button(key="runs_cancel").disabled
    at.button(key="runs_cancel").click().run()
    assert not at.exception and not at.error
    assert jobs.job_status(ws, run_id)["status"] == "cancelled" == metrics(at)["Status"]
    assert f"Job {run_id}: cancelled." in [shown(s.value) for s in at.success]
    at.button(key="runs_resume").click().run()
    assert jobs.job_status(ws, run_id)["status"] == "queued" == metrics(at)["Status"]


def test_rerun_fills_the_form_and_queues_the_edited_job(laion, open_page, monkeypatch):
    ws, set_id = laion
    stop_scheduler(monkeypatch)
    first = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 5, "n_neighbors": 3, "niter": 7,
                                        "fit_sample": 50})
    at = open_page(PAGE, ws.root)
    at.selectbox(key="runs_stage").set_value("embed").run()
    at.button(key="runs_rerun").click().run()
    assert not at.exception and not at.error
    assert at.selectbox(key="runs_stage").value == "cluster"
    assert at.number_input(key="runs_p_cluster_k").value == 5
    assert at.number_input(key="runs_p_cluster_n_neighbors").value == 3
    assert at.number_input(key="runs_p_cluster_niter").value == 7
    assert at.text_input(key="runs_p_cluster_fit_sample").value == "50"
    assert at.text_input(key="runs_p_cluster_clustering_id").value == ""  # derived from k: not copied
    assert f"Filled from job {first}" in at.info[0].value

    at.number_input(key="runs_p_cluster_k").set_value(6).run()
    at.button(key="runs_queue").click().run()
    assert not at.error, [e.value for e in at.error]
    second = at.selectbox(key="runs_job").value
    assert second != first
    cfg = config(ws, second)["config"]
    assert (cfg["k"], cfg["n_neighbors"], cfg["niter"], cfg["fit_sample"]) == (6, 3, 7, 50)
    assert cfg["clustering_id"] == f"{set_id}.k6.s1234"


# -- "Train on this manifest" ------------------------------------------------------------------------------
@pytest.fixture()
def clustered_copy(clustered_workspace, tmp_path) -> Iterator[Workspace]:
    root = tmp_path / "ws"
    shutil.copytree(clustered_workspace.root, root)
    ws = Workspace(root, create=False)
    yield ws
    cancel_all(ws)


def assert_train_job_queued(ws: Workspace, at: AppTest, manifest: str) -> None:
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("Queued train-clip job" in s.value for s in at.success)
    assert [link.proto.page for link in at.get("page_link")][-1:] == ["runs"]
    [run_id] = jobs.list_jobs(ws, statuses=["queued"])["id"].tolist()
    cfg = config(ws, run_id)
    assert cfg["stage"] == "train-clip"
    assert (cfg["config"]["dataset"], cfg["config"]["manifest"]) == ("web_pool", manifest)


def test_pruning_page_trains_on_its_saved_manifest(clustered_copy, open_page, monkeypatch):
    stop_scheduler(monkeypatch)
    at = open_page("app_pages/pruning.py", clustered_copy.root)
    at.toggle(key="pruning_dedup").set_value(False).run()
    at.selectbox(key="pruning_method").set_value("random").run()
    at.text_input(key="pruning_name").input("rand-a").run()
    at.button(key="pruning_save").click().run()
    at.button(key="pruning_train").click().run()
    assert_train_job_queued(clustered_copy, at, "rand-a")


def test_similarity_page_trains_on_its_saved_manifest(clustered_copy, open_page, monkeypatch):
    from core.embed import EmbedConfig, embed_dataset
    from core.similarity_stage import SimilarityConfig, run_similarity

    ws = clustered_copy
    sets = {name: embed_dataset(ws, EmbedConfig(dataset=name, model="demo-vit-tiny", num_workers=0)).id
            for name in ("val_bench", "ref_clean")}
    pool_set = str(ws.catalog.query("SELECT embedding_set FROM clusterings WHERE id = 'web3'").iloc[0, 0])
    run_similarity(ws, SimilarityConfig(pool_set=pool_set, reference_set=sets["ref_clean"],
                                        benchmark_sets=(sets["val_bench"],), analysis_id="web.vs.ref"))
    stop_scheduler(monkeypatch)
    at = open_page("app_pages/similarity.py", ws.root)
    at.text_input(key="similarity_name").input("closer-gone").run()
    at.button(key="similarity_save").click().run()
    at.button(key="similarity_train").click().run()
    assert_train_job_queued(ws, at, "closer-gone")
