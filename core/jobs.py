"""Background jobs: a stage plus validated parameters, run as its own process, queued in the catalog.

A job is one row of the catalog's ``runs`` table and one folder ``runs/<id>/``:

- :func:`submit` validates the parameters by building the stage's typed config (the one the CLI
  builds), so an unknown stage, an unknown parameter or an out-of-range value is refused with a
  one-line :class:`~core.errors.ConfigError` before anything is written; then it writes
  ``params.json`` (atomically) and inserts the row as ``queued``.
- :func:`schedule` starts queued jobs, oldest first, while fewer than ``max_cpu`` CPU jobs and
  ``max_gpu`` GPU jobs run. The queue is the ``runs`` table itself, so it survives a dashboard restart.
- :func:`start` launches ``python -m core.jobs run <id> --workspace <root>`` from an argument list
  (never a shell) in a new session (its own process group), stdout and stderr appended to
  ``runs/<id>/log.txt``, with ``$PRUNESCOPE_RUN_ID`` set: the stage's :func:`core.runs.recorded_run`
  adopts the queued row, so a job is exactly one run. ``runs/<id>/job.json`` records the pid, the
  process start time (``/proc/<pid>/stat``; a reused pid is not mistaken for the job) and the host.
- :func:`cancel`: a queued job is cancelled at once; a running one gets SIGTERM, then SIGKILL to its
  whole process group after ``grace_s``. The job process turns SIGTERM into KeyboardInterrupt: at once
  for stages whose outputs are atomic and idempotent, after the current step (its next progress record,
  :func:`core.runs.request_stop`) for training, whose interrupt handler checkpoints; the run is marked
  ``cancelled``.
- :func:`refresh`: a running job whose process is gone (or whose pid now belongs to another process)
  is marked ``failed`` with the last lines of its ``log.txt``; temporary files its dead writers left
  in its output folders are removed.
- :func:`resume`: a failed or cancelled job is queued again under the same id. Stages with a
  ``run_id`` field (training, corruption grids) get it set to that id and continue from their own
  checkpoints; the others (embed, cluster, prune, similarity) skip the work that is finished.
- :func:`list_jobs` / :func:`job_status`: rows plus the latest progress record (``progress.jsonl``).

The launchable stages are the registry :data:`STAGES`; each entry's ``params`` are
:class:`~core.registry.ParamSpec` s derived from the config dataclass (read from its source, so that
listing them imports no torch), for the dashboard's forms. Validating a job does import the config's
module (torch for the training and corruption stages).

Within one process DuckDB refuses a read-only connection while a read-write one is open (and the other
way round), which the catalog's lock retry does not cover; a process that reads the catalog from several
threads (the dashboard) while calling :func:`submit` / :func:`schedule` / :func:`cancel` must not overlap
the two, or run the queue in another process (``prunescope jobs run-queue``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from core import atomic
from core.errors import ConfigError, PathOutsideWorkspace, PrunescopeError, UnknownName
from core.registry import ParamSpec, Registry
from core.runs import (
    RUN_ID_ENV,
    ProgressWriter,
    RunHandle,
    git_revision,
    new_run_id,
    package_version,
    read_progress,
    recorded_run,
    request_stop,
)
from core.store.catalog import utcnow
from core.workspace import Workspace, validate_name

log = logging.getLogger("core.jobs")  # also under `python -m core.jobs`, where __name__ is __main__

JOB_FILE = "job.json"
LOG_FILE = "log.txt"
PARAMS_FILE = "params.json"
#: Lines of ``log.txt`` kept in the message of a job whose process vanished.
TAIL_LINES = 20
DEFAULT_MAX_CPU = 2
DEFAULT_MAX_GPU = 1
#: Seconds a claimed job may go without a pid before :func:`refresh` calls its launch failed.
LAUNCH_TIMEOUT_S = 120.0
ACTIVE = ("queued", "running")
_CORE = Path(__file__).resolve().parent


# -- stage descriptions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobField:
    """One field of a stage's config dataclass, as read from its source.

    ``annotation`` is the source text (``int | None``, ``tuple[str, ...]``); ``default`` the literal
    default (None when computed by a factory, or when there is none and ``required`` is set).
    """

    name: str
    annotation: str
    required: bool
    default: Any = None

    @property
    def optional(self) -> bool:
        return "None" in self.annotation.replace(" ", "").split("|")

    @property
    def base(self) -> str:
        """The annotation without ``| None``."""
        parts = [p.strip() for p in self.annotation.split("|") if p.strip() != "None"]
        return " | ".join(parts)

    @property
    def shape(self) -> str:
        """``scalar``, ``list`` (tuple/list fields: a list or a comma-separated string) or ``json``."""
        if self.base.startswith(("tuple[", "list[", "Sequence[")):
            return "list"
        return "scalar" if self.base in ("int", "float", "bool", "str") else "json"


@dataclass(frozen=True)
class Ref:
    """A config field naming a catalog row that must exist: ``table.key`` (``what`` for messages). ``role``:
    the dataset role (pool, reference, benchmark) whose rows a launch form offers first, if any."""

    field: str
    table: str
    key: str
    what: str
    role: str | None = None


@dataclass(frozen=True)
class JobStage:
    """A launchable stage.

    Attributes:
        name: the registry name; kind: its run kind in the ``runs`` table.
        config: the config class as ``module:Class`` (imported only when a job is validated or run).
        run: ``(ws, config, call options, run handle) -> message``; the handle is the adopted job run
            for stages that do not record themselves, None for those that do.
        records_itself: the stage opens its own ``recorded_run`` / ``resumed_run`` (which adopts the row).
        resume: ``run_id`` (the config field that continues the run from its checkpoint) or
            ``idempotent`` (a re-run skips finished work).
        resource: ``config -> "cpu" | "gpu"``.
        outputs: ``(config, run id) -> folders`` (workspace-relative) the stage writes.
        refs: fields that must name existing catalog rows (checked by :func:`submit`).
        stop_at_record: on SIGTERM, stop at the next progress record (a complete training step) rather
            than at once; a second SIGTERM stops at once (see :func:`core.runs.request_stop`).
        fields: the config's fields; call_options: keyword options of the call that are not config.
        example: parameters that validate (tests, documentation).
    """

    name: str
    kind: str
    config: str
    run: Callable[[Workspace, Any, Mapping[str, Any], RunHandle | None], str | None]
    records_itself: bool
    resume: str
    resource: Callable[[Any], str]
    outputs: Callable[[Any, str], list[str]]
    refs: tuple[Ref, ...] = ()
    stop_at_record: bool = False
    fields: tuple[JobField, ...] = ()
    call_options: tuple[ParamSpec, ...] = ()
    example: Mapping[str, Any] = field(default_factory=dict)

    def config_class(self) -> type:
        import importlib

        module, _, name = self.config.partition(":")
        cls: type = getattr(importlib.import_module(module), name)
        return cls


def config_fields(module: str, cls_name: str) -> tuple[JobField, ...]:
    """The annotated fields of dataclass ``cls_name`` in ``module`` (a ``core`` module), read from its
    source with :mod:`ast` so that no heavy library is imported."""
    path = _CORE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name), None)
    if node is None:
        raise RuntimeError(f"no class {cls_name} in {path}")
    out = []
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            required, default = _literal_default(item.value)
            out.append(JobField(item.target.id, ast.unparse(item.annotation), required, default))
    return tuple(out)


def _literal_default(value: ast.expr | None) -> tuple[bool, Any]:
    """(required, default) of a field's default expression; computed defaults give None."""
    if value is None:
        return True, None
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return False, _literal(kw.value)
            factory = kw.value.id if kw.arg == "default_factory" and isinstance(kw.value, ast.Name) else None
            if factory in ("dict", "list"):
                return False, {} if factory == "dict" else []
        return False, None
    return False, _literal(value)


