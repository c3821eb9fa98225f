"""What the benchmarks share: one seed of every strategy under the fair protocol, multiply-add counting,
a process pool with a per-seed cache, and the machine description written next to every result."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import accelerate
import timm
import torch
from torch import nn
from torch.utils.data import Dataset

import hf_netmerge as hm
from hf_netmerge.config import RecipeConfig, StageConfig, apply_overrides
from hf_netmerge.data import TensorBatchDataset, make_loader
from hf_netmerge.training import evaluate, make_accelerator, predict
from hf_netmerge.training.pruning import prune_baseline
from hf_netmerge.training.runner import MeanEnsemble
from hf_netmerge.training.strategies import Setup, best_of, train_one

RESULTS = Path(__file__).parent / "results"


def load_recipe(path: Path, overrides: list[str]) -> RecipeConfig:
    """A recipe file with dotted ``key=value`` overrides, validated."""
    import yaml

    return RecipeConfig.from_dict(apply_overrides(yaml.safe_load(path.read_text()), overrides))


def machine() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "hf_netmerge": hm.__version__,
    }


def command() -> str:
    return " ".join([".venv/bin/python", *sys.argv])


def forward_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one forward pass per example, counted on every Linear and Conv2d."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.in_features if isinstance(module, nn.Linear) else (
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1])
        total += output.numel() // output.shape[0] * per_output

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return total


def stretched(stage: StageConfig, epochs: int) -> StageConfig:
    """``stage`` run for ``epochs`` epochs with its learning-rate drops moved in proportion."""
    return dataclasses.replace(stage, epochs=epochs, milestones=moved(stage.milestones, stage.epochs, epochs))


def moved(milestones: list[int], epochs: int, new_epochs: int) -> list[int]:
    """Epoch milestones of an ``epochs``-long schedule moved in proportion to ``new_epochs`` (merged where they meet)."""
    return sorted({round(m * new_epochs / epochs) for m in milestones} & set(range(1, new_epochs)))


@dataclasses.dataclass
class SeedData:
    """One seed's data under the fair protocol: every strategy trains on ``train``; bo3 picks on ``val``."""

    train: Dataset
    val: Dataset
    test: Dataset
    grid: torch.Tensor | None = None


