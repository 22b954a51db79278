"""Detectors: torchvision's COCO detectors, the small demo detectors, and our checkpoint format.

Architectures live in :data:`DETECTORS` (name -> :class:`DetectorArch`):

- torchvision's ``fasterrcnn_resnet50_fpn``, ``fasterrcnn_mobilenet_v3_large_fpn``,
  ``retinanet_resnet50_fpn`` and ``fcos_resnet50_fpn`` (COCO weights from the torch hub cache; offline
  and not cached, :class:`~core.errors.WeightsUnavailable` names the file to fetch);
- ``demo-frcnn``: a Faster R-CNN on a small BN conv net (stride 8, 1.2 M parameters) at 128 px that
  trains on two CPU cores in minutes on the demo world's scenes.

Every model follows torchvision's convention: ``num_classes`` includes the background, labels are
1..K, and in eval mode ``module(list_of_CHW_float_in_0_1)`` returns ``[{"boxes", "labels", "scores"}]``
in input pixels (the model resizes and normalises internally).

:func:`load_detector` turns a spec into a :class:`Detector`: ``[LABEL=]torchvision:ARCH``,
``[LABEL=]PATH.pt`` (a checkpoint of :data:`CHECKPOINT_FORMAT`) or ``[LABEL=]RUN_ID`` (a
``train-detector`` run's ``checkpoints/last.pt``).

Ref: Ren et al., Faster R-CNN (NeurIPS 2015); Lin et al., Feature Pyramid Networks (CVPR 2017) and
Focal Loss / RetinaNet (ICCV 2017); Tian et al., FCOS (ICCV 2019).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core import atomic
from core.errors import ConfigError, DataError, MissingFileError, UnknownName

if TYPE_CHECKING:
    from core.workspace import Workspace

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "prunescope.detector/1"
#: Run kind whose ``checkpoints/last.pt`` a bare run id refers to (core.train.detector.RUN_KIND).
TRAIN_RUN_KIND = "train-detector"
TORCHVISION_PREFIX = "torchvision:"
#: Labels of torchvision's COCO category list that are no category (background, unused ids).
_NOT_A_CATEGORY = ("__background__", "N/A")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class DetectorArch:
    """A registered detector architecture.

    ``build(num_classes, **kw)`` returns a randomly initialised model; ``torchvision`` names the
    torchvision model whose weights enum holds its COCO weights (None: no pretrained weights);
    ``image_size``: the side the model resizes inputs to (None: torchvision's 800/1333 rule).
    """

    name: str
    summary: str
    paper: str
    build: Builder
    torchvision: str | None = None
    image_size: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


DETECTORS: dict[str, DetectorArch] = {}


def register_detector(name: str, *, summary: str, paper: str, torchvision: str | None = None,
                      image_size: int | None = None, **defaults: Any) -> Callable[[Builder], Builder]:
    """Decorator registering a builder ``(num_classes, **kw) -> nn.Module`` under ``name``."""

    def deco(build: Builder) -> Builder:
        if name in DETECTORS:
            raise ValueError(f"detector '{name}' is registered twice")
        DETECTORS[name] = DetectorArch(name, summary, paper, build, torchvision, image_size, dict(defaults))
        return build

    return deco


def detector_arch(name: str) -> DetectorArch:
    """The registered architecture; UnknownName listing the others."""
    if name not in DETECTORS:
        import difflib

        close = difflib.get_close_matches(str(name), sorted(DETECTORS), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownName(f"detector architecture '{name}' not found{guess}; available: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]


# -- torchvision ---------------------------------------------------------------------------------------------
def _register_torchvision(name: str, summary: str, paper: str) -> None:
    def build(num_classes: int, **kw: Any) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **kw)

    register_detector(name, summary=summary, paper=paper, torchvision=name)(build)


_register_torchvision("fasterrcnn_resnet50_fpn", "torchvision Faster R-CNN, ResNet-50 FPN (41.8 M params; "
                      "COCO box AP 37.0)", "Ren et al., Faster R-CNN, NeurIPS 2015")
_register_torchvision("fasterrcnn_mobilenet_v3_large_fpn", "torchvision Faster R-CNN, MobileNetV3-Large FPN "
                      "(19.4 M params; COCO box AP 32.8)", "Ren et al., Faster R-CNN, NeurIPS 2015")
_register_torchvision("retinanet_resnet50_fpn", "torchvision RetinaNet, ResNet-50 FPN (34.0 M params; COCO "
                      "box AP 36.4)", "Lin et al., Focal Loss for Dense Object Detection, ICCV 2017")
_register_torchvision("fcos_resnet50_fpn", "torchvision FCOS, ResNet-50 FPN (32.3 M params; COCO box AP 39.2)",
                      "Tian et al., FCOS, ICCV 2019")


# -- the demo detectors --------------------------------------------------------------------------------------
DEMO_SIZE = 128


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DemoBackbone(nn.Module):
    """A small BN conv net: three stride-2 stages of two 3x3 convs each, then a 1x1 projection.

    Returns an OrderedDict with one feature map ``"0"``: (B, out_channels, H/8, W/8), as torchvision's
    detection heads expect.
    """

    def __init__(self, width: int = 32, out_channels: int = 64) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv(3, w, 2), _conv(w, w),                    # /2
            _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),        # /4
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w),    # /8
        )
        self.proj = nn.Conv2d(4 * w, out_channels, 1)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.proj(self.body(x)))])


@register_detector("demo-frcnn", summary="Faster R-CNN on a small BN conv net (stride 8, 1.2 M params), "
                   "128 px; trains on CPU in minutes", paper="Ren et al., Faster R-CNN, NeurIPS 2015",
                   image_size=DEMO_SIZE)
def demo_frcnn(num_classes: int, *, width: int = 32, channels: int = 64, image_size: int = DEMO_SIZE,
               representation: int = 256, anchor_sizes: tuple[int, ...] = (16, 32, 64), **kw: Any) -> nn.Module:
    """Faster R-CNN at ``image_size`` px on :class:`DemoBackbone`: one stride-8 map, 3 sizes x 3 ratios of
    anchors, RoIAlign 7x7, a two-layer box head; fewer proposals and samples than the COCO defaults."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = DemoBackbone(width, channels)
    anchors = AnchorGenerator((tuple(anchor_sizes),), ((0.5, 1.0, 2.0),))
    options: dict[str, Any] = dict(
        min_size=image_size, max_size=image_size, rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128,
        box_batch_size_per_image=64, box_score_thresh=0.01, box_detections_per_img=50,
    )
    options.update(kw)
    head = TwoMLPHead(backbone.out_channels * 7 * 7, representation)
    # num_classes goes to the predictor: FasterRCNN's own assumes a 1024-wide box head
    return FasterRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
                      box_head=head, box_predictor=FastRCNNPredictor(representation, num_classes), **options)


