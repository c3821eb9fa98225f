"""Speed benchmarks: the stage runner against a plain PyTorch loop, gate-stage cost, surgery time and memory.

    .venv/bin/python benchmarks/speed.py [--threads 1] [--epochs 3]

Writes ``benchmarks/results/speed.json`` and ``speed.md`` (machine, versions, command). Numbers are
measured on the machine that runs it; targets come from the benchmarks issue and a missed target says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import hf_netmerge as hm
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader, sine_data
from hf_netmerge.gates import GateRegularizer
from hf_netmerge.training import make_accelerator, train_stage

RESULTS = Path(__file__).parent / "results"


def _workloads() -> dict[str, tuple[str, dict, TensorBatchDataset, str]]:
    gen = torch.Generator().manual_seed(0)
    images = TensorBatchDataset(torch.randn(4096, 1, 28, 28, generator=gen), torch.randint(0, 10, (4096,), generator=gen))
    return {
        "sine_mlp": ("netmerge_sine_mlp", {}, sine_data(10_000, gen), "regression"),
        "lenet": ("netmerge_lenet", {"in_chans": 1, "num_classes": 10}, images, "classification"),
    }


def plain_loop(model: torch.nn.Module, data: TensorBatchDataset, task: str, epochs: int, batch: int) -> float:
    """Samples per second of the textbook loop: shuffle, slice, forward, backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data))
        for i in range(0, len(data), batch):
            index = order[i : i + batch]
            x, y = data.inputs[index], data.targets[index]
            out = model(x)
            loss = F.mse_loss(out, y) if task == "regression" else F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epochs * len(data) / (time.perf_counter() - start)


def runner(model: torch.nn.Module, data: TensorBatchDataset, task: str, epochs: int, batch: int, accelerator, gated=None) -> float:
    """Samples per second of :func:`train_stage` (with the gate regularizer when ``gated``)."""
    reg = GateRegularizer(gated, 0.01, 0.05) if gated is not None else None
    report = train_stage(gated or model, make_loader(data, batch, shuffle=True), StageConfig(epochs=epochs), task=task,
                         accelerator=accelerator, name="bench", regularizer=reg, progress=False)
    return report.samples / report.seconds


def surgery(name: str) -> dict[str, float]:
    """Seconds of concatenate + compress and peak RSS growth, relative to one teacher's parameter bytes."""
    a, b = timm.create_model(name), timm.create_model(name)
    param_bytes = sum(p.numel() * p.element_size() for p in a.parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    big = hm.concatenate(a, b)
    concat_s = time.perf_counter() - start
    gated = hm.add_gates(big)
    start = time.perf_counter()
    hm.compress(gated)
    compress_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"concatenate_s": concat_s, "compress_s": compress_s, "total_s": concat_s + compress_s,
            "peak_rss_growth_over_teacher_bytes": peak / param_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accelerator = make_accelerator("no")
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
                     "throughput": {}, "surgery": {}}
    for key, (arch, kwargs, data, task) in _workloads().items():
        torch.manual_seed(0)
        plain = plain_loop(timm.create_model(arch, **kwargs), data, task, args.epochs, 64)
        ours = runner(timm.create_model(arch, **kwargs), data, task, args.epochs, 64, accelerator)
        gated = hm.add_gates(hm.concatenate(timm.create_model(arch, **kwargs), timm.create_model(arch, **kwargs)))
        gate = runner(None, data, task, args.epochs, 64, accelerator, gated=gated)
        results["throughput"][key] = {"plain_samples_per_s": plain, "runner_samples_per_s": ours, "runner_over_plain": ours / plain,
                                      "gate_epoch_over_teacher_epoch": ours / gate}
    for name in ("resnet18", "resnet50"):
        results["surgery"][name] = surgery(name)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Speed ({results['machine']['cpu']}, {args.threads} thread(s), torch {torch.__version__})", "",
             f"Command: `{results['command']}`", "",
             "| workload | plain loop samples/s | runner samples/s | runner / plain (target ≥ 0.95) "
             "| gate epoch / teacher epoch (target ≤ 2.5) |",
             "|---|---|---|---|---|"]
    for key, t in results["throughput"].items():
        ok_a = "met" if t["runner_over_plain"] >= 0.95 else "**missed**"
        ok_b = "met" if t["gate_epoch_over_teacher_epoch"] <= 2.5 else "**missed**"
        lines.append(f"| {key} | {t['plain_samples_per_s']:.0f} | {t['runner_samples_per_s']:.0f} | "
                     f"{t['runner_over_plain']:.2f} ({ok_a}) | {t['gate_epoch_over_teacher_epoch']:.2f} ({ok_b}) |")
    lines += ["", "| model | concatenate s | compress s | total s (target ≤ 1 for resnet50) | peak RSS growth / teacher bytes |",
              "|---|---|---|---|---|"]
    for name, s in results["surgery"].items():
        ok = "" if name != "resnet50" else (" (met)" if s["total_s"] <= 1 else " (**missed**)")
        lines.append(f"| {name} | {s['concatenate_s']:.2f} | {s['compress_s']:.2f} | {s['total_s']:.2f}{ok} | "
                     f"{s['peak_rss_growth_over_teacher_bytes']:.1f} |")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
