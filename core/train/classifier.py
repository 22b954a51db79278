"""Supervised classifier training on a labelled dataset, optionally with noise augmentation.

``train_classifier(ws, cfg)`` trains a registered classifier (:mod:`core.classifiers`, default
``resnet-demo``) with cross-entropy on the (image, label) rows of a registered dataset, or on the ids
a pruning manifest kept, with SGD (momentum 0.9) or AdamW and a warm-up + cosine (or constant) LR
schedule (:mod:`core.train.schedule`). Noise augmentation (:mod:`core.train.augment`; Rusak et al.
ECCV 2020) perturbs the noisy part of every batch in [0, 1] pixel space before the model's own
normalisation: Gaussian, speckle, or adversarial noise from a jointly trained noise generator (ANT).

Everything lands in ``runs/<id>/`` (run kind ``train-classifier``): ``params.json`` (resolved config),
``progress.jsonl`` (step, total, loss, train_acc, lr, img/s, adv_loss), ``log.txt``, ``data.json``
(samples used, skips by reason) and ``checkpoints/step-NNNNNN.pt`` + ``last.pt``, each loadable with
:func:`core.classifiers.load_classifier`. Final train loss, throughput and (with ``val_dataset``) clean
top-1 accuracy go to the catalog's ``metrics`` table (model ``classifier:<run id>``).

Resuming (``run_id=...``) continues from ``last.pt`` with the stored config. The batch of step k (rows:
a permutation seeded by (seed, epoch), :class:`core.train.clip.StepBatchSampler`; each sample's
augmentation: a seed of (seed, step, slot); the noise: a Generator seeded by (seed, step)) is a pure
function of the seed and k, and the checkpoint holds the model, optimiser, scheduler, grad scaler and
the ANT adversary, so a resumed run ends with an uninterrupted run's weights (bit-identical on CPU).

Single process only (no torchrun / DDP, unlike CLIP training).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core import atomic
from core.classifiers import CLASSIFIERS, Classifier, build_classifier, eval_transform
from core.errors import ConfigError, DataError, UnknownName
from core.train.augment import (
    GENERATOR_KINDS,
    AdversarialNoise,
    AntConfig,
    NoiseConfig,
    add_noise,
    make_generator,
)
from core.train.clip import StepBatchSampler, checkpoint_dir, read_manifest_ids, sample_seed
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

RUN_KIND = "train-classifier"
CHECKPOINT_FORMAT = "prunescope.train_classifier/1"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AUGMENTS = ("flip-crop", "resized-crop", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Fields a resumed run may change; every other one must equal the stored config.
RESUMABLE_OVERRIDES = (
    "device",
    "precision",
    "num_workers",
    "cpu_threads",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "run_id",
)
#: Per-step train losses kept for :attr:`ClassifierTrainResult.loss_tail`.
LOSS_TAIL = 50


# -- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainClassifierConfig:
    """A classifier training run (validated on creation; stored in ``runs/<id>/params.json``).

    Args:
        dataset: a registered dataset with labels (an image folder with one sub-folder per class).
        arch: a registered classifier (``core.classifiers.CLASSIFIERS``); pretrained: a torchvision
            weights tag (``IMAGENET1K_V1``) or a local checkpoint to start from.
        manifest: a pruning manifest (parquet path or id under ``manifests/``); only its kept ids are used.
        val_dataset: a labelled dataset with the same classes; its clean top-1 accuracy is reported.
        epochs: passes over the data (the tail that does not fill a batch is dropped each epoch);
            steps: optimiser updates in total, overriding ``epochs`` when set.
        batch_size: images per update; lr: peak learning rate; weight_decay: L2 decay of conv / linear
            weights (not of BatchNorm parameters and biases); optimizer: sgd (with ``momentum``) or adamw.
        schedule: cosine (to ``min_lr_ratio`` of the peak) or constant, after ``warmup_steps`` of linear
            warm-up.
        image_size: input side in px (default: the architecture's); augment: flip-crop (pad 1/8, random
            crop, horizontal flip; small images), resized-crop (ImageNet's), or none.
        noise: none | gaussian | speckle | ant (:mod:`core.train.augment`); noise_sigma: fixed std for
            gaussian / speckle (None: per image from the paper's set); clean_fraction: share of each batch
            kept clean (paper 0.5).
        ant_epsilon / ant_generator / ant_lr / ant_pool_size: the adversary's L2 budget (at 3x224x224;
            paper 135), generator type (1x1 | 3x3), Adam LR (1e-4) and replay pool size;
            ant_snapshot_every: generator updates between replay snapshots (0: once per epoch, as the paper).
        seed: model init, data order, augmentations and noise.
        device: auto | cpu | cuda | cuda:N; precision: auto | fp32 | bf16 | fp16 (autocast; fp16 with a
            GradScaler; auto = fp32 on CPU). num_workers: DataLoader workers; cpu_threads: torch threads
            during the run (None: unchanged).
        log_every: steps between progress records; checkpoint_every: steps between checkpoints (0: only
            at the end); keep_checkpoints: ``step-*.pt`` files kept besides ``last.pt`` (0: all).
        run_id: resume this run from its ``last.pt``.
    """

    dataset: str
    arch: str = "resnet-demo"
    pretrained: str | None = None
    manifest: str | None = None
    val_dataset: str | None = None
    epochs: int = 10
    steps: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    image_size: int | None = None
    augment: str = "flip-crop"
    noise: str = "none"
    noise_sigma: float | None = None
    clean_fraction: float = 0.5
    ant_epsilon: float = 135.0
    ant_generator: str = "1x1"
    ant_lr: float = 1e-4
    ant_pool_size: int = 8
    ant_snapshot_every: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    cpu_threads: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    run_id: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.dataset, "dataset name")
        if self.val_dataset is not None:
            validate_name(self.val_dataset, "dataset name")
        CLASSIFIERS.entry(self.arch)  # UnknownName listing the architectures
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("augment", AUGMENTS),
            ("precision", PRECISIONS),
            ("ant_generator", GENERATOR_KINDS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        self._check_ints()
        if not self.lr > 0 or not self.weight_decay >= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("lr must be > 0, weight_decay >= 0 and momentum in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        self.noise_config()  # validates noise, noise_sigma, clean_fraction and the ant_* fields
        if self.run_id is not None:
            validate_name(self.run_id, "run id")

    def _check_ints(self) -> None:
        for name, low, optional in (
            ("epochs", 1, False),
            ("steps", 1, True),
            ("batch_size", 2, False),
            ("warmup_steps", 0, False),
            ("image_size", 8, True),
            ("ant_pool_size", 1, False),
            ("ant_snapshot_every", 0, False),
            ("num_workers", 0, False),
            ("cpu_threads", 1, True),
            ("log_every", 1, False),
            ("checkpoint_every", 0, False),
            ("keep_checkpoints", 0, False),
        ):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(
                    f"{name} must be an integer >= {low}{' or None' if optional else ''}; got {value!r}"
                )

    def noise_config(self, steps_per_epoch: int = 1) -> NoiseConfig:
        """The :class:`NoiseConfig` of the run (ANT snapshots once per ``steps_per_epoch`` by default)."""
        ant = AntConfig(
            epsilon=self.ant_epsilon,
            generator=self.ant_generator,
            lr=self.ant_lr,
            pool_size=self.ant_pool_size,
            snapshot_every=self.ant_snapshot_every or max(1, steps_per_epoch),
        )
        return NoiseConfig(
            kind=self.noise,
            sigma=self.noise_sigma,
            clean_fraction=self.clean_fraction,
            seed=self.seed,
            ant=ant,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainClassifierConfig:
        """A config from stored values; unknown keys raise ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(values))


