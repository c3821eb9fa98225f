"""The image data path: images/s through hf_netmerge's training loader against timm's ``create_loader`` on the same JPEGs.

    .venv/bin/python benchmarks/loader.py [--images 2000] [--size 160] [--input-size 128] [--workers 0 1 2] [--repeats 3]

Writes an image folder of random JPEGs (``--images`` of ``--size`` px, 10 classes) into a temporary
directory, then reads one epoch of it per run, at every ``--workers`` count, through
(a) ``load_data(folder)`` → ``prepare_dataset`` → ``training_view`` → ``make_loader`` (what every training
stage reads: lazy decoding a batch per Arrow read, in persistent workers) and (b) timm's
``create_dataset`` + ``create_loader`` (no prefetcher) with the same training transform (RandomResizedCrop
to ``--input-size``, flip, colour jitter), batch 64, shuffled; medians of ``--repeats`` interleaved runs
after one warm-up epoch. Writes ``loader.json`` and ``loader.md`` into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from _common import RESULTS, command, machine
from hf_netmerge.config import AugmentConfig
from hf_netmerge.data import load_data, make_loader, prepare_dataset, training_view

TARGET = 0.9
BATCH = 64


def write_folder(root: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # smooth-ish content, JPEG-compressible
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def epoch_rate(loader: Iterable) -> float:
    start, count = time.perf_counter(), 0
    for inputs, _ in loader:
        count += len(inputs)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = timm.create_model("resnet18", num_classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_folder(root, args.images, args.size)
        data = load_data(str(root))
        evaluation = prepare_dataset(data.train, model=model, task="classification", num_classes=10, image_size=args.input_size)
        ours_data = training_view(evaluation, AugmentConfig(), seed=0)
        timm_data = timm.data.create_dataset("", root=str(root))
        results = {}
        for workers in args.workers:
            ours = make_loader(ours_data, BATCH, shuffle=True, seed=0, num_workers=workers)
            theirs = timm.data.create_loader(timm_data, input_size=(3, args.input_size, args.input_size), batch_size=BATCH,
                                             is_training=True, use_prefetcher=False, num_workers=workers, persistent_workers=workers > 0,
                                             color_jitter=0.4, interpolation="bicubic", mean=evaluation.preprocessing.mean,
                                             std=evaluation.preprocessing.std)
            epoch_rate(ours), epoch_rate(theirs)  # warm-up: workers start, files enter the page cache
            rates = {"hf_netmerge": [], "timm": []}
            for _ in range(args.repeats):
                rates["hf_netmerge"].append(epoch_rate(ours))
                rates["timm"].append(epoch_rate(theirs))
            medians = {k: statistics.median(v) for k, v in rates.items()}
            results[workers] = {**{f"{k}_images_per_s": v for k, v in medians.items()}, "ratio": medians["hf_netmerge"] / medians["timm"],
                                "runs": rates}
            print(f"{workers} workers: hf_netmerge {medians['hf_netmerge']:.0f} img/s, timm {medians['timm']:.0f} img/s "
                  f"({results[workers]['ratio']:.2f}×)", flush=True)
            del ours, theirs
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader.json").write_text(json.dumps({"command": command(), "machine": machine(), "settings": vars(args),
                                                      "results": results}, indent=1))
    lines = [f"# Image loading: hf_netmerge's training loader vs timm's create_loader ({machine()['cpu']}, {machine()['cores']} cores)", "",
             f"Command: `{command()}`", "",
             f"{args.images} random JPEGs of {args.size} px, training transform to {args.input_size} px (RandomResizedCrop, flip, "
             f"colour jitter), batch {BATCH}, one epoch per run, medians of {args.repeats} interleaved runs.", "",
             f"| workers | hf_netmerge images/s | timm images/s | ratio (target ≥ {TARGET}) |", "|---|---|---|---|"]
    for workers, r in results.items():
        verdict = "met" if r["ratio"] >= TARGET else "**missed**"
        lines.append(f"| {workers} | {r['hf_netmerge_images_per_s']:.0f} | {r['timm_images_per_s']:.0f} | {r['ratio']:.2f} ({verdict}) |")
    (RESULTS / "loader.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "loader.md").read_text())


if __name__ == "__main__":
    main()
