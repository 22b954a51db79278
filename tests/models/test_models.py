"""core.models: devices, precision, project configs, checkpoints, pretrained tags offline."""

from __future__ import annotations

import json
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from core import models
from core.errors import ConfigError, DataError, MissingFileError, UnknownName, WeightsUnavailable
from core.models import (
    PROJECT_CONFIG_DIR,
    autocast,
    fetch_pretrained,
    load_clip,
    project_configs,
    resolve_precision,
    select_device,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return load_clip("demo-vit-tiny", device="cpu")


def _images(clip, n=3, seed=0):
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(rng.integers(0, 255, (20 + 9 * i, 30 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]
    return torch.stack([clip.preprocess(p) for p in pics])


# -- devices and precision -------------------------------------------------------------------------
def test_select_device_auto_and_forced(monkeypatch):
    assert select_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        select_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device(None) == torch.device("cuda")
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        select_device("cuda:3")


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ConfigError, match="GPU-only"):
        resolve_precision(cpu, "fp16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision(cpu, "int8")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(torch.device("cuda"), "auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"


def test_autocast_is_a_noop_on_cpu(tiny):
    x = _images(tiny)
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        out = tiny.model.encode_image(x)
    assert out.dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")


# -- project configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", project_configs())
def test_project_config_loads_offline_with_unit_norm_embeddings(arch):
    cfg = json.loads((PROJECT_CONFIG_DIR / f"{arch}.json").read_text())
    clip = load_clip(arch, device="cpu")
    assert arch in open_clip.list_models()
    assert clip.embed_dim == cfg["embed_dim"] and clip.image_size == cfg["vision_cfg"]["image_size"]
    assert clip.context_length == cfg["text_cfg"]["context_length"]
    assert clip.device.type == "cpu" and clip.precision == "fp32" and not clip.model.training
    img = clip.encode_images(_images(clip))
    txt = clip.encode_texts(["a red circle", "a photo of a dog", ""])
    for emb in (img, txt):
        assert emb.shape == (3, cfg["embed_dim"]) and emb.dtype == torch.float32
        assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert clip.tokenizer(["x"]).shape == (1, cfg["text_cfg"]["context_length"])


def test_demo_tiny_size_matches_env_notes(tiny):
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 6.5e6 < n_params < 8e6  # ENV.md: 7.2 M


def test_random_init_is_seeded_and_leaves_global_rng_alone(tiny):
    state = torch.random.get_rng_state()
    again = load_clip("demo-vit-tiny", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    x = _images(tiny)
    assert torch.equal(tiny.encode_images(x), again.encode_images(x))
    other = load_clip("demo-vit-tiny", device="cpu", seed=1)
    assert not torch.equal(tiny.encode_images(x), other.encode_images(x))


# -- local checkpoints -----------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny):
    trained = load_clip("demo-vit-tiny", device="cpu", seed=7)
    x = _images(trained)
    want_img, want_txt = trained.encode_images(x), trained.encode_texts(["a cat", "two dogs"])
    plain, wrapped, ddp = tmp_path / "plain.pt", tmp_path / "trainer.pt", tmp_path / "ddp.pt"
    torch.save(trained.model.state_dict(), plain)
    torch.save({"model": trained.model.state_dict(), "arch": "demo-vit-tiny", "step": 30}, wrapped)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.model.state_dict().items()}}, ddp)
    for path in (plain, wrapped, ddp):
        loaded = load_clip("demo-vit-tiny", checkpoint=path, device="cpu")
        assert loaded.checkpoint == str(path.resolve()) and loaded.weights == str(path.resolve())
        assert torch.equal(loaded.encode_images(x), want_img)
        assert torch.equal(loaded.encode_texts(["a cat", "two dogs"]), want_txt)
    assert not torch.equal(tiny.encode_images(x), want_img)
    assert models.checkpoint_arch(wrapped) == "demo-vit-tiny" and models.checkpoint_arch(plain) is None
    # open_clip's own convention: a file path passed as `pretrained`
    assert torch.equal(load_clip("demo-vit-tiny", str(plain), device="cpu").encode_images(x), want_img)


def test_checkpoint_errors(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save({"model": tiny.model.state_dict(), "arch": "demo-vit-tiny"}, path)
    with pytest.raises(ConfigError, match="trained as demo-vit-tiny, not demo-vit-small; pass --model demo-vit-tiny"):
        load_clip("demo-vit-small", checkpoint=path, device="cpu")
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(DataError, match="does not fit architecture demo-vit-small") as info:
        load_clip("demo-vit-small", checkpoint=path, device="cpu")
    assert "\n" not in info.value.one_line()
    with pytest.raises(MissingFileError, match="does not exist"):
        load_clip("demo-vit-tiny", checkpoint=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot be read as weights"):
        load_clip("demo-vit-tiny", checkpoint=tmp_path / "junk.pt")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(DataError, match="holds no state_dict"):
        load_clip("demo-vit-tiny", checkpoint=tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match="not both"):
        load_clip("demo-vit-tiny", "openai", checkpoint=path)


# -- names and pretrained tags ---------------------------------------------------------------------
def test_unknown_arch_lists_close_matches():
    with pytest.raises(UnknownName) as info:
        load_clip("ViT-B-23")
    msg = str(info.value)
    assert msg.startswith("model architecture 'ViT-B-23' not found; closest: ") and "ViT-B-32" in msg
    with pytest.raises(UnknownName, match="demo-vit-tiny"):
        load_clip("demo-vit-tiyn")
    assert models.check_arch("ViT-B/32") == "ViT-B-32"


def test_unknown_tag_lists_available_tags():
    with pytest.raises(UnknownName, match=r"did you mean 'laion2b_s34b_b79k'\?.*available: openai"):
        load_clip("ViT-B-32", "laion2b_s34b_b79")
    with pytest.raises(UnknownName, match="no pretrained tags; pass --checkpoint PATH"):
        load_clip("demo-vit-tiny", "openai")


def test_offline_weights_error_names_source_and_checkpoint_alternative(tmp_path):
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as info:
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path, device="cpu")
    assert time.perf_counter() - started < 5
    msg = info.value.one_line()
    assert "\n" not in msg
    assert "ViT-B-32/laion2b_s34b_b79k" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg
    assert "--checkpoint PATH" in msg and "--cache-dir" in msg
    assert WeightsUnavailable.exit_code not in (0, 1)


def test_unreachable_hub_and_failed_download_raise_weights_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "reachable", lambda host, timeout=3.0: False)
    with pytest.raises(WeightsUnavailable, match=r"ViT-B-32/openai .*the hub cannot be reached.*--checkpoint PATH"):
        fetch_pretrained("ViT-B-32", "openai", cache_dir=tmp_path)

    def refuse(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(models, "reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(open_clip, "download_pretrained", refuse)
    with pytest.raises(WeightsUnavailable, match="the download failed: .*Network is unreachable"):
        fetch_pretrained("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path)


def test_cached_weights_are_found_offline_in_cache_dir(tmp_path):
    # The Hugging Face cache layout: models--<org>--<name>/snapshots/<rev>/<file> + refs/main.
    repo = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    assert fetch_pretrained("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path) == str(weights)
    assert models.weights_source("ViT-B-32", "openai").startswith("hf-hub:timm/vit_base_patch32_clip_224.openai")
