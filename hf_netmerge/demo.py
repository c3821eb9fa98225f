"""The embedded default experiment: the paper's sine problem end to end, under a fair protocol.

Per seed, every strategy sees the same 10k training set; bo3 picks its model on a separate 2k
validation set; all are scored on a fixed 10k test set. At ``epochs_scale=1`` each strategy gets
the paper's 900 epochs: the student 300+300 (teachers) + 150 (gates) + 150 (fine-tune), bo3 3×300,
one model 900, with the paper's learning-rate drops (×0.1 after 250/300, 100/150 and 800/900).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .api import MergeResult, merge_models
from .config import MergeConfig, StageConfig
from .data import TensorBatchDataset, make_loader, sine_data
from .training import evaluate, make_accelerator, predict
from .training import report
from .training.strategies import Setup, best_of, train_one

ARCHITECTURE = "netmerge_sine_mlp"
STRATEGIES = ("student", "bo3", "one_model")
PAPER_EPOCHS = 900
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 10_000, 2_000, 10_000


@dataclass(frozen=True)
class DemoConfig:
    """Demo settings; the defaults finish in a few minutes on a 2-core CPU."""

    seeds: int = 3
    first_seed: int = 0
    epochs_scale: float = 0.3
    batch_size: int = 64
    lr: float = 0.01
    threads: int = 1
    output_dir: str = "demo_output"

    def epochs(self, fraction: float) -> int:
        """Epochs for a stage taking ``fraction`` of the paper's 900, at this scale (at least 1)."""
        return max(1, round(PAPER_EPOCHS * self.epochs_scale * fraction))


def _stage(epochs: int, lr: float, decay_at: float) -> StageConfig:
    milestone = round(epochs * decay_at)
    return StageConfig(epochs=epochs, lr=lr, momentum=0.9, milestones=[milestone] if 0 < milestone < epochs else [])


def _data(seed: int) -> tuple[TensorBatchDataset, TensorBatchDataset, TensorBatchDataset]:
    """Train/validation from one stream, the test set from its own (fixed per seed)."""
    stream = torch.Generator().manual_seed(seed)
    train, val = sine_data(TRAIN_SIZE, stream), sine_data(VAL_SIZE, stream)
    return train, val, sine_data(TEST_SIZE, torch.Generator().manual_seed(1_000_003 + seed))


