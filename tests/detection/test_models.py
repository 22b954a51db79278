"""Detector registry, checkpoints and specs (no network: torchvision weights must fail cleanly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.detection.models import (
    CHECKPOINT_FORMAT,
    DETECTORS,
    build_detector,
    load_detector,
    save_detector_checkpoint,
)
from core.errors import ConfigError, DataError, MissingFileError, UnknownName, WeightsUnavailable

CATEGORIES = [{"id": 3, "name": "red disc"}, {"id": 7, "name": "blue ring"}, {"id": 12, "name": "green cross"}]
DEMO = sorted(name for name, arch in DETECTORS.items() if arch.torchvision is None)


def test_registry_lists_torchvision_and_demo_archs() -> None:
    for name in ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
                 "fcos_resnet50_fpn"):
        assert DETECTORS[name].torchvision == name
    assert DEMO and all(DETECTORS[n].image_size == 128 for n in DEMO)
    with pytest.raises(UnknownName, match="did you mean 'demo-frcnn'.*available: .*fcos_resnet50_fpn"):
        build_detector("demo-frcn", 3)
    with pytest.raises(ConfigError, match="num_classes"):
        build_detector("demo-frcnn", 1)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_detector("demo-frcnn", 3, pretrained=True)


@pytest.mark.parametrize("arch", sorted(DETECTORS))
def test_every_arch_builds_with_our_label_space(arch: str) -> None:
    model = build_detector(arch, 4)
    assert isinstance(model, torch.nn.Module) and model.training


@pytest.mark.parametrize("arch", DEMO)
def test_demo_arch_trains_and_predicts_in_input_pixels(arch: str) -> None:
    torch.manual_seed(0)
    model = build_detector(arch, 4)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    for img, pred in zip(images, out, strict=True):
        boxes = pred["boxes"]
        assert boxes.shape[1] == 4 and len(pred["labels"]) == len(pred["scores"]) == len(boxes)
        if len(boxes):  # boxes are in the input's pixels, whatever the internal resize
            assert boxes[:, 2].max() <= img.shape[2] + 1e-3 and boxes[:, 3].max() <= img.shape[1] + 1e-3
            assert set(pred["labels"].tolist()) <= {1, 2, 3}  # never the background


def _outputs(module: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return module.eval()([image])[0]


@pytest.mark.parametrize("arch", DEMO)
def test_checkpoint_round_trip_gives_the_same_outputs(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    build_kw = {"box_score_thresh": 0.0}  # an untrained model scores low: keep every detection
    model = build_detector(arch, len(CATEGORIES) + 1, **build_kw)
    image = torch.rand(3, 128, 128)
    want = _outputs(model, image)
    path = tmp_path / "det.pt"
    save_detector_checkpoint(path, model, arch=arch, categories=CATEGORIES,
                             extra={"build_kw": build_kw, "step": 5})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["step"] == 5 and raw["num_classes"] == 4
    det = load_detector(None, f"mine={path}")
    assert det.label == "mine" and det.arch == arch and not det.module.training
    assert det.categories == {1: "red disc", 2: "blue ring", 3: "green cross"}
    assert det.category_ids == {1: 3, 2: 7, 3: 12}
    got = _outputs(det.module, image)
    assert len(want["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        torch.testing.assert_close(got[key], want[key])


def test_run_id_and_relative_paths_resolve_in_the_workspace(tmp_path: Path) -> None:
    from core.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    model = build_detector("demo-frcnn", 3)
    ckpt = ws.dir("runs", "20260101-000000-train-detector-abc123") / "checkpoints" / "last.pt"
    save_detector_checkpoint(ckpt, model, arch="demo-frcnn", categories=CATEGORIES[:2])
    det = load_detector(ws, "20260101-000000-train-detector-abc123")
    assert det.label == "detector:20260101-000000-train-detector-abc123" and det.categories == {1: "red disc",
                                                                                                2: "blue ring"}
    rel = "runs/20260101-000000-train-detector-abc123/checkpoints/last.pt"
    assert load_detector(ws, rel).source == rel
    with pytest.raises(UnknownName, match="train-detector run"):
        load_detector(ws, "no-such-run")
    with pytest.raises(MissingFileError):
        load_detector(ws, "runs/nothing.pt")
    with pytest.raises(ConfigError, match="no workspace"):
        load_detector(None, "20260101-000000-train-detector-abc123")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(DataError, match="not a prunescope detector checkpoint"):
        load_detector(None, str(plain))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable"):
        load_detector(None, str(junk))
    # weights of another shape than the stored build options say (a narrower net)
    path = tmp_path / "narrow.pt"
    save_detector_checkpoint(path, build_detector("demo-frcnn", 3, width=16), arch="demo-frcnn",
                             categories=CATEGORIES[:2])
    with pytest.raises(DataError, match="do not fit demo-frcnn"):
        load_detector(None, str(path))
    with pytest.raises(ConfigError):
        load_detector(None, "  ")


def test_offline_torchvision_spec_is_weights_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="fasterrcnn_resnet50_fpn.*not cached"):
        load_detector(None, "torchvision:fasterrcnn_resnet50_fpn")
    with pytest.raises(ConfigError, match="no torchvision COCO weights"):
        load_detector(None, "torchvision:demo-frcnn")
    with pytest.raises(UnknownName):
        load_detector(None, "torchvision:yolo")


def test_split_label() -> None:
    from core.models import split_label

    assert split_label("base=torchvision:fcos_resnet50_fpn") == ("base", "torchvision:fcos_resnet50_fpn")
    assert split_label("torchvision:fcos_resnet50_fpn") == (None, "torchvision:fcos_resnet50_fpn")
    assert split_label("runs/a=b/last.pt") == (None, "runs/a=b/last.pt")
    assert split_label("x=runs/a/last.pt") == ("x", "runs/a/last.pt")
