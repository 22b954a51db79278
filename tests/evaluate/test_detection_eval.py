"""The detection grid: AP per domain, catalog rows, P / mPC / rPC against robustness.mpc / rpc and hand
counts, resume, a corrupted tree on disk, category matching, and bad configs refused.

The detector is a stub that finds coloured rectangles by their colour (red = "cat", blue = "dog"), so
clean AP is exactly 1 and a shifted rectangle gives an IoU, hence an AP, that can be counted by hand.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.errors import ConfigError, DataError, UnknownName

W, H = 64, 32
RECT = (10, 12, 40, 22)  # x0, y0, x1, y1 (exclusive): 30 x 10 px
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}]  # not contiguous on purpose
COLOURS = {3: (220, 30, 30), 9: (30, 30, 220)}
THRESHOLDS = np.linspace(0.5, 0.95, 10)


class ColourBoxes(torch.nn.Module):
    """Label 1: the bounding box of red-dominant pixels, label 2: of blue-dominant ones (torchvision API)."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.images_seen: list[float] = []  # sum of each input image, in call order
        self.fail_after = fail_after

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for x in images:
            if self.fail_after is not None and len(self.images_seen) >= self.fail_after:
                raise RuntimeError("simulated crash")
            a = x.numpy()
            self.images_seen.append(float(a.sum()))
            boxes, labels, scores = [], [], []
            for label, (c, others) in {1: (0, [1, 2]), 2: (2, [0, 1])}.items():
                mask = (a[c] - a[others].max(0)) > 0.35
                if mask.any():
                    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
                    box = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
                    boxes.append([float(v) for v in box])
                    labels.append(label)
                    scores.append(float(mask.sum()) / float((box[2] - box[0]) * (box[3] - box[1])))
            out.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64),
                        "scores": torch.tensor(scores)})
        return out


def stub(label="stub", names=None, ids=None, **kw):
    return types.SimpleNamespace(label=label, arch="stub", module=ColourBoxes(**kw), source="stub",
                                 categories=names or {1: "cat", 2: "dog"}, category_ids=ids or {1: 3, 2: 9})


@pytest.fixture()
def stubs(monkeypatch):
    """``load_detector`` replaced: spec ``NAME`` -> a fresh stub labelled NAME (``NAME=...`` as usual)."""
    from core.evaluate import detection

    made: dict[str, types.SimpleNamespace] = {}
    registry: dict[str, dict] = {}

    def load(ws, spec, device):
        label, _, rest = spec.partition("=")
        det = stub(label, **registry.get(rest or label, {}))
        made[label] = det
        return det

    monkeypatch.setattr(detection, "_load_detector", load)
    return types.SimpleNamespace(made=made, registry=registry)


def draw(path: Path, shift: int = 0, category: int = 3) -> None:
    arr = np.full((H, W, 3), 128, np.uint8)
    x0, y0, x1, y1 = RECT
    arr[y0:y1, x0 + shift:x1 + shift] = COLOURS[category]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def coco_set(root: Path, n: int = 4) -> Path:
    """n images, one rectangle each (cat / dog alternating), as a COCO folder with annotations.json."""
    images, anns = [], []
    for i in range(n):
        cat = 3 if i % 2 == 0 else 9
        draw(root / "images" / f"im{i}.png", category=cat)
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": W, "height": H})
        x0, y0, x1, y1 = RECT
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": CATEGORIES}))
    return root


@pytest.fixture()
def ws(tmp_path):
    from core.workspace import Workspace

    w = Workspace(tmp_path / "ws")
    coco_set(w.root / "det")
    return w


def config(**kw):
    from core.evaluate.detection import DetectionEvalConfig

    base = dict(data="det", models=("a",), corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
                batch_size=3, seed=2, device="cpu")
    return DetectionEvalConfig(**(base | kw))


def metrics(w, run_id: str) -> pd.DataFrame:
    return w.catalog.query("SELECT model, dataset, corruption, severity, adaptation, metric, value FROM metrics "
                           "WHERE run_id = ?", [run_id])