def _literal(node: ast.expr) -> Any:
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError):
        return None
    return list(value) if isinstance(value, tuple) else value


def _docstring_help(module: str, cls_name: str) -> dict[str, str]:
    """``field -> first clause of its description`` from the config class's Google docstring."""
    path = _CORE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    doc = re.sub(r"\n[ \t]{8,}", " ", ast.get_docstring(node) or "")  # join continuation lines
    out: dict[str, str] = {}
    for m in re.finditer(r"(?<![\w.])(\w+)((?:[ \t]*/[ \t]*\w+)*):[ \t]*([^;\n]+)", doc):
        names = [m.group(1), *re.findall(r"\w+", m.group(2))]
        for name in names:
            out.setdefault(name, m.group(3).strip().rstrip(".")[:160])
    return out


#: Fields whose values are files (the form offers a path input).
PATH_FIELDS = frozenset({"checkpoint", "vocabulary", "templates", "classnames", "cache_dir", "data", "val_data",
                         "clean_data"})
#: Path fields a job writes to (they must stay inside the workspace: source data is never modified).
WRITE_PATH_FIELDS = frozenset({"cache_dir"})


def param_specs(stage_fields: Sequence[JobField], help_text: Mapping[str, str],
                overrides: Mapping[str, Mapping[str, Any]]) -> tuple[ParamSpec, ...]:
    """ParamSpecs for a form: kind from the annotation, default, required, help, plus ``overrides``
    (ranges, choices) per field. The config itself stays the authority on what is valid."""
    out = []
    for f in stage_fields:
        kind = f.base if f.shape == "scalar" else "str"
        if kind == "str" and f.name in PATH_FIELDS:
            kind = "path"
        extra = dict(overrides.get(f.name, {}))
        if "choices" in extra:
            kind = "choice"
            extra["choices"] = tuple(extra["choices"])
        note = {"list": " (a list, or comma-separated)", "json": " (JSON)"}.get(f.shape, "")
        default = extra.pop("default", f.default)
        out.append(ParamSpec(f.name, kind, default=default, help=help_text.get(f.name, "") + note,
                             required=f.required, **extra))
    return tuple(out)


def _device_resource(device: Any) -> str:
    """``gpu`` when a device setting resolves to CUDA (``auto``/None: when a GPU is visible), else ``cpu``."""
    name = str(device or "auto").strip().lower()
    if name == "auto":
        return "gpu" if cuda_visible() else "cpu"
    return "gpu" if name.startswith("cuda") else "cpu"


