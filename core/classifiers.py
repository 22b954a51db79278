"""Image classifiers: a registry of architectures, pretrained and local weights, saved-model loading.

Every classifier is a :class:`Classifier`: a backbone from :data:`CLASSIFIERS` behind its own input
normalisation, so it takes (B, 3, H, W) images in [0, 1] and returns (B, K) logits. Noise and
corruptions are applied in that [0, 1] space (ImageNet-C; Rusak et al. ECCV 2020), never after
normalisation. Its preferred input size, crop ratio, normalisation mean/std and class names travel with
it (:meth:`Classifier.meta`) and into every checkpoint.

Architectures:

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision's ImageNet ResNets (He et al., CVPR 2016), 224 px.
  ``pretrained="IMAGENET1K_V1"`` (any member of torchvision's weights enum for the model, or
  ``DEFAULT``) loads torchvision's weights, downloaded into the torch hub cache (``$TORCH_HOME``) the
  first time; offline and not cached, :class:`~core.errors.WeightsUnavailable` names the file to fetch.
  With ``num_classes`` other than 1000 the ImageNet head is dropped and a fresh one trained.
- ``resnet-demo``: a narrow CIFAR-style ResNet with BatchNorm (3x3 stem, three stages of two basic
  blocks, 16/32/64 channels, 0.17 M parameters) for 32-64 px images; trains on two CPU cores in a minute.

``pretrained`` may also be a local checkpoint: one of ours (a training checkpoint or a saved model) or
a plain torchvision ``state_dict``; a head of another class count is dropped the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from core.errors import ConfigError, DataError, MissingFileError, UnknownName, WeightsUnavailable
from core.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Keys a saved classifier carries besides its ``state_dict`` (see :meth:`Classifier.meta`).
META_KEYS = ("arch", "num_classes", "classes", "image_size", "crop_ratio", "mean", "std")


@dataclass(frozen=True)
class ClassifierSpec:
    """What an architecture prefers: input side in px, eval crop ratio (resize to ``size / ratio``, then
    center-crop), normalisation mean/std of [0, 1] RGB, and the torchvision model name whose weights
    enum lists its pretrained tags (None: no pretrained weights)."""

    image_size: int
    crop_ratio: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision: str | None = None


Builder = Callable[[int], nn.Module]
#: Architecture name -> ``builder(num_classes) -> backbone``; ``entry.extra["spec"]`` is its ClassifierSpec.
CLASSIFIERS: Registry[Builder] = Registry("classifier")


# -- architectures --------------------------------------------------------------------------------------
def _register_torchvision(name: str, summary: str) -> None:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    CLASSIFIERS.register(
        name,
        summary=summary,
        paper="He et al., Deep Residual Learning, CVPR 2016",
        spec=ClassifierSpec(224, torchvision=name),
    )(build)


_register_torchvision("resnet18", "torchvision ResNet-18 (11.7 M parameters at 1000 classes), 224 px")
_register_torchvision("resnet34", "torchvision ResNet-34 (21.8 M parameters at 1000 classes), 224 px")
_register_torchvision("resnet50", "torchvision ResNet-50 (25.6 M parameters at 1000 classes), 224 px")


class DemoResNet(nn.Module):
    """A narrow ResNet with BatchNorm for small images: 3x3 stem (stride 1), stages of torchvision
    ``BasicBlock``s (the first of each later stage strides 2), global average pooling, linear head.
    Any input side >= 8 px works (32 px: 32 -> 16 -> 8 feature maps)."""

    def __init__(
        self, num_classes: int, widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (2, 2, 2)
    ) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        inplanes = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or inplanes != width:
                    down = nn.Sequential(
                        nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                    )
                layers.append(BasicBlock(inplanes, width, stride, down))
                inplanes = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) normalised images. Returns: (B, num_classes) logits."""
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


CLASSIFIERS.register(
    "resnet-demo",
    summary="narrow BN ResNet (16/32/64 ch, 2-2-2 blocks, 0.17 M params), 32-64 px",
    paper="He et al., CVPR 2016 (CIFAR variant)",
    spec=ClassifierSpec(32, crop_ratio=1.0),
)(DemoResNet)


def classifier_spec(arch: str) -> ClassifierSpec:
    """The spec of a registered architecture; UnknownName lists the available ones."""
    spec = CLASSIFIERS.entry(arch).extra["spec"]
    assert isinstance(spec, ClassifierSpec)
    return spec


