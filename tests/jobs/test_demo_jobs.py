"""`prunescope demo` runs each stage as a job: the stage config, its job, a failing stage's report."""

from __future__ import annotations

import pytest

import core.jobs as jobs
from core.demo.pipeline import STAGE_NAMES, DemoStageConfig, _stage_as_job
from core.errors import ConfigError, PrunescopeError
from core.workspace import Workspace


@pytest.mark.parametrize("kw, needle", [
    ({"stage": "nope"}, "unknown demo stage"),
    ({"stage": "generate", "size": "huge"}, "unknown demo size"),
    ({"stage": "generate", "seed": -1}, "seed"),
    ({"stage": "generate", "seed": True}, "seed"),
])
def test_bad_demo_stage_configs_are_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        DemoStageConfig(**kw)


def test_the_demo_job_offers_every_stage_in_order(tmp_path):
    spec = {p.name: p for p in jobs.STAGES.entry("demo").params}
    assert tuple(spec["stage"].choices) == STAGE_NAMES
    assert STAGE_NAMES[0] == "generate" and STAGE_NAMES[-1] == "detection"
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ConfigError, match="colour"):
        jobs.submit(ws, "demo", {"stage": "generate", "colour": "red"})
    assert jobs.list_jobs(ws).empty


def test_a_demo_stage_runs_as_a_job_with_a_row_progress_and_message(tmp_path):
    ws = Workspace(tmp_path / "ws")
    lines: list[str] = []
    message = _stage_as_job(ws, DemoStageConfig("reference_results", "tiny"), lines.append, poll_s=0.1)
    assert "reference" in message
    listed = jobs.list_jobs(ws)
    assert listed["stage"].tolist() == ["demo"] and listed["status"].tolist() == ["done"]
    status = jobs.job_status(ws, listed["id"].iloc[0])
    assert status["fraction"] == 1.0 and status["message"] == message
    assert status["progress"]["stage"] == "demo reference_results"
    assert ws.catalog.query("SELECT count(*) AS n FROM reference_results")["n"].iloc[0] > 0


def test_a_failing_demo_stage_raises_with_its_job_and_shows_the_log(tmp_path):
    ws = Workspace(tmp_path / "ws")
    lines: list[str] = []
    with pytest.raises(PrunescopeError, match=r"demo stage embed failed \(job ") as info:
        _stage_as_job(ws, DemoStageConfig("embed", "tiny"), lines.append, poll_s=0.1)
    assert "log.txt" in (info.value.hint or "")
    assert any("the end of its log" in line for line in lines)
    assert jobs.list_jobs(ws)["status"].tolist() == ["failed"]


def test_the_heartbeat_names_the_progress_of_the_stage_s_own_run(tmp_path):
    import os

    from core.demo.pipeline import _inner_progress
    from core.runs import ProgressWriter, recorded_run

    ws = Workspace(tmp_path / "ws")
    assert _inner_progress(ws, "job-x") == ""
    with recorded_run(ws, "demo-stage", {}) as job, recorded_run(ws, "train-clip", {}) as run:
        assert _inner_progress(ws, job.id) == ""  # running, nothing reported yet
        ProgressWriter(run.dir).write(stage="train", step=3, total=10)
        assert _inner_progress(ws, job.id) == ": train-clip 3/10"
        assert _inner_progress(ws, run.id) == ""  # the outer row reported nothing
        ws.catalog.execute("UPDATE runs SET pid = ? WHERE id = ?", [os.getpid() + 1, run.id])
        assert _inner_progress(ws, job.id) == ""  # another process's run (a job running beside it)
    assert _inner_progress(ws, job.id) == ""  # done: no longer running


@pytest.mark.parametrize("stage, config, expected", [
    ("demo", {"stage": "robustness", "size": "tiny"}, "robustness (tiny)"),
    ("train-classifier", {"dataset": "reference", "val_dataset": "val"}, "reference"),
    ("cluster", {"embedding_set": "pool.image", "k": 8}, "pool.image"),
    ("eval-zeroshot", {"datasets": ["val", "v2"]}, "val, v2"),
    ("eval-corruptions", {"models": ["a.pt"]}, ""),
])
def test_a_job_s_target_says_what_it_works_on(stage, config, expected):
    assert jobs.job_target(stage, config) == expected


def test_every_stage_s_needs_come_earlier_in_the_stage_order():
    from core.demo.pipeline import NEEDS, START_ORDER

    assert set(NEEDS) == set(STAGE_NAMES) == set(START_ORDER) and len(START_ORDER) == len(STAGE_NAMES)
    for name, needs in NEEDS.items():
        assert all(STAGE_NAMES.index(n) < STAGE_NAMES.index(name) for n in needs), name
