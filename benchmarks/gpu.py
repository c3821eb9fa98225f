"""GPU: ImageNet-shaped training throughput and memory of the runner and the gate stage, eager and compiled, and a
merge experiment on Fashion-MNIST.

    .venv/bin/python benchmarks/gpu.py [--models resnet50 resnet18 vgg16_bn] [--compiled resnet18 resnet50]
                                       [--batch 128] [--image-size 224] [--steps 30] [--accuracy-seeds 1]
                                       [--only CELL ...] [--deadline 420] [--cells results/gpu_cells.jsonl]
    .venv/bin/python benchmarks/gpu.py --render --cells results/gpu_cells.jsonl [MORE.jsonl ...]

Throughput (one process, bf16 autocast, synthetic images already in GPU memory, so the numbers are the training
step's): per model, a textbook loop (shuffle on the GPU, slice, forward, backward, SGD) on a teacher and on the
big student (the two teachers concatenated), the runner (:func:`hf_netmerge.training.train_stage`) on a teacher
and on the big student, and the gate stage (the runner on the gated big student with the half loss and the gates'
optimizer), with the fused gated ReLU and, for reference, with a plain multiply at every gate site (``unfused``).
Each rate is the last of ``--epochs`` epochs of ``--steps`` batches; memory is the peak allocated
during training, the dataset left out. ``--compiled`` models get the same cells through ``torch.compile``
(default mode) with the compile time apart. ``--profile`` adds the device time of an eager step of the big student
and of the gate stage, with the gate stage's costliest kernels; a noise check compares the gates' noise and sample on
the device, eager and compiled, with the CPU's.

Accuracy: the packaged ``resnet20-fashion-mnist-given`` recipe on all 60 000 Fashion-MNIST training images
(``HF_NETMERGE_FASHION_MNIST_DIR`` points at the IDX files where Debian's package is not installed), data in GPU
memory, for ``--accuracy-seeds`` seeds.

Every measurement is appended to ``--cells`` as it finishes (a run cut short keeps what it measured); cells
that would start after ``--deadline`` seconds are skipped and listed; ``--only`` keeps the throughput cells of
those names (``"gate stage"``, ``"plain big student"``, ...). ``--render`` only rebuilds ``gpu.md``, ``gpu.json``
and ``gpu.png`` in ``benchmarks/results/`` from cells files, a later file's cell replacing an earlier one's
(each table row's ratios then still come from one run when the later run measured both of its cells).
``--allow-cpu`` checks the script on small settings without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _common import RESULTS, bar_chart, command, machine, target_table

import hf_netmerge as hm
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader
from hf_netmerge.experiments import Budgets, SeedData, Timer, load_recipe, load_seed_data, run_seed
from hf_netmerge import gates
from hf_netmerge.formats import logits
from hf_netmerge.gates import GateNoise, GateRegularizer, GateSite, LambdaSchedule, gated_relu
from hf_netmerge.training import make_accelerator, train_stage

GIB = 2**30
STRATEGIES = ["student", "continue", "distill", "weight_matching", "student_distill", "ensemble", "teacher_a", "teacher_b"]


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every throughput cell shares."""

    batch: int
    image_size: int
    steps: int
    epochs: int
    device: torch.device

    @functools.cache  # noqa: B019 (one Bench per run: every cell trains on the same images)
    def images(self, num_classes: int) -> TensorBatchDataset:
        """``steps`` batches of random images and labels in device memory (throughput only: nothing to learn)."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        n = self.steps * self.batch
        inputs = torch.randn(n, 3, self.image_size, self.image_size, device=self.device, generator=gen)
        return TensorBatchDataset(inputs, torch.randint(0, num_classes, (n,), device=self.device, generator=gen))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_start(device: torch.device) -> int:
    """The allocated bytes a cell starts from, after freeing what earlier cells left (models the runner prepared sit
    in reference cycles through Accelerate's forward wrapper: only the cycle collector frees them)."""
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _memory_peak(device: torch.device, start: int) -> float:
    return (torch.cuda.max_memory_allocated(device) - start) / GIB if device.type == "cuda" else 0.0


def plain_loop(make: Callable[[], torch.nn.Module], data: TensorBatchDataset, bench: Bench, compiled: bool) -> dict[str, float]:
    """Samples/s of a textbook bf16 loop over ``data`` (its last epoch), peak memory, and the first step's time."""
    start_memory = _memory_start(bench.device)
    model = make().to(bench.device).train()
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first_step, rate = 0.0, 0.0
    for epoch in range(bench.epochs):
        _sync(bench.device)
        start = time.perf_counter()
        order = torch.randperm(len(data), device=bench.device)
        for i in range(0, len(data), bench.batch):
            index = order[i : i + bench.batch]
            with torch.autocast(bench.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(step_model(data.inputs[index]).float(), data.targets[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch == 0 and i == 0:
                _sync(bench.device)
                first_step = time.perf_counter() - start
        _sync(bench.device)
        rate = len(data) / (time.perf_counter() - start)
    return {"samples_per_s": rate, "memory_gib": _memory_peak(bench.device, start_memory), "first_step_s": first_step}


def runner(make: Callable[[], torch.nn.Module], data: TensorBatchDataset, bench: Bench, compiled: bool, gated: bool = False,
           fused: bool = True, channels_last: bool = False) -> dict[str, float]:
    """Samples/s of :func:`train_stage` (its last epoch), peak memory and compile time; ``gated``: the gate stage."""
    start_memory = _memory_start(bench.device)
    model = make()
    regularizer = None
    if gated:
        model = hm.add_gates(model)
        for site in model.modules():
            if isinstance(site, GateSite):
                site.fused = site.fused and fused
        regularizer = GateRegularizer(model, LambdaSchedule("per_epoch", 0.01, growth=0.05))
    report = train_stage(model, make_loader(data, bench.batch, shuffle=True), StageConfig(epochs=bench.epochs, lr=0.01),
                         task="classification", accelerator=make_accelerator("bf16"), name="bench", regularizer=regularizer,
                         compile_mode="default" if compiled else "no", channels_last=channels_last, progress=False)
    return {"samples_per_s": report.history[-1]["samples_per_second"], "memory_gib": _memory_peak(bench.device, start_memory),
            "compile_s": report.compile_seconds}


def throughput_cells(name: str, bench: Bench, compiled: bool) -> list[tuple[str, Callable[[], dict[str, float]]]]:
    """The (cell name, measurement) pairs of one model, eager or compiled."""
    kwargs = {"num_classes": 1000}

    def teacher() -> torch.nn.Module:
        return timm.create_model(name, **kwargs)

    def big() -> torch.nn.Module:
        return hm.concatenate(teacher(), teacher())

    def data() -> TensorBatchDataset:
        return bench.images(kwargs["num_classes"])

    mode = "compiled" if compiled else "eager"
    cells = [
        (f"{name}/{mode}/plain teacher", lambda: plain_loop(teacher, data(), bench, compiled)),
        (f"{name}/{mode}/runner teacher", lambda: runner(teacher, data(), bench, compiled)),
        (f"{name}/{mode}/plain big student", lambda: plain_loop(big, data(), bench, compiled)),
        (f"{name}/{mode}/runner big student", lambda: runner(big, data(), bench, compiled)),
        (f"{name}/{mode}/gate stage", lambda: runner(big, data(), bench, compiled, gated=True)),
    ]
    if not compiled:
        cells += [
            (f"{name}/{mode}/gate stage unfused", lambda: runner(big, data(), bench, compiled, gated=True, fused=False)),
            (f"{name}/{mode}/runner teacher channels_last", lambda: runner(teacher, data(), bench, compiled, channels_last=True)),
            (f"{name}/{mode}/gate stage channels_last", lambda: runner(big, data(), bench, compiled, gated=True, channels_last=True)),
        ]
    return cells


def accuracy(seeds: int, device: torch.device, max_train: int | None) -> dict[str, Any]:
    """Test accuracies of every strategy of the Fashion-MNIST recipe, data in device memory."""
    recipe = load_recipe("resnet20-fashion-mnist-given", [f"seeds={list(range(seeds))}", f"data.max_train_samples={max_train or 'null'}",
                                                          "mixed_precision=bf16"])
    rows = []
    for seed in recipe.seeds:
        cpu = load_seed_data(recipe, seed)
        data = SeedData(*(TensorBatchDataset(d.inputs.to(device), d.targets.to(device)) for d in (cpu.train, cpu.val, cpu.test)),
                        name=cpu.name)
        row = run_seed(recipe, seed, data=data, accelerator=make_accelerator("bf16"), observers=[Timer(), Budgets()], progress=False).row
        rows.append({k: v for k, v in row.items() if k != "curves"})
    return {"recipe": recipe.to_dict(), "runs": rows}


def gate_check(device: torch.device) -> dict[str, float]:
    """The fused gated ReLU against ReLU-then-multiply on ``device``: largest output and gradient differences (fp32, bf16)."""
    out: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(0)
        gate = hm.HardConcreteGate(64).to(device).train()
        with torch.no_grad():
            gate.log_alpha.copy_(torch.linspace(-4, 4, 64, device=device))
        sample = gate.value(32)
        x = torch.randn(32, 64, 14, 14, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        upstream = torch.randn(32, 64, 14, 14, device=device, dtype=dtype, generator=gen)
        results = []
        for fn in (gated_relu, lambda x, g: torch.relu(x) * g.to(x.dtype)[:, :, None, None]):
            x.grad = gate.log_alpha.grad = None
            y = fn(x, sample)
            (y.float() * upstream.float()).sum().backward(retain_graph=True)
            results.append((y.detach().float(), x.grad.float(), gate.log_alpha.grad.clone()))
        name = str(dtype).removeprefix("torch.")
        for what, (ours, plain) in zip(("output", "grad_x", "grad_log_alpha"), zip(*results)):
            out[f"{name}_{what}_max_relative"] = float((ours - plain).abs().max() / plain.abs().max())
    return out


def noise_check(device: torch.device) -> dict[str, float]:
    """The gates' logistic noise on ``device``, eager and compiled, against the CPU's (its int32 hash must wrap alike
    everywhere), and the eager sample function against the plain formula there: largest absolute differences."""
    passes = torch.arange(3)
    cpu = GateNoise(seed=7).logistic(passes, 64, 1000)
    noise = GateNoise(seed=7).to(device)
    compiled = torch.compile(lambda p: noise.logistic(p, 64, 1000), dynamic=False)
    log_alpha = torch.linspace(-4, 4, 1000, device=device).requires_grad_(True)
    plain_alpha = log_alpha.detach().clone().requires_grad_(True)
    table = noise.logistic(passes.to(device), 64, 1000)[0]
    ours, plain = gates._HardConcrete.apply(log_alpha, table), gates.hard_concrete(plain_alpha, table)
    upstream = torch.randn(64, 1000, device=device)
    (ours * upstream).sum().backward()
    (plain * upstream).sum().backward()
    return {"eager_vs_cpu": float((noise.logistic(passes.to(device), 64, 1000).cpu() - cpu).abs().max()),
            "compiled_vs_cpu": float((compiled(passes.to(device)).cpu() - cpu).abs().max()),
            "sample_vs_formula": float((ours - plain).detach().abs().max()),
            "sample_grad_vs_autograd": float((log_alpha.grad - plain_alpha.grad).abs().max() / plain_alpha.grad.abs().max())}


def gate_profile(name: str, bench: Bench, steps: int = 5) -> dict[str, Any]:
    """Device milliseconds per eager step of the big student and of the gate stage (bf16, same batch), wall milliseconds
    per step, and the gate stage's costliest kernels (device time per step, launches per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    data = bench.images(1000)
    out: dict[str, Any] = {}
    for label in ("big student", "gate stage"):
        model = hm.concatenate(timm.create_model(name, num_classes=1000), timm.create_model(name, num_classes=1000))
        regularizer = None
        if label == "gate stage":
            model = hm.add_gates(model)
            regularizer = GateRegularizer(model, LambdaSchedule("per_epoch", 0.01, growth=0.05))
        model.to(bench.device).train()
        extra = {id(p) for p in regularizer.parameters()} if regularizer else set()
        optimizers = [torch.optim.SGD([p for p in model.parameters() if id(p) not in extra], lr=0.01, momentum=0.9, fused=True)]
        if regularizer:
            optimizers.append(regularizer.optimizer())

        def step(i: int) -> None:
            batch = slice(i * bench.batch, (i + 1) * bench.batch)
            with torch.autocast(bench.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(logits(model(data.inputs[batch])).float(), data.targets[batch])
            if regularizer:
                loss = loss + regularizer.weight(0.0) * regularizer.penalty()
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)

        for i in range(3):
            step(i)
        _sync(bench.device)
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(bench.device)
        wall = (time.perf_counter() - start) / steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                step(i)
            _sync(bench.device)
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]  # kernels
        top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
        out[label] = {"wall_ms": 1e3 * wall, "device_ms": sum(e.self_device_time_total for e in events) / steps / 1e3,
                      "launches": sum(e.count for e in events) / steps,
                      "top": [[e.key[:90], e.self_device_time_total / steps / 1e3, e.count / steps] for e in top]}
    return {"model": name, **out}


def append(cells_path: Path, record: dict[str, Any]) -> None:
    with cells_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    shown = {k: v for k, v in record.items() if k not in ("recipe", "runs", "machine")}
    print(json.dumps(shown), flush=True)


def _rate(row: dict[str, dict[str, float]], key: str, reference: str | None = None) -> str:
    """``row[key]``'s samples/s, with its ratio to ``row[reference]``'s when both were measured."""
    if key not in row:
        return "-"
    value = row[key]["samples_per_s"]
    return f"{value:.0f}" + (f" ({value / row[reference]['samples_per_s']:.2f}×)" if reference in row else "")


def _throughput_lines(cells: dict[str, dict[str, Any]], models: list[str]) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """The throughput table's rows (one per model and mode) and the issue's resnet50 targets."""
    lines, targets = [], []
    for model in models:
        for mode in ("eager", "compiled"):
            row = {k.split("/")[2]: v for k, v in cells.items() if k.startswith(f"{model}/{mode}/")}
            if not row:
                continue
            memory = " / ".join(f"{row[k]['memory_gib']:.1f}" if k in row else "-"
                                for k in ("plain teacher", "plain big student", "runner big student", "gate stage", "gate stage unfused"))
            compile_s = " / ".join(f"{row[k]['compile_s']:.0f}" if k in row else "-"
                                   for k in ("runner teacher", "runner big student", "gate stage"))
            lines.append(f"| {model} | {mode} | {_rate(row, 'plain teacher')} | {_rate(row, 'runner teacher', 'plain teacher')} "
                         f"| {_rate(row, 'plain big student')} | {_rate(row, 'runner big student', 'plain big student')} "
                         f"| {_rate(row, 'gate stage', 'plain big student')} "
                         f"| {_rate(row, 'gate stage unfused', 'plain big student')} | {memory} | "
                         f"{compile_s if mode == 'compiled' else '-'} |")
            if model != "resnet50" or not {"plain big student", "gate stage"} <= set(row):
                continue
            big, gate = row["plain big student"], row["gate stage"]
            speed_ratio = gate["samples_per_s"] / big["samples_per_s"]
            targets.append((f"resnet50 gate-stage throughput ≥ 0.90× plain big student, {mode}", f"{speed_ratio:.2f}×",
                            speed_ratio >= 0.90))
            if mode == "eager":
                memory_ratio = gate["memory_gib"] / big["memory_gib"]
                targets.append(("resnet50 gate-stage memory ≤ 1.15× plain big student, eager", f"{memory_ratio:.2f}×",
                                memory_ratio <= 1.15))
            if {"plain teacher", "runner teacher"} <= set(row):
                runner_ratio = row["runner teacher"]["samples_per_s"] / row["plain teacher"]["samples_per_s"]
                targets.append((f"resnet50 runner ≥ 0.95× plain loop, {mode}", f"{runner_ratio:.2f}×", runner_ratio >= 0.95))
    return lines, targets


def _layout_line(cells: dict[str, dict[str, Any]]) -> list[str]:
    """channels_last cells against the same cell in the default format measured in the same run."""
    layouts = []
    for key, value in cells.items():
        default = cells.get(key.removesuffix(" channels_last")) if key.endswith(" channels_last") else None
        if default is not None and default["run"] == value["run"]:
            layouts.append(f"{key.split('/')[0]} {key.split('/')[2].removesuffix(' channels_last')} {value['samples_per_s']:.0f} "
                           f"({value['samples_per_s'] / default['samples_per_s']:.2f}× the default format)")
    return ["", "channels_last, eager (samples/s): " + "; ".join(layouts) + "."] if layouts else []


def _accuracy_lines(acc: dict[str, Any], gpu: str) -> tuple[list[str], dict[str, list[float]]]:
    """The Fashion-MNIST table (accuracy per seed, each strategy's epochs and training multiply-adds) and its values."""
    runs, recipe = acc["runs"], acc["recipe"]
    summary = {s: [r[s] for r in runs] for s in STRATEGIES if s in runs[0]}
    budgets = runs[0]
    lines = ["", f"## {recipe['architecture']} on all of Fashion-MNIST ({len(runs)} seed(s), {gpu})", "",
             (f"Recipe `{recipe['name']}` with `data.max_train_samples={recipe['data']['max_train_samples']}`: teachers "
             f"{recipe['teacher']['epochs']} epochs; continue / distill / weight matching {recipe['extra']['epochs']} more "
             f"epochs; the student {recipe['merge']['gate_epochs']} gate + {recipe['merge']['finetune_epochs']} fine-tune "
             f"epochs. Test accuracy (10 000 images), with each strategy's budget (epochs counted from scratch, teachers "
             f"included; training multiply-adds):"), "",
             "| strategy | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | epochs | training MACs |",
             "|---|" + "---|" * (len(runs) + 2)]
    for name, values in summary.items():
        budget = f"{budgets['epochs'][name]} | {budgets['macs'][name]:.2e}" if name in budgets["macs"] else "- | -"
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {budget} |")
    return lines, summary


def render(cells_paths: list[Path]) -> None:
    """``gpu.md``, ``gpu.json`` and ``gpu.png`` from cells files (a later file's cells replace an earlier one's)."""
    records = [{**json.loads(line), "run": run} for run, path in enumerate(cells_paths) for line in path.read_text().splitlines()
               if line.strip()]
    headers = [r for r in records if r["kind"] == "header"]
    header = headers[0]
    settings = ("batch", "image_size", "steps", "epochs")
    if any(tuple(h[k] for k in settings) != tuple(header[k] for k in settings) for h in headers):
        raise SystemExit(f"the cells files were measured with different {settings}")
    cells = {r["cell"]: r for r in records if r["kind"] == "cell"}
    skipped = [r["cell"] for r in records if r["kind"] == "skipped" and r["cell"] not in cells]
    failed = {r["cell"]: r["error"] for r in records if r["kind"] == "failed"}
    acc = next((r for r in records if r["kind"] == "accuracy"), None)
    check = next((r for r in reversed(records) if r["kind"] == "gate_check"), None)
    noise = next((r for r in reversed(records) if r["kind"] == "noise_check"), None)
    profiled = next((r for r in reversed(records) if r["kind"] == "gate_profile"), None)
    gpu = header["machine"]["gpu"] or "no GPU (CPU check)"
    commands = [f"`{h['command']}` ({h['machine']['gpu'] or 'CPU'})" for h in headers]
    joined = ("s, the later's cells replacing the earlier's: " if len(commands) > 1 else ": ") + "; ".join(commands)
    rows, targets = _throughput_lines(cells, list(dict.fromkeys(m for h in headers for m in h["models"])))
    lines = [f"# Training throughput and memory ({gpu})", "", f"Command{joined}", "",
             (f"torch {header['machine']['torch']}, timm {header['machine']['timm']}; bf16 autocast, batch {header['batch']}, "
             f"{header['image_size']} px, synthetic images in GPU memory, {header['steps']} steps per epoch, the last of "
             f"{header['epochs']} epochs timed; memory: peak allocated while training, the data left out."), "",
             ("| model | mode | plain teacher | runner teacher | plain big student | runner big student | gate stage "
              "| gate stage unfused | memory teacher / big / runner big / gate / unfused (GiB) "
              "| compile s (runner teacher / runner big / gate) |"),
             "|---|---|---|---|---|---|---|---|---|---|", *rows, *_layout_line(cells)]
    if not all(h.get("memory_collects_cycles") for h in headers):
        lines += ["", ("Memory caveat: runs whose header lacks `memory_collects_cycles` measured each cell's memory from a "
                       "baseline taken without collecting reference cycles, so models that earlier runner cells left (freed only "
                       "by the cycle collector, possibly during the cell) may make a cell's peak look smaller than it was.")]
    if targets:
        lines += ["", *target_table(targets)]
    if check is not None:
        differences = ", ".join(f"{k.removesuffix('_max_relative')} {v:.1e}" for k, v in check.items() if k not in ("kind", "run"))
        lines += ["", (f"Fused gated ReLU against ReLU then multiply on this device, largest difference relative to the largest "
                      f"value: {differences}.")]
    if noise is not None:
        lines += ["", ("Gate noise and sample on this device, largest absolute differences: noise eager vs CPU "
                       f"{noise['eager_vs_cpu']:.1e}, compiled vs CPU {noise['compiled_vs_cpu']:.1e}; the eager sample function "
                       f"vs the plain formula {noise['sample_vs_formula']:.1e}, its log α gradient (relative) "
                       f"{noise['sample_grad_vs_autograd']:.1e}.")]
    if profiled is not None:
        big, gate = profiled["big student"], profiled["gate stage"]
        lines += ["", f"Eager step profile ({profiled['model']}, bf16, batch {header['batch']}): big student {big['device_ms']:.1f} ms "
                  f"device / {big['wall_ms']:.1f} ms wall, {big['launches']:.0f} kernels; gate stage {gate['device_ms']:.1f} ms "
                  f"device / {gate['wall_ms']:.1f} ms wall, {gate['launches']:.0f} kernels. The gate stage's costliest kernels "
                  "(ms and launches per step):", "", "| kernel | ms | launches |", "|---|---|---|",
                  *(f"| `{k.replace('|', '/')}` | {ms:.2f} | {n:.0f} |" for k, ms, n in gate["top"])]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{cell}: `{error}`" for cell, error in failed.items()) + "."]
    if skipped:
        lines += ["", f"Not measured (past the {header['deadline']} s deadline): {', '.join(skipped)}."]
    summary: dict[str, list[float]] = {}
    if acc is not None:
        accuracy_lines, summary = _accuracy_lines(acc, gpu)
        lines += accuracy_lines
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gpu.json").write_text(json.dumps({"headers": headers, "cells": cells, "skipped": skipped, "failed": failed,
                                                  "gate_check": check, "accuracy": acc}, indent=1))
    panels = []
    for mode in ("eager", "compiled"):
        values = {k.replace(f"/{mode}/", " "): v["samples_per_s"] for k, v in cells.items() if f"/{mode}/" in k and "channels" not in k}
        if values:
            panels.append((f"samples/s, {mode} ({gpu})", values, None))
    if summary:
        panels.append(("Fashion-MNIST test accuracy (mean)", {s: sum(v) / len(v) for s, v in summary.items()}, None))
    if panels:
        bar_chart(RESULTS / "gpu.png", panels)
    print((RESULTS / "gpu.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "resnet18", "vgg16_bn"])
    parser.add_argument("--compiled", nargs="*", default=["resnet18", "resnet50"], help="models also measured compiled")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=24, help="batches per timed epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accuracy-seeds", type=int, default=1, help="Fashion-MNIST seeds (0: skip)")
    parser.add_argument("--accuracy-max-train", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new cell starts")
    parser.add_argument("--only", nargs="*", help="throughput cells to measure, by name (default: all)")
    parser.add_argument("--cells", type=Path, nargs="+", default=[RESULTS / "gpu_cells.jsonl"])
    parser.add_argument("--render", action="store_true", help="only rebuild the results from --cells")
    parser.add_argument("--profile", action="store_true", help="profile an eager step of the first model's big student and gate stage")
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    if args.render:
        render(args.cells)
        return
    if len(args.cells) != 1:
        sys.exit("a run writes one --cells file")
    cells_path = args.cells[0]
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (pass --allow-cpu to check the script on small settings)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(args.batch, args.image_size, args.steps, args.epochs, device)
    began = time.perf_counter()
    cells_path.parent.mkdir(parents=True, exist_ok=True)
    cells_path.write_text("")
    append(cells_path, {"kind": "header", "memory_collects_cycles": True, "command": command(), "machine": machine(), "models": args.models, "batch": args.batch,
                        "image_size": args.image_size, "steps": args.steps, "epochs": args.epochs, "deadline": args.deadline})
    plan: list[tuple[str, Callable[[], Any]]] = [("gate check", lambda: gate_check(device)), ("noise check", lambda: noise_check(device))]
    if args.profile:
        plan.append(("gate profile", lambda: gate_profile(args.models[0], bench)))
    for name in args.models:
        plan += throughput_cells(name, bench, compiled=False)
    if args.accuracy_seeds:
        plan.append(("accuracy", lambda: accuracy(args.accuracy_seeds, device, args.accuracy_max_train)))
    compiled = [cell for name in args.compiled for cell in throughput_cells(name, bench, compiled=True)]
    plan += sorted(compiled, key=lambda cell: "plain" in cell[0])  # what users run first: the runner and the gate stage
    if args.only is not None:
        plan = [(cell, measure) for cell, measure in plan if cell.count("/") != 2 or cell.split("/")[2] in args.only]
    for cell, measure in plan:
        if time.perf_counter() - began > args.deadline:
            append(cells_path, {"kind": "skipped", "cell": cell})
            continue
        torch._dynamo.reset()
        try:
            result = measure()
        except Exception as e:  # noqa: BLE001 (a failed cell is reported in the table; the other cells still run)
            append(cells_path, {"kind": "failed", "cell": cell, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        if cell in ("accuracy", "gate check", "noise check", "gate profile"):
            append(cells_path, {"kind": cell.replace(" ", "_"), **result})
        else:
            append(cells_path, {"kind": "cell", "cell": cell, **result})
    render([cells_path])


if __name__ == "__main__":
    main()
