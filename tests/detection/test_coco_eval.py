"""COCO AP (pycocotools) on toy cases whose answers are worked out by hand, and the predict() adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from core.detection.coco_eval import coco_ap, predict
from core.errors import DataError

# COCO interpolates precision at 101 recall points 0, 0.01, ..., 1.
N_RECALL = 101


def gt_set(boxes: list[tuple[int, int, list[float], int]], *, categories=((1, "cat"), (7, "dog"))) -> dict:
    """Ground truth of images 1 and 2 (100 x 100): boxes = [(image_id, category_id, xywh, iscrowd)]."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                   {"id": 2, "file_name": "b.png", "width": 100, "height": 100}],
        "annotations": [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": list(b),
                         "area": b[2] * b[3], "iscrowd": crowd} for i, (img, cat, b, crowd) in enumerate(boxes)],
        "categories": [{"id": c, "name": n} for c, n in categories],
    }


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


TWO_CATS = [(1, 1, [10, 10, 30, 30], 0), (2, 7, [40, 20, 40, 50], 0)]


def test_perfect_detections_score_one():
    gt = gt_set(TWO_CATS)
    out = coco_ap(gt, [det(i, c, b, 0.9) for i, c, b, _ in TWO_CATS])
    assert out == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0})


def test_one_of_two_objects_found():
    # Two cats, one found with the top score: precision 1 up to recall 0.5 (51 of the 101 recall
    # points), then nothing -> AP = 51 / 101 at every IoU threshold.
    gt = gt_set([(1, 1, [10, 10, 30, 30], 0), (2, 1, [40, 20, 40, 50], 0)], categories=((1, "cat"),))
    out = coco_ap(gt, [det(1, 1, [10, 10, 30, 30], 0.8)])
    assert out["ap"] == pytest.approx(51 / N_RECALL)
    assert out["ap50"] == pytest.approx(51 / N_RECALL)


def test_false_positive_ranked_first_halves_precision():
    # A wrong box scoring above the hit: precision 1/2 at recall 1/2 -> AP = 0.5 * 51 / 101.
    gt = gt_set([(1, 1, [10, 10, 30, 30], 0), (2, 1, [40, 20, 40, 50], 0)], categories=((1, "cat"),))
    out = coco_ap(gt, [det(1, 1, [60, 60, 20, 20], 0.9), det(1, 1, [10, 10, 30, 30], 0.8)])
    assert out["ap50"] == pytest.approx(0.5 * 51 / N_RECALL)


def test_partial_overlap_counts_at_low_iou_thresholds_only():
    # IoU = (10 x 6.25) / (10 x 10) = 0.625: a hit at IoU 0.50, 0.55, 0.60 (3 of 10 thresholds).
    gt = gt_set([(1, 1, [0, 0, 10, 10], 0)], categories=((1, "cat"),))
    out = coco_ap(gt, [det(1, 1, [0, 0, 10, 6.25], 0.9)])
    assert out["ap50"] == pytest.approx(1.0)
    assert out["ap75"] == pytest.approx(0.0)
    assert out["ap"] == pytest.approx(0.3)


def test_wrong_class_scores_zero():
    gt = gt_set(TWO_CATS)
    out = coco_ap(gt, [det(1, 7, [10, 10, 30, 30], 0.9), det(2, 1, [40, 20, 40, 50], 0.9)])
    assert out == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_crowd_boxes_are_ignored():
    # A crowd region: a detection on it is no false positive, and missing it costs no recall.
    gt = gt_set([(1, 1, [10, 10, 30, 30], 0), (2, 1, [0, 0, 60, 60], 1)], categories=((1, "cat"),))
    hit = det(1, 1, [10, 10, 30, 30], 0.5)
    assert coco_ap(gt, [hit])["ap"] == pytest.approx(1.0)
    assert coco_ap(gt, [det(2, 1, [5, 5, 40, 40], 0.9), hit])["ap"] == pytest.approx(1.0)
    # ... whereas the same box as a normal object halves the recall.
    gt["annotations"][1]["iscrowd"] = 0
    assert coco_ap(gt, [hit])["ap"] == pytest.approx(51 / N_RECALL)