# -- building ------------------------------------------------------------------------------------------------
def build_detector(arch: str, num_classes: int, *, pretrained: bool = False, **kw: Any) -> nn.Module:
    """A detector of a registered architecture (train mode, CPU).

    Args:
        num_classes: including the background (labels 1..K, 0 = background), torchvision's convention.
        pretrained: load torchvision's COCO weights (then ``num_classes`` must be 91, COCO's label space).
        kw: passed to the builder (e.g. ``width`` of the demo nets, ``box_score_thresh``); None values are
            dropped so the builder keeps its defaults.

    Raises:
        UnknownName: unknown architecture. ConfigError: num_classes < 2, pretrained without weights or with
            another label space. WeightsUnavailable: weights not cached and offline.
    """
    spec = detector_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2 (background included); got {num_classes!r}")
    options = {**spec.defaults, **{k: v for k, v in kw.items() if v is not None}}
    state = _pretrained_state(spec, num_classes) if pretrained else None  # fail fast, before building
    model = spec.build(num_classes, **options)
    if state is not None:
        model.load_state_dict(state)
    return model


def _pretrained_state(spec: DetectorArch, num_classes: int) -> dict[str, torch.Tensor]:
    from core.classifiers import fetch_torchvision_weights

    if spec.torchvision is None:
        raise ConfigError(f"detector '{spec.name}' has no pretrained weights; train it (prunescope train detector)")
    n = len(_torchvision_categories(spec.torchvision))
    if num_classes != n:
        raise ConfigError(f"torchvision's COCO weights of {spec.name} predict {n} labels, not {num_classes}",
                          hint=f"build it with num_classes={n}")
    return fetch_torchvision_weights(spec.torchvision, "DEFAULT")


def _torchvision_categories(model: str) -> list[str]:
    from torchvision.models import get_model_weights

    return list(get_model_weights(model)["DEFAULT"].meta["categories"])


# -- checkpoints ---------------------------------------------------------------------------------------------
def save_detector_checkpoint(path: str | os.PathLike[str], module: nn.Module, *, arch: str,
                             categories: list[dict], extra: dict | None = None) -> None:
    """Write ``{"format", "arch", "num_classes", "categories", "state_dict", ...extra}`` atomically.

    ``categories`` are the training set's ``[{"id", "name"}]`` in label order: model label ``i + 1`` is
    ``categories[i]``. ``extra`` keys (optimiser state, config, step ...) are stored beside them.
    """
    detector_arch(arch)
    cats = [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]
    obj: dict[str, Any] = dict(extra or {})
    obj.update({"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": len(cats) + 1, "categories": cats,
                "state_dict": module.state_dict(), "build_kw": dict((extra or {}).get("build_kw", {}))})
    with atomic.atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def read_detector_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict (``weights_only`` load). Raises MissingFileError / DataError."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"detector checkpoint {p} not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip / IO errors all mean "not a checkpoint"
        raise DataError(f"{p} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{p} is not a prunescope detector checkpoint (format {found!r}, "
                        f"expected {CHECKPOINT_FORMAT!r})")
    return ckpt


