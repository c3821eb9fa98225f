"""The embedded default experiment: the packaged sine recipe (the paper's Table 1) end to end, scaled to CPU minutes.

Per seed, every strategy sees the same 10k training set; bo3 picks its model on a separate 2k
validation set; all are scored on a fixed 10k test set (:mod:`~hf_netmerge.experiments.protocol`). At
``epochs_scale=1`` each strategy gets the paper's 900 epochs: the student 300+300 (teachers) + 150
(gates) + 150 (fine-tune), bo3 3×300, one model 900, with the paper's learning-rate drops (×0.1
after 250/300, 100/150 and 800/900), batch 32. The demo is :func:`run_seeds` with observers (the learned curves,
progress lines), stacked by default: every stage of all seeds trains as one stacked model, which gives each network
what it gets alone, to float rounding, in a fraction of the time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import SINE_TEST_SIZE, SINE_TRAIN_SIZE, SINE_VAL_SIZE, TensorBatchDataset
from ..errors import ConfigError
from ..training import make_accelerator
from . import report
from .observers import Curves, Printer
from .protocol import load_seed_data
from .recipe import RecipeConfig, load_recipe, scale_recipe
from .run import run_seeds

STRATEGIES = ("student", "bo3", "one_model")


@dataclass(frozen=True)
class DemoConfig:
    """Demo settings; the defaults finish in a few minutes on a 2-core CPU."""

    seeds: int = 3
    first_seed: int = 0
    epochs_scale: float = 0.3
    threads: int = 1
    output_dir: str = "demo_output"
    stacked: bool = True

    def recipe(self) -> RecipeConfig:
        """The packaged ``sine`` recipe for these seeds, every stage's epochs times ``epochs_scale``."""
        recipe = load_recipe("sine", [f"seeds={list(range(self.first_seed, self.first_seed + self.seeds))}"])
        return scale_recipe(recipe, self.epochs_scale)


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
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("the demo draws its plot with matplotlib, an extra: pip install 'hf_netmerge[plots]'")
    torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator("no")
    recipe = cfg.recipe()
    out = Path(cfg.output_dir)
    grid = torch.linspace(0, 1, 500)
    observers = [Curves(grid), Printer()]
    runs, curves = [], {name: [] for name in STRATEGIES}
    start = time.perf_counter(), time.process_time()
    stacked = cfg.stacked and accelerator.num_processes == 1  # processes must run their stages in one order
    seeds = run_seeds(recipe, recipe.seeds, stacked=stacked, accelerator=accelerator, observers=observers, progress=progress)
    for result in seeds:
        for name in STRATEGIES:
            curves[name].append(torch.tensor(result.row["curves"][name]))
        runs.append({k: v for k, v in result.row.items() if k != "curves"})
    summary = report.summarize(runs, [*STRATEGIES, "teacher_a", "teacher_b", "ensemble"], higher_is_better=False,
                               baselines=["bo3", "one_model"])
    results = {
        "runs": runs,
        "summary": summary,
        "config": asdict(cfg),
        "recipe": recipe.to_dict(),
        "protocol": {
            "train_size": SINE_TRAIN_SIZE,
            "val_size": SINE_VAL_SIZE,
            "test_size": SINE_TEST_SIZE,
            "epochs_per_strategy": recipe.one_model.epochs,
            "bo3_selection": "validation set",
            "same_training_set_for_all_strategies": True,
        },
        "seconds": time.perf_counter() - start[0],
        "cpu_seconds": time.process_time() - start[1],
        "stacked": stacked,
    }
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(curves, grid, load_seed_data(recipe, recipe.seeds[0]).train, out / "learned_curves.png")
        seeds[0].trained["student"].merge.save_pretrained(out / "student", overwrite=True)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out / "results.json")
        print(report.text_table(summary, list(STRATEGIES), "MSE"), flush=True)
        print(f"wrote {out / 'results.json'}, {out / 'learned_curves.png'} and {out / 'student'} in {results['seconds']:.0f}s "
              f"({results['cpu_seconds']:.0f} CPU s{', stacked' if stacked else ''})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
