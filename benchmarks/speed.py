"""Speed: the stage runner against a plain PyTorch loop, gate-stage cost, surgery time and memory, the sine pipeline.

    .venv/bin/python benchmarks/speed.py [--threads 1] [--epochs 2] [--repeats 5]

(a) samples/s of :func:`train_stage` over a textbook loop (same model, data, batch 64 and thread count);
(b) gate-stage epoch time over teacher epoch time; both from ``--repeats`` interleaved runs, medians;
(b') gate-stage epoch time over the same big student's epoch without gates, both through the runner, side by side
(interleaved repeats, medians): the sine MLP at batch 32, LeNet-BN at 128, resnet18 at 64 px and batch 64.
(c) ``concatenate`` + ``compress`` seconds for resnet18/resnet50, and the peak resident memory while
the gate-stage model is built (``concatenate`` + ``add_gates``), over one teacher's parameter bytes.
(d) CPU seconds of one seed of the whole sine student pipeline at ``recipes/sine.yaml``'s budget, trained alone;
(e) the same pipeline for ``--stacked-seeds`` seeds trained together as stacked models: seeds per CPU-minute of each.
Writes ``speed.json``, ``speed.md`` and ``speed.png`` into ``benchmarks/results/``; a missed target says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from _common import RESULTS, bar_chart, command, machine

import hf_netmerge as hm
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader, sine_data
from hf_netmerge.experiments import SeedContext, Student, load_recipe, load_seed_data, run_seeds
from hf_netmerge.gates import GateRegularizer, LambdaSchedule
from hf_netmerge.training import make_accelerator, train_stage

TARGETS = {"runner_over_plain": 0.95, "gate_over_teacher": 2.5, "gate_over_big": 1.25, "resnet50_surgery_s": 1.0, "gate_model_memory": 4.5,
           "sine_student_cpu_s": 29.0, "stacked_student_cpu_s_per_seed": 54.0}
REFERENCE_STUDENT_CPU_S = 108.0  # the paper's reference code, same pipeline at batch 32, on this machine (DESIGN.md §4)


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
    reg = GateRegularizer(gated, LambdaSchedule("per_epoch", 0.01, growth=0.05)) if gated is not None else None
    report = train_stage(gated or model, make_loader(data, batch, shuffle=True), StageConfig(epochs=epochs), task=task,
                         accelerator=accelerator, name="bench", regularizer=reg, progress=False)
    return report.samples / report.seconds


def throughput(arch: str, kwargs: dict, data: TensorBatchDataset, task: str, epochs: int, repeats: int, accelerator) -> dict[str, Any]:
    """Median samples/s of the plain loop, the runner and the gate stage over interleaved repeats."""
    runs: dict[str, list[float]] = {"plain": [], "runner": [], "gate": []}
    for _ in range(repeats):
        runs["plain"].append(plain_loop(timm.create_model(arch, **kwargs), data, task, epochs, 64))
        runs["runner"].append(runner(timm.create_model(arch, **kwargs), data, task, epochs, 64, accelerator))
        gated = hm.add_gates(hm.concatenate(timm.create_model(arch, **kwargs), timm.create_model(arch, **kwargs)))
        runs["gate"].append(runner(None, data, task, epochs, 64, accelerator, gated=gated))
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {"plain_samples_per_s": median["plain"], "runner_samples_per_s": median["runner"], "gate_samples_per_s": median["gate"],
            "runner_over_plain": median["runner"] / median["plain"], "gate_epoch_over_teacher_epoch": median["runner"] / median["gate"],
            "repeats": runs}


def _gate_workloads() -> dict[str, tuple[str, dict, TensorBatchDataset, str, int]]:
    """(b')'s models, data and batch sizes: the sine recipe's, LeNet-BN on 28 px images, resnet18 at 64 px."""
    gen = torch.Generator().manual_seed(0)
    images = TensorBatchDataset(torch.randn(4096, 1, 28, 28, generator=gen), torch.randint(0, 10, (4096,), generator=gen))
    resnet = TensorBatchDataset(torch.randn(256, 3, 64, 64, generator=gen), torch.randint(0, 10, (256,), generator=gen))
    return {
        "sine_mlp": ("netmerge_sine_mlp", {}, sine_data(10_000, gen), "regression", 32),
        "lenet_bn": ("netmerge_lenet_bn", {"in_chans": 1, "num_classes": 10}, images, "classification", 128),
        "resnet18_64px": ("resnet18", {"num_classes": 10}, resnet, "classification", 64),
    }


def gate_over_big(arch: str, kwargs: dict, data: TensorBatchDataset, task: str, batch: int, repeats: int, accelerator) -> dict[str, Any]:
    """Median seconds of one runner epoch of the big student without gates and of the gate stage, interleaved."""
    seconds: dict[str, list[float]] = {"big": [], "gate": []}
    for _ in range(repeats):
        for kind in seconds:
            big = hm.concatenate(timm.create_model(arch, **kwargs), timm.create_model(arch, **kwargs))
            gated = hm.add_gates(big) if kind == "gate" else None
            samples_per_s = runner(big, data, task, 1, batch, accelerator, gated=gated)
            seconds[kind].append(len(data) / samples_per_s)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"batch": batch, "samples": len(data), "big_epoch_s": median["big"], "gate_epoch_s": median["gate"],
            "gate_over_big": median["gate"] / median["big"], "repeats": seconds}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak growth of resident memory while it ran (sampled every millisecond)."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], _rss()) - base


