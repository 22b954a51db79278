"""COCO box AP: run a torchvision-style detector over images, and score its detections with pycocotools.

Two steps, kept apart so each can be tested alone:

- :func:`predict` feeds (image, image_id) pairs in batches to a detector that follows torchvision's
  detection interface (a list of (3, H, W) float tensors in [0, 1] in; a list of ``{"boxes" (n, 4)
  xyxy pixels, "labels" (n,), "scores" (n,)}`` out) and returns COCO result dicts;
- :func:`coco_ap` scores result dicts against a COCO ground-truth dict with the official
  ``pycocotools`` ``COCOeval`` (bbox): AP@[.5:.95], AP50 and AP75, as fractions.

Ref: Lin et al., "Microsoft COCO: Common Objects in Context" (ECCV 2014) and the COCO detection
evaluation (101-point interpolated precision, IoU thresholds 0.50:0.05:0.95, 100 detections per image);
Michaelis et al. (2019) report these numbers per corruption.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.errors import DataError

log = logging.getLogger(__name__)

#: pycocotools' ``COCOeval.stats`` positions of the numbers :func:`coco_ap` returns.
STATS = {"ap": 0, "ap50": 1, "ap75": 2}


# -- prediction --------------------------------------------------------------------------------------
def predict(module: torch.nn.Module, images: Iterable[tuple[np.ndarray | Image.Image, int]], *,
            label_to_category: Mapping[int, int], batch_size: int = 8, device: torch.device | str = "cpu",
            score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """Detections of ``module`` on ``images`` as COCO result dicts.

    Args:
        module: a torchvision-style detector on ``device`` (put in eval mode for the call, then restored).
        images: ``(image, image_id)`` pairs; an image is (H, W[, C]) uint8 or a PIL image, any size.
        label_to_category: model output label -> dataset category id; detections of other labels (the
            background, classes the dataset lacks) are dropped.
        batch_size: images per forward pass.
        score_threshold: drop detections scoring below this.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h] (pixels), "score"}]``, in input order, each
        image's detections by decreasing score.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = torch.device(device)
    mapping = {int(k): int(v) for k, v in label_to_category.items()}
    out: list[dict[str, Any]] = []
    dropped = 0
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            for batch in _batches(images, batch_size):
                tensors = [_to_tensor(img).to(device) for img, _ in batch]
                for (_, image_id), pred in zip(batch, module(tensors), strict=True):
                    rows, n_dropped = _results(pred, int(image_id), mapping, score_threshold)
                    out.extend(rows)
                    dropped += n_dropped
    finally:
        module.train(was_training)
    if dropped:
        log.debug("%d detections of labels outside label_to_category dropped", dropped)
    return out


def _batches(items: Iterable[tuple[Any, int]], size: int) -> Iterator[list[tuple[Any, int]]]:
    batch: list[tuple[Any, int]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _to_tensor(img: np.ndarray | Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a uint8 image (grey and alpha handled as in core.corrupt)."""
    from core.corrupt import to_rgb_uint8

    arr = to_rgb_uint8(img)
    if not arr.flags.writeable:  # a PIL-backed or memory-mapped array; torch wants its own
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _results(pred: Mapping[str, torch.Tensor], image_id: int, mapping: Mapping[int, int],
             score_threshold: float) -> tuple[list[dict[str, Any]], int]:
    """One image's output -> (COCO result dicts by decreasing score, detections dropped for their label)."""
    boxes = pred["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
    labels = pred["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
    scores = pred["scores"].detach().float().cpu().numpy().reshape(-1)
    rows, dropped = [], 0
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < score_threshold:
            continue
        category = mapping.get(int(labels[i]))
        if category is None:
            dropped += 1
            continue
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        rows.append({"image_id": image_id, "category_id": category,
                     "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)], "score": float(scores[i])})
    return rows, dropped


# -- scoring -----------------------------------------------------------------------------------------
def coco_ap(gt: Mapping[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO box AP of ``detections`` against the ground truth ``gt``, by pycocotools' COCOeval.

    Args:
        gt: a COCO ground-truth dict (``images``, ``annotations`` with ``bbox`` xywh and ``iscrowd``,
            ``categories``); missing annotation ``id`` / ``area`` are filled in (area = w x h). Crowd
            boxes are ignored: a detection on one is neither a hit nor a false positive.
        detections: COCO result dicts (:func:`predict`); categories absent from ``gt`` are not scored.

    Returns:
        ``{"ap": AP@[.5:.95], "ap50": AP@.5, "ap75": AP@.75}`` as fractions in [0, 1] (higher = better);
        0.0 for each when there is no detection; NaN when ``gt`` has no (non-crowd) object to find.

    Raises:
        DataError: a detection names an image that is not in ``gt``, or lacks a key.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = _ground_truth(gt)
    if not any(not a.get("iscrowd", 0) for a in dataset["annotations"]):
        return {k: float("nan") for k in STATS}
    if not detections:
        return {k: 0.0 for k in STATS}
    results = _check_detections(detections, {int(img["id"]) for img in dataset["images"]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: _stat(evaluator.stats[i]) for k, i in STATS.items()}


def _ground_truth(gt: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``gt`` with what COCO/COCOeval need present (ids, areas, iscrowd, info)."""
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise DataError(f"COCO ground truth lacks {', '.join(missing)}")
    dataset = copy.deepcopy(dict(gt))
    dataset.setdefault("info", {})
    used = {a["id"] for a in dataset["annotations"] if "id" in a}
    next_id = max(used, default=0) + 1
    for ann in dataset["annotations"]:
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
        w, h = ann["bbox"][2], ann["bbox"][3]
        ann.setdefault("area", float(w) * float(h))
        ann.setdefault("iscrowd", 0)
    return dataset


def _check_detections(detections: list[dict[str, Any]], image_ids: set[int]) -> list[dict[str, Any]]:
    out = []
    for det in detections:
        absent = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if absent:
            raise DataError(f"a detection lacks {', '.join(absent)}: {det!r}"[:300])
        if int(det["image_id"]) not in image_ids:
            raise DataError(f"a detection names image {det['image_id']!r}, which the ground truth lacks",
                            hint="score detections against the ground truth of the same images")
        out.append({"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
                    "bbox": [float(v) for v in det["bbox"]], "score": float(det["score"])})
    return out


def _stat(value: float) -> float:
    # COCOeval writes -1 when no ground truth falls in the evaluated range: undefined, not zero.
    return float("nan") if value < 0 else float(value)