# -- the on-the-fly grid ---------------------------------------------------------------------------
def test_grid_results_rows_and_pixels(ws, stubs):
    from core.detection.coco_eval import coco_ap, predict
    from core.detection.data import CorruptedDetection, read_coco
    from core.evaluate.detection import evaluate_detection

    results = evaluate_detection(ws, config(models=("a", "b")))
    assert results.attrs["metric"] == "ap" and results.attrs["dataset"] == "det"
    assert len(results) == 2 * 5 and set(results["n_images"]) == {4}
    clean = results[results["corruption"] == "clean"]
    assert clean[["ap", "ap50", "ap75"]].to_numpy() == pytest.approx(1.0)  # the stub is exact on clean images
    # Every model saw the same pixels, and they are CorruptedDetection's: recompute one cell by brute force.
    assert stubs.made["a"].module.images_seen == stubs.made["b"].module.images_seen
    ds = read_coco(ws.root / "det" / "annotations.json")
    view = CorruptedDetection(ds, "gaussian_noise", 5, seed=2)
    pairs = [(view[i][0], im.image_id) for i, im in enumerate(ds.images)]
    expected = coco_ap(ds.coco_gt(), predict(ColourBoxes(), pairs, label_to_category={1: 3, 2: 9}))
    got = results[(results["model"] == "a") & (results["corruption"] == "gaussian_noise") & (results["severity"] == 5)]
    assert got[["ap", "ap50", "ap75"]].iloc[0].to_dict() == pytest.approx(expected)
    assert expected["ap"] < 1.0  # the noise did move the stub's boxes: the check has teeth
    # the catalog: AP and AP50 per cell in %, clean as NULL / 0, P per model, no mPC for a partial grid
    run = ws.catalog.query("SELECT id, status, message FROM runs WHERE kind = 'eval-detection'").iloc[0]
    assert run["status"] == "done" and "no mPC" in run["message"]
    m = metrics(ws, run["id"])
    cells = m[m["metric"].isin(["AP", "AP50"])]
    assert len(cells) == 2 * 5 * 2 and set(m["adaptation"]) == {"none"} and set(m["dataset"]) == {"det"}
    assert set(m["metric"]) == {"AP", "AP50", "P"}
    row = cells[(cells["model"] == "a") & (cells["corruption"] == "gaussian_noise") & (cells["severity"] == 5)
                & (cells["metric"] == "AP")]
    assert row["value"].iloc[0] == pytest.approx(100 * expected["ap"])
    assert m.loc[m["metric"] == "P", "value"].tolist() == pytest.approx([100.0, 100.0])
    assert m[m["metric"] == "P"]["corruption"].isna().all()
    assert cells[cells["corruption"].isna()]["severity"].eq(0).all()
    run_dir = ws.root / "runs" / run["id"]
    assert (run_dir / "results.parquet").exists() and (run_dir / "params.json").exists()
    progress = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5] and progress[-1]["total"] == 5


def test_limit_and_explicit_dataset_name(ws, stubs):
    from core.evaluate.detection import evaluate_detection

    results = evaluate_detection(ws, config(limit=2, corruptions=("brightness",), severities=(1,), dataset="toy"))
    assert set(results["n_images"]) == {2}
    assert set(metrics(ws, results.attrs["run_id"])["dataset"]) == {"toy"}


def test_resume_keeps_finished_cells(ws, stubs):
    from core.evaluate.detection import evaluate_detection

    stubs.registry["a"] = {"fail_after": 4 * 3}  # crashes in the fourth of five domains
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate_detection(ws, config())
    run = ws.catalog.query("SELECT id, status, run_dir FROM runs").iloc[0]
    assert run["status"] == "failed"
    partial = pd.read_parquet(ws.root / run["run_dir"] / "results.parquet")
    assert len(partial) == 3
    stubs.registry["a"] = {}
    resumed = evaluate_detection(ws, config(run_id=run["id"]))
    assert len(stubs.made["a"].module.images_seen) == 2 * 4  # only the two unfinished domains ran
    fresh = evaluate_detection(ws, config())
    cols = ["model", "corruption", "severity", "n_images", "ap", "ap50", "ap75"]
    pd.testing.assert_frame_equal(resumed[cols].reset_index(drop=True), fresh[cols].reset_index(drop=True),
                                  check_dtype=False)
    status = ws.catalog.query("SELECT status FROM runs WHERE id = ?", [run["id"]])["status"].iloc[0]
    assert status == "done" and len(metrics(ws, run["id"])) == len(metrics(ws, fresh.attrs["run_id"]))


