"""The detection commands as a user runs them: train a detector, write a corrupted copy, evaluate both ways."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.demo.benchmarks import DETECTION_TRAIN_DIR, write_detection, write_detection_train
from core.demo.spec import World, WorldSize
from core.workspace import Workspace

SCENES = WorldSize("scenes", n_classes=3, pool=10, shard_size=10, reference_per_class=1, bench_per_class=1,
                   detection_scenes=4, laion_partitions=1, detection_train_scenes=8)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = World(tmp_path_factory.mktemp("scenes") / "demo", SCENES, seed=5)
    write_detection(world)
    write_detection_train(world)
    return world.out


@pytest.mark.slow
def test_train_corrupt_and_evaluate_from_the_cli(scenes: Path, cli, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    proc = cli("train", "detector", scenes / DETECTION_TRAIN_DIR, "--val-data", scenes / "detection", "--steps", "3",
               "--batch-size", "2", "--device", "cpu", "-o", "warmup_steps=1", "-o", "cpu_threads=1", workspace=ws)
    assert proc.returncode == 0, proc.stderr
    run_id = re.search(r"run (\S+) finished", proc.stdout).group(1)
    assert (ws / "runs" / run_id / "checkpoints" / "last.pt").is_file()

    out = tmp_path / "scenes-c"
    proc = cli("corrupt", "detection", scenes / "detection", out, "--corruptions", "fog,gaussian_noise",
               "--severities", "1,5", workspace=ws)
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "fog" / "5").iterdir())) == SCENES.detection_scenes
    source = json.loads((scenes / "detection" / "annotations.json").read_text())
    written = json.loads((out / "annotations.json").read_text())
    assert sorted(a["bbox"] for a in written["annotations"]) == sorted(a["bbox"] for a in source["annotations"])

    # the same grid twice: on the fly from the clean scenes, and from the tree just written (JPEG round trip)
    on_the_fly = cli("eval", "detection", scenes / "detection", "--model", f"det={run_id}", "--corruptions",
                     "fog,gaussian_noise", "--severities", "1,5", "--device", "cpu", workspace=ws)
    assert on_the_fly.returncode == 0, on_the_fly.stderr
    from_tree = cli("eval", "detection", out, "--clean-data", scenes / "detection", "--model", f"det={run_id}",
                    "--device", "cpu", "--dataset", "scenes-c", workspace=ws)
    assert from_tree.returncode == 0, from_tree.stderr
    cat = Workspace(ws, create=False).catalog
    cells = cat.query("SELECT dataset, corruption, severity, value FROM metrics WHERE metric = 'AP50' "
                      "AND corruption IS NOT NULL ORDER BY dataset, corruption, severity")
    assert len(cells) == 8  # 2 corruptions x 2 severities, each way
    assert set(cells["dataset"]) == {"detection", "scenes-c"}
    assert cat.query("SELECT count(*) AS n FROM metrics WHERE metric = 'mPC'")["n"].iloc[0] == 0  # partial grids


def test_bad_detection_commands_are_one_line_errors(cli, tmp_path: Path) -> None:
    proc = cli("train", "detector", workspace=tmp_path / "ws")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = cli("corrupt", "detection", tmp_path / "missing.json", tmp_path / "out", workspace=tmp_path / "ws")
    assert proc.returncode == 3 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("train", "detector", tmp_path, "--arch", "yolo", workspace=tmp_path / "ws")
    assert proc.returncode == 2 and "yolo" in proc.stderr
