"""CUDA code paths: run on a GPU machine (`benchmarks/gpu_check.sh`); skipped on CPU-only machines."""

import numpy as np
import pytest
import torch
from PIL import Image

from core.datasets import register_dataset
from core.workspace import Workspace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture()
def captioned(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("red", "blue"):
        (root / cls).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
            (root / cls / f"{i}.txt").write_text(f"a {cls} thing {i}")
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "toy", "image_folder", root)
    return ws


def test_autocast_precision_on_cuda():
    from core.models import autocast, resolve_precision, select_device

    dev = select_device("cuda")
    assert dev.type == "cuda" and resolve_precision(dev, "auto") in {"bf16", "fp16"}
    with autocast(dev, "auto"):
        out = torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)
    assert out.dtype in {torch.bfloat16, torch.float16}


def test_embeddings_on_cuda_match_cpu(captioned):
    from core.embed import EmbedConfig, embed_dataset, load_embeddings

    ids_gpu, X_gpu = load_embeddings(captioned, embed_dataset(captioned, EmbedConfig(
        dataset="toy", device="cuda", precision="fp32", set_id="g", num_workers=2)).id)
    ids_cpu, X_cpu = load_embeddings(captioned, embed_dataset(captioned, EmbedConfig(
        dataset="toy", device="cpu", set_id="c", num_workers=0)).id)
    assert list(ids_gpu) == list(ids_cpu)
    assert np.abs(np.asarray(X_gpu, np.float32) - np.asarray(X_cpu, np.float32)).max() < 2e-2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_clip_on_cuda_with_amp(captioned, precision):
    from core.train.clip import TrainClipConfig, train_clip

    res = train_clip(captioned, TrainClipConfig(dataset="toy", steps=4, batch_size=16, warmup_steps=1,
                                                device="cuda", precision=precision, checkpoint_every=2))
    assert res.finished and np.isfinite(res.final_loss) and res.checkpoint.exists()


def test_semdedup_on_cuda_matches_cpu():
    from core.prune import PruneContext, select
    from core.prune.semdedup import pairwise_device
    from tests.prune.conftest import make_planted

    assert pairwise_device(None) is not None and pairwise_device(None).type == "cuda"
    p = make_planted(k=6, per=400, dim=64, n_dups=200)
    ctx = {d: PruneContext.from_arrays(p.ids, p.labels, p.dist, p.centroids, p.X, device=d) for d in ("cpu", "cuda")}
    cpu, gpu = (select(ctx[d], "semdedup", eps=0.05) for d in ("cpu", "cuda"))
    assert len(cpu.removed) > 50
    assert (gpu.kept == cpu.kept).all() and (gpu.ref == cpu.ref).all()
    assert np.allclose(gpu.score, cpu.score, atol=1e-5)