def test_resume_refuses_other_settings_and_unknown_runs(ws, stubs):
    from core.evaluate.detection import evaluate_detection

    first = evaluate_detection(ws, config(corruptions=("brightness",), severities=(1,)))
    run_id = first.attrs["run_id"]
    with pytest.raises(ConfigError, match="seed"):
        evaluate_detection(ws, config(corruptions=("brightness",), severities=(1,), seed=5, run_id=run_id))
    assert ws.catalog.query("SELECT status FROM runs WHERE id = ?", [run_id])["status"].iloc[0] == "done"
    with pytest.raises(UnknownName):
        evaluate_detection(ws, config(run_id="nope-0001"))
    # the grid may grow on resume: the new domain is evaluated, the old one kept
    grown = evaluate_detection(ws, config(corruptions=("brightness",), severities=(1, 2), run_id=run_id))
    assert sorted(grown["severity"].tolist()) == [0, 1, 2]
    params = json.loads((ws.root / "runs" / run_id / "params.json").read_text())
    assert params["config"]["severities"] == [1, 2]


# -- the full grid, from a corrupted tree: P / mPC / rPC -------------------------------------------
def iou_ap(shift: int) -> float:
    """AP@[.5:.95] of one exact-size box shifted sideways by ``shift`` px on every image: the share of
    IoU thresholds the IoU (30 - k) / (30 + k) reaches."""
    w = RECT[2] - RECT[0]
    return float(np.mean((w - shift) / (w + shift) >= THRESHOLDS - 1e-12))


def shift_of(ci: int, severity: int) -> int:
    return severity - 1 + ci % 3


def test_full_tree_grid_gives_mpc_and_rpc(ws, stubs, tmp_path):
    from core.corrupt import TEST_CORRUPTIONS
    from core.evaluate.detection import evaluate_detection
    from core.evaluate.robustness import mpc, rpc

    tree = tmp_path / "tree"
    gt = json.loads((ws.root / "det" / "annotations.json").read_text())
    (tree).mkdir()
    (tree / "annotations.json").write_text(json.dumps(gt))
    for ci, c in enumerate(TEST_CORRUPTIONS):
        for s in range(1, 6):
            for i, im in enumerate(gt["images"]):
                draw(tree / c / str(s) / im["file_name"], shift_of(ci, s), 3 if i % 2 == 0 else 9)
    results = evaluate_detection(ws, config(data=str(tree), clean_data="det", corruptions=(), severities=(1, 2, 3, 4, 5), batch_size=4))
    assert len(results) == 1 + 75
    for ci, c in enumerate(TEST_CORRUPTIONS[:4]):  # AP by hand from the IoU of the shift
        for s in (1, 5):
            got = results[(results["corruption"] == c) & (results["severity"] == s)]["ap"].iloc[0]
            assert got == pytest.approx(iou_ap(shift_of(ci, s)))
    m = metrics(ws, results.attrs["run_id"])
    assert set(m["dataset"]) == {"tree"}
    cells = m[(m["metric"] == "AP") & m["corruption"].notna()].rename(columns={"value": "ap"})
    p = m.loc[m["metric"] == "P", "value"].iloc[0]
    assert p == pytest.approx(100.0)
    expected = mpc(cells, value="ap")
    hand = 100 * np.mean([iou_ap(shift_of(ci, s)) for ci in range(15) for s in range(1, 6)])
    assert m.loc[m["metric"] == "mPC", "value"].iloc[0] == pytest.approx(expected) == pytest.approx(hand)
    assert m.loc[m["metric"] == "rPC", "value"].iloc[0] == pytest.approx(rpc(expected, p))
    assert 0 < expected < 100
    assert "no mPC" not in ws.catalog.query("SELECT message FROM runs")["message"].iloc[0]