def cuda_visible() -> bool:
    """Whether a CUDA GPU is usable, without importing torch unless it is already loaded."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


# -- the stages' calls (imports stay inside: the job process pays for them, the dashboard does not) ----------
def _run_embed(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.embed import embed_dataset

    info = embed_dataset(ws, cfg, replace=bool(call.get("replace")), run=run)
    return f"embedding set {info.id}: {info.n} rows x {info.dim}, {info.n_skipped} skipped"


def _run_cluster(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.clustering import run_clustering

    info = run_clustering(ws, cfg, replace=bool(call.get("replace")))
    return f"clustering {info.id}: {info.n} rows in {info.k} clusters, {info.n_skipped} skipped"


def _run_prune(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.prune.manifest import run_pruning

    info = run_pruning(ws, cfg, replace=bool(call.get("replace")))
    return f"pruning {info.id}: kept {info.n_kept} of {info.n_in}"


def _run_similarity(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.similarity_stage import run_similarity

    summary = run_similarity(ws, cfg)
    return f"similarity analysis {cfg.id}: {len(summary)} benchmark(s)"


def _run_train_clip(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.train.clip import train_clip

    result = train_clip(ws, cfg, progress=False)
    return f"final loss {result.final_loss:.4f}"


def _run_train_classifier(ws: Workspace, cfg: Any, call: Mapping[str, Any],
                          run: RunHandle | None) -> str | None:
    from core.train.classifier import train_classifier

    result = train_classifier(ws, cfg, progress=False)
    return f"final loss {result.final_loss:.4f}"


def _run_zeroshot(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.evaluate.zeroshot import evaluate_zeroshot

    evaluate_zeroshot(ws, cfg, progress=False)
    return None


def _run_corruptions(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.evaluate.corruption import evaluate_corruptions

    evaluate_corruptions(ws, cfg, progress=False)
    return None


def _run_demo_stage(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.demo.pipeline import run_stage

    if run is not None:
        ProgressWriter(run.dir).write(stage=f"demo {cfg.stage}", step=0, total=1)
    message = run_stage(ws, cfg)
    if run is not None:
        ProgressWriter(run.dir).write(stage=f"demo {cfg.stage}", step=1, total=1)
    return message


def _run_train_detector(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.train.detector import train_detector

    result = train_detector(ws, cfg, progress=False)
    return f"final loss {result.final_loss:.4f}" + (f", clean AP50 {result.ap50:.1%}" if result.ap50 is not None else "")


def _run_detection(ws: Workspace, cfg: Any, call: Mapping[str, Any], run: RunHandle | None) -> str | None:
    from core.evaluate.detection import evaluate_detection

    evaluate_detection(ws, cfg, progress=False)
    return None


def _run_folder(cfg: Any, run_id: str) -> list[str]:
    return [f"runs/{run_id}"]


STAGES: Registry[JobStage] = Registry("job stage")

_REPLACE = ParamSpec("replace", "bool", default=False, help="recompute existing outputs from scratch")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _register(name: str, summary: str, config: str, *,
              overrides: Mapping[str, Mapping[str, Any]] | None = None, **kw: Any) -> None:
    """Register stage ``name`` with ParamSpecs derived from its config class ``module:Class``."""
    module, _, cls_name = config.partition(":")
    stage_fields = config_fields(module, cls_name)
    specs = param_specs(stage_fields, _docstring_help(module, cls_name), overrides or {})
    stage = JobStage(name=name, config=config, fields=stage_fields, **kw)
    uses_gpu = any(f.name in ("device", "gpu") for f in stage_fields)
    STAGES.register(name, summary=summary, params=specs + stage.call_options, kind=stage.kind,
                    resume=stage.resume, gpu=uses_gpu)(stage)


_register(
    "embed", "embed a dataset's images and/or captions with a CLIP model (sharded; finished shards are kept)",
    "core.embed:EmbedConfig", kind="embed", run=_run_embed, records_itself=False, resume="idempotent",
    resource=lambda c: _device_resource(c.device),
    outputs=lambda c, _id: [f"embeddings/{c.set_id}"],
    refs=(Ref("dataset", "datasets", "name", "dataset", role="pool"),), call_options=(_REPLACE,),
    overrides={"model": {"default": "demo-vit-tiny"}, "modality": {"choices": ("image", "text", "both")},
               "dtype": {"choices": ("float16", "float32")},
               "precision": {"choices": _PRECISIONS}, "batch_size": {"min": 1}, "num_workers": {"min": 0},
               "shard_rows": {"min": 1}, "limit": {"min": 1}},
    example={"dataset": "pool", "model": "demo-vit-tiny", "device": "cpu"},
)
_register(
    "cluster", "spherical k-means of an embedding set with per-cluster statistics and labels",
    "core.clustering:ClusterConfig", kind="cluster", run=_run_cluster, records_itself=False,
    resume="idempotent",
    resource=lambda c: "gpu" if c.gpu else "cpu",
    outputs=lambda c, _id: [f"clusters/{c.id}"],
    refs=(Ref("embedding_set", "embedding_sets", "id", "embedding set", role="pool"),), call_options=(_REPLACE,),
    overrides={"k": {"min": 2}, "niter": {"min": 1}, "n_neighbors": {"min": 1}, "fit_sample": {"min": 2},
               "modality": {"choices": (None, "image", "text")}},
    example={"embedding_set": "pool.demo-vit-tiny.image", "k": 8},
)
_register(
    "prune", "prune a clustering with a chain of methods into a manifest",
    "core.prune.manifest:PruneConfig", kind="prune", run=_run_prune, records_itself=False,
    resume="idempotent",
    resource=lambda c: "cpu", outputs=lambda c, _id: ["manifests"],
    refs=(Ref("clustering_id", "clusterings", "id", "clustering"),), call_options=(_REPLACE,),
    overrides={"fraction_of": {"choices": ("input", "pool")}},
    example={"clustering_id": "pool.k8.s1234", "chain": [["semdedup", {"eps": 0.05}]]},
)
_register(
    "similarity", "train-test similarity of a pool against a reference set, per benchmark (CLIP-OOD)",
    "core.similarity_stage:SimilarityConfig", kind="similarity", run=_run_similarity, records_itself=False,
    resume="idempotent", resource=lambda c: "cpu", outputs=lambda c, _id: [f"similarity/{c.id}"],
    refs=(Ref("pool_set", "embedding_sets", "id", "embedding set", role="pool"),
          Ref("reference_set", "embedding_sets", "id", "embedding set", role="reference"),
          Ref("benchmark_sets", "embedding_sets", "id", "embedding set", role="benchmark")),
    example={"pool_set": "pool.image", "reference_set": "ref.image", "benchmark_sets": "bench.image"},
)
_register(
    "train-clip", "train CLIP (InfoNCE or AnInfoNCE) with checkpoints",
    "core.train.clip:TrainClipConfig", kind="train-clip", stop_at_record=True, run=_run_train_clip,
    records_itself=True, resume="run_id", resource=lambda c: _device_resource(c.device), outputs=_run_folder,
    refs=(Ref("dataset", "datasets", "name", "dataset", role="pool"),),
    overrides={"loss": {"choices": ("infonce", "aninfonce")}, "precision": {"choices": _PRECISIONS},
               "steps": {"min": 1}, "batch_size": {"min": 2}, "warmup_steps": {"min": 0},
               "checkpoint_every": {"min": 0}, "keep_checkpoints": {"min": 0}, "num_workers": {"min": 0},
               "log_every": {"min": 1}, "min_lr_ratio": {"min": 0.0, "max": 1.0},
               "weight_decay": {"min": 0.0}, "cpu_threads": {"min": 1}},
    example={"dataset": "captioned", "steps": 4, "warmup_steps": 1, "batch_size": 8, "device": "cpu"},
)
_register(
    "train-classifier", "train an image classifier, optionally with Gaussian / speckle / adversarial noise",
    "core.train.classifier:TrainClassifierConfig", kind="train-classifier", stop_at_record=True,
    run=_run_train_classifier, records_itself=True, resume="run_id",
    resource=lambda c: _device_resource(c.device), outputs=_run_folder,
    refs=(Ref("dataset", "datasets", "name", "dataset"), Ref("val_dataset", "datasets", "name", "dataset")),
    overrides={"optimizer": {"choices": ("sgd", "adamw")}, "schedule": {"choices": ("cosine", "constant")},
               "augment": {"choices": ("flip-crop", "resized-crop", "none")},
               "noise": {"choices": ("none", "gaussian", "speckle", "ant")},
               "ant_generator": {"choices": ("1x1", "3x3")}, "precision": {"choices": _PRECISIONS},
               "epochs": {"min": 1}, "steps": {"min": 1}, "batch_size": {"min": 2},
               "warmup_steps": {"min": 0},
               "image_size": {"min": 8}, "clean_fraction": {"min": 0.0, "max": 1.0},
               "min_lr_ratio": {"min": 0.0, "max": 1.0}, "weight_decay": {"min": 0.0},
               "checkpoint_every": {"min": 0}, "keep_checkpoints": {"min": 0}, "num_workers": {"min": 0},
               "log_every": {"min": 1}, "cpu_threads": {"min": 1}, "ant_pool_size": {"min": 1},
               "ant_snapshot_every": {"min": 0}},
    example={"dataset": "shapes", "steps": 4, "batch_size": 8, "device": "cpu"},
)
_register(
    "eval-zeroshot", "zero-shot top-1/top-5, per-class accuracy and retrieval recall of a CLIP model",
    "core.evaluate.zeroshot:ZeroShotConfig", kind="eval_zeroshot", run=_run_zeroshot, records_itself=True,
    resume="idempotent", resource=lambda c: _device_resource(c.device), outputs=_run_folder,
    refs=(Ref("datasets", "datasets", "name", "dataset", role="benchmark"),),
    overrides={"batch_size": {"min": 1}, "num_workers": {"min": 0}},
    example={"datasets": "val_bench", "device": "cpu"},
)
_register(
    "eval-corruptions", "error per corruption x severity x adaptation method; mCE and relative mCE",
    "core.evaluate.corruption:CorruptionEvalConfig", kind="eval-corruptions", run=_run_corruptions,
    records_itself=True, resume="run_id", resource=lambda c: _device_resource(c.device), outputs=_run_folder,
    refs=(Ref("dataset", "datasets", "name", "dataset", role="benchmark"),
          Ref("clean_dataset", "datasets", "name", "dataset", role="benchmark")),
    overrides={"setting": {"choices": ("reset", "continual")}, "batch_size": {"min": 1}, "limit": {"min": 1},
               "corrupt_size": {"min": 32}, "num_workers": {"min": 0}},
    example={"dataset": "val_bench", "models": "runs/x/checkpoints/last.pt", "severities": "1,5",
             "device": "cpu"},
)


_register(
    "train-detector", "train an object detector (torchvision Faster R-CNN / RetinaNet / FCOS, or demo-frcnn)",
    "core.train.detector:TrainDetectorConfig", kind="train-detector", stop_at_record=True,
    run=_run_train_detector, records_itself=True, resume="run_id",
    resource=lambda c: _device_resource(c.device), outputs=_run_folder,
    overrides={"optimizer": {"choices": ("sgd", "adamw")}, "augment": {"choices": ("flip", "none")},
               "steps": {"min": 1}, "batch_size": {"min": 1}, "warmup_steps": {"min": 0}, "seed": {"min": 0},
               "lr": {"min": 0.0}, "weight_decay": {"min": 0.0}, "cpu_threads": {"min": 1},
               "num_workers": {"min": 0}, "checkpoint_every": {"min": 0}, "log_every": {"min": 1}},
    example={"data": "sources/demo/detection-train", "steps": 4, "warmup_steps": 1, "batch_size": 2,
             "device": "cpu"},
)
_register(
    "eval-detection", "detection AP per corruption x severity; P, mPC and rPC (Michaelis et al. 2019)",
    "core.evaluate.detection:DetectionEvalConfig", kind="eval-detection", run=_run_detection,
    records_itself=True, resume="run_id", resource=lambda c: _device_resource(c.device), outputs=_run_folder,
    overrides={"metric": {"choices": ("auto", "ap", "ap50")}, "batch_size": {"min": 1}, "limit": {"min": 1},
               "cpu_threads": {"min": 1}, "seed": {"min": 0}},
    example={"data": "sources/demo/detection", "models": "torchvision:fasterrcnn_resnet50_fpn",
             "severities": "1,5", "device": "cpu"},
)
_register(
    "demo", "one stage of the bundled demo (world, CLIP, embeddings, clusters, prunings, similarity, robustness)",
    "core.demo.pipeline:DemoStageConfig", kind="demo-stage", run=_run_demo_stage, records_itself=False,
    resume="idempotent", resource=lambda c: "cpu", outputs=_run_folder,
    overrides={"stage": {"choices": ("generate", "register", "reference_results", "train_clip", "embed",
                                     "zeroshot", "cluster", "maps", "prune", "similarity", "robustness",
                                     "detection")},
               "size": {"choices": ("tiny", "small", "full")}, "seed": {"min": 0}},
    example={"stage": "generate", "size": "tiny"},
)


# -- validation ------------------------------------------------------------------------------------------
def build_config(stage: str, params: Mapping[str, Any]) -> Any:
    """The stage's config built from ``params`` (no file or catalog is touched).

    Raises:
        UnknownName: no such stage (the message lists them). ConfigError: an unknown parameter, a value
            of the wrong type or out of range (one line, from the config itself).
    """
    return _validate(STAGES.entry(stage).obj, params)[0]


def _validate(stage: JobStage, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(config, call options) from raw parameters; see :func:`build_config`."""
    by_name = {f.name: f for f in stage.fields}
    specs = {p.name: p for p in STAGES.entry(stage.name).params}
    options = {o.name: o for o in stage.call_options}
    unknown = sorted(set(params) - set(by_name) - set(options))
    if unknown:
        known = ", ".join([*by_name, *options])
        raise ConfigError(
            f"unknown parameter(s) for job stage '{stage.name}': {', '.join(unknown)}; known: {known}")
    values = {}
    for name, value in params.items():
        if name in by_name:
            coerced = _coerce(by_name[name], specs[name], value)
            if coerced is not _DROP:
                values[name] = coerced
    missing = [f.name for f in stage.fields if f.required and f.name not in values]
    if missing:
        raise ConfigError(f"job stage '{stage.name}' needs parameter(s): {', '.join(missing)}")
    call = {name: spec.validate(params.get(name)) for name, spec in options.items()}
    cls = stage.config_class()
    try:
        return cls(**values), call
    except TypeError as exc:  # a value the config's own checks did not anticipate
        raise ConfigError(f"invalid parameters for job stage '{stage.name}': {exc}") from None


