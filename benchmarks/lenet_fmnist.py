"""LeNet on Fashion-MNIST (the paper's Table 2 set-up at CPU-sized epochs): student, bo3, one model and pruning.

    .venv/bin/python benchmarks/lenet_fmnist.py [--seeds 5] [--workers 2] [--set key=value ...] [--name lenet_fmnist]

A thin script over the experiment API: each seed is :func:`run_seed` of the packaged
``lenet-fashion-mnist-cpu`` recipe (12 epochs per strategy) on the first ``data.max_train_samples``
(default 20 000) images of Debian's Fashion-MNIST training set, of which ``data.val_fraction`` is held
out for bo3's choice; every strategy trains on the rest and is scored on the 10 000 test images. Seeds vary the initializations and the shuffling. Writes ``<name>.json``,
``<name>.md`` and ``<name>_box.png`` into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from _common import RESULTS, command, machine, pool_seeds, target_table

from hf_netmerge.experiments import Budgets, RecipeConfig, Timer, load_recipe, run_seed
from hf_netmerge.experiments.report import markdown_table, summarize

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["student", "bo3", "one_model", "pruning", "ensemble", "teacher_a", "teacher_b"]


def job(seed: int, recipe: RecipeConfig) -> dict:
    return run_seed(recipe, seed, observers=[Timer(), Budgets()], progress=False).row


def markdown(summary: dict, runs: list[dict], recipe: RecipeConfig) -> str:
    lines = [f"# LeNet on Fashion-MNIST ({len(runs)} seeds, {recipe.data.max_train_samples} training images, "
             f"{recipe.teacher.epochs * 3} epochs per strategy, {machine()['cpu']}, 1 thread per seed)", "",
             f"Command: `{command()}`", "",
             markdown_table(summary, STRATEGIES, "accuracy")]
    mean = summary["student"]["mean"]
    met = mean > summary["bo3"]["mean"] and mean > summary["one_model"]["mean"]
    lines += target_table([("student mean accuracy above bo3's and one model's",
                            f"{mean:.4f} vs {summary['bo3']['mean']:.4f} and {summary['one_model']['mean']:.4f}", met)])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recipe", default="lenet-fashion-mnist-cpu", help="a packaged recipe name or a recipe file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-lenet-fmnist")
    parser.add_argument("--name", default="lenet_fmnist", help="stem of the result files")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, ["data.max_train_samples=20000", *args.overrides])
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = pool_seeds(functools.partial(job, recipe=recipe), seeds, args.work_dir, args.workers, {"recipe": recipe.to_dict()})
    summary = summarize(runs, STRATEGIES, higher_is_better=True, baselines=STRATEGIES[1:4])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({
        "command": command(), "machine": machine(), "recipe": recipe.to_dict(),
        "protocol": "shared training subset, bo3 on its validation split, the 10k test set", "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "curves"} for r in runs]}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, runs, recipe))
    box_plot(runs, RESULTS / f"{args.name}_box.png")
    print((RESULTS / f"{args.name}.md").read_text())


def box_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in STRATEGIES[:4] if n in runs[0]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.boxplot([[r[n] for r in runs] for n in names], orientation="horizontal", showmeans=True, meanprops={"marker": "x"})
    ax.set_yticks(range(1, len(names) + 1), [n.replace("_", " ") for n in names])
    ax.set_xlabel("test accuracy")
    ax.set_title(f"LeNet on Fashion-MNIST, {len(runs)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