def test_tree_without_clean_data_skips_clean_and_missing_domains(ws, stubs, tmp_path, caplog):
    from core.evaluate.detection import evaluate_detection

    tree = tmp_path / "tree2"
    gt = json.loads((ws.root / "det" / "annotations.json").read_text())
    tree.mkdir()
    (tree / "annotations.json").write_text(json.dumps(gt))
    for im in gt["images"][:3]:  # the fourth image is missing: left out of detections and ground truth
        draw(tree / "fog" / "2" / im["file_name"], 0, 3 if im["id"] % 2 == 0 else 9)
    results = evaluate_detection(ws, config(data=str(tree), corruptions=("fog", "frost"), severities=(2,)))
    assert results[["corruption", "severity", "n_images"]].values.tolist() == [["fog", 2, 3]]
    assert results["ap"].iloc[0] == pytest.approx(1.0)
    assert "frost-2" in caplog.text and "clean_data" in caplog.text
    assert set(metrics(ws, results.attrs["run_id"])["metric"]) == {"AP", "AP50"}  # no P without clean images


def test_summaries_skip_a_zero_p_and_partial_grids():
    from core.evaluate.detection import summaries

    rows = [{"model": "m", "corruption": "clean", "severity": 0, "ap": 0.0, "ap50": 0.4}]
    out = summaries(pd.DataFrame(rows), "ap")
    assert out.to_dict("records") == [{"model": "m", "metric": "P", "value": 0.0}]
    with pytest.raises(ConfigError):
        summaries(pd.DataFrame(rows), "ap75")


# -- categories and the primary metric ------------------------------------------------------------
def test_match_categories_direct_by_name_and_none():
    from core.evaluate.detection import match_categories

    cats = [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 12, "name": "dining table"}]
    assert match_categories({1: "cat", 2: "dog"}, {1: 3, 2: 9}, cats) == {1: 3, 2: 9}
    # another training set's ids: matched by name (case, underscores, VOC/COCO spellings ignored)
    assert match_categories({5: "Dog", 6: "diningtable", 7: "zebra"}, {5: 18, 6: 67, 7: 24}, cats) == {5: 9, 6: 12}
    assert match_categories({1: "aeroplane", 2: "tvmonitor"}, {1: 1, 2: 20},
                            [{"id": 5, "name": "airplane"}, {"id": 72, "name": "tv"}]) == {1: 5, 2: 72}
    with pytest.raises(DataError, match="share no category"):
        match_categories({1: "zebra"}, {1: 24}, cats)


def test_model_with_other_label_ids_is_matched_by_name(ws, stubs):
    from core.evaluate.detection import evaluate_detection

    stubs.registry["named"] = {"names": {1: "cat", 2: "dog"}, "ids": {1: 17, 2: 18}}  # COCO's ids
    results = evaluate_detection(ws, config(models=("named",), corruptions=("brightness",), severities=(1,)))
    assert results.loc[results["corruption"] == "clean", "ap"].iloc[0] == pytest.approx(1.0)


def test_partial_category_overlap_scores_the_shared_classes(ws, stubs):
    from core.evaluate.detection import evaluate_detection

    stubs.registry["catonly"] = {"names": {1: "cat"}, "ids": {1: 3}}
    results = evaluate_detection(ws, config(models=("catonly",), corruptions=("brightness",), severities=(1,)))
    assert results.loc[results["corruption"] == "clean", "ap"].iloc[0] == pytest.approx(1.0)
    stubs.registry["zebra"] = {"names": {1: "zebra"}, "ids": {1: 24}}
    with pytest.raises(DataError, match="share no category"):
        evaluate_detection(ws, config(models=("zebra",)))


def test_voc_categories_choose_ap50(tmp_path):
    from core.detection.data import VOC_CLASSES, DetectionSet
    from core.evaluate.detection import _primary, is_voc

    voc = DetectionSet("voc", tmp_path, [], [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)])
    coco = DetectionSet("coco", tmp_path, [], CATEGORIES)
    assert is_voc(voc) and not is_voc(coco)
    assert _primary("auto", voc) == "ap50" and _primary("auto", coco) == "ap" and _primary("ap", voc) == "ap"


