"""The sine problem (paper Table 1, Fig. 9, Fig. 10) under the fair protocol: a batch-size grid, stacked.

    .venv/bin/python benchmarks/sine.py [--seeds 30] [--batch-sizes 32 64] [--workers 2] [--no-equal-compute]

Every strategy of the packaged ``sine`` recipe (the paper's 900 epochs per strategy) runs on ``--seeds`` seeds at each
of ``--batch-sizes`` under the fair protocol — one 10k training set per seed for every strategy, a 2k validation set
on which every choice is made (bo3's member, the batch size of the third view), never the test set, and a fixed 10k
test set. Each batch size is one cell, run in its own process (``--workers`` at a time, one thread each), where all
seeds train together as stacked models (:func:`~hf_netmerge.experiments.run_seeds` with ``stacked=True``). The
equal-compute baselines (bo3 and one model given the student's training multiply-adds, so more epochs, their
learning-rate drops moved in proportion) run after the main grid in each cell. Three views: each batch size alone,
and each strategy at its best batch size, chosen per seed on the validation set. Cells already in ``--work-dir``
are not run again. Writes ``<name>.json``, ``<name>.md``, ``<name>_box.png`` and ``<name>_curves.png`` (``--name``,
default ``sine``) into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, cache_dir, command, machine, target_table

from hf_netmerge.experiments import (
    Budgets,
    Curves,
    ModelCost,
    RecipeConfig,
    StretchableStrategy,
    Student,
    ValidationScores,
    load_recipe,
    load_seed_data,
    run_seeds,
)
from hf_netmerge.experiments.report import markdown_table, summarize
from hf_netmerge.experiments.strategies import strategies_for

ROOT = Path(__file__).resolve().parents[1]
MAIN = ["student", "bo3", "one_model"]
EQUAL = ["bo3_equal_compute", "one_model_equal_compute"]
ALSO = ["ensemble", "teacher_a", "teacher_b"]
TARGET_GRID_MINUTES = 30.0
# For comparison (DESIGN.md §4): medians of test MSE measured elsewhere, with their sources.
REFERENCE = [
    ("paper, Table 1 (50 runs, its protocol)", {"student": 0.078, "bo3": 0.253, "one_model": 0.281}),
    ("reference code, fair protocol, batch 32 (38 seeds)", {"student": 0.070, "bo3": 0.082, "one_model": 0.079}),
    ("this project before, batch 32 (seeds 7001–7004)", {"student": 0.070, "bo3": 0.079, "one_model": 0.217}),
    ("this project before, batch 64 (seeds 7001–7004)", {"student": 0.044, "bo3": 0.231, "one_model": 0.267}),
]


def _merge_rows(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        else:
            into.setdefault(key, value)


def cell(batch: int, recipe_dict: dict[str, Any], seeds: list[int], equal_compute: bool) -> dict[str, Any]:
    """Every seed at one batch size, stacked: the main strategies, then (``equal_compute``) the equal-compute baselines."""
    torch.set_num_threads(1)
    recipe = RecipeConfig.from_dict({**recipe_dict, "batch_size": batch})
    data = {seed: load_seed_data(recipe, seed) for seed in seeds}
    observers = [Budgets(), ValidationScores(), Curves(torch.linspace(0, 1, 500))]
    start = time.perf_counter(), time.process_time()
    rows = [r.row for r in run_seeds(recipe, seeds, stacked=True, data=data.__getitem__, observers=observers, progress=False)]
    timing = {"main": {"seconds": time.perf_counter() - start[0], "cpu_seconds": time.process_time() - start[1]}}
    if equal_compute:
        cost = ModelCost.measure(recipe, data[seeds[0]])
        macs = Student.from_recipe(recipe).budget(cost).macs
        stretched = [s.at_compute(macs, cost) for s in strategies_for(recipe) if isinstance(s, StretchableStrategy)]
        start = time.perf_counter(), time.process_time()
        extra = run_seeds(recipe, seeds, stacked=True, strategies=lambda seed: stretched, data=data.__getitem__, observers=observers,
                          progress=False)
        timing["equal_compute"] = {"seconds": time.perf_counter() - start[0], "cpu_seconds": time.process_time() - start[1]}
        for row, more in zip(rows, extra):
            _merge_rows(row, more.row)
    return {"batch_size": batch, "rows": rows, "time": timing}


def _cell_job(args: tuple[int, dict[str, Any], list[int], bool, Path]) -> dict[str, Any]:
    batch, recipe_dict, seeds, equal_compute, path = args
    result = cell(batch, recipe_dict, seeds, equal_compute)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def best_batch_rows(cells: dict[int, dict[str, Any]], strategies: list[str]) -> tuple[list[dict[str, Any]], dict[str, dict[int, int]]]:
    """Per seed, each strategy's test score at the batch size with its best validation score (the smaller on ties), and
    how often each batch size was chosen."""
    batches = sorted(cells)
    rows, picks = [], {name: dict.fromkeys(batches, 0) for name in strategies}
    for by_batch in zip(*(cells[b]["rows"] for b in batches)):
        row: dict[str, Any] = {"seed": by_batch[0]["seed"], "batch_size": {}, "macs": {}}
        for name in strategies:
            if not all(name in r for r in by_batch):
                continue
            k = min(range(len(batches)), key=lambda i: (by_batch[i]["validation"][name], batches[i]))
            row[name], row["batch_size"][name] = by_batch[k][name], batches[k]
            row["macs"][name] = by_batch[k]["macs"][name]
            picks[name][batches[k]] += 1
        rows.append(row)
    return rows, picks


def _reference_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| median test MSE | student | bo3 | one model |", "|---|---|---|---|"]
    for view, summary in summaries.items():
        lines.append(f"| this run, {view} | " + " | ".join(f"{summary[n]['median']:.4f}" for n in MAIN) + " |")
    for source, values in REFERENCE:
        lines.append(f"| {source} | " + " | ".join(f"{values[n]:.3f}" for n in MAIN) + " |")
    return lines


def markdown(views: dict[str, dict[str, Any]], picks: dict[str, dict[int, int]], cells: dict[int, dict[str, Any]], recipe: RecipeConfig,
             workers: int, seeds: int) -> str:
    grid_minutes = max(c["time"]["main"]["seconds"] for c in cells.values()) / 60
    cpu_minutes = sum(t["cpu_seconds"] for c in cells.values() for t in c["time"].values()) / 60
    merge = recipe.merge
    lines = [(f"# Sine problem, fair protocol: batch sizes {sorted(cells)}, {seeds} seeds each, stacked ({machine()['cpu']}, "
              f"{workers} processes of 1 thread)"), "", f"Command: `{command()}`", "",
             (f"Budget per seed and batch size (epochs): student = two teachers × {recipe.teacher.epochs} + gates {merge.gate_epochs} "
              f"(double width) + fine-tune {merge.finetune_epochs}; bo3 = 3 × {recipe.teacher.epochs}; one model = {recipe.one_model.epochs}; "
              "the equal-compute variants get the student's training multiply-adds. 10k training examples; every choice on the 2k "
              "validation set."), "",
             *target_table([(f"main grid ({', '.join(MAIN)} × {len(cells)} batch sizes × {seeds} seeds) ≤ {TARGET_GRID_MINUTES:.0f} min wall",
                              f"{grid_minutes:.1f} min", grid_minutes <= TARGET_GRID_MINUTES)]),
             "| cell | main grid wall s | CPU s | equal-compute wall s | CPU s |", "|---|---|---|---|---|"]
    for batch, c in sorted(cells.items()):
        e = c["time"].get("equal_compute", {})
        lines.append(f"| batch {batch} | {c['time']['main']['seconds']:.0f} | {c['time']['main']['cpu_seconds']:.0f} | "
                     f"{e.get('seconds', float('nan')):.0f} | {e.get('cpu_seconds', float('nan')):.0f} |")
    lines += ["", f"All cells together: {cpu_minutes:.1f} CPU minutes.", ""]
    for view, summary in views.items():
        names = [*MAIN, *EQUAL] if view == "best batch" else [*MAIN, *EQUAL, *ALSO]
        lines += [f"## {view}", ""]
        if view == "best batch":
            lines += ["Each strategy at the batch size with the better validation MSE, chosen per seed; chosen batch sizes: " +
                      "; ".join(f"{n.replace('_', ' ')} " + ", ".join(f"{b}: {k}" for b, k in p.items()) for n, p in picks.items()) + ".", ""]
        lines += [markdown_table(summary, names, "MSE (the noise alone gives 0.04)")]
    lines += ["## For comparison", "", *_reference_table({v: s for v, s in views.items()}), ""]
    return "\n".join(lines)


def plots(views: dict[str, dict[str, Any]], view_rows: dict[str, list[dict[str, Any]]], curve_rows: list[dict[str, Any]], stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(views), figsize=(5 * len(views), 3.8), sharex=True)
    for ax, (view, rows) in zip(axes, view_rows.items()):
        names = [n for n in [*MAIN, *EQUAL] if n in views[view]]
        ax.boxplot([[r[n] for r in rows if n in r] for n in names], orientation="horizontal", showmeans=True, meanprops={"marker": "x"})
        ax.set_yticks(range(1, len(names) + 1), [n.replace("_", " ").replace("equal compute", "(eq. MACs)") for n in names])
        ax.set_title(view)
        ax.set_xlabel("test MSE")
    fig.suptitle(f"Sine problem, {len(curve_rows)} seeds (cf. the paper's Fig. 9)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}_box.png", dpi=120)
    grid = torch.linspace(0, 1, 500)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
    for ax, name in zip(axes, MAIN):
        ax.plot(grid, torch.sin(10 * math.pi * grid), color="black", linewidth=2, label="sin(10πx)")
        for r in curve_rows:
            ax.plot(grid, r["curves"][name], alpha=0.25, linewidth=0.8)
        ax.set_title(f"{name.replace('_', ' ')}")
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left")
    fig.suptitle(f"Learned curves at batch 32, {len(curve_rows)} seeds (cf. the paper's Fig. 10)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}_curves.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, default=2, help="cells (batch sizes) run at once, one process of one thread each")
    parser.add_argument("--no-equal-compute", dest="equal_compute", action="store_false")
    parser.add_argument("--recipe", default="sine", help="a packaged recipe name or a recipe file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-sine")
    parser.add_argument("--name", default="sine", help="stem of the result files")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings = {k: v for k, v in recipe.to_dict().items() if k != "batch_size"}  # each cell sets its own
    cache = cache_dir(args.work_dir, {"recipe": settings, "seeds": seeds, "equal_compute": args.equal_compute, "stacked": True})
    cache.mkdir(parents=True, exist_ok=True)
    paths = {b: cache / f"batch{b}.json" for b in args.batch_sizes}
    todo = [(b, recipe.to_dict(), seeds, args.equal_compute, paths[b]) for b in args.batch_sizes if not paths[b].is_file()]
    if todo:
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(todo))) as pool:
            for result in pool.imap_unordered(_cell_job, todo):
                print(f"batch {result['batch_size']}: {result['time']}", flush=True)
    cells = {b: json.loads(paths[b].read_text()) for b in args.batch_sizes}
    strategies = [*MAIN, *EQUAL] if args.equal_compute else MAIN
    view_rows = {f"batch {b}": cells[b]["rows"] for b in args.batch_sizes}
    view_rows["best batch"], picks = best_batch_rows(cells, strategies)
    views = {view: summarize(rows, [*strategies, *ALSO], higher_is_better=False, baselines=strategies[1:]) for view, rows in view_rows.items()}
    RESULTS.mkdir(exist_ok=True)
    slim = {view: [{k: v for k, v in r.items() if k != "curves"} for r in rows] for view, rows in view_rows.items()}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({
        "command": command(), "machine": machine(), "recipe": recipe.to_dict(), "workers": args.workers,
        "protocol": "fair: shared 10k train, every choice on a 2k validation set, fixed 10k test; all seeds of a cell stacked",
        "time": {b: c["time"] for b, c in cells.items()}, "best_batch_picks": picks, "summary": views, "runs": slim}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(views, picks, cells, recipe, args.workers, len(seeds)))
    plots(views, view_rows, cells[min(cells, key=lambda b: abs(b - 32))]["rows"], args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