# -- the model -----------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A backbone behind its input normalisation: (B, 3, H, W) images in [0, 1] -> (B, K) logits.

    ``mean`` / ``std`` are buffers (saved in the ``state_dict``); the other metadata are attributes
    (see :meth:`meta`).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        arch: str,
        num_classes: int,
        image_size: int,
        crop_ratio: float,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch, self.num_classes = arch, num_classes
        self.image_size, self.crop_ratio = image_size, crop_ratio
        self.classes = list(classes) if classes is not None else None
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) in [0, 1]. Returns: (B, num_classes) logits."""
        return self.backbone((x - self.mean) / self.std)

    def meta(self) -> dict[str, Any]:
        """arch, num_classes, classes, image_size (px), crop_ratio, mean, std: what a checkpoint records."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "image_size": self.image_size,
            "crop_ratio": self.crop_ratio,
            "mean": [round(float(v), 6) for v in self.mean.flatten()],
            "std": [round(float(v), 6) for v in self.std.flatten()],
        }


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
) -> Classifier:
    """A :class:`Classifier` of a registered architecture (random init unless ``pretrained``).

    Args:
        pretrained: a torchvision weights tag of the architecture (``IMAGENET1K_V1``, ``DEFAULT``, ...),
            or a local checkpoint file. A head of another class count is replaced by a fresh one.
        classes: class names by label index (recorded, not used); image_size: the input side it will
            be trained / evaluated at (default: the architecture's preferred one).

    Raises:
        UnknownName: unknown architecture or weights tag. ConfigError: bad ``num_classes`` / ``image_size``,
            or a tag for an architecture without pretrained weights. MissingFileError / DataError: a
            local checkpoint that is missing or does not fit. WeightsUnavailable: not cached and offline.
    """
    entry = CLASSIFIERS.entry(arch)
    spec = classifier_spec(arch)
    for name, value, low in (
        ("num_classes", num_classes, 1),
        ("image_size", image_size or spec.image_size, 8),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    if classes is not None and len(classes) != num_classes:
        raise ConfigError(f"{len(classes)} class names given for {num_classes} classes")
    backbone = entry.obj(num_classes)
    if pretrained is not None:
        state, source = _pretrained_state(arch, spec, pretrained)
        load_backbone_state(backbone, state, source)
    return Classifier(
        backbone,
        arch=arch,
        num_classes=num_classes,
        image_size=image_size or spec.image_size,
        crop_ratio=spec.crop_ratio,
        mean=spec.mean,
        std=spec.std,
        classes=classes,
    )


# -- weights ---------------------------------------------------------------------------------------------
def _pretrained_state(
    arch: str, spec: ClassifierSpec, pretrained: str | os.PathLike[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """(backbone state_dict, description) of a weights tag or a local file."""
    text = str(pretrained)
    path = Path(text).expanduser()
    if path.is_file():
        return _file_backbone_state(arch, path), str(path)
    if os.sep in text or "/" in text or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise MissingFileError(f"pretrained checkpoint {path} does not exist")
    if spec.torchvision is None:
        raise ConfigError(
            f"classifier '{arch}' has no pretrained weights to download; pass a local checkpoint "
            f"path, or train it from scratch (pretrained=None)"
        )
    return fetch_torchvision_weights(spec.torchvision, text), f"torchvision {spec.torchvision}/{text}"


def _file_backbone_state(arch: str, path: Path) -> dict[str, torch.Tensor]:
    from core.models import checkpoint_arch, read_checkpoint

    recorded = checkpoint_arch(path)
    if recorded is not None and recorded != arch:
        raise ConfigError(f"checkpoint {path} holds a {recorded} classifier, not {arch}; use arch {recorded}")
    state = read_checkpoint(path)
    if any(k.startswith("backbone.") for k in state):  # one of ours: drop the normalisation buffers
        return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``backbone``; a head (``fc.*``) whose shape differs is dropped and left as
    initialised (fine-tuning to other classes). Raises DataError when anything else does not fit."""
    own = backbone.state_dict()
    head = {k for k in state if k.startswith("fc.") and k in own and state[k].shape != own[k].shape}
    if head:
        log.info(
            "%s: dropping the pretrained head (%s) for %d classes",
            source,
            ", ".join(sorted(head)),
            own["fc.weight"].shape[0] if "fc.weight" in own else -1,
        )
    bad = [k for k in state if k in own and k not in head and state[k].shape != own[k].shape]
    kept = {k: v for k, v in state.items() if k not in head}
    try:
        result = backbone.load_state_dict(kept, strict=False)
    except RuntimeError:
        result = None
    missing = [k for k in (result.missing_keys if result else []) if k not in head]
    unexpected = list(result.unexpected_keys) if result else []
    if bad or missing or unexpected or result is None:
        what = "; ".join(
            f"{n} {w} (e.g. {', '.join(ks[:3])})"
            for n, w, ks in (
                (len(bad), "shape mismatches", bad),
                (len(missing), "missing keys", missing),
                (len(unexpected), "unexpected keys", unexpected),
            )
            if ks
        )
        raise DataError(f"weights from {source} do not fit this architecture: {what or 'load failed'}")


def torchvision_weights_file(model: str, tag: str) -> tuple[str, Path]:
    """(download URL, path in the torch hub cache) of torchvision weights ``model``/``tag``.

    Raises:
        UnknownName: the tag is not a member of the model's weights enum (the message lists them).
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(model)
    try:
        weights = enum[tag]
    except KeyError:
        raise UnknownName(
            f"torchvision weights '{tag}' not found for {model}; available: {', '.join(enum.__members__)}"
        ) from None
    url = str(weights.url)
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_torchvision_weights(model: str, tag: str) -> dict[str, torch.Tensor]:
    """The state_dict of torchvision weights, from the hub cache or downloaded into it.

    Raises:
        WeightsUnavailable: not cached and offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), the
            host unreachable, or the download failed; the message names the file and where to put it.
    """
    from core.models import hub_offline, reachable

    url, cached = torchvision_weights_file(model, tag)
    if cached.is_file():
        return _read_state(cached)
    offline = hub_offline()
    if offline or not reachable(urlparse(url).hostname):
        raise _unavailable(
            model, tag, url, cached, "offline mode is set" if offline else "the host cannot be reached"
        )
    try:
        torch.hub.load_state_dict_from_url(
            url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as exc:  # noqa: BLE001 - HTTP/IO/hash errors of many kinds all mean "no weights"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise _unavailable(model, tag, url, cached, f"the download failed: {reason}") from exc
    return _read_state(cached)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from core.models import read_checkpoint

    return read_checkpoint(path)


def _unavailable(model: str, tag: str, url: str, cached: Path, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"pretrained weights {model}/{tag} are not cached and cannot be downloaded ({why}); download {url} "
        f"on a connected machine and put it at {cached} (the torch hub cache, set by $TORCH_HOME), "
        "or pass the file's path as pretrained"
    )


# -- saved classifiers --------------------------------------------------------------------------------------
def load_classifier(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Classifier:
    """The classifier a checkpoint holds (a training checkpoint or :func:`save_classifier`'s file),
    rebuilt with its architecture, class count and names, input size and normalisation; in eval mode.

    Raises:
        MissingFileError: no such file. DataError: not a classifier checkpoint, or its weights do not fit.
        UnknownName: it records an architecture this version does not know.
    """
    from core.models import load_file, state_dict_of

    obj = load_file(Path(path))
    if not isinstance(obj, Mapping) or any(k not in obj for k in ("arch", "num_classes", "state_dict")):
        raise DataError(
            f"{path} is not a prunescope classifier checkpoint (it needs arch, num_classes, state_dict)",
            hint="to start from plain weights use build_classifier(arch, n, pretrained=PATH)",
        )
    model = build_classifier(
        str(obj["arch"]),
        int(obj["num_classes"]),
        classes=obj.get("classes"),
        image_size=obj.get("image_size"),
    )
    try:
        model.load_state_dict(state_dict_of(obj, Path(path)))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise DataError(
            f"checkpoint {path} does not fit {obj['arch']} with {obj['num_classes']} classes: {first[:200]}"
        ) from None
    if obj.get("crop_ratio") is not None:
        model.crop_ratio = float(obj["crop_ratio"])
    return model.to(device).eval()


def save_classifier(model: Classifier, path: str | os.PathLike[str]) -> Path:
    """Write the model alone (meta + ``state_dict``) atomically, loadable with :func:`load_classifier`."""
    from core import atomic

    dest = Path(path)
    with atomic.atomic_path(dest) as tmp:
        torch.save(
            {"format": "prunescope.classifier/1", **model.meta(), "state_dict": model.state_dict()}, tmp
        )
    return dest


def eval_transform(image_size: int, crop_ratio: float = 1.0) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (3, S, S) float in [0, 1]: resize the short side to ``round(S / crop_ratio)``, then
    center-crop S (no normalisation: the Classifier does it)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(round(image_size / crop_ratio)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Returns: (N, K) logits of ``images`` ((N, 3, H, W) in [0, 1]) in eval mode, on the model's device;
    the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [model(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0), device=device)
