"""Throughput of the embed stage beside the raw model forward on the same batches.

The stage (``core.embed.embed_dataset``: read + decode + preprocess in DataLoader workers, forward,
normalise, write shards) is timed over its compute loop (what it records as ``images_per_s``); the
raw loop runs ``model.encode_image`` over the very same batches, decoded and preprocessed beforehand,
so the ratio is the cost of everything around the forward pass. Goal: ratio >= 0.9 on CPU.

    python benchmarks/embed.py                                   # demo-vit-tiny, 512 generated images
    python benchmarks/embed.py --model ViT-B-32 --device cuda --n 4096 --batch-size 256 --num-workers 12
    python benchmarks/embed.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --cache-dir /models
    python benchmarks/embed.py --workspace data/workspace --dataset demo_pool

Without ``--workspace`` a temporary image folder of random pictures (smooth noise, saved as JPEG at
``--image-size`` +- 25 %) is generated and registered in a temporary workspace. Random weights
(no ``--pretrained``) time exactly like trained ones. Prints a table and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from core.embed import default_workers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", help="use this workspace's --dataset instead of generated images")
    p.add_argument("--dataset", default="bench", help="dataset to embed (with --workspace)")
    p.add_argument("--n", type=int, default=512, help="generated images (or rows of --dataset) to embed")
    p.add_argument("--image-size", type=int, default=128, help="typical side of the generated JPEGs (px)")
    p.add_argument("--model", default="demo-vit-tiny")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=default_workers())
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the main process (default: torch's choice); 1 gives steady "
                        "numbers on a machine other jobs share")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (the best is reported)")
    return p.parse_args(argv)


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` JPEGs of smooth random colour fields, sides within +-25 % of ``size``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(size * f) for f in rng.uniform(0.75, 1.25, size=2))
        small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        small.resize((w, h), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)


def setup_workspace(args: argparse.Namespace, tmp: Path):
    from core.datasets import register_dataset
    from core.workspace import Workspace

    if args.workspace:
        return Workspace(args.workspace), args.dataset
    make_images(tmp / "images", args.n, args.image_size)
    ws = Workspace(tmp / "ws")
    register_dataset(ws, "bench", "image_folder", tmp / "images", verify=False)
    return ws, "bench"


def time_stage(ws, cfg) -> float:
    """Images/s of embed_dataset's compute loop (a fresh set each call)."""
    from core.embed import embed_dataset

    info = embed_dataset(ws, cfg, replace=True)
    return float(info.stats["image"].rows_per_s or 0.0)


def preprocessed_batches(ws, dataset: str, clip, n: int, batch_size: int):
    """The stage's batches (same positions, same order), decoded and preprocessed up front."""
    import torch

    from core.datasets import open_dataset

    ds = open_dataset(ws, dataset)
    tensors = [clip.preprocess(img) for _, img in ds.iter_images(stop=n)]
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
    if clip.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    return batches


def time_raw(clip, batches) -> float:
    """Images/s of the bare forward (host-to-device copy included, as in the stage)."""
    import torch

    from core.models import autocast

    sync = torch.cuda.synchronize if clip.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with torch.no_grad(), autocast(clip.device, clip.precision):
        for batch in batches:
            out = clip.model.encode_image(batch.to(clip.device, non_blocking=True))
            out.float().cpu()
    sync()
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def machine_line(clip) -> str:
    import torch

    dev = torch.cuda.get_device_name(clip.device) if clip.device.type == "cuda" else platform.processor() or "cpu"
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {clip.device} [{dev}], precision {clip.precision}")


def measure(args: argparse.Namespace) -> dict:
    """Both loops, interleaved ``args.repeats`` times: ``stage`` and ``raw`` img/s per run, the model's
    ``clip`` handle, ``n_images`` and the batches' image size."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from core.embed import EmbedConfig
    from core.models import load_clip

    with tempfile.TemporaryDirectory(prefix="prunescope-bench-") as tmp_name:
        ws, dataset = setup_workspace(args, Path(tmp_name))
        clip = load_clip(args.model, args.pretrained, checkpoint=args.checkpoint, device=args.device,
                         cache_dir=args.cache_dir, precision=args.precision)
        cfg = EmbedConfig(dataset, model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                          batch_size=args.batch_size, num_workers=args.num_workers, shard_rows=1 << 30,
                          dtype="float16", device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                          set_id="bench-embed", limit=args.n)
        batches = preprocessed_batches(ws, dataset, clip, args.n, args.batch_size)
        time_raw(clip, batches[:2])  # warm-up: kernel selection, allocator, cuDNN autotune
        stage, raw = [], []
        for _ in range(args.repeats):  # interleaved, so that drift in machine load hits both alike
            stage.append(time_stage(ws, cfg))
            raw.append(time_raw(clip, batches))
    return {"stage": stage, "raw": raw, "clip": clip, "n_images": sum(len(b) for b in batches)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    m = measure(args)
    stage, raw, clip, n_images = m["stage"], m["raw"], m["clip"], m["n_images"]
    # The best run of each loop is the least disturbed by other jobs (timeit's rule); medians beside.
    s, r = max(stage), max(raw)
    print(f"embed benchmark: {args.model} ({clip.weights}), {n_images} images -> {clip.image_size}px, "
          f"batch {args.batch_size}, {args.num_workers} workers, best of {args.repeats}")
    print(f"{'loop':<44}{'img/s':>9}{'median':>9}   runs")
    for name, best, runs in (("embed stage (read+decode+forward+write)", s, stage),
                             ("raw model.encode_image (same batches)", r, raw)):
        print(f"{name:<44}{best:>9.1f}{statistics.median(runs):>9.1f}   {', '.join(f'{v:.1f}' for v in runs)}")
    print(f"{'ratio stage / raw':<44}{s / r:>9.2f}{statistics.median(stage) / statistics.median(raw):>9.2f}"
          f"   (goal >= 0.90 on CPU)")
    print(machine_line(clip))
    print("RESULT " + json.dumps({"model": args.model, "weights": clip.weights, "device": str(clip.device),
                                  "precision": clip.precision, "n": n_images, "batch_size": args.batch_size,
                                  "num_workers": args.num_workers, "stage_img_s": round(s, 2),
                                  "raw_img_s": round(r, 2), "ratio": round(s / r, 3),
                                  "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