@dataclass(frozen=True)
class ClassifierTrainResult:
    """What a call of :func:`train_classifier` did. ``finished`` is False when it stopped early.

    ``loss_tail`` holds the train loss of the last (up to 50) updates, oldest first; ``val_accuracy`` the
    clean top-1 accuracy on ``val_dataset`` (a fraction in [0, 1]) when one was given and the run finished.
    """

    run_id: str
    run_dir: Path
    checkpoint: Path | None
    steps: int
    total_steps: int
    final_loss: float
    loss_tail: tuple[float, ...]
    val_accuracy: float | None
    img_per_s: float
    n_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    finished: bool = True


def load_run_config(ws: Workspace, run_id: str) -> TrainClassifierConfig:
    """The stored config of a classifier training run, with ``run_id`` set (for resuming).

    Raises:
        UnknownName: no classifier training run ``run_id`` in this workspace.
    """
    params = ws.dir("runs", validate_name(run_id, "run id")) / "params.json"
    stored = json.loads(params.read_text(encoding="utf-8")) if params.is_file() else {}
    if stored.get("kind") != RUN_KIND:
        runs = ws.catalog.query(
            "SELECT id FROM runs WHERE kind = ? ORDER BY started_at DESC LIMIT 10", [RUN_KIND]
        )
        raise UnknownName(
            f"classifier training run '{run_id}' not found; recent ones: {', '.join(runs['id']) or 'none'}"
        )
    return replace(TrainClassifierConfig.from_dict(stored["config"]), run_id=run_id)