def run_seed(recipe: RecipeConfig, seed: int, data: SeedData, equal_compute: bool) -> dict[str, Any]:
    """Every strategy of ``recipe`` for one seed: test metric, CPU seconds and training multiply-adds of each."""
    accelerator = make_accelerator(recipe.mixed_precision)
    setup = Setup(recipe.architecture, recipe.task, recipe.batch_size, accelerator, dict(recipe.model_args), progress=False)
    metric = "accuracy" if recipe.task == "classification" else "mse"
    test_loader = make_loader(data.test, 1024, shuffle=False)
    n = len(data.train)
    row: dict[str, Any] = {"seed": seed, "seconds": {}, "macs": {}, "curves": {}}
    models: dict[str, nn.Module] = {}

    def timed(name: str, train: Callable[[], nn.Module]) -> None:
        start = time.process_time()
        models[name] = train()
        row["seconds"][name] = time.process_time() - start

    teachers: list[nn.Module] = []

    def student() -> nn.Module:
        teachers.extend(train_one(setup, data.train, recipe.teacher, seed=seed * 1000 + i, name=f"teacher {ab}").model
                        for i, ab in enumerate("ab"))
        merged = hm.merge_models(teachers[0], teachers[1], data.train, data.val, recipe.merge_config(seed),
                                 accelerator=accelerator, progress=False)
        row["gate_stats"] = [s.to_dict() for s in merged.gate_stats]
        return merged.student

    timed("student", student)
    example = data.train[0][0].unsqueeze(0)
    teacher_macs = forward_macs(teachers[0], example)
    big_macs = forward_macs(hm.concatenate(teachers[0], teachers[1]), example)
    merge = recipe.merge
    budget = n * (2 * recipe.teacher.epochs * teacher_macs + merge.gate_epochs * big_macs + merge.finetune_epochs * teacher_macs)
    row["macs"]["student"] = 3 * budget
    pruning = recipe.pruning
    baseline_macs = {"bo3": 3 * recipe.teacher.epochs * teacher_macs, "one_model": recipe.one_model.epochs * teacher_macs,
                     "pruning": (pruning.train.epochs + pruning.prune_epochs) * big_macs + pruning.finetune.epochs * teacher_macs}
    for name in recipe.baselines:
        row["macs"][name] = 3 * n * baseline_macs[name]  # pruning: an upper bound (its width shrinks while pruning)
        if name == "bo3":
            timed(name, lambda: best_of(3, setup, data.train, data.val, recipe.teacher, seed=seed * 1000 + 10, name="bo3").model)
        elif name == "one_model":
            timed(name, lambda: train_one(setup, data.train, recipe.one_model, seed=seed * 1000 + 20, name="one").model)
        elif name == "pruning":
            timed(name, lambda: prune_baseline(setup, data.train, recipe.pruning, seed=seed * 1000 + 30, name="pruning").model)
    if equal_compute:
        bo3_epochs = round(budget / (3 * n * teacher_macs))
        one_epochs = round(budget / (n * teacher_macs))
        timed("bo3_equal_compute", lambda: best_of(3, setup, data.train, data.val, stretched(recipe.teacher, bo3_epochs),
                                                   seed=seed * 1000 + 10, name="bo3 eq").model)
        timed("one_model_equal_compute", lambda: train_one(setup, data.train, stretched(recipe.one_model, one_epochs),
                                                           seed=seed * 1000 + 20, name="one eq").model)
        row["macs"]["bo3_equal_compute"] = 3 * n * 3 * bo3_epochs * teacher_macs
        row["macs"]["one_model_equal_compute"] = 3 * n * one_epochs * teacher_macs
        row["equal_compute_epochs"] = {"bo3_member": bo3_epochs, "one_model": one_epochs}
    models["teacher_a"], models["teacher_b"] = teachers
    models["ensemble"] = MeanEnsemble(*teachers)
    grid_loader = make_loader(TensorBatchDataset(data.grid, torch.zeros_like(data.grid)), 1024, shuffle=False) \
        if data.grid is not None else None
    for name, model in models.items():
        row[name] = evaluate(model, test_loader, task=recipe.task, accelerator=accelerator)[metric]
        if grid_loader is not None and name in ("student", "bo3", "one_model"):
            row["curves"][name] = predict(model, grid_loader, accelerator)[:, 0].tolist()
    return row


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_seeds(job: Callable[[int], dict[str, Any]], seeds: list[int], work_dir: Path, workers: int,
              settings: dict[str, Any]) -> list[dict[str, Any]]:
    """``job(seed)`` for every seed not yet cached, in ``workers`` processes of one thread.

    Results are cached one JSON per seed under ``work_dir/<digest of settings>``, so a rerun with the
    same settings resumes and one with other settings starts afresh.
    """
    canonical = json.dumps(settings, sort_keys=True)
    cache = work_dir / hashlib.sha256(canonical.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "settings.json").write_text(canonical)
    todo = [s for s in seeds if not (cache / f"seed{s}.json").is_file()]
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=(1,)) as pool:
        for row in pool.imap_unordered(job, todo):
            tmp = cache / f"seed{row['seed']}.json.tmp"
            tmp.write_text(json.dumps(row))
            os.replace(tmp, cache / f"seed{row['seed']}.json")
            print(f"seed {row['seed']}: " + ", ".join(f"{k} {row[k]:.4f}" for k in row if isinstance(row[k], float)), flush=True)
    return [json.loads((cache / f"seed{s}.json").read_text()) for s in seeds]


def strategy_table(summary: dict[str, Any], names: list[str]) -> list[str]:
    """Markdown rows of each strategy's statistics, its training multiply-adds and CPU seconds (where known)."""
    lines = ["| strategy | min | median | mean | max | std | seeds | training MACs / student's | CPU s per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in (n for n in names if n in summary):
        t = summary[name]
        macs = f"{summary['macs_over_student'][name]:.2f}" if name in summary["macs_over_student"] else ""
        secs = f"{summary['cpu_seconds'][name]['mean']:.1f}" if name in summary["cpu_seconds"] else ""
        lines.append(f"| {name} | {t['min']:.4f} | {t['median']:.4f} | {t['mean']:.4f} | {t['max']:.4f} | {t['std']:.4f} "
                     f"| {t['n']} | {macs} | {secs} |")
    return lines


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values), "max": max(values),
            "std": statistics.pstdev(values), "n": len(values)}


def bar_chart(path: Path, panels: list[tuple[str, dict[str, float], float | None]]) -> None:
    """One horizontal bar panel per ``(title, {label: value}, target line or None)``, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.5 + 0.45 * max(len(v) for _, v, _ in panels)), squeeze=False)
    for ax, (title, values, target) in zip(axes[0], panels):
        ax.barh(list(values), list(values.values()), color="tab:blue")
        if target is not None:
            ax.axvline(target, color="tab:red", linestyle=":", label=f"target {target:g}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