def test_metric_ap50_is_primary_when_asked(ws, stubs, tmp_path):
    from core.evaluate.detection import evaluate_detection

    results = evaluate_detection(ws, config(metric="ap50", corruptions=("brightness",), severities=(1,)))
    assert results.attrs["metric"] == "ap50"
    params = json.loads(next((ws.root / "runs").glob("*/params.json")).read_text())
    assert params["config"]["metric"] == "ap50" and params["kind"] == "eval-detection"


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"models": ()}, "at least one detector"),
    ({"models": "a"}, "at least one detector"),
    ({"data": ""}, "detection data"),
    ({"metric": "map"}, "metric"),
    ({"corruptions": ("gaussian_nois",)}, "gaussian_noise"),
    ({"severities": (6,)}, "severity"),
    ({"batch_size": 0}, "batch_size"),
    ({"limit": 0}, "limit"),
    ({"dataset": "a/b"}, "dataset name"),
])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        config(**kw)


def test_bad_data_is_refused_before_a_run(ws, stubs, tmp_path):
    from core.errors import MissingFileError
    from core.evaluate.detection import evaluate_detection

    with pytest.raises(MissingFileError):
        evaluate_detection(ws, config(data="nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    with pytest.raises(DataError):
        evaluate_detection(ws, config(data=str(empty)))
    with pytest.raises(ConfigError, match="share the label"):
        evaluate_detection(ws, config(models=("x=a", "x=b")))
    assert ws.catalog.query("SELECT count(*) AS n FROM runs")["n"].iloc[0] == 0


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_eval_detection(ws, stubs):
    from typer.testing import CliRunner

    from core.cli import app

    args = ["eval", "detection", "det", "--model", "a", "--corruptions", "brightness,contrast", "--severities", "1",
            "--batch-size", "2", "--workspace", str(ws.root)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "primary metric ap" in out.output and "no mPC" in out.output and "100" in out.output
    runs = ws.catalog.query("SELECT id, status FROM runs WHERE kind = 'eval-detection'")
    assert runs["status"].tolist() == ["done"]


def test_cli_refuses_a_bad_metric_in_one_line(ws, monkeypatch, capsys):
    from core.cli import main

    monkeypatch.setattr("sys.argv", ["prunescope", "eval", "detection", "det", "--model", "a", "--metric", "map",
                                     "--workspace", str(ws.root)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: metric must be one of") and "\n" not in err


# -- with the real detector loader ---------------------------------------------------------------------
def test_a_saved_demo_detector_runs_through_the_grid(ws):
    """No stub: a (random) demo detector checkpoint loaded by core.detection.models.load_detector."""
    from core.detection.models import DETECTORS, build_detector, save_detector_checkpoint
    from core.evaluate.detection import evaluate_detection

    arch = next(name for name in sorted(DETECTORS) if name.startswith("demo"))
    torch.manual_seed(0)
    module = build_detector(arch, 3)
    save_detector_checkpoint(ws.root / "models" / "det.pt", module, arch=arch, categories=CATEGORIES)
    results = evaluate_detection(ws, config(models=("mine=models/det.pt",), corruptions=("brightness",),
                                            severities=(1,), device="cpu", cpu_threads=1))
    assert results["model"].tolist() == ["mine", "mine"] and set(results["n_images"]) == {4}
    assert results[["ap", "ap50", "ap75"]].apply(lambda c: c.between(0, 1)).all().all()
    assert ws.catalog.query("SELECT status FROM runs")["status"].tolist() == ["done"]


def test_offline_torchvision_weights_fail_before_a_run(ws, monkeypatch):
    from core.errors import WeightsUnavailable
    from core.evaluate.detection import evaluate_detection

    monkeypatch.setenv("TORCH_HOME", str(ws.root / "no-torch-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        evaluate_detection(ws, config(models=("torchvision:fasterrcnn_mobilenet_v3_large_fpn",), device="cpu"))
    except WeightsUnavailable as exc:
        assert "fasterrcnn_mobilenet_v3_large_fpn" in exc.one_line()
    else:  # pragma: no cover - only where the weights can be fetched
        pytest.skip("torchvision weights were reachable here")
    assert ws.catalog.query("SELECT count(*) AS n FROM runs")["n"].iloc[0] == 0