# -- data ----------------------------------------------------------------------------------------------------
def labelled_index(
    ws: Workspace, name: str, manifest: str | None = None
) -> tuple[Any, pd.DataFrame, list[str], Counter[str]]:
    """A labelled dataset, its usable rows (manifest-filtered, labelled), its class names and the
    per-reason counts of rows left out.

    Raises:
        UnknownName: no such dataset. DataError: no labels, no images, nothing left to train on, or a
            manifest sharing no id with the dataset.
    """
    from core.datasets import open_dataset

    ds = open_dataset(ws, name)
    classes, index = ds.classes(), ds.index
    if not classes or "label" not in index.columns or index["label"].isna().all():
        raise DataError(
            f"dataset '{name}' has no class labels",
            hint="register an image folder with one sub-folder per class (or a source with a label column)",
        )
    if not ds.has_images:
        raise DataError(f"dataset '{name}' has no local images to train on")
    skipped: Counter[str] = Counter()
    if manifest:
        kept = read_manifest_ids(ws, manifest)
        inside = index["id"].astype(str).isin(kept)
        if not inside.any():
            raise DataError(
                f"manifest {manifest} keeps none of the {len(index)} ids of dataset '{name}'",
                hint="was it made from another dataset?",
            )
        skipped["not_in_manifest"] = int((~inside).sum())
        skipped["manifest_id_not_in_dataset"] = len(kept - set(index["id"].astype(str)))
        index = index[inside]
    labelled = index["label"].notna()
    skipped["missing_label"] = int((~labelled).sum())
    index = index[labelled].reset_index(drop=True)
    if index.empty:
        raise DataError(f"dataset '{name}' has no labelled samples to train on")
    return ds, index, list(classes), Counter({k: v for k, v in skipped.items() if v})


class LabelledImages(torch.utils.data.Dataset):
    """Index rows -> (image tensor in [0, 1], label); an unreadable image gives ``(None, reason)``.

    Keys are ``(row, seed)``: the transform draws from the global torch RNG re-seeded with the sample's
    seed inside ``fork_rng`` (as :class:`core.train.clip.CaptionedImages`), so it does not depend on
    workers and leaves the RNG as it was.
    """

    def __init__(self, dataset: Any, rows: pd.DataFrame, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset = dataset
        self.rows = rows.to_dict("records")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int | str]:
        from core.errors import PathOutsideWorkspace
        from core.sources import SampleError

        i, seed = key
        row = self.rows[i]
        try:
            image = self.dataset.load_image(row)
        except SampleError as exc:
            return None, exc.reason
        except PathOutsideWorkspace:
            return None, "path_outside_root"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), int(row["label"])