def test_noncontiguous_ids_and_missing_ids_areas():
    gt = gt_set([(1, 90, [10, 10, 30, 30], 0)], categories=((1, "cat"), (90, "toothbrush")))
    for ann in gt["annotations"]:
        del ann["id"], ann["area"], ann["iscrowd"]
    assert coco_ap(gt, [det(1, 90, [10, 10, 30, 30], 0.9)])["ap"] == pytest.approx(1.0)


def test_no_detection_is_zero_and_no_object_is_nan():
    assert coco_ap(gt_set(TWO_CATS), []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert all(math.isnan(v) for v in coco_ap(gt_set([]), [det(1, 1, [0, 0, 5, 5], 0.5)]).values())


def test_unknown_image_is_refused_and_gt_untouched():
    gt = gt_set(TWO_CATS)
    before = repr(gt)
    with pytest.raises(DataError, match="image 99"):
        coco_ap(gt, [det(99, 1, [0, 0, 5, 5], 0.5)])
    coco_ap(gt, [det(1, 1, [10, 10, 30, 30], 0.9)])
    assert repr(gt) == before


def test_pycocotools_prints_nothing(capsys):
    coco_ap(gt_set(TWO_CATS), [det(1, 1, [10, 10, 30, 30], 0.9)])
    assert capsys.readouterr().out == ""


class FixedBoxes(torch.nn.Module):
    """A stub detector: per image, boxes scaled to its size, and a record of what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], float, float]] = []
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.calls += 1
        self.modes.append(self.training)
        out = []
        for x in images:
            self.seen.append((tuple(x.shape), float(x.min()), float(x.max())))
            h, w = x.shape[1:]
            out.append({"boxes": torch.tensor([[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h], [1, 1, 3, 3]]),
                        "labels": torch.tensor([1, 2, 0]), "scores": torch.tensor([0.3, 0.9, 0.95])})
        return out


def test_predict_converts_boxes_labels_and_batches():
    model = FixedBoxes().train()
    images = [(np.full((40, 60, 3), 255, np.uint8), 5), (Image.new("L", (20, 10), 0), 6),
              (np.zeros((8, 8), np.uint8), 7)]
    out = predict(model, images, label_to_category={1: 11, 2: 90}, batch_size=2)
    assert model.calls == 2 and model.modes == [False, False] and model.training  # eval for the call only
    assert model.seen == [((3, 40, 60), 1.0, 1.0), ((3, 10, 20), 0.0, 0.0), ((3, 8, 8), 0.0, 0.0)]
    first = [d for d in out if d["image_id"] == 5]
    # label 0 (background here) is not in the mapping: dropped; the rest by decreasing score
    assert first == [{"image_id": 5, "category_id": 90, "bbox": [15.0, 10.0, 45.0, 30.0], "score": pytest.approx(0.9)},
                     {"image_id": 5, "category_id": 11, "bbox": [0.0, 0.0, 30.0, 20.0], "score": pytest.approx(0.3)}]
    assert [d["image_id"] for d in out] == [5, 5, 6, 6, 7, 7]
    assert len(predict(model, images, label_to_category={1: 11, 2: 90}, score_threshold=0.5)) == 3


def test_predict_then_score_round_trip():
    # The stub's boxes, taken as the ground truth, score AP 1.
    model = FixedBoxes()
    out = predict(model, [(np.zeros((100, 100, 3), np.uint8), 1)], label_to_category={1: 1, 2: 7})
    gt = gt_set([(1, d["category_id"], d["bbox"], 0) for d in out])
    assert coco_ap(gt, out)["ap"] == pytest.approx(1.0)
