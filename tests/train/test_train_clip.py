"""CLIP training: config, data selection, sampler, and tiny end-to-end and resume runs on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.errors import ConfigError, DataError, UnknownName
from core.runs import read_progress
from core.train.clip import (
    StepBatchSampler,
    TrainClipConfig,
    load_run_config,
    main,
    train_clip,
    training_index,
)
from core.train.losses import LOSSES

from .conftest import BLANK_CAPTION, CORRUPTED_LATER, N_IMAGES, NO_CAPTION

TINY = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread():
    # Small matmuls gain nothing from a second thread and lose a lot when the two cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(ds: str, **kw) -> TrainClipConfig:
    return TrainClipConfig(dataset=ds, **{**TINY, **kw})


# -- config and data ---------------------------------------------------------------------------------------
def test_config_is_validated_on_creation():
    with pytest.raises(UnknownName, match="available: aninfonce, infonce"):
        TrainClipConfig(dataset="d", loss="simclr")
    with pytest.raises(ConfigError, match="steps"):
        TrainClipConfig(dataset="d", steps=0)
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainClipConfig(dataset="d", steps=5, warmup_steps=6)
    with pytest.raises(ConfigError, match="precision"):
        TrainClipConfig(dataset="d", precision="fp8")
    with pytest.raises(ConfigError, match="invalid dataset name"):
        TrainClipConfig(dataset="../etc")
    cfg = TrainClipConfig(dataset="d")
    assert TrainClipConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainClipConfig.from_dict({"dataset": "d", "epochs": 3})


def test_sampler_batches_are_a_function_of_the_step():
    full = list(StepBatchSampler(10, 3, seed=7, total_steps=8))
    assert len(full) == 8 and all(len(b) == 3 for b in full)
    resumed = list(StepBatchSampler(10, 3, seed=7, total_steps=8, start_step=5))
    assert resumed == full[5:]
    epoch0 = [i for b in full[:3] for i, _ in b]
    assert len(set(epoch0)) == 9  # 3 batches of an epoch: distinct rows (the 10th is dropped)
    assert [i for i, _ in full[3]] != [i for i, _ in full[0]]  # a new permutation each epoch
    assert list(StepBatchSampler(10, 3, seed=8, total_steps=8)) != full


def test_sampler_shards_each_global_batch_across_ranks():
    ranks = [list(StepBatchSampler(20, 2, seed=1, total_steps=6, rank=r, world_size=3)) for r in range(3)]
    for step in range(6):
        rows = [i for r in range(3) for i, _ in ranks[r][step]]
        seeds = [s for r in range(3) for _, s in ranks[r][step]]
        assert len(set(rows)) == 6 and len(set(seeds)) == 6
    with pytest.raises(DataError, match="cannot fill one batch of 4 x 2") as err:
        StepBatchSampler(5, 4, seed=0, total_steps=1, world_size=2)
    assert "batch-size" in (err.value.hint or "")


def test_training_index_uses_manifest_ids_and_skips_uncaptioned(captioned):
    ds, rows, skipped = training_index(captioned.ws, _cfg(captioned.dataset))
    assert len(rows) == N_IMAGES - len(NO_CAPTION) - len(BLANK_CAPTION)
    assert skipped == {"missing_caption": len(NO_CAPTION) + len(BLANK_CAPTION)}
    for manifest in (str(captioned.manifest), "keep-most"):  # a path or a manifest id
        _, rows, skipped = training_index(captioned.ws, _cfg(captioned.dataset, manifest=manifest))
        assert set(rows["id"]) <= captioned.kept_ids
        assert skipped["not_in_manifest"] == N_IMAGES - len(captioned.kept_ids)
    with pytest.raises(UnknownName):
        training_index(captioned.ws, _cfg("no-such-dataset"))


def test_a_manifest_without_ids_or_with_no_captioned_rows_fails(captioned, tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"sample": ["x"]}).to_parquet(bad)
    with pytest.raises(DataError, match="no 'id' column"):
        training_index(captioned.ws, _cfg(captioned.dataset, manifest=str(bad)))
    only_uncaptioned = tmp_path / "none.parquet"
    pd.DataFrame({"id": [f"img_{i:03d}.png" for i in NO_CAPTION]}).to_parquet(only_uncaptioned)
    with pytest.raises(DataError, match="no captioned samples"):
        training_index(captioned.ws, _cfg(captioned.dataset, manifest=str(only_uncaptioned)))


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES.names())
def test_train_clip_end_to_end(captioned, loss):
    from core.models import load_clip

    ws = captioned.ws
    cfg = _cfg(captioned.dataset, loss=loss, manifest="keep-most", batch_size=8)
    result = train_clip(ws, cfg)
    assert result.finished and result.steps == 4 and result.img_per_s > 0
    assert math.isfinite(result.final_loss) and result.final_loss > 0

    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["last.pt", "step-000002.pt", "step-000004.pt"]
    progress = read_progress(result.run_dir)
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and all(p["total"] == 4 for p in progress)
    assert {"loss", "lr", "img_per_s"} <= set(progress[0])
    assert "step 4/4" in (result.run_dir / "log.txt").read_text()
    data = json.loads((result.run_dir / "data.json").read_text())
    assert data["n_samples"] == result.n_samples and data["skipped"]["not_in_manifest"] == 4

    run = ws.catalog.query("SELECT status, kind FROM runs WHERE id = ?", [result.run_id]).iloc[0]
    assert (run["status"], run["kind"]) == ("done", "train-clip")
    metrics = ws.catalog.query("SELECT model, dataset, metric, value FROM metrics WHERE run_id = ?", [result.run_id])
    assert set(metrics["metric"]) == {"train_loss_final", "train_img_per_s"}
    assert set(metrics["model"]) == {f"clip:{result.run_id}"} and set(metrics["dataset"]) == {"captioned"}

    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["arch"] == "demo-vit-tiny" and ckpt["loss_name"] == loss
    reloaded = load_clip("demo-vit-tiny", checkpoint=result.checkpoint, device="cpu")
    state = reloaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    if loss == "aninfonce":
        assert "lam" in ckpt["loss"] and ckpt["loss"]["lam"].shape == (reloaded.embed_dim,)
    else:  # InfoNCE trains the model's own logit scale, so the saved model carries it
        assert torch.equal(ckpt["loss"]["logit_scale"], ckpt["state_dict"]["logit_scale"])


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted(captioned):
    # Every captioned row, 2 steps of 8 over 26 rows: the corrupted image is drawn in one of them
    # for seed 3 (checked below through the sampler, so the test does not depend on luck).
    cfg = _cfg(captioned.dataset, steps=3, batch_size=8, seed=3, checkpoint_every=0)
    _, rows, _ = training_index(captioned.ws, cfg)
    sampler = StepBatchSampler(len(rows), 8, seed=3, total_steps=3)
    drawn = {rows.iloc[i]["id"] for batch in sampler for i, _ in batch}
    assert CORRUPTED_LATER in drawn
    result = train_clip(captioned.ws, cfg)
    assert result.finished
    assert sum(v for k, v in result.skipped.items() if k.endswith("_image")) == 1


@pytest.mark.slow
def test_resumed_run_continues_step_count_schedule_and_weights(captioned):
    """Stop after 3 of 6 steps, resume by run id: same step count, same LR per step, same weights."""
    ws = captioned.ws
    cfg = _cfg(captioned.dataset, steps=6, warmup_steps=2, checkpoint_every=0, loss="aninfonce")
    whole = train_clip(ws, cfg)

    first = train_clip(ws, cfg, stop_after_steps=3)
    assert not first.finished and first.steps == 3
    status = ws.catalog.query("SELECT status, message FROM runs WHERE id = ?", [first.run_id]).iloc[0]
    assert status["status"] == "cancelled" and "resume" in status["message"]
    assert ws.catalog.query("SELECT count(*) AS n FROM metrics WHERE run_id = ?", [first.run_id])["n"][0] == 0

    stored = load_run_config(ws, first.run_id)
    assert stored == replace(cfg, run_id=first.run_id)
    resumed = train_clip(ws, stored)
    assert resumed.run_id == first.run_id and resumed.run_dir == first.run_dir
    assert resumed.finished and resumed.steps == 6

    lr_whole = {p["step"]: p["lr"] for p in read_progress(whole.run_dir)}
    lr_resumed = {p["step"]: p["lr"] for p in read_progress(resumed.run_dir)}
    assert sorted(lr_resumed) == [1, 2, 3, 4, 5, 6]
    assert lr_resumed == pytest.approx(lr_whole, rel=1e-12)
    loss_whole = {p["step"]: p["loss"] for p in read_progress(whole.run_dir)}
    loss_resumed = {p["step"]: p["loss"] for p in read_progress(resumed.run_dir)}
    assert loss_resumed == pytest.approx(loss_whole, rel=1e-5)

    a = torch.load(whole.checkpoint, map_location="cpu", weights_only=True)
    b = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    torch.testing.assert_close(b["loss"]["lam"], a["loss"]["lam"], rtol=1e-6, atol=1e-7)
    assert ws.catalog.query("SELECT status FROM runs WHERE id = ?", [first.run_id])["status"][0] == "done"

    again = train_clip(ws, stored)  # resuming a finished run is a no-op that reports it
    assert again.finished and again.steps == 6 and again.final_loss == pytest.approx(resumed.final_loss)
    with pytest.raises(ConfigError, match="different config"):
        train_clip(ws, replace(stored, lr=1e-3))
    with pytest.raises(UnknownName):
        load_run_config(ws, "no-such-run")


@pytest.mark.slow
def test_module_entry_point_trains_and_resumes(captioned, capsys):
    root = str(captioned.ws.root)
    args = ["--workspace", root, "--dataset", captioned.dataset, "--steps", "2", "--batch-size", "4",
            "--warmup-steps", "0", "--device", "cpu", "--no-progress", "--log-every", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and Path(out["checkpoint"]).is_file()
    assert main(["--workspace", root, "--resume", out["run_id"], "--no-progress"]) == 0
    assert main(["--workspace", root, "--dataset", captioned.dataset, "--loss", "nope"]) == 2
    assert "error: loss 'nope' not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES.names())
def test_two_cpu_processes_under_torchrun_train_one_run(captioned, loss):
    """DDP on CPU (gloo): two ranks, one run folder written by rank 0, a global batch of 2 x 4."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "core.train.clip", "--workspace", str(captioned.ws.root), "--dataset", captioned.dataset,
           "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--device", "cpu", "--no-progress",
           "--log-every", "1", "--loss", loss, "--cpu-threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["steps"] == 3
    progress = read_progress(captioned.ws.abs(f"runs/{out['run_id']}"))
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert progress[-1]["img_per_s"] > 0
    ckpt = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    with pytest.raises(ConfigError, match="trained with 2 process"):  # resuming needs the same world size
        train_clip(captioned.ws, load_run_config(captioned.ws, out["run_id"]))
    status = captioned.ws.catalog.query("SELECT status FROM runs WHERE id = ?", [out["run_id"]])["status"][0]
    assert status == "done"  # a refused resume leaves the run's record alone