# -- loading -------------------------------------------------------------------------------------------------
@dataclass
class Detector:
    """A detector ready for inference.

    ``categories`` / ``category_ids`` map the model's output label to the category name / the category
    id of its training set (COCO ids for torchvision weights).
    """

    label: str
    arch: str
    module: nn.Module
    categories: dict[int, str]
    category_ids: dict[int, int]
    source: str


def load_detector(ws: Workspace | None, spec: str, device: torch.device | str = "cpu") -> Detector:
    """A :class:`Detector` (eval mode, on ``device``) from a spec.

    Args:
        ws: the workspace: relative paths and run ids are looked up in it (None: paths relative to the
            current folder, no run ids).
        spec: ``[LABEL=]torchvision:ARCH`` (torchvision COCO weights), ``[LABEL=]PATH.pt`` (a detector
            checkpoint) or ``[LABEL=]RUN_ID`` (a train-detector run's ``checkpoints/last.pt``).

    Raises:
        ConfigError: an empty spec. UnknownName: unknown architecture or run. MissingFileError / DataError:
            a missing or foreign checkpoint. WeightsUnavailable: torchvision weights not cached and offline.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a detector spec must be 'torchvision:ARCH', a checkpoint path or a train-detector run id")
    from core.models import split_label

    label, body = split_label(spec)
    if body.startswith(TORCHVISION_PREFIX):
        det = _load_torchvision(body[len(TORCHVISION_PREFIX):], body)
    elif body.endswith((".pt", ".pth")) or "/" in body or os.sep in body:
        det = _load_checkpoint(_resolve_path(ws, body), body, body)
    else:
        det = _load_checkpoint(_run_checkpoint(ws, body), body, f"detector:{body}")
    det.label = label or det.label
    det.module.to(device).eval()
    return det


def _load_torchvision(arch: str, source: str) -> Detector:
    spec = detector_arch(arch)
    if spec.torchvision is None:
        raise ConfigError(f"'{arch}' has no torchvision COCO weights; torchvision detectors: "
                          f"{', '.join(n for n, a in sorted(DETECTORS.items()) if a.torchvision)}")
    names = _torchvision_categories(spec.torchvision)
    module = build_detector(arch, len(names), pretrained=True)
    keep = {i: n for i, n in enumerate(names) if n not in _NOT_A_CATEGORY}
    # torchvision's COCO label is the COCO category id itself (91 slots, 80 used)
    return Detector(source, arch, module, keep, {i: i for i in keep}, source)


def _resolve_path(ws: Workspace | None, body: str) -> Path:
    p = Path(body).expanduser()
    if not p.is_absolute() and ws is not None:
        p = ws.root / p
    return p


def _run_checkpoint(ws: Workspace | None, run_id: str) -> Path:
    from core.workspace import validate_name

    if ws is None:
        raise ConfigError(f"'{run_id}' looks like a run id, but no workspace was given",
                          hint="pass a checkpoint path or torchvision:ARCH")
    validate_name(run_id, "run id")
    path = ws.dir("runs", run_id) / "checkpoints" / "last.pt"
    if path.is_file():
        return path
    runs = ws.catalog.query("SELECT id FROM runs WHERE kind = ? ORDER BY started_at DESC LIMIT 10", [TRAIN_RUN_KIND])
    raise UnknownName(f"detector '{run_id}' is neither torchvision:ARCH, a .pt file nor a train-detector run with "
                      f"a checkpoint; recent train-detector runs: {', '.join(runs['id']) or 'none'}; "
                      f"torchvision detectors: {', '.join(n for n, a in sorted(DETECTORS.items()) if a.torchvision)}")


def _load_checkpoint(path: Path, source: str, label: str) -> Detector:
    ckpt = read_detector_checkpoint(path)
    arch = str(ckpt["arch"])
    cats = list(ckpt["categories"])
    module = build_detector(arch, int(ckpt["num_classes"]), **dict(ckpt.get("build_kw") or {}))
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise DataError(f"{path}: the weights do not fit {arch} ({str(exc).splitlines()[0]})") from None
    return Detector(label, arch, module, {i + 1: str(c["name"]) for i, c in enumerate(cats)},
                    {i + 1: int(c["id"]) for i, c in enumerate(cats)}, source)


__all__ = [
    "CHECKPOINT_FORMAT", "DETECTORS", "DemoBackbone", "Detector", "DetectorArch", "build_detector",
    "detector_arch", "load_detector", "read_detector_checkpoint", "register_detector",
    "save_detector_checkpoint",
]
