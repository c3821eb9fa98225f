"""Is merging worth it? Two given teachers and N more epochs: the student against what their holder would do instead.

    .venv/bin/python benchmarks/given_teachers.py [--recipe resnet20-fashion-mnist-given] [--seeds 3] [--workers 2]
        [--scale 1.0] [--set key=value ...] [--name NAME]

A thin script over the experiment API: per seed, :func:`run_seed` of the recipe trains two teachers (checkpointed
under ``--work-dir``, so an interrupted run resumes), then every strategy spends the same N epochs on the same
training data and augmentation, makes every choice on the validation split, and is scored on the same test set:
``continue`` (the better teacher trained on), ``distill`` (the ensemble distilled into the better teacher, T and α
chosen on validation), ``weight_matching`` (align, average, recompute BatchNorm statistics, fine-tune),
``student`` (the method), ``student_distill`` (the method, its fine-tuning distilled from the ensemble) and the
``ensemble`` itself (no training, two networks at inference). ``merge`` is the better of the two merge variants on
validation, per seed. ``--scale`` multiplies every stage's epochs (for a GPU machine). Writes ``<name>.json``,
``<name>.md`` and ``<name>_box.png`` into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from _common import RESULTS, cache_dir, command, machine, pool_seeds, target_table
from hf_netmerge.experiments import Budgets, RecipeConfig, Timer, load_recipe, run_seed, scale_recipe
from hf_netmerge.experiments.report import stats, summarize
from hf_netmerge.training.checkpoint import CheckpointDir

ROOT = Path(__file__).resolve().parents[1]
ALTERNATIVES = ["continue", "distill", "weight_matching"]
ROWS = ["merge", "student", "student_distill", *ALTERNATIVES, "ensemble", "teacher_a", "teacher_b"]
INFERENCE = {"ensemble": 2}  # networks evaluated per input; every other row is one network of the teachers' architecture


def job(seed: int, recipe: RecipeConfig, checkpoints: str) -> dict:
    row = run_seed(recipe, seed, observers=[Timer(), Budgets()], checkpoints=CheckpointDir(checkpoints).sub(f"seed{seed}"),
                   progress=False).row
    variants = {name: row[f"{name}_validation"]["student"] for name in ("student", "student_distill")}
    chosen = max(variants, key=variants.get)  # accuracy on the validation split
    row.update(merge=row[chosen], merge_variant=chosen)
    return row


def markdown(summary: dict, runs: list[dict], recipe: RecipeConfig, scale: float) -> str:
    n = len(runs)
    lines = [f"# Given teachers: {recipe.architecture} on {recipe.data.dataset} ({n} seeds, {machine()['cpu']}, 1 thread per seed)", "",
             f"Command: `{command()}`", "",
             f"Training set: the first {recipe.data.max_train_samples} training images, {recipe.data.val_fraction:.0%} of them held out for "
             f"every choice; test: the {recipe.data.dataset} test split. Teachers {recipe.teacher.epochs} epochs each; then "
             f"N = {recipe.extra.epochs} epochs per strategy (student: {recipe.merge.gate_epochs} gate + {recipe.merge.finetune_epochs} "
             f"fine-tune); augmentation: {recipe.augment.mode}; epochs × {scale}. MACs: training multiply-adds over the whole "
             "budget (teachers included) relative to the student's.", "",
             "| strategy | mean test accuracy | ± std | min | max | student better in | merge better in | training MACs / student's "
             "| CPU s per seed | networks at inference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        if name not in summary:
            continue
        s = summary[name]
        wins = lambda who: sum(r[who] > r[name] for r in runs) if name not in (who, "merge") else None  # noqa: E731
        cells = [f"{w}/{n}" if w is not None else "" for w in (wins("student"), wins("merge"))]
        ratios = {**summary["macs_over_student"], "merge": summary["merge_macs_over_student"]["mean"]}
        macs = f"{ratios[name]:.2f}" if name in ratios else ""
        secs = f"{summary['cpu_seconds'][name]['mean']:.0f}" if name in summary["cpu_seconds"] else ""
        lines.append(f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {cells[0]} | {cells[1]} | {macs} "
                     f"| {secs} | {INFERENCE.get(name, 1)} |")
    chosen = [r["merge_variant"] for r in runs]
    distill = summary["distill"]["mean"]
    best_alternative = max(summary[a]["mean"] for a in ALTERNATIVES)
    met = summary["merge"]["mean"] > best_alternative
    near = summary["student"]["mean"] >= distill - 0.003
    lines += ["", f"`merge` is, per seed, the merge variant with the better validation accuracy: student_distill in "
              f"{chosen.count('student_distill')}/{n} seeds, student in {chosen.count('student')}/{n}. The student's CPU seconds include "
              "its teachers' (it ran first); distill and student_distill train one network per (T, α) of the grid "
              f"{recipe.distill.grid or [[recipe.distill.temperature, recipe.distill.alpha]]}.", "",
              *target_table([
                  ("the better merge variant above continue, weight matching and distill (mean)",
                   f"{summary['merge']['mean']:.4f} vs best {best_alternative:.4f}", met),
                  ("the plain student at most 0.3 points below distill", f"{summary['student']['mean']:.4f} vs {distill:.4f}", near),
              ])]
    return "\n".join(lines)


def box_plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n in runs[0]]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.42 * len(names)))
    ax.boxplot([[r[n] for r in runs] for n in names], orientation="horizontal", showmeans=True, meanprops={"marker": "x"})
    ax.set_yticks(range(1, len(names) + 1), [n.replace("_", " ") for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet20-fashion-mnist-given", help="a packaged recipe name or a recipe file")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's epochs (e.g. for a GPU machine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-given-teachers")
    parser.add_argument("--name", help="stem of the result files (default: the recipe's name)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    recipe = scale_recipe(recipe, args.scale) if args.scale != 1 else recipe
    name = args.name or recipe.name.replace("-", "_")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings = {"recipe": recipe.to_dict()}
    checkpoints = cache_dir(args.work_dir, settings) / "checkpoints"  # keyed by the settings, like the per-seed results
    runs = pool_seeds(functools.partial(job, recipe=recipe, checkpoints=str(checkpoints)), seeds, args.work_dir, args.workers, settings)
    summary = summarize(runs, ROWS, higher_is_better=True, baselines=ALTERNATIVES)
    summary["merge_macs_over_student"] = stats([r["macs"][r["merge_variant"]] / r["macs"]["student"] for r in runs])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command(), "machine": machine(), "recipe": recipe.to_dict(),
                                                       "scale": args.scale, "summary": summary, "runs": runs}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(summary, runs, recipe, args.scale))
    box_plot(runs, RESULTS / f"{name}_box.png", f"{recipe.architecture} on {recipe.data.dataset}, given teachers + N epochs, {len(runs)} seeds")
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