_DROP = object()


def _coerce(f: JobField, spec: ParamSpec, value: Any) -> Any:
    """A form or JSON value converted to what the config field expects, checked against the form's
    ranges and choices (None or '': the config's default, unless the field is optional)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if f.required:
            raise ConfigError(f"parameter '{f.name}' is required")
        return None if f.optional else _DROP
    if f.shape == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"parameter '{f.name}' must be a list; got {value!r}")
        kind = "int" if "int" in f.base else "float" if "float" in f.base else "str"
        item = ParamSpec(f.name, kind)
        return tuple(item.validate(v.strip() if isinstance(v, str) else v) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if f.shape == "json":
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"parameter '{f.name}' must be JSON; got {value!r}") from None
        return value
    return spec.validate(value)


def _check_refs(ws: Workspace, stage: JobStage, cfg: Any) -> None:
    """UnknownName (listing what exists) for a config field naming a catalog row that does not exist."""
    for ref in stage.refs:
        value = getattr(cfg, ref.field)
        for name in value if isinstance(value, tuple | list) else [value]:
            if name is not None:
                ws.catalog.row(ref.table, ref.key, name, what=ref.what)


def plain_config(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON types (tuples become lists)."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)
    for f in fields(cfg):  # PruneConfig.to_dict leaves its id out
        raw.setdefault(f.name, getattr(cfg, f.name))
    out: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    return out


# -- submitting ----------------------------------------------------------------------------------------
def submit(ws: Workspace, stage: str, params: Mapping[str, Any] | None = None, *,
           check_refs: bool = True, confine_paths: bool = False) -> str:
    """Queue a job; returns its run id. Nothing is written unless the parameters are valid.

    Args:
        stage: a name in :data:`STAGES`.
        params: config fields (and call options such as ``replace``); values may be strings from a form.
            A ``run_id`` (training, corruption grids) names a failed or cancelled run to continue: the
            job is that run (queued again under its id), whether a job or the CLI started it.
        check_refs: refuse names of datasets / embedding sets / clusterings that are not registered
            (pass False to queue a job behind the one that will make them).
        confine_paths: refuse path parameters (:data:`PATH_FIELDS`) that resolve outside the workspace and
            the registered dataset roots (written ones: outside the workspace), symlinks followed. The
            dashboard submits with True; the CLI user may point at any file they can read.

    Raises:
        UnknownName: unknown stage, or (``check_refs``) a named dataset/set/clustering that does not exist.
        ConfigError: unknown or invalid parameters.
        PathOutsideWorkspace: (``confine_paths``) a path parameter outside the allowed places.
    """
    entry = STAGES.entry(stage)
    job_stage = entry.obj
    params = _anchor_paths(ws, dict(params or {})) if confine_paths else dict(params or {})
    cfg, call = _validate(job_stage, params)
    if confine_paths:
        _confine_paths(ws, cfg)
    if check_refs:
        _check_refs(ws, job_stage, cfg)
    resumed = getattr(cfg, "run_id", None) if job_stage.resume == "run_id" else None
    run_id = resumed or new_run_id(job_stage.kind)
    config = plain_config(cfg)
    job = {"stage": stage, "config": config, "call": call, "resource": job_stage.resource(cfg),
           "outputs": job_stage.outputs(cfg, run_id), "resume": job_stage.resume,
           "submitted_at": utcnow().isoformat()}
    if resumed:  # continuing an existing run: the job is that run
        if ws.catalog.query("SELECT id FROM runs WHERE id = ? AND kind = ?", [resumed, job_stage.kind]).empty:
            raise UnknownName(f"{job_stage.kind} run '{resumed}' not found in the catalog")
        _requeue(ws, resumed, job)
    else:
        _write_queued(ws, run_id, job_stage.kind, config, getattr(cfg, "seed", None), job)
    log.info("queued %s job %s", stage, run_id)
    return run_id


#: Fields holding model specs (``[LABEL=]torchvision:ARCH``, a run id, or a checkpoint path) or a pretrained
#: tag that may be a local weights file.
MODEL_SPEC_FIELDS = frozenset({"models", "pretrained"})
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _spec_path(spec: object) -> str | None:
    """The file path inside a model spec, or None when the spec names a registry entry, tag or run id."""
    from core.models import split_label

    rest = split_label(str(spec))[1]
    looks_like_path = "/" in rest or "\\" in rest or rest.lower().endswith(_WEIGHT_SUFFIXES)
    return rest if looks_like_path and not rest.partition(":")[0].isidentifier() else None


def _path_values(cfg: Any) -> Iterator[tuple[str, str]]:
    """(field, path) of every file path in ``cfg``'s path fields and model specs."""
    for name in sorted(PATH_FIELDS):
        value = getattr(cfg, name, None)
        if value is not None and str(value).strip():
            yield name, str(value)
    for name in sorted(MODEL_SPEC_FIELDS):
        value = getattr(cfg, name, None)
        for spec in (value if isinstance(value, list | tuple) else [value] if value else []):
            path = _spec_path(spec)
            if path:
                yield name, path


