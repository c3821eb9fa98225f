"""The sine problem (paper Table 1, Fig. 9, Fig. 10) under the fair protocol, at equal epochs and at equal compute.

    .venv/bin/python benchmarks/sine.py [--seeds 30] [--workers 2] [--equal-compute-seeds 10] [--set key=value ...]

A thin script over the experiment API (``hf_netmerge.experiments``): each seed is :func:`run_seed` of the
packaged ``sine`` recipe (the paper's 900 epochs per strategy) under the fair protocol — one 10k training
set for every strategy, a 2k validation set on which bo3 picks its model (never the test set) and a
fixed 10k test set. The equal-compute baselines are ``at_compute`` copies of bo3 and one model given as
many training multiply-adds as the student used (counted on every Linear layer; the double-width gate
stage costs more per epoch), so more epochs, with their learning-rate drop moved in proportion. Seeds already in ``--work-dir`` are
not run again. Writes ``<name>.json``, ``<name>.md``, ``<name>_box.png`` and ``<name>_curves.png`` (``--name``, default ``sine``)
into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch
from _common import RESULTS, command, machine, run_seeds, target_table

from hf_netmerge.experiments import (
    Budgets,
    Curves,
    ModelCost,
    RecipeConfig,
    StretchableStrategy,
    Timer,
    load_recipe,
    load_seed_data,
    run_seed,
)
from hf_netmerge.experiments.report import markdown_table, summarize
from hf_netmerge.experiments.strategies import strategies_for

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["student", "bo3", "one_model", "bo3_equal_compute", "one_model_equal_compute", "ensemble", "teacher_a", "teacher_b"]
TARGET_MEDIAN, TARGET_WINS, TARGET_SECONDS = 0.055, 25 / 30, 29.0


def job(seed: int, recipe: RecipeConfig, equal_compute_seeds: set[int]) -> dict:
    data = load_seed_data(recipe, seed)
    strategies = strategies_for(recipe)
    if seed in equal_compute_seeds:
        cost = ModelCost.measure(recipe, data)
        student_macs = strategies[0].budget(cost).macs
        strategies += [s.at_compute(student_macs, cost) for s in strategies if isinstance(s, StretchableStrategy)]
    observers = [Timer(), Budgets(), Curves(torch.linspace(0, 1, 500))]
    return run_seed(recipe, seed, data=data, strategies=strategies, observers=observers, progress=False).row


def markdown(summary: dict, runs: list[dict], recipe: RecipeConfig) -> str:
    seeds = len(runs)
    s = summary["student"]
    wins_ok = all(w["wins"] >= math.ceil(TARGET_WINS * w["seeds"]) for k, w in summary["student_wins"].items() if k in ("bo3", "one_model"))
    lines = [f"# Sine problem, fair protocol ({seeds} seeds, batch {recipe.batch_size}, {machine()['cpu']}, 1 thread per seed)", "",
             f"Command: `{command()}`", "",
             markdown_table(summary, STRATEGIES, "MSE (the noise alone gives 0.04)"),
             *target_table([
                 (f"student median test MSE ≤ {TARGET_MEDIAN}", f"{s['median']:.4f}", s["median"] <= TARGET_MEDIAN),
                 ("student better than bo3 and one model in ≥ 25 of 30 seeds (same share)",
                  f"{summary['student_wins']['bo3']['wins']} and {summary['student_wins']['one_model']['wins']} of {seeds}", wins_ok),
                 (f"CPU seconds per seed of the student pipeline ≤ {TARGET_SECONDS:.0f}", f"{summary['cpu_seconds']['student']['mean']:.1f}",
                  summary["cpu_seconds"]["student"]["mean"] <= TARGET_SECONDS),
             ])]
    return "\n".join(lines)


def plots(runs: list[dict], summary: dict, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in STRATEGIES[:5] if n in summary]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.boxplot([[r[n] for r in runs if n in r] for n in names], orientation="horizontal", showmeans=True, meanprops={"marker": "x"})
    ax.set_yticks(range(1, len(names) + 1), [n.replace("_", " ") for n in names])
    ax.axvline(TARGET_MEDIAN, color="grey", linestyle=":", label=f"target median {TARGET_MEDIAN}")
    ax.set_xlabel("test MSE")
    ax.set_title(f"Sine problem, {len(runs)} seeds (cf. the paper's Fig. 9)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}_box.png", dpi=120)
    grid = torch.linspace(0, 1, 500)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
    for ax, name in zip(axes, ["student", "bo3", "one_model"]):
        ax.plot(grid, torch.sin(10 * math.pi * grid), color="black", linewidth=2, label="sin(10πx)")
        for r in runs:
            ax.plot(grid, r["curves"][name], alpha=0.25, linewidth=0.8)
        ax.set_title(f"{name.replace('_', ' ')}: median MSE {summary[name]['median']:.3f}")
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left")
    fig.suptitle(f"Learned curves, {len(runs)} seeds (cf. the paper's Fig. 10)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}_curves.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--equal-compute-seeds", type=int, default=10, help="run the equal-compute baselines on the first N seeds")
    parser.add_argument("--recipe", default="sine", help="a packaged recipe name or a recipe file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-sine")
    parser.add_argument("--name", default="sine", help="stem of the result files")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    equal_compute_seeds = seeds[: args.equal_compute_seeds]
    run = functools.partial(job, recipe=recipe, equal_compute_seeds=set(equal_compute_seeds))
    runs = run_seeds(run, seeds, args.work_dir, args.workers, {"recipe": recipe.to_dict(), "equal_compute_seeds": equal_compute_seeds})
    summary = summarize(runs, STRATEGIES, higher_is_better=False, baselines=STRATEGIES[1:5])
    RESULTS.mkdir(exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "curves"} for r in runs]
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command(), "machine": machine(), "recipe": recipe.to_dict(),
                                                    "protocol": "fair: shared 10k train, bo3 on a 2k validation set, fixed 10k test",
                                                    "summary": summary, "runs": slim}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, runs, recipe))
    plots(runs, summary, args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