def collate(
    items: Sequence[tuple[torch.Tensor | None, int | str]],
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, int]]:
    """Stack the readable samples of a batch.

    Returns: (B, 3, S, S) images, (B,) int64 labels, and the unreadable ones counted by reason.
    """
    good = [(img, int(lab)) for img, lab in items if img is not None]
    bad = Counter(str(reason) for img, reason in items if img is None)
    if not good:
        return None, None, dict(bad)
    return torch.stack([img for img, _ in good]), torch.tensor([lab for _, lab in good]), dict(bad)


def train_transform(image_size: int, augment: str, crop_ratio: float = 1.0) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (3, S, S) in [0, 1] with the training augmentation (no normalisation).

    flip-crop: short side to S, random S crop of the image reflect-padded by S/8, horizontal flip (the
    CIFAR recipe); resized-crop: RandomResizedCrop(S) + flip (the ImageNet recipe); none: the eval transform.
    """
    from torchvision import transforms

    if augment == "none":
        return eval_transform(image_size, crop_ratio)
    if augment == "resized-crop":
        first: list[Any] = [transforms.RandomResizedCrop(image_size)]
    else:
        first = [
            transforms.Resize(image_size),
            transforms.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"),
        ]
    return transforms.Compose([*first, transforms.RandomHorizontalFlip(), transforms.ToTensor()])


def noise_seed(seed: int, step: int) -> int:
    """Seed of step ``step``'s noise (which images, sigmas, noise draws, ANT generator input)."""
    return sample_seed(seed + 0x5EED, step, 2**20)


# -- state and checkpoints -----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a checkpoint holds, live."""

    model: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    noise: NoiseConfig
    adversary: AdversarialNoise | None = None
    step: int = 0
    skipped_images: Counter[str] = field(default_factory=Counter)
    loss_tail: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_TAIL))


