"""Corrupted evaluation beside clean evaluation of the same model: the cost of corrupting on the fly.

Data (seeded, written once under ROOT): ``--n`` [64] images of ``--image-px`` [256] px in 4 class
folders, registered as an image folder. Model: ``--arch`` [resnet18] with random weights (the forward
cost is what matters), ``--device`` [auto: cuda when present].

Rows, every one the same ``--n`` images through the grid's own code path
(:func:`core.evaluate.corruption.evaluate_corruptions`, adaptation ``none``, batch ``--batch-size``):

1. ``clean`` (the baseline): read, resize + centre-crop to the model's input, forward;
2. one row per corruption at ``--severity`` [3]: read, corrupt on the fly (core.corrupt, seeded per
   image), transform, forward; ratio = its time / the clean row's;
3. ``all 15 x 1 severity`` in one grid run (the images are read once per domain).

Times are the median of ``--repeats`` [3] runs after a warm-up (glass_blur's numba compile, the model's
first forward). On a GPU the forward shrinks and corruption (CPU, numpy) dominates: that ratio is the one
to watch.

    python benchmarks/robustness.py /tmp/bench/robust
    python benchmarks/robustness.py /tmp/bench/robust --arch resnet50 --device cuda --n 256

Prints a table and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(root: Path, n: int, px: int, arch: str) -> Any:
    """The workspace with the image folder ``bench`` and a saved random classifier (reused when present)."""
    from PIL import Image

    from core.classifiers import build_classifier, save_classifier
    from core.datasets import register_dataset
    from core.workspace import Workspace

    ws = Workspace(root / "ws")
    model_path = ws.root / "models" / f"{arch}.pt"
    if not (root / "src" / "done").exists():
        rng = np.random.default_rng(0)
        for i in range(n):
            arr = rng.integers(0, 255, size=(px, px, 3), dtype=np.uint8)
            arr[px // 4: 3 * px // 4, px // 4: 3 * px // 4] = rng.integers(0, 255, size=3)
            folder = root / "src" / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"img{i:05d}.jpg", quality=90)
        (root / "src" / "done").write_text("ok")
        register_dataset(ws, "bench", "image_folder", root / "src", role="benchmark", replace=True)
    if not model_path.exists():
        save_classifier(build_classifier(arch, 4, classes=[f"class{i}" for i in range(4)]), model_path)
    return ws, model_path


def time_domain(ws: Any, model_path: Path, domain: tuple[str, int], args: Any) -> float:
    """Seconds for one domain through the grid's own steps: read (and corrupt) the images
    (``_Source.arrays``), transform (``_tensor``), forward in batches (adaptation ``none``)."""
    import torch

    from core.classifiers import load_classifier
    from core.evaluate.corruption import CorruptionEvalConfig, _Source, _tensor
    from core.models import select_device

    device = select_device(None if args.device == "auto" else args.device)
    model = load_classifier(model_path, device=device)
    corruptions = (domain[0],) if domain[0] != "clean" else ("fog",)
    source = _Source(ws, CorruptionEvalConfig(dataset="bench", models=("m",), corruptions=corruptions,
                                              severities=(args.severity,), batch_size=args.batch_size))
    t0 = time.perf_counter()
    images, _, _ = source.arrays(domain)
    X = _tensor(images, model.image_size, model.crop_ratio, False)
    with torch.no_grad():
        for i in range(0, len(X), args.batch_size):
            model(X[i: i + args.batch_size].to(device)).argmax(1).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def grid_time(ws: Any, model_path: Path, args: Any) -> float:
    """Seconds of one :func:`evaluate_corruptions` run over the 15 test corruptions at one severity."""
    from core.evaluate.corruption import CorruptionEvalConfig, evaluate_corruptions

    cfg = CorruptionEvalConfig(dataset="bench", models=(f"m={model_path}",), severities=(args.severity,),
                               clean=False, batch_size=args.batch_size, device=args.device)
    t0 = time.perf_counter()
    evaluate_corruptions(ws, cfg)
    return time.perf_counter() - t0


def median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from core.corrupt import TEST_CORRUPTIONS

    ws, model = build(args.root, args.n, args.image_px, args.arch)
    base = median_time(lambda: time_domain(ws, model, ("clean", 0), args), args.repeats)
    rows = [{"domain": "clean (baseline)", "seconds": base, "img_per_s": args.n / base, "ratio": 1.0}]
    for name in TEST_CORRUPTIONS:
        t = median_time(lambda name=name: time_domain(ws, model, (name, args.severity), args), args.repeats)
        rows.append({"domain": f"{name} s{args.severity}", "seconds": t, "img_per_s": args.n / t, "ratio": t / base})
    t_all = grid_time(ws, model, args)
    rows.append({"domain": f"all 15 x s{args.severity} (one grid run)", "seconds": t_all,
                 "img_per_s": 15 * args.n / t_all, "ratio": t_all / (15 * base)})
    lines = ["| domain | seconds | images/s | time / clean |", "|---|---|---|---|"]
    lines += [f"| {r['domain']} | {r['seconds']:.2f} | {r['img_per_s']:.1f} | {r['ratio']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(f"# Corrupted vs clean evaluation\n\n`python benchmarks/robustness.py ROOT --arch {args.arch} "
                            f"--n {args.n} --device {args.device}` ({args.image_px} px images, batch {args.batch_size}, "
                            f"median of {args.repeats})\n\n{table}\n")
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
