"""CLIP models: open_clip architectures, pretrained tags, local checkpoints, devices and precision.

Three ways to get weights, all through :func:`load_clip`:

- a **pretrained tag** (``load_clip("ViT-B-32", "laion2b_s34b_b79k")``) goes through open_clip's own
  download path (Hugging Face hub or URL) into ``cache_dir``. When the weights are not cached and the
  hub cannot be reached (``HF_HUB_OFFLINE=1``, no route, DNS failure) it fails at once with
  :class:`~core.errors.WeightsUnavailable`, naming what to download and the ``--checkpoint`` alternative;
- a **local checkpoint** (``checkpoint="run/checkpoints/last.pt"``): a ``state_dict`` saved with
  ``torch.save``, a dict holding it under ``"state_dict"`` or ``"model"`` (our trainer's format), or an
  open_clip ``.safetensors`` / ``.bin`` file downloaded elsewhere;
- **random init** (neither): what the demo trains from, and enough for throughput benchmarks.

The project ships small configs in ``core/model_configs/*.json`` (registered with open_clip on first
use): ``demo-vit-tiny`` (7.2 M parameters, 64 px, 64-d embeddings; trains on two CPU cores in minutes)
and ``demo-vit-small`` (~19 M parameters, 128-d).

Devices: ``auto`` picks CUDA when present, else CPU (Apple ``mps`` only when asked for). Precision:
``auto`` is bf16 autocast on CUDA (fp16 on GPUs without bf16) and fp32 on CPU, where bf16 autocast
is slower (ENV.md). Weights stay fp32 either way; autocast only changes the matmul dtype.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F

from core.errors import ConfigError, DataError, MissingFileError, UnknownName, WeightsUnavailable

log = logging.getLogger(__name__)

PROJECT_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DEMO_MODEL = "demo-vit-tiny"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_registered = False
_register_lock = threading.Lock()


# -- devices and precision -------------------------------------------------------------------------
def select_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``device``: None/"auto" -> CUDA when available, else CPU.

    Raises:
        ConfigError: a CUDA (or mps) device was asked for and is not there, or the name is unknown.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        return _cuda_device(name)
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' requested but Apple MPS is not available here; use --device cpu")
        return torch.device("mps")
    raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def _cuda_device(name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu or auto")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"bad CUDA device {name!r}; use cuda or cuda:N") from None
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {name!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
    return dev


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``: auto = bf16 (else fp16) on CUDA, fp32 elsewhere.

    Raises:
        ConfigError: unknown precision, or fp16 asked for on a CPU (no fp16 autocast there).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 is GPU-only; on CPU use fp32 (default) or bf16")
    return precision


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` torch intra-op CPU threads inside the block (None: leave as is); restored after.

    On a small CPU shared with other work, 1 thread is often several times faster than all cores.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "auto") -> Iterator[None]:
    """Mixed-precision context for inference and training steps; a no-op for fp32 (CPU default)."""
    device = torch.device(device) if isinstance(device, str) else device
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        yield
        return
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


# -- architectures ---------------------------------------------------------------------------------
def register_project_configs() -> list[str]:
    """Register ``core/model_configs/*.json`` with open_clip (once per process); returns their names."""
    global _registered
    with _register_lock:
        if not _registered:
            open_clip.add_model_config(PROJECT_CONFIG_DIR)
            _registered = True
    return project_configs()


def project_configs() -> list[str]:
    """Names of the configs shipped with prunescope (``demo-vit-tiny``, ...)."""
    return sorted(p.stem for p in PROJECT_CONFIG_DIR.glob("*.json"))


def list_archs() -> list[str]:
    """Every architecture open_clip can build here (its own configs and ours)."""
    register_project_configs()
    return list(open_clip.list_models())


def check_arch(arch: str) -> str:
    """Returns ``arch`` when open_clip knows it; UnknownName listing the closest names otherwise."""
    archs = list_archs()
    if arch.startswith(("hf-hub:", "local-dir:")):
        return arch
    if arch.replace("/", "-") in archs:  # open_clip accepts "ViT-B/32" for "ViT-B-32"
        return arch.replace("/", "-")
    close = difflib.get_close_matches(arch, archs, n=5, cutoff=0.5)
    ours = ", ".join(project_configs())
    hint = f"closest: {', '.join(close)}" if close else f"{len(archs)} exist, e.g. ViT-B-32, ViT-L-14, {ours}"
    raise UnknownName(f"model architecture '{arch}' not found; {hint}")


def pretrained_tags(arch: str) -> list[str]:
    """open_clip's pretrained tags for ``arch`` (empty for our demo configs)."""
    return list(open_clip.list_pretrained_tags_by_model(arch))


def model_embed_dim(arch: str) -> int | None:
    """The embedding width an architecture's config declares, or None for names open_clip lacks."""
    register_project_configs()
    arch = arch.replace("/", "-")
    cfg = open_clip.get_model_config(arch) if arch in open_clip.list_models() else None
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


# -- the loaded model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedClip:
    """A CLIP model ready for inference (eval mode) with its transforms and tokenizer.

    ``preprocess`` is the validation transform (PIL -> (3, S, S) tensor), ``preprocess_train`` the
    augmenting one; ``tokenizer(list[str])`` returns (B, context_length) int64 tokens.
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    preprocess_train: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    arch: str
    pretrained: str | None
    checkpoint: str | None
    device: torch.device
    precision: str
    embed_dim: int
    image_size: int
    context_length: int

    @property
    def weights(self) -> str:
        """Where the weights came from: the tag, the checkpoint path, or ``random-init``."""
        return self.pretrained or self.checkpoint or "random-init"

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Returns: (B, D) float32 L2-normalised image embeddings of preprocessed (B, 3, S, S) images."""
        images = images.to(self.device, non_blocking=True)
        model: Any = self.model
        with autocast(self.device, self.precision):
            feats = model.encode_image(images)
        return l2_normalize(feats.float())

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Returns: (B, D) float32 L2-normalised text embeddings of strings or (B, L) tokens."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenizer(list(texts))
        tokens = tokens.to(self.device, non_blocking=True)
        model: Any = self.model
        with autocast(self.device, self.precision):
            feats = model.encode_text(tokens)
        return l2_normalize(feats.float())


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows divided by their L2 norm; an all-zero row stays zero (never NaN)."""
    return F.normalize(x, dim=-1, eps=eps)


def load_clip(arch: str, pretrained: str | None = None, *, checkpoint: str | os.PathLike[str] | None = None,
              device: str | torch.device | None = None, cache_dir: str | os.PathLike[str] | None = None,
              precision: str = "auto", seed: int = 0) -> LoadedClip:
    """Build ``arch`` with weights from a pretrained tag, a local checkpoint, or random init.

    Args:
        arch: an open_clip architecture (``ViT-B-32``) or a project config (``demo-vit-tiny``).
        pretrained: an open_clip pretrained tag for ``arch`` (``laion2b_s34b_b79k``, ``openai``).
        checkpoint: a local weights file (exclusive with ``pretrained``).
        device: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:N``.
        cache_dir: download cache for pretrained weights (default: the hub's / open_clip's own).
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (autocast in the encode helpers).
        seed: seeds the initialisation (without touching the global RNG), so that a randomly
            initialised model is the same in every process: a resumed embedding matches the first run.

    Raises:
        UnknownName: unknown architecture or pretrained tag (lists the alternatives).
        WeightsUnavailable: the tag's weights are not cached and cannot be downloaded.
        MissingFileError / DataError: the checkpoint is missing or does not fit the architecture.
        ConfigError: both ``pretrained`` and ``checkpoint``; a device that is not there.
    """
    register_project_configs()
    arch = check_arch(arch)
    if pretrained and checkpoint:
        raise ConfigError("pass either a pretrained tag or --checkpoint, not both")
    dev = select_device(device)
    prec = resolve_precision(dev, precision)
    if pretrained and not open_clip.get_pretrained_cfg(arch, pretrained) and Path(pretrained).is_file():
        checkpoint, pretrained = pretrained, None  # open_clip accepts a file as `pretrained`; so do we
    create_kw: dict[str, Any] = {}
    if pretrained:
        create_kw = _pretrained_kwargs(arch, pretrained, cache_dir)
    with _quiet_random_init(bool(checkpoint)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, preprocess_train, preprocess = open_clip.create_model_and_transforms(arch, device="cpu", **create_kw)
    if checkpoint:
        _load_checkpoint_into(model, Path(checkpoint), arch)
    model = model.to(dev).eval()
    tokenizer = open_clip.get_tokenizer(arch, cache_dir=str(cache_dir) if cache_dir else None)
    return LoadedClip(
        model=model, preprocess=preprocess, preprocess_train=preprocess_train, tokenizer=tokenizer, arch=arch,
        pretrained=pretrained, checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None, device=dev,
        precision=prec, embed_dim=_embed_dim(model, arch), image_size=_image_size(model),
        context_length=int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 77)),
    )


@contextlib.contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning when a checkpoint is loaded right after."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    root, flt = logging.getLogger(), _Drop()
    if active:
        root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _embed_dim(model: torch.nn.Module, arch: str) -> int:
    dim = model_embed_dim(arch)
    if dim is None:
        dim = int(getattr(model.visual, "output_dim", 0))
    return dim


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# -- pretrained tags -------------------------------------------------------------------------------
def weights_source(arch: str, tag: str) -> str:
    """What open_clip would fetch for ``arch``/``tag``: ``hf-hub:<repo> (<file>)`` or the URL."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub and (open_clip.pretrained.has_hf_hub() or not url):
        repo, filename = os.path.split(hub)
        return f"hf-hub:{repo} ({filename or HUB_WEIGHT_FILES[1]})"
    return url or str(cfg.get("file", "")) or f"{arch}/{tag}"


def _pretrained_kwargs(arch: str, tag: str, cache_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """create_model_and_transforms arguments for a tag: the downloaded file + the tag's preprocessing."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = pretrained_tags(arch)
        close = difflib.get_close_matches(tag, tags, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        known = f"available: {', '.join(tags)}" if tags else "it has no pretrained tags; pass --checkpoint PATH"
        raise UnknownName(f"pretrained tag '{tag}' not found for {arch}{guess}; {known}")
    path = fetch_pretrained(arch, tag, cache_dir)
    kw: dict[str, Any] = {"pretrained": path}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if cfg.get(key) is not None:
            kw[arg] = cfg[key]
    # open_clip only warns when a tag was trained with QuickGELU and the arch config lacks it; the
    # embeddings are then subtly wrong, so follow the tag (e.g. ViT-B-32 / openai).
    if cfg.get("quick_gelu"):
        kw["force_quick_gelu"] = True
    return kw


def fetch_pretrained(arch: str, tag: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Local path of the weights of ``arch``/``tag``, downloaded through open_clip when not cached.

    Raises:
        WeightsUnavailable: not cached and the hub is unreachable (offline mode, no network), or the
            download failed; the message names the source and the ``--checkpoint`` alternative.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    cache = str(cache_dir) if cache_dir else None
    if cfg.get("file"):
        return str(cfg["file"])
    cached = cached_weights(cfg, cache)
    if cached:
        return cached
    offline = hub_offline()
    if offline or not reachable(_download_host(cfg)):
        raise _unavailable(arch, tag, "HF_HUB_OFFLINE=1 is set" if offline else "the hub cannot be reached")
    try:
        return str(open_clip.download_pretrained(cfg, cache_dir=cache))
    except Exception as exc:  # noqa: BLE001 - hub/HTTP/IO errors of many kinds: all mean "no weights"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise _unavailable(arch, tag, f"the download failed: {reason}") from exc


def _unavailable(arch: str, tag: str, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"pretrained weights {arch}/{tag} are not cached and cannot be downloaded ({why}); they come from "
        f"{weights_source(arch, tag)}: download that file on a connected machine and pass --checkpoint PATH, "
        f"or pass --cache-dir with a cache that holds it"
    )


def hub_offline() -> bool:
    """Whether Hugging Face hub offline mode is on (the environment now, or the hub's constants)."""
    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def cached_weights(cfg: Mapping[str, Any], cache_dir: str | None) -> str | None:
    """The already-downloaded file for a pretrained config, or None (looks where open_clip would)."""
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = (filename,) if filename else HUB_WEIGHT_FILES
        if filename and filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
        return str(target) if target.is_file() else None
    return None


def _download_host(cfg: Mapping[str, Any]) -> str | None:
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return urlparse(endpoint).hostname
    return urlparse(cfg.get("url", "")).hostname


def reachable(host: str | None, timeout: float = 3.0) -> bool:
    """A quick TCP probe of ``host``:443, so that a machine without network fails in seconds rather
    than after the hub client's minute of retries. Behind a proxy the probe is skipped (True)."""
    if not host or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


# -- local checkpoints -----------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The model state_dict in a checkpoint file (plain, or under "state_dict"/"model"; DDP/compile
    prefixes removed). Loaded with ``weights_only=True``: a file that needs arbitrary code is refused.

    Raises:
        MissingFileError: no such file. DataError: not a checkpoint torch can read safely.
    """
    return state_dict_of(load_file(Path(path)), Path(path))


def checkpoint_arch(path: str | os.PathLike[str]) -> str | None:
    """The architecture a training checkpoint records under "arch", if any (our trainer saves it)."""
    obj = load_file(Path(path))
    arch = obj.get("arch") if isinstance(obj, Mapping) else None
    return arch if isinstance(arch, str) else None


def load_file(path: Path) -> Any:
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/IO/safetensors errors
        raise DataError(f"checkpoint {path} cannot be read as weights: {' '.join(str(exc).split())[:200]}") from None


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"checkpoint {path} holds no state_dict (tensors by name, or under 'state_dict'/'model')")
    return {_strip_prefixes(str(k)): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _load_checkpoint_into(model: torch.nn.Module, path: Path, arch: str) -> None:
    """Load a local checkpoint onto ``model``, with open_clip's conversions (position-embedding
    resizing, old text-tower layout, scalar logit scale) so that files open_clip writes also load.

    Raises:
        ConfigError: the checkpoint records another architecture. DataError: its tensors do not fit.
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    obj = load_file(path)
    recorded = obj.get("arch") if isinstance(obj, Mapping) else None
    if isinstance(recorded, str) and recorded != arch:
        raise ConfigError(f"checkpoint {path} was trained as {recorded}, not {arch}; pass --model {recorded}")
    state = convert_state_dict(model, state_dict_of(obj, path))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if name in state and param is not None and state[name].ndim != param.ndim:
            state[name] = state[name].reshape(param.shape)
    logit_bias = getattr(model, "logit_bias", None)
    if "logit_bias" not in state and isinstance(logit_bias, torch.Tensor):
        state["logit_bias"] = torch.zeros_like(logit_bias)
    try:
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, AssertionError, ValueError) as exc:  # shape mismatches (raised even when not strict)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)
        raise DataError(f"checkpoint {path} does not fit architecture {arch}: {first[:200]}",
                        hint="pass the --model the checkpoint was trained with") from None
    if result.missing_keys or result.unexpected_keys:
        raise DataError(f"checkpoint {path} does not fit architecture {arch}: {_key_summary(result)}",
                        hint="pass the --model the checkpoint was trained with")


def _key_summary(result: Any) -> str:
    parts = []
    for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            parts.append(f"{len(keys)} {what} keys (e.g. {', '.join(keys[:3])})")
    return "; ".join(parts)


def split_label(spec: str) -> tuple[str | None, str]:
    """``"LABEL=REST"`` -> (LABEL, REST) of a model spec, both stripped; a spec without a label, or whose
    '=' sits in a path or a ``scheme:`` part (``runs/a=b/last.pt``), -> (None, spec)."""
    head, sep, rest = spec.partition("=")
    if sep and head.strip() and not any(c in head for c in "/\\:"):
        return head.strip(), rest.strip()
    return None, spec.strip()