def surgery(name: str) -> dict[str, float]:
    """Seconds of concatenate and compress; peak memory of building the gate-stage model, over one teacher's bytes."""
    a, b = timm.create_model(name), timm.create_model(name)
    param_bytes = sum(p.numel() * p.element_size() for p in a.parameters())
    seconds: dict[str, float] = {}

    def build() -> hm.GatedModel:
        start = time.perf_counter()
        big = hm.concatenate(a, b)
        seconds["concatenate"] = time.perf_counter() - start
        return hm.add_gates(big)

    gated, growth = peak_rss_growth(build)
    concat_s = seconds["concatenate"]
    start = time.perf_counter()
    hm.compress(gated)
    compress_s = time.perf_counter() - start
    gate_model_bytes = sum(p.numel() * p.element_size() for p in gated.parameters())
    return {"concatenate_s": concat_s, "compress_s": compress_s, "total_s": concat_s + compress_s,
            "gate_model_params_over_teacher": gate_model_bytes / param_bytes, "peak_rss_growth_over_teacher_bytes": growth / param_bytes}


def sine_pipeline(accelerator) -> dict[str, float]:
    """CPU seconds of one seed of the sine student pipeline (two teachers, gates, fine-tune) at the recipe's budget."""
    recipe = load_recipe("sine")
    ctx = SeedContext(recipe, 0, load_seed_data(recipe, 0), accelerator, progress=False)
    start = time.process_time()
    ctx.teachers()
    teachers_s = time.process_time() - start
    merged = Student.from_recipe(recipe).train(ctx).merge
    total = time.process_time() - start
    return {"student_cpu_s": total, "teachers_cpu_s": teachers_s, "teacher_samples": 2 * recipe.teacher.epochs * len(ctx.data.train),
            **{f"{_role(stage.stage)}_wall_s": stage.seconds for stage in merged.stages},
            **{f"{_role(stage.stage)}_samples": stage.samples for stage in merged.stages}}


def _role(stage: str) -> str:
    """``gates`` or ``finetune`` from a merge stage's name (which the experiment prefixes with its seed and strategy)."""
    return stage.rsplit(" ", 1)[-1]