def build_optimizer(cfg: TrainClassifierConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; conv / linear weights decay, BatchNorm parameters and biases do not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def build_state(
    cfg: TrainClassifierConfig,
    classes: list[str],
    total_steps: int,
    steps_per_epoch: int,
    device: torch.device,
    *,
    load_pretrained: bool = True,
) -> TrainState:
    """Model (seeded init, ``cfg.pretrained`` weights unless ``load_pretrained`` is False: a resume
    overwrites them anyway), optimiser, scheduler, scaler and (ANT) adversary at step 0."""
    from core.models import resolve_precision
    from core.train.schedule import warmup_cosine_scheduler

    torch.manual_seed(cfg.seed)
    model = (
        build_classifier(
            cfg.arch,
            len(classes),
            pretrained=cfg.pretrained if load_pretrained else None,
            classes=classes,
            image_size=cfg.image_size,
        )
        .to(device)
        .train()
    )
    optimizer = build_optimizer(cfg, model)
    floor = 1.0 if cfg.schedule == "constant" else cfg.min_lr_ratio
    scheduler = warmup_cosine_scheduler(
        optimizer, total_steps=total_steps, warmup_steps=min(cfg.warmup_steps, total_steps), min_ratio=floor
    )
    scaler = torch.amp.GradScaler(device.type, enabled=resolve_precision(device, cfg.precision) == "fp16")
    noise = cfg.noise_config(steps_per_epoch)
    adversary = AdversarialNoise(noise.ant, seed=cfg.seed, device=device) if noise.kind == "ant" else None
    return TrainState(model, optimizer, scheduler, scaler, noise, adversary)


def save_checkpoint(
    state: TrainState,
    cfg: TrainClassifierConfig,
    run_dir: Path,
    total_steps: int,
    *,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``step-NNNNNN.pt`` and copy it to ``last.pt``, both atomically; prune old step files.

    Loads with ``torch.load(..., weights_only=True)`` and :func:`core.classifiers.load_classifier`.
    """
    from core.train.clip import rng_state  # the same RNG snapshot as CLIP checkpoints

    folder = checkpoint_dir(run_dir)
    obj = {
        "format": CHECKPOINT_FORMAT,
        **state.model.meta(),
        "step": state.step,
        "total_steps": total_steps,
        "state_dict": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "adversary": state.adversary.state_dict() if state.adversary is not None else None,
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "metrics": dict(metrics or {}),
        "skipped_images": dict(state.skipped_images),
        "loss_tail": list(state.loss_tail),
    }
    path = folder / f"step-{state.step:06d}.pt"
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)
    with atomic.atomic_path(folder / "last.pt") as tmp:
        shutil.copyfile(path, tmp)
    if cfg.keep_checkpoints:
        for old in sorted(folder.glob("step-*.pt"))[: -cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(state: TrainState, path: Path) -> dict[str, Any]:
    """Restore every part of ``state`` (and the torch RNG) from a checkpoint; returns the raw dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(
            f"{path} is not a prunescope classifier training checkpoint (format {ckpt.get('format')!r})"
        )
    state.model.load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    if state.adversary is not None:
        state.adversary.load_state_dict(ckpt["adversary"])
    state.step = int(ckpt["step"])
    state.skipped_images = Counter(ckpt.get("skipped_images", {}))
    state.loss_tail = deque((float(v) for v in ckpt.get("loss_tail", [])), maxlen=LOSS_TAIL)
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt


# -- one update ----------------------------------------------------------------------------------------------
@dataclass
class StepOutput:
    """What one update reports: mean train loss, train accuracy on the (noisy) batch, adversary's loss."""

    loss: float
    accuracy: float
    adv_loss: float | None = None


def train_step(
    state: TrainState,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainClassifierConfig,
    device: torch.device,
) -> StepOutput:
    """One update: (ANT: one generator step, classifier in eval mode), noise on the noisy part of the
    batch, autocast forward, cross-entropy, scaled backward, optimiser step.

    Args:
        images: (B, 3, S, S) in [0, 1]; labels: (B,) int64.
    """
    from core.models import autocast

    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    gen = make_generator(noise_seed(cfg.seed, state.step), device)
    adv_loss = None
    if state.adversary is not None:
        state.model.eval()
        with autocast(device, cfg.precision):
            adv_loss = state.adversary.step(
                images, lambda x: F.cross_entropy(state.model(x).float(), labels), gen
            )
        state.model.train()
    noisy, _ = add_noise(images, state.noise, gen, state.adversary)
    with autocast(device, cfg.precision):
        logits = state.model(noisy)
    loss = F.cross_entropy(logits.float(), labels)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    accuracy = float((logits.detach().argmax(1) == labels).float().mean().item())
    return StepOutput(float(loss.detach().item()), accuracy, adv_loss)


# -- the loop ------------------------------------------------------------------------------------------------
@dataclass
class _Window:
    """Losses, accuracies and throughput since the last progress record, and over the whole call."""

    losses: list[float] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    adv: list[float] = field(default_factory=list)
    images: int = 0
    start: float = field(default_factory=time.perf_counter)
    total_images: int = 0
    total_time: float = 0.0

    def add(self, out: StepOutput, n: int) -> None:
        self.losses.append(out.loss)
        self.accs.append(out.accuracy)
        if out.adv_loss is not None:
            self.adv.append(out.adv_loss)
        self.images += n
        self.total_images += n

    def flush(self) -> dict[str, float | None]:
        elapsed = time.perf_counter() - self.start
        self.total_time += elapsed
        rec = {
            "loss": _mean(self.losses),
            "train_acc": _mean(self.accs),
            "adv_loss": _mean(self.adv) if self.adv else None,
            "img_per_s": self.images / elapsed if elapsed > 0 else 0.0,
        }
        self.losses, self.accs, self.adv, self.images, self.start = [], [], [], 0, time.perf_counter()
        return rec

    @property
    def img_per_s(self) -> float:
        return self.total_images / self.total_time if self.total_time > 0 else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class _Loop:
    """Per-call plumbing: config, where to write, the total step count, the bar."""

    cfg: TrainClassifierConfig
    run_dir: Path
    device: torch.device
    total_steps: int
    bar: Any = None
    saved_step: int = -1

    def run(self, state: TrainState, batches: Iterable[Any], stop_at: int) -> _Window:
        window = _Window()
        for images, labels, bad in batches:
            state.skipped_images.update(bad)
            if images is None or len(images) < 2:
                log.warning("step %d: fewer than 2 readable images in the batch; update skipped", state.step)
            else:
                out = train_step(state, images, labels, self.cfg, self.device)
                state.loss_tail.append(out.loss)
                window.add(out, len(images))
            state.scheduler.step()
            state.step += 1
            self.after_step(state, window)
            if state.step >= stop_at:
                break
        return window

    def after_step(self, state: TrainState, window: _Window) -> None:
        from core.runs import ProgressWriter

        if self.bar is not None:
            self.bar.update(1)
        step, cfg = state.step, self.cfg
        if step % cfg.log_every == 0 or step == self.total_steps:
            rec = window.flush()
            lr = float(state.scheduler.base_lrs[0] * state.scheduler.lr_lambdas[0](step - 1))
            ProgressWriter(self.run_dir).write(stage="train", step=step, total=self.total_steps, lr=lr, **rec)
            log.info(
                "step %d/%d loss %.4f acc %.3f lr %.3g img/s %.1f",
                step,
                self.total_steps,
                rec["loss"],
                rec["train_acc"],
                lr,
                rec["img_per_s"],
            )
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_acc']:.2f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.total_steps:
            save_checkpoint(state, cfg, self.run_dir, self.total_steps)
            self.saved_step = step


@torch.no_grad()
def clean_accuracy(
    model: torch.nn.Module, batches: Iterable[Any], device: torch.device
) -> tuple[float, int, Counter[str]]:
    """(top-1 accuracy in [0, 1], images scored, unreadable ones by reason) of ``model`` on clean batches."""
    was_training = model.training
    model.eval()
    correct, n, bad = 0, 0, Counter[str]()
    try:
        for images, labels, skipped in batches:
            bad.update(skipped)
            if images is None:
                continue
            pred = model(images.to(device)).argmax(1).cpu()
            correct += int((pred == labels).sum())
            n += len(labels)
    finally:
        model.train(was_training)
    return (correct / n if n else float("nan")), n, bad


def _val_batches(ds: Any, rows: pd.DataFrame, model: Classifier, cfg: TrainClassifierConfig) -> DataLoader:
    keys = [(i, 0) for i in range(len(rows))]
    chunks = [keys[i : i + cfg.batch_size] for i in range(0, len(keys), cfg.batch_size)]
    images = LabelledImages(ds, rows, eval_transform(model.image_size, model.crop_ratio))
    return DataLoader(images, batch_sampler=chunks, collate_fn=collate, num_workers=cfg.num_workers)


# -- entry point ---------------------------------------------------------------------------------------------
@dataclass
class _Data:
    """The training rows and, optionally, the validation rows."""

    ds: Any
    rows: pd.DataFrame
    classes: list[str]
    skipped: Counter[str]
    val: tuple[Any, pd.DataFrame] | None = None

    def steps(self, cfg: TrainClassifierConfig) -> tuple[int, int]:
        """(total steps, steps per epoch); DataError when the rows cannot fill one batch."""
        per_epoch = len(self.rows) // cfg.batch_size
        if per_epoch < 1:
            raise DataError(
                f"{len(self.rows)} training samples cannot fill one batch of {cfg.batch_size}",
                hint="lower batch_size",
            )
        return (cfg.steps or cfg.epochs * per_epoch), per_epoch


def load_data(ws: Workspace, cfg: TrainClassifierConfig) -> _Data:
    """Training rows (and validation rows with the same classes); see :func:`labelled_index`."""
    ds, rows, classes, skipped = labelled_index(ws, cfg.dataset, cfg.manifest)
    data = _Data(ds, rows, classes, skipped)
    if cfg.val_dataset:
        vds, vrows, vclasses, _ = labelled_index(ws, cfg.val_dataset)
        if vclasses != classes:
            raise DataError(
                f"val_dataset '{cfg.val_dataset}' has other classes than '{cfg.dataset}' "
                f"({len(vclasses)} vs {len(classes)}: {vclasses[:3]} vs {classes[:3]})",
                hint="register it with the training set's class order (label_from=classes_file)",
            )
        data.val = (vds, vrows)
    return data


def train_classifier(
    ws: Workspace, cfg: TrainClassifierConfig, progress: bool = False, *, stop_after_steps: int | None = None
) -> ClassifierTrainResult:
    """Train (or resume, when ``cfg.run_id`` is set) a classifier; see the module docstring.

    Args:
        progress: show a tqdm bar (CLI); the run's progress file is written either way.
        stop_after_steps: stop after this many updates in this call, checkpointing first (simulates an
            interruption; the run is then marked ``cancelled`` and resumes with ``run_id``).

    Raises:
        UnknownName: unknown dataset, architecture or run. ConfigError: a resumed run's config differs.
        DataError: no labels, nothing to train on, a manifest without overlap, fewer samples than a batch.
        WeightsUnavailable: pretrained weights not cached and offline.
    """
    from core.models import select_device, torch_threads
    from core.train.clip import file_log

    device = select_device(cfg.device)
    if cfg.run_id:
        _check_resume(ws, cfg)
    data = load_data(ws, cfg)
    steps = data.steps(cfg)
    with torch_threads(cfg.cpu_threads), _run_scope(ws, cfg) as run, file_log(run.dir, True):
        result = _train_in_run(ws, cfg, run, data, steps, device, progress, stop_after_steps)
        if not result.finished:
            run.message = (
                f"stopped at step {result.steps} of {result.total_steps}; resume with run_id={run.id}"
            )
    if not result.finished:
        ws.catalog.execute("UPDATE runs SET status = 'cancelled' WHERE id = ?", [run.id])
    return result


def _run_scope(ws: Workspace, cfg: TrainClassifierConfig) -> Any:
    from core.runs import recorded_run, resumed_run

    if cfg.run_id:
        return resumed_run(ws, cfg.run_id, RUN_KIND)
    return recorded_run(
        ws, RUN_KIND, {k: v for k, v in cfg.to_dict().items() if k != "run_id"}, seed=cfg.seed
    )


def _check_resume(ws: Workspace, cfg: TrainClassifierConfig) -> None:
    """Refuse, before touching the run's record, a resume whose config differs from the stored one."""
    stored = load_run_config(ws, cfg.run_id or "")
    diffs = [
        f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in fields(cfg)
        if f.name not in RESUMABLE_OVERRIDES and getattr(stored, f.name) != getattr(cfg, f.name)
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume run {cfg.run_id} with a different config ({'; '.join(diffs)})",
            hint="resume with the stored config (load_run_config)",
        )


def _train_in_run(
    ws: Workspace,
    cfg: TrainClassifierConfig,
    run: Any,
    data: _Data,
    steps: tuple[int, int],
    device: torch.device,
    progress: bool,
    stop_after_steps: int | None,
) -> ClassifierTrainResult:
    total, per_epoch = steps
    last = checkpoint_dir(run.dir) / "last.pt"
    resuming = bool(cfg.run_id) and last.is_file()
    state = build_state(cfg, data.classes, total, per_epoch, device, load_pretrained=not resuming)
    if resuming:
        load_checkpoint(state, last)
        log.info("resumed run %s at step %d of %d", run.id, state.step, total)
    else:
        log.info(
            "training %s on %s: %d samples, %d classes, %d steps of %d, noise %s",
            cfg.arch,
            cfg.dataset,
            len(data.rows),
            len(data.classes),
            total,
            cfg.batch_size,
            cfg.noise,
        )
    transform = train_transform(state.model.image_size, cfg.augment, state.model.crop_ratio)
    sampler = StepBatchSampler(
        len(data.rows), cfg.batch_size, seed=cfg.seed, total_steps=total, start_step=state.step
    )
    loader = DataLoader(
        LabelledImages(data.ds, data.rows, transform),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    stop_at = total if stop_after_steps is None else min(total, state.step + stop_after_steps)
    loop = _Loop(cfg, run.dir, device, total)
    window = _run_loop(loop, state, loader, stop_at, progress)
    return _finish(ws, cfg, run, data, state, loop, window)


def _run_loop(loop: _Loop, state: TrainState, loader: DataLoader, stop_at: int, progress: bool) -> _Window:
    from core.train.clip import progress_bar

    with progress_bar(progress, loop.total_steps, state.step) as loop.bar:
        try:
            return loop.run(state, loader, stop_at) if state.step < stop_at else _Window()
        except KeyboardInterrupt:
            if state.step > max(0, loop.saved_step):
                save_checkpoint(state, loop.cfg, loop.run_dir, loop.total_steps)
            raise


def _finish(
    ws: Workspace,
    cfg: TrainClassifierConfig,
    run: Any,
    data: _Data,
    state: TrainState,
    loop: _Loop,
    window: _Window,
) -> ClassifierTrainResult:
    """Final checkpoint, validation accuracy, data summary, catalog metrics; the result."""
    finished = state.step >= loop.total_steps
    tail = tuple(state.loss_tail)
    final_loss = _mean(tail[-min(len(tail), cfg.log_every) :])
    val_acc = None
    if finished and data.val is not None:
        val_acc, n_val, bad = clean_accuracy(
            state.model, _val_batches(*data.val, state.model, cfg), loop.device
        )
        log.info(
            "clean top-1 on %s: %.4f (%d images, %d unreadable)",
            cfg.val_dataset,
            val_acc,
            n_val,
            sum(bad.values()),
        )
    metrics = {"final_loss": final_loss, "img_per_s": window.img_per_s, "val_accuracy": val_acc}
    ckpt = save_checkpoint(state, cfg, run.dir, loop.total_steps, metrics=metrics)
    skipped = data.skipped + state.skipped_images
    atomic.write_json(
        Path(run.dir) / "data.json",
        {"n_samples": len(data.rows), "n_classes": len(data.classes), "skipped": dict(skipped)},
    )
    if finished:
        _record_metrics(ws, run.id, cfg, final_loss, window.img_per_s, val_acc)
    return ClassifierTrainResult(
        run.id,
        run.dir,
        checkpoint_dir(run.dir) / "last.pt" if ckpt else None,
        state.step,
        loop.total_steps,
        final_loss,
        tail,
        val_acc,
        window.img_per_s,
        len(data.rows),
        dict(skipped),
        finished,
    )


def _record_metrics(
    ws: Workspace,
    run_id: str,
    cfg: TrainClassifierConfig,
    final_loss: float,
    img_per_s: float,
    val_acc: float | None,
) -> None:
    base = {
        "run_id": run_id,
        "model": f"classifier:{run_id}",
        "dataset": cfg.dataset,
        "corruption": None,
        "severity": 0,
        "adaptation": "none",
    }
    rows = [
        {**base, "metric": "train_loss_final", "value": None if math.isnan(final_loss) else final_loss},
        {**base, "metric": "train_img_per_s", "value": img_per_s},
    ]
    if val_acc is not None and cfg.val_dataset:
        rows.append({**base, "dataset": cfg.val_dataset, "metric": "val_top1", "value": val_acc})
    ws.catalog.insert(
        "metrics",
        rows,
        replace_where="run_id = ? AND metric IN ('train_loss_final', 'train_img_per_s', 'val_top1')",
        replace_params=[run_id],
    )