def _log(accelerator: Accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


def run_seed(
    seed: int, cfg: DemoConfig, accelerator: Accelerator, progress: bool = True
) -> tuple[dict[str, Any], dict[str, torch.nn.Module], MergeResult]:
    """Train every strategy for one seed; returns the result row, the final models and the merge result."""
    train, val, test = _data(seed)
    test_loader = make_loader(test, 2048, shuffle=False)
    setup = Setup(ARCHITECTURE, "regression", cfg.batch_size, accelerator, progress=progress)
    third = _stage(cfg.epochs(1 / 3), cfg.lr, 250 / 300)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    teachers = [
        train_one(setup, train, third, seed=seed * 1000 + i, name=f"seed {seed} teacher {n}").model
        for i, n in enumerate("AB")
    ]
    gate_epochs, finetune_epochs = cfg.epochs(1 / 6), cfg.epochs(1 / 6)
    merge_cfg = MergeConfig(
        task="regression",
        gate_epochs=gate_epochs,
        finetune_epochs=finetune_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        finetune_milestones=[m for m in [round(finetune_epochs * 100 / 150)] if 0 < m < finetune_epochs],
        lambda_init=0.01,
        lambda_growth=0.05 / cfg.epochs_scale,
        seed=seed,
    )
    merged = merge_models(teachers[0], teachers[1], train, val, merge_cfg, accelerator=accelerator, progress=progress)
    timings["student"] = time.perf_counter() - start
    _log(accelerator, f"seed {seed}: student done in {timings['student']:.1f}s")

    start = time.perf_counter()
    bo3 = best_of(3, setup, train, val, third, seed=seed * 1000 + 10, name=f"seed {seed} bo3")
    timings["bo3"] = time.perf_counter() - start
    _log(accelerator, f"seed {seed}: bo3 done in {timings['bo3']:.1f}s")

    start = time.perf_counter()
    one = train_one(setup, train, _stage(cfg.epochs(1.0), cfg.lr, 800 / 900), seed=seed * 1000 + 20, name=f"seed {seed} one model")
    timings["one_model"] = time.perf_counter() - start
    _log(accelerator, f"seed {seed}: one model done in {timings['one_model']:.1f}s")

    models = {"student": merged.student, "bo3": bo3.model, "one_model": one.model}
    row: dict[str, Any] = {"seed": seed}
    for name, model in models.items():
        row[name] = evaluate(model, test_loader, task="regression", accelerator=accelerator)["mse"]
    for name, model in (("teacher_a", teachers[0]), ("teacher_b", teachers[1])):
        row[name] = evaluate(model, test_loader, task="regression", accelerator=accelerator)["mse"]
    row["student_validation"] = {k: v.get("mse") for k, v in merged.metrics.items()}
    row["bo3_validation"] = [v["mse"] for v in bo3.validation]
    row["seconds"] = timings
    return row, models, merged


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Test-MSE statistics per strategy (and teacher) over seeds, and the student's wins against each baseline."""
    return report.summarize(runs, [*STRATEGIES, "teacher_a", "teacher_b"], higher_is_better=False, baselines=["bo3", "one_model"])


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the summary."""
    return report.text_table(summary, list(STRATEGIES), "MSE")


def plot_curves(curves: dict[str, list[torch.Tensor]], grid: torch.Tensor, data: TensorBatchDataset, path: Path) -> None:
    """The learned functions of every seed per strategy over the training data (the paper's Fig. 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), sharey=True)
    x, y = data.inputs[:2000, 0], data.targets[:2000, 0]
    for ax, (name, outputs) in zip(axes, curves.items()):
        ax.scatter(x, y, s=1, color="0.75", label="training data")
        for out in outputs:
            ax.plot(grid, out, linewidth=1, alpha=0.8)
        ax.plot(grid, torch.sin(10 * math.pi * grid), "k--", linewidth=0.8, label="sin(10πx)")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run every seed, write ``results.json``, the plot and the first seed's student; returns the results."""
    torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator("no")
    out = Path(cfg.output_dir)
    grid = torch.linspace(0, 1, 500).unsqueeze(1)
    grid_loader = make_loader(TensorBatchDataset(grid, torch.zeros_like(grid)), 500, shuffle=False)
    runs, curves = [], {name: [] for name in STRATEGIES}
    first_merge, first_train = None, None
    start = time.perf_counter()
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        row, models, merged = run_seed(seed, cfg, accelerator, progress)
        runs.append(row)
        for name, model in models.items():
            curves[name].append(predict(model, grid_loader, accelerator)[:, 0])
        if first_merge is None:
            first_merge, first_train = merged, _data(seed)[0]
        _log(accelerator, f"seed {seed}: test MSE student {row['student']:.4f}, bo3 {row['bo3']:.4f}, one model {row['one_model']:.4f}")
    summary = summarize(runs)
    results = {
        "runs": runs,
        "summary": summary,
        "config": cfg.__dict__,
        "protocol": {
            "train_size": TRAIN_SIZE,
            "val_size": VAL_SIZE,
            "test_size": TEST_SIZE,
            "epochs_per_strategy": cfg.epochs(1.0),
            "bo3_selection": "validation set",
            "same_training_set_for_all_strategies": True,
        },
        "seconds": time.perf_counter() - start,
    }
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(curves, grid[:, 0], first_train, out / "learned_curves.png")
        first_merge.save_pretrained(out / "student", overwrite=True)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out / "results.json")
        print(format_table(summary), flush=True)
        print(f"wrote {out / 'results.json'}, {out / 'learned_curves.png'} and {out / 'student'} in {results['seconds']:.0f}s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