def sine_pipeline_stacked(seeds: int) -> dict[str, float]:
    """CPU seconds of ``seeds`` seeds of the sine student pipeline trained together as stacked models (data made first,
    as in :func:`sine_pipeline`)."""
    recipe = load_recipe("sine", [f"seeds={list(range(seeds))}"])
    data = {seed: load_seed_data(recipe, seed) for seed in recipe.seeds}
    student = Student.from_recipe(recipe)
    start = time.process_time()
    run_seeds(recipe, recipe.seeds, stacked=True, strategies=lambda seed: [student], data=data.__getitem__, progress=False)
    cpu = time.process_time() - start
    return {"seeds": seeds, "cpu_s": cpu, "cpu_s_per_seed": cpu / seeds, "seeds_per_cpu_minute": 60 * seeds / cpu}


def markdown(results: dict, threads: int) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [f"# Speed ({results['machine']['cpu']}, {threads} thread(s), torch {results['machine']['torch']})", "",
             f"Command: `{results['command']}`", "",
             "| workload | plain loop samples/s | runner samples/s | (a) runner / plain (target ≥ 0.95) "
             "| (b) gate epoch / teacher epoch (target ≤ 2.5) |", "|---|---|---|---|---|"]
    for key, t in results["throughput"].items():
        lines.append(f"| {key} | {t['plain_samples_per_s']:.0f} | {t['runner_samples_per_s']:.0f} | {t['runner_over_plain']:.2f} "
                     f"({verdict(t['runner_over_plain'] >= TARGETS['runner_over_plain'])}) | {t['gate_epoch_over_teacher_epoch']:.2f} "
                     f"({verdict(t['gate_epoch_over_teacher_epoch'] <= TARGETS['gate_over_teacher'])}) |")
    if "gate_over_big" in results:
        lines += ["", "| workload | batch | big student epoch s (no gates) | gate-stage epoch s | (b') gate / big (target ≤ 1.25) |",
                  "|---|---|---|---|---|"]
        for key, r in results["gate_over_big"].items():
            lines.append(f"| {key} | {r['batch']} | {r['big_epoch_s']:.3f} | {r['gate_epoch_s']:.3f} | {r['gate_over_big']:.2f} "
                         f"({verdict(r['gate_over_big'] <= TARGETS['gate_over_big'])}) |")
    lines += ["", "| model | concatenate s | compress s | (c) total s (target ≤ 1 for resnet50) | gate-stage model params / teacher's "
              "| (c) peak memory building it / teacher bytes (target ≤ 4.5) |", "|---|---|---|---|---|---|"]
    for name, s in results["surgery"].items():
        ok = "" if name != "resnet50" else f" ({verdict(s['total_s'] <= TARGETS['resnet50_surgery_s'])})"
        lines.append(f"| {name} | {s['concatenate_s']:.2f} | {s['compress_s']:.2f} | {s['total_s']:.2f}{ok} | "
                     f"{s['gate_model_params_over_teacher']:.2f} | {s['peak_rss_growth_over_teacher_bytes']:.2f} "
                     f"({verdict(s['peak_rss_growth_over_teacher_bytes'] <= TARGETS['gate_model_memory'])}) |")
    if "sine_pipeline" in results:
        p = results["sine_pipeline"]
        sine = results["throughput"]["sine_mlp"]
        samples = p["teacher_samples"] + p["finetune_samples"] + p["gates_samples"] * sine["gate_epoch_over_teacher_epoch"]
        plain_s = samples / sine["plain_samples_per_s"]
        lines += ["", f"(d) sine student pipeline, one seed at recipes/sine.yaml's budget: **{p['student_cpu_s']:.1f} CPU s** "
                  f"(target ≤ 29: {verdict(p['student_cpu_s'] <= TARGETS['sine_student_cpu_s'])}); teachers {p['teachers_cpu_s']:.1f} s, "
                  f"gate stage {p['gates_wall_s']:.1f} s, fine-tune {p['finetune_wall_s']:.1f} s (wall). The plain loop above would "
                  f"need about {plain_s:.0f} s for the same epochs at its batch-64 throughput, counting a gate epoch at (b)'s cost."]
    if "sine_pipeline_stacked" in results:
        p, alone = results["sine_pipeline_stacked"], results["sine_pipeline"]["student_cpu_s"]
        target = TARGETS["stacked_student_cpu_s_per_seed"]
        lines += ["", "| (e) sine student pipeline at recipes/sine.yaml's budget | CPU s per seed | seeds per CPU-minute |", "|---|---|---|",
                  f"| one seed alone (d) | {alone:.1f} | {60 / alone:.2f} |",
                  f"| {p['seeds']} seeds stacked | {p['cpu_s_per_seed']:.1f} | {p['seeds_per_cpu_minute']:.2f} |",
                  f"| the paper's reference code, alone (DESIGN.md §4) | {REFERENCE_STUDENT_CPU_S:.0f} | {60 / REFERENCE_STUDENT_CPU_S:.2f} |", "",
                  f"Stacked: {alone / p['cpu_s_per_seed']:.1f}× the seeds per CPU-minute of one seed alone; target ≤ {target:.0f} CPU s per "
                  f"seed (half the reference code's): {verdict(p['cpu_s_per_seed'] <= target)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out (d) and (e), which train for minutes")
    parser.add_argument("--stacked-seeds", type=int, default=30, help="seeds of (e)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accelerator = make_accelerator("no")
    results: dict = {"command": command(), "threads": args.threads, "machine": machine(), "targets": TARGETS,
                     "throughput": {}, "surgery": {}}
    for key, (arch, kwargs, data, task) in _workloads().items():
        torch.manual_seed(0)
        results["throughput"][key] = throughput(arch, kwargs, data, task, args.epochs, args.repeats, accelerator)
    results["gate_over_big"] = {}
    for key, (arch, kwargs, data, task, batch) in _gate_workloads().items():
        torch.manual_seed(0)
        results["gate_over_big"][key] = gate_over_big(arch, kwargs, data, task, batch, args.repeats if key != "resnet18_64px" else 3,
                                                      accelerator)
    for name in ("resnet18", "resnet50"):
        results["surgery"][name] = surgery(name)
    if not args.skip_pipeline:
        results["sine_pipeline"] = sine_pipeline(accelerator)
        results["sine_pipeline_stacked"] = sine_pipeline_stacked(args.stacked_seeds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "speed.md").write_text(markdown(results, args.threads))
    speeds, surgeries = results["throughput"], results["surgery"]
    bar_chart(RESULTS / "speed.png", [
        ("(a) runner / plain loop", {k: t["runner_over_plain"] for k, t in speeds.items()}, TARGETS["runner_over_plain"]),
        ("(b) gate epoch / teacher epoch", {k: t["gate_epoch_over_teacher_epoch"] for k, t in speeds.items()},
         TARGETS["gate_over_teacher"]),
        ("(b') gate epoch / big-student epoch", {k: r["gate_over_big"] for k, r in results["gate_over_big"].items()},
         TARGETS["gate_over_big"]),
        ("(c) concatenate + compress, s", {k: s["total_s"] for k, s in surgeries.items()}, TARGETS["resnet50_surgery_s"]),
        ("(c) peak memory / teacher bytes", {k: s["peak_rss_growth_over_teacher_bytes"] for k, s in surgeries.items()},
         TARGETS["gate_model_memory"]),
        *([("(e) sine student pipelines per CPU-minute", {"one seed alone": 60 / results["sine_pipeline"]["student_cpu_s"],
                                                         "stacked": results["sine_pipeline_stacked"]["seeds_per_cpu_minute"]}, None)]
          if "sine_pipeline_stacked" in results else []),
    ])
    print((RESULTS / "speed.md").read_text())


if __name__ == "__main__":
    main()