def _anchor_paths(ws: Workspace, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with relative file paths (path fields, paths in model specs) taken relative to the workspace
    (a dashboard user types paths as they see them in the workspace, not relative to the server's folder)."""
    from core.models import split_label

    def anchored(path: str) -> str:
        return path if Path(path).expanduser().is_absolute() else str(ws.root / path)

    out = dict(params)
    for name, value in params.items():
        if name in PATH_FIELDS and isinstance(value, str) and value.strip():
            out[name] = anchored(value.strip())
        elif name in MODEL_SPEC_FIELDS and value:
            specs = value.split(",") if isinstance(value, str) else list(value)
            fixed = []
            for spec in (str(s).strip() for s in specs):
                path = _spec_path(spec)
                label = split_label(spec)[0]
                fixed.append(spec if not path else (f"{label}={anchored(path)}" if label else anchored(path)))
            out[name] = fixed if not isinstance(value, str) or name == "models" else fixed[0]
    return out


def _confine_paths(ws: Workspace, cfg: Any) -> None:
    """Raise PathOutsideWorkspace for a path in ``cfg`` outside the workspace and registered roots."""
    roots = ws.registered_roots()
    for name, value in _path_values(cfg):
        try:
            ws.safe_path(str(value), roots=[] if name in WRITE_PATH_FIELDS else roots)
        except PathOutsideWorkspace:
            where = "the workspace" if name in WRITE_PATH_FIELDS else "the workspace and every registered dataset root"
            raise PathOutsideWorkspace(
                f"parameter '{name}' = {value}: jobs launched from the dashboard only use files inside {where}; "
                "copy the file into the workspace or launch the job from the CLI") from None


def _write_queued(ws: Workspace, run_id: str, kind: str, config: dict[str, Any], seed: int | None,
                  job: dict[str, Any]) -> None:
    """``params.json`` first, then the ``queued`` row (a scheduler never sees a row without its params)."""
    run_dir = ws.dir("runs", run_id)
    rev, ver = git_revision(), package_version()
    atomic.write_json(run_dir / PARAMS_FILE, {"kind": kind, "config": config, "seed": seed, "version": ver,
                                              "git_rev": rev, "job": job})
    try:
        ws.catalog.insert("runs", [{
            "id": run_id, "kind": kind, "status": "queued", "config_json": json.dumps(config, sort_keys=True),
            "seed": seed, "git_rev": rev, "version": ver, "started_at": None, "ended_at": None,
            "run_dir": ws.rel(run_dir), "pid": None, "message": None}])
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _params(ws: Workspace, run_id: str) -> dict[str, Any]:
    """A job's ``params.json``; UnknownName when the run is not a job."""
    path = ws.dir("runs", validate_name(run_id, "run id")) / PARAMS_FILE
    try:
        params: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        params = {}
    if "job" not in params:
        raise UnknownName(f"job '{run_id}' not found (no runs/{run_id}/{PARAMS_FILE} written by a job)")
    return params


def _row(ws: Workspace, run_id: str) -> dict[str, Any]:
    found = ws.catalog.query("SELECT * FROM runs WHERE id = ?", [run_id])
    if found.empty:
        raise UnknownName(f"job '{run_id}' not found in the catalog")
    return {k: (None if _isna(v) else v) for k, v in found.iloc[0].to_dict().items()}


def _isna(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _update(ws: Workspace, sql: str, params: Sequence[Any]) -> int:
    """Run one UPDATE in its own transaction; returns how many rows it changed."""
    with ws.catalog.connect() as con:
        row = con.execute(sql, list(params)).fetchone()
    return int(row[0]) if row else 0


def _finish(ws: Workspace, run_id: str, status: str, message: str | None, *, pid: int | None = None) -> bool:
    """Set a final status unless the run already has one (the stage's own bookkeeping wins)."""
    sql = ("UPDATE runs SET status = ?, ended_at = ?, message = coalesce(message, ?) "
           "WHERE id = ? AND status IN ('queued', 'running')")
    args: list[Any] = [status, utcnow(), message, run_id]
    if pid is not None:
        sql += " AND pid = ?"
        args.append(pid)
    return _update(ws, sql, args) > 0


# -- processes ---------------------------------------------------------------------------------------------
#: Job processes this process launched (reaped when polled, so finished ones do not linger as zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from ``/proc``; None when absent."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = data.rsplit(")", 1)[1].split()
    return rest[0], int(rest[19])


def _reap() -> dict[int, int]:
    """Poll the children this process launched; returns ``pid -> exit code`` of those that ended."""
    ended = {}
    for pid, proc in list(_CHILDREN.items()):
        code = proc.poll()
        if code is not None:
            ended[pid] = code
            _CHILDREN.pop(pid, None)  # (dashboard sessions are threads: another may have reaped it)
    return ended


_EXIT_CODES: dict[int, int] = {}


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs and is the process that started at ``start_ticks`` (zombies count as ended)."""
    if not pid:
        return False
    _EXIT_CODES.update(_reap())
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (not Linux): existence is all we can check
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, ticks = stat
    return state not in ("Z", "X") and (start_ticks is None or ticks == start_ticks)


def _launch_info(ws: Workspace, run_id: str) -> dict[str, Any]:
    try:
        info: dict[str, Any] = json.loads((ws.dir("runs", run_id) / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        info = {}
    return info


def log_tail(ws: Workspace, run_id: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a run's ``log.txt`` ('' when there is none)."""
    path = ws.dir("runs", validate_name(run_id, "run id")) / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def job_command(ws: Workspace, run_id: str) -> list[str]:
    """The job process's argument list (never a shell string)."""
    return [sys.executable, "-m", "core.jobs", "run", run_id, "--workspace", str(ws.root)]


def start(ws: Workspace, run_id: str) -> int:
    """Launch a queued job as its own process (a new session, output appended to ``log.txt``); its pid.

    The row is claimed (``queued`` -> ``running``) before the launch, so two schedulers never start a job
    twice. Raises ConfigError when the job is not queued.
    """
    job = _params(ws, run_id)["job"]
    claimed = _update(ws, "UPDATE runs SET status = 'running', pid = NULL, started_at = ?, ended_at = NULL, "
                          "message = NULL WHERE id = ? AND status = 'queued'", [utcnow(), run_id])
    if not claimed:
        raise ConfigError(f"job {run_id} is {_row(ws, run_id)['status']}, not queued")
    run_dir = ws.dir("runs", run_id)
    (run_dir / JOB_FILE).unlink(missing_ok=True)  # a relaunch: the last process's pid means nothing now
    argv = job_command(ws, run_id)
    env = {**os.environ, RUN_ID_ENV: run_id, "PYTHONUNBUFFERED": "1"}
    try:
        with open(run_dir / LOG_FILE, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, close_fds=True)
    except OSError as exc:
        _finish(ws, run_id, "failed", f"could not start the job process: {exc}")
        raise PrunescopeError(f"could not start job {run_id}: {exc}") from exc
    _CHILDREN[proc.pid] = proc
    stat = _proc_stat(proc.pid)
    atomic.write_json(run_dir / JOB_FILE, {
        "pid": proc.pid, "start_ticks": stat[1] if stat else None, "host": socket.gethostname(),
        "launched_at": utcnow().isoformat(), "argv": argv, "stage": job["stage"],
        "resource": job["resource"]})
    _update(ws, "UPDATE runs SET pid = ? WHERE id = ? AND status = 'running'", [proc.pid, run_id])
    log.info("started %s job %s (pid %d)", job["stage"], run_id, proc.pid)
    return proc.pid


@contextlib.contextmanager
def _queue_lock(ws: Workspace) -> Iterator[None]:
    """One scheduler at a time per workspace (dashboard sessions, ``jobs run-queue``): an flock."""
    import fcntl

    path = ws.dir("runs") / ".jobs.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _active_jobs(ws: Workspace) -> list[dict[str, Any]]:
    """Queued and running jobs (rows plus their ``job`` section), oldest submission first."""
    rows = ws.catalog.query(
        "SELECT id, status, pid, started_at FROM runs WHERE status IN ('queued', 'running')")
    out = []
    for row in rows.to_dict("records"):
        with contextlib.suppress(UnknownName):
            out.append({**row, "job": _params(ws, row["id"])["job"]})
    out.sort(key=lambda r: (r["job"].get("submitted_at") or "", r["id"]))
    return out


def schedule(ws: Workspace, *, max_cpu: int = DEFAULT_MAX_CPU, max_gpu: int = DEFAULT_MAX_GPU) -> list[str]:
    """Start queued jobs, oldest first, while fewer than the limits run; returns the ids started.

    Jobs whose process vanished are marked failed first (:func:`refresh`), so only live jobs count.
    A job that cannot start does not hold back the ones of the other resource.
    """
    limits = {"cpu": max_cpu, "gpu": max_gpu}
    started = []
    with _queue_lock(ws):
        refresh(ws)
        jobs = _active_jobs(ws)
        running = {"cpu": 0, "gpu": 0}
        for job in jobs:
            if job["status"] == "running":
                running[job["job"]["resource"]] += 1
        for job in jobs:
            resource = job["job"]["resource"]
            if job["status"] != "queued" or running[resource] >= limits[resource]:
                continue
            try:
                start(ws, job["id"])
            except PrunescopeError as exc:  # cancelled meanwhile, or its process did not start (now failed)
                log.warning("job %s not started: %s", job["id"], exc.one_line())
                continue
            running[resource] += 1
            started.append(job["id"])
    return started


def run_queue(ws: Workspace, *, max_cpu: int = DEFAULT_MAX_CPU, max_gpu: int = DEFAULT_MAX_GPU,
              poll_s: float = 1.0, until_idle: bool = True, timeout_s: float | None = None) -> None:
    """Keep scheduling (``prunescope jobs run-queue``): until no job is queued or running when
    ``until_idle``, else forever (or until ``timeout_s``)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        schedule(ws, max_cpu=max_cpu, max_gpu=max_gpu)
        if until_idle and not _active_jobs(ws):
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(poll_s)


def refresh(ws: Workspace) -> list[str]:
    """Mark ``failed`` every running job (launched on this host) whose process is gone; returns their ids.

    The message carries the last lines of ``log.txt``; dead writers' temporary files are removed from
    the job's output folders. A row the job finished meanwhile is left as it is.
    """
    failed = []
    for job in _active_jobs(ws):
        if job["status"] != "running":
            continue
        info = _launch_info(ws, job["id"])
        if info.get("host") not in (None, socket.gethostname()):
            continue  # another machine's job (a shared workspace): its pids mean nothing here
        if _vanished(job, info):
            pid = info.get("pid") or job.get("pid")
            if _finish(ws, job["id"], "failed", _vanished_message(ws, job["id"], pid)):
                failed.append(job["id"])
                _clean_outputs(ws, job["job"])
                log.warning("job %s: process %s vanished; marked failed", job["id"], pid)
    return failed


def _vanished(job: Mapping[str, Any], info: Mapping[str, Any]) -> bool:
    pid = info.get("pid") or (None if _isna(job.get("pid")) else job.get("pid"))
    if not pid:
        started = job.get("started_at")
        age = (utcnow() - started).total_seconds() if started is not None and not _isna(started) else 0.0
        return age > LAUNCH_TIMEOUT_S  # claimed, but the launcher died before the process started
    return not process_alive(int(pid), info.get("start_ticks") if info.get("pid") == pid else None)


def _vanished_message(ws: Workspace, run_id: str, pid: Any) -> str:
    code = _EXIT_CODES.get(int(pid)) if pid else None
    how = f" (exit code {code})" if code is not None else ""
    tail = log_tail(ws, run_id)
    return f"job process {pid} ended without recording a result{how}; last lines of log.txt:\n{tail}"[-6000:]


def _clean_outputs(ws: Workspace, job: Mapping[str, Any]) -> int:
    """Delete temporary files of dead writers in the job's output folders; returns how many."""
    n = 0
    for rel in job.get("outputs", []):
        folder = ws.root / rel
        if folder.is_dir() and folder.resolve().is_relative_to(ws.root):
            n += clean_dead_temp_files(folder)
    return n


_WRITER_PID = re.compile(re.escape(atomic.TMP_MARK) + r"(\d+)-")


def clean_dead_temp_files(folder: Path) -> int:
    """Delete :mod:`core.atomic` temporary files below ``folder`` whose writer (the pid in the name) has
    died; a live writer's files stay. Zombies count as dead (unlike a bare ``kill(pid, 0)``)."""
    n = 0
    for path in folder.rglob(f".*{atomic.TMP_MARK}*"):
        m = _WRITER_PID.search(path.name)
        if path.is_file() and atomic.is_temp_path(path) and m and not process_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            n += 1
    return n


def cancel(ws: Workspace, run_id: str, *, grace_s: float = 10.0) -> str:
    """Cancel a job; returns its final status (``cancelled``, or how it ended if it had already).

    A queued job is cancelled at once. A running one gets SIGTERM (only the job process, which stops its
    own workers and records ``cancelled``; training checkpoints first), and SIGKILL to its whole process
    group when it is still there after ``grace_s`` seconds.
    """
    _params(ws, run_id)
    if _update(ws, "UPDATE runs SET status = 'cancelled', ended_at = ?, "
                   "message = 'cancelled before it started' WHERE id = ? AND status = 'queued'",
               [utcnow(), run_id]):
        return "cancelled"
    row = _row(ws, run_id)
    if row["status"] != "running":
        return str(row["status"])
    pid, ticks = _wait_for_pid(ws, run_id)
    if pid is not None:
        _terminate(pid, ticks, grace_s)
    _finish(ws, run_id, "cancelled", "cancelled by the user")
    return str(_row(ws, run_id)["status"])


def _wait_for_pid(ws: Workspace, run_id: str, timeout_s: float = 5.0) -> tuple[int | None, int | None]:
    """(pid, start ticks) of a running job; a just-claimed one gets ``timeout_s`` to get its process."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = _launch_info(ws, run_id)
        if info.get("pid"):
            return int(info["pid"]), info.get("start_ticks")
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.05)


def _terminate(pid: int, ticks: int | None, grace_s: float) -> None:
    """SIGTERM to the job process, then SIGKILL to its process group after ``grace_s`` seconds."""
    if not process_alive(pid, ticks):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while process_alive(pid, ticks) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The group id is the job's pid (start_new_session); stray workers die with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while process_alive(pid, ticks) and time.monotonic() < deadline:
        time.sleep(0.05)


def resume(ws: Workspace, run_id: str) -> str:
    """Queue a failed or cancelled job again under the same id; returns the id.

    Stages with a ``run_id`` field continue from their checkpoint (the field is set to the job's id);
    the others re-run and skip finished work (``replace`` is turned off so nothing is recomputed).

    Raises:
        UnknownName: no such job. ConfigError: the job is queued, running or done.
    """
    job = dict(_params(ws, run_id)["job"])
    if job["resume"] == "run_id":
        job["config"] = {**job["config"], "run_id": run_id}
    if "replace" in job.get("call", {}):
        job["call"] = {**job["call"], "replace": False}
    _requeue(ws, run_id, job)
    return run_id


def _requeue(ws: Workspace, run_id: str, job: dict[str, Any]) -> None:
    """Make a failed or cancelled run (a job, or a run started elsewhere) the queued job ``job``."""
    status = _row(ws, run_id)["status"]
    if status not in ("failed", "cancelled"):
        raise ConfigError(f"run {run_id} is {status}; only failed or cancelled runs resume",
                          hint="cancel it first" if status in ACTIVE else "submit a new job to run it again")
    run_dir = ws.dir("runs", run_id)
    try:
        params = json.loads((run_dir / PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        params = {}
    resumes = int(params.get("job", {}).get("resumes", 0)) + 1
    job = {**job, "submitted_at": utcnow().isoformat(), "resumes": resumes}
    (run_dir / JOB_FILE).unlink(missing_ok=True)  # the last process's pid means nothing now
    atomic.write_json(run_dir / PARAMS_FILE, {**params, "job": job})
    if not _update(ws, "UPDATE runs SET status = 'queued', pid = NULL, ended_at = NULL, message = NULL "
                       "WHERE id = ? AND status IN ('failed', 'cancelled')", [run_id]):
        raise ConfigError(f"run {run_id} changed state while resuming; look again")
    log.info("re-queued run %s", run_id)


# -- reading -----------------------------------------------------------------------------------------
def progress_fraction(record: Mapping[str, Any] | None) -> float | None:
    """Done share in [0, 1] of a progress record (``done``/``total`` or ``step``/``total``), if it says."""
    if not record or not record.get("total"):
        return None
    done = record.get("done", record.get("step"))
    if done is None:
        return None
    return max(0.0, min(1.0, float(done) / float(record["total"])))


def job_status(ws: Workspace, run_id: str) -> dict[str, Any]:
    """A job's row plus ``stage``, ``resource``, ``progress`` (latest record), ``fraction``, ``log_tail``."""
    params = _params(ws, run_id)
    row = _row(ws, run_id)
    progress = read_progress(ws.dir("runs", run_id))
    latest = progress[-1] if progress else None
    fraction = 1.0 if row["status"] == "done" else progress_fraction(latest)
    return {**row, "stage": params["job"]["stage"], "resource": params["job"]["resource"], "progress": latest,
            "fraction": fraction, "log_tail": log_tail(ws, run_id)}


JOB_COLUMNS = ["id", "stage", "target", "kind", "status", "resource", "fraction", "pid", "submitted_at",
               "started_at", "ended_at", "message"]
#: Config fields naming what a job works on, in order of preference (the first one set is its ``target``).
TARGET_FIELDS = ("dataset", "embedding_set", "clustering_id", "pool_set", "datasets", "data")


def job_target(stage: str, config: Mapping[str, Any]) -> str:
    """A short text saying what a job works on: ``robustness (tiny)`` for a demo stage, else the dataset,
    embedding set or clustering its config names ("" when none)."""
    if stage == "demo":
        return f"{config.get('stage', '?')} ({config.get('size', '?')})"
    for name in TARGET_FIELDS:
        value = config.get(name)
        if value:
            return ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return ""


def list_jobs(ws: Workspace, *, limit: int = 200, statuses: Sequence[str] | None = None) -> pd.DataFrame:
    """The latest jobs (queued first, then by start, newest first): :data:`JOB_COLUMNS`."""
    where = ""
    args: list[Any] = []
    if statuses:
        where = f"WHERE status IN ({', '.join('?' for _ in statuses)})"
        args = list(statuses)
    rows = ws.catalog.query(f"SELECT id, kind, status, pid, started_at, ended_at, message FROM runs {where} "
                            f"ORDER BY started_at DESC NULLS FIRST, id DESC LIMIT {int(limit)}", args)
    out = []
    for row in rows.to_dict("records"):
        try:
            job = _params(ws, row["id"])["job"]
        except UnknownName:
            continue
        progress = read_progress(ws.dir("runs", row["id"]))
        fraction = 1.0 if row["status"] == "done" else progress_fraction(progress[-1] if progress else None)
        out.append({**row, "stage": job["stage"], "target": job_target(job["stage"], job.get("config", {})),
                    "resource": job["resource"], "fraction": fraction, "submitted_at": job.get("submitted_at")})
    return pd.DataFrame(out, columns=JOB_COLUMNS)


# -- the job process -------------------------------------------------------------------------------------
def run_job(ws: Workspace, run_id: str) -> int:
    """The job process's work: build the config, run the stage, leave a final status; the exit code."""
    job = _params(ws, run_id)["job"]
    status = _row(ws, run_id)["status"]
    if status not in ACTIVE:
        log.warning("job %s is %s; not running it", run_id, status)
        return 0
    stage = STAGES.get(job["stage"])
    if stage.stop_at_record and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_at_next_record)
    try:
        cfg, _ = _validate(stage, job["config"])
        _clean_outputs(ws, job)
        log.info("job %s: %s started in process %d", run_id, stage.name, os.getpid())
        message = _call_stage(ws, stage, cfg, job.get("call", {}))
    except KeyboardInterrupt:
        return _cancelled(ws, run_id, None)
    except PrunescopeError as exc:
        if _terminating:
            return _cancelled(ws, run_id, exc)
        log.error("job %s failed: %s", run_id, exc.one_line())
        _finish(ws, run_id, "failed", exc.one_line())
        return exc.exit_code
    except Exception as exc:
        if _terminating:
            return _cancelled(ws, run_id, exc)
        log.exception("job %s failed", run_id)
        _finish(ws, run_id, "failed", f"{type(exc).__name__}: {exc}"[:500])
        return 1
    _finish(ws, run_id, "done", message)
    log.info("job %s done: %s", run_id, message or "")
    return 0


def _cancelled(ws: Workspace, run_id: str, exc: BaseException | None) -> int:
    """Record a stop asked for with SIGTERM. Libraries may turn the KeyboardInterrupt into an error of
    their own (DuckDB: ``RuntimeError: Query interrupted``), which the stage then recorded as ``failed``."""
    how = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    log.warning("job %s cancelled%s", run_id, how)
    _update(ws, "UPDATE runs SET status = 'cancelled', ended_at = ?, message = 'cancelled (SIGTERM)' "
                "WHERE id = ? AND status IN ('queued', 'running', 'failed')", [utcnow(), run_id])
    return 130


def _call_stage(ws: Workspace, stage: JobStage, cfg: Any, call: Mapping[str, Any]) -> str | None:
    """Run the stage; one that does not record itself runs inside ``recorded_run`` (adopting the job row)."""
    if stage.records_itself:
        return stage.run(ws, cfg, call, None)
    with recorded_run(ws, stage.kind, plain_config(cfg), seed=getattr(cfg, "seed", None)) as run:
        message = stage.run(ws, cfg, call, run)
        run.message = run.message or message or ""
    return message


class _NotTwice(logging.Filter):
    """Drop ``core.*`` records while a stage's own FileHandler already writes them into ``log.txt``."""

    def __init__(self, log_path: Path) -> None:
        super().__init__()
        self.log_path = str(log_path.resolve())

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("core"):
            return True
        return not any(isinstance(h, logging.FileHandler) and h.baseFilename == self.log_path
                       for h in logging.getLogger("core").handlers)


#: Set once the job process got SIGTERM: an error after that is the interruption, not a failure.
_terminating = False


def _stop_now(signum: int, frame: Any) -> None:
    """SIGTERM -> KeyboardInterrupt where the job is (stages whose outputs are atomic and idempotent)."""
    global _terminating
    _terminating = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break the final bookkeeping
    raise KeyboardInterrupt


def _stop_at_next_record(signum: int, frame: Any) -> None:
    """SIGTERM for training: stop after the current step (its next progress record); a second SIGTERM
    stops at once. If no record comes, :func:`cancel`'s SIGKILL ends the job and the resume starts from
    the last periodic checkpoint, which is consistent too."""
    global _terminating
    _terminating = True
    request_stop()
    signal.signal(signal.SIGTERM, _stop_now)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.jobs run RUN_ID --workspace ROOT``: the entry of a job process."""
    parser = argparse.ArgumentParser(prog="python -m core.jobs", description="run one prunescope job")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a queued job (launched by core.jobs.start)")
    run.add_argument("run_id")
    run.add_argument("--workspace", required=True)
    args = parser.parse_args(argv)
    ws = Workspace(args.workspace, create=False)
    handler = logging.StreamHandler(sys.stderr)  # stderr is the job's log.txt
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_NotTwice(ws.dir("runs", validate_name(args.run_id, "run id")) / LOG_FILE))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(True)
    signal.signal(signal.SIGTERM, _stop_now)
    return run_job(ws, args.run_id)


if __name__ == "__main__":
    sys.exit(main())
