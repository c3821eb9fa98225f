"""Is merging worth it? Two given converged teachers and N more epochs: the budget curve of every alternative.

    .venv/bin/python benchmarks/given_teachers.py [--recipe lenet-bn-fashion-mnist-given] [--fractions 0.25 0.5 1]
        [--seeds 3] [--workers 2] [--set key=value ...] [--name NAME]

A thin script over the public API: per seed, the recipe's two teachers are trained once (checkpointed under
``--work-dir``), then for every N = fraction × the teachers' epochs, :func:`hf_netmerge.compare_models` gives every
alternative the same N epochs on the same training data and scores it on the same test set: ``keep`` (the better
teacher), ``continue``, ``distill``, ``weight_matching`` (BatchNorm recomputed), ``student`` (the recommended
schedule: the recipe's ``merge``), ``student_paper`` (the paper's schedule) and the ``ensemble``. Every choice is made
on the validation split. Each (seed, N) is cached, so an interrupted run resumes. Writes ``<name>.json``,
``<name>.md`` and ``<name>.png`` (test accuracy against N) into ``benchmarks/results/``.

``--rerun student`` reruns only the named strategies with today's code and recipe on the committed ``<name>.json``'s
teachers (from its cache under ``--work-dir``, else trained again with its recipe and checked to score the same) and
replaces their rows there; the other rows, the winner's choice
among all rows and both commands are kept in the result.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from _common import RESULTS, cache_dir, command, machine, pool_seeds, target_table
import hf_netmerge as hm
from hf_netmerge.data import first_examples, load_data
from hf_netmerge.experiments import RecipeConfig, load_recipe, run_seed
from hf_netmerge.experiments.report import stats
from hf_netmerge.experiments.strategies import STRATEGIES
from hf_netmerge.training.checkpoint import CheckpointDir

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["keep", "continue", "distill", "weight_matching", "student_paper", "student", "ensemble"]
STAGES = ["ensemble", "gated_big_student", "student_before_finetune", "student_recalibrated", "student"]


def budgets(recipe: RecipeConfig, fractions: list[float]) -> list[int]:
    """The extra epochs N per fraction of the teachers' epochs (at least 2: one gate and one fine-tune epoch)."""
    return sorted({max(2, round(f * recipe.teacher.epochs)) for f in fractions})


def job(seed: int, recipe: RecipeConfig, epochs: list[int], work: str, teacher_recipe: RecipeConfig | None = None,
        rerun: list[str] | None = None) -> dict:
    """One seed: the teachers (trained once, checkpointed, by ``teacher_recipe`` when given), then one comparison per N
    (each cached as JSON; with ``rerun``, of those strategies only, cached beside the full one under a digest)."""
    root = Path(work) / f"seed{seed}"
    teachers = run_seed(teacher_recipe or recipe, seed, strategies=[STRATEGIES["ensemble"].from_recipe(recipe)],
                        checkpoints=CheckpointDir(root / "checkpoints"), progress=False).teachers
    data = load_data(recipe.data.dataset)
    train = first_examples(data.train, recipe.data.max_train_samples)
    test = first_examples(data.eval, recipe.data.max_test_samples)
    out = {"seed": seed}
    tag = "" if rerun is None else "-rerun-" + hashlib.sha256(json.dumps([rerun, recipe.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
    for n in epochs:
        path = root / f"n{n}{tag}.json"
        if not path.is_file():
            comparison = hm.compare_models(*teachers, train, test, epochs=n, config=recipe.merge_config(seed), strategies=rerun,
                                           val_fraction=recipe.data.val_fraction, dataset_name=data.name, progress=False)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(comparison.record()))
            os.replace(tmp, path)
        out[str(n)] = json.loads(path.read_text())
    return out


def replaced(old: dict, new: dict, strategies: list[str]) -> dict:
    """Comparison record ``old`` with the rows and details of ``strategies`` taken from ``new`` (a rerun of them alone);
    the winner is chosen again among all rows on validation. Refuses teachers that score otherwise than the committed
    ones (a cache lost and the teachers retrained differently would mix two experiments in one table)."""
    scores = [(record["details"]["teacher_a"], record["details"]["teacher_b"]) for record in (old, new)]
    if scores[0] != scores[1]:
        raise SystemExit(f"the rerun's teachers score {scores[1]} on the test split, the committed ones {scores[0]}: not the same teachers")
    rows = {row["strategy"]: row for row in old["rows"]}
    rows.update({row["strategy"]: row for row in new["rows"] if row["strategy"] in strategies})
    eligible = [row for row in rows.values() if row["eligible"]]
    best = max if new["metric"] == "accuracy" else min
    return {**old, "rows": list(rows.values()), "details": {**old["details"], **new["details"]},
            "winner": best(eligible, key=lambda row: row["validation"])["strategy"], "merge_config": new["merge_config"],
            "preset": new["preset"]}


def summarize(runs: list[dict], epochs: list[int]) -> dict:
    summary: dict = {}
    for n in epochs:
        records = [r[str(n)] for r in runs]
        by_name = [{row["strategy"]: row for row in rec["rows"]} for rec in records]
        names = [name for name in ROWS if all(name in rows for rows in by_name)]  # weight matching: where it can match
        summary[str(n)] = {
            "test": {name: stats([rows[name]["test"] for rows in by_name]) for name in names},
            "validation": {name: stats([rows[name]["validation"] for rows in by_name])["mean"] for name in names},
            "macs_over_continue": {name: stats([rows[name]["training_macs"] / rows["continue"]["training_macs"]
                                                for rows in by_name])["mean"] for name in names},
            "stages": {variant: {stage: stats([rec["details"][f"{variant}_validation"][stage] for rec in records])["mean"]
                                 for stage in STAGES if stage in records[0]["details"][f"{variant}_validation"]}
                       for variant in ("student", "student_paper")},
            "undecided": {variant: stats([rec["details"][f"{variant}_undecided_gates"] for rec in records])["mean"]
                          for variant in ("student", "student_paper")},
            "winners": [rec["winner"] for rec in records],
        }
    return summary


def markdown(summary: dict, runs: list[dict], recipe: RecipeConfig, epochs: list[int], extra: dict) -> str:
    n_seeds = len(runs)
    train = recipe.data.max_train_samples or "all"
    commands = [f"Command: `{command()}`"]
    if extra:
        commands = [f"Command: `{extra['first_command']}`, then `{command()}`: the rows {', '.join(extra['rerun']['strategies'])} "
                    f"rerun on the same teachers with the merge settings {extra['rerun']['merge_changes']}; every other row is "
                    "the first run's."]
    lines = [f"# Given teachers: {recipe.architecture} on {recipe.data.dataset}, N more epochs ({n_seeds} seeds, "
             f"{machine()['cpu']}, 1 thread per seed)", "", *commands, "",
             f"Data: {train} training images, {recipe.data.val_fraction:.0%} of them held out for every choice; test: the "
             f"{recipe.data.dataset} test split. Teachers: {recipe.teacher.epochs} epochs each, lr {recipe.teacher.lr} "
             + (f"÷10 at {recipe.teacher.milestones}" if recipe.teacher.lr_schedule == "step" else "with a cosine schedule")
             + f", batch {recipe.batch_size}, no augmentation (CPU-sized). Then N extra epochs per strategy: "
             f"{', '.join(b.replace('_', ' ') for b in recipe.baselines if b != 'ensemble')} at lr "
             f"{recipe.merge.finetune_lr or recipe.merge.lr} with a cosine schedule (distill trains one network per (T, α) of "
             f"{recipe.distill.grid} and keeps the better on validation); the "
             "recommended merge spends ⌊N/4⌋ epochs (at least one) on gates and the rest on fine-tuning, the paper's ⌊N/2⌋. "
             "Training multiply-adds are relative to continue's "
             "at the same N (the gate stage trains the double-width network; distillation adds the ensemble's forward passes).", ""]
    for n in epochs:
        s = summary[str(n)]
        lines += [f"## N = {n} epochs", "", "| strategy | test accuracy (mean ± std) | min | max | validation (mean) | training MACs / continue's |",
                  "|---|---|---|---|---|---|"]
        for name in s["test"]:
            t = s["test"][name]
            lines.append(f"| {name} | {t['mean']:.4f} ± {t['std']:.4f} | {t['min']:.4f} | {t['max']:.4f} | {s['validation'][name]:.4f} "
                         f"| {s['macs_over_continue'][name]:.2f} |")
        lines += ["", "Stage by stage (validation accuracy, mean): ensemble → gated big student → compressed → recalibrated → final; "
                  "undecided gates at the end of the gate stage.", "",
                  "| merge | ensemble | gated | compressed | recalibrated | final | undecided |", "|---|---|---|---|---|---|---|"]
        for variant in ("student_paper", "student"):
            st = s["stages"][variant]
            lines.append(f"| {variant} | " + " | ".join(f"{st[k]:.4f}" if k in st else "–" for k in STAGES)
                         + f" | {100 * s['undecided'][variant]:.1f}% |")
        lines += ["", f"Chosen on validation per seed: {', '.join(s['winners'])}.", ""]
    full = summary[str(epochs[-1])]["test"]
    half = [summary[str(n)]["test"] for n in epochs if 2 * n >= recipe.teacher.epochs]
    averaging = [b for b in ("continue", "weight_matching") if b in full]  # the one-network baselines that ran
    better_teacher = stats([max(r[str(epochs[-1])]["details"]["teacher_a"], r[str(epochs[-1])]["details"]["teacher_b"]) for r in runs])["mean"]
    lines += target_table([
        ("recommended student ≥ better teacher + 0.1 pt at N = the teachers' epochs",
         f"{full['student']['mean']:.4f} vs {better_teacher:.4f}", full["student"]["mean"] >= better_teacher + 0.001),
        ("recommended student ≥ distill − 0.3 pt at N = the teachers' epochs", f"{full['student']['mean']:.4f} vs {full['distill']['mean']:.4f}",
         full["student"]["mean"] >= full["distill"]["mean"] - 0.003),
        ("recommended student never below the better teacher at N ≥ ½ the teachers' epochs",
         ", ".join(f"{t['student']['mean']:.4f}" for t in half), all(t["student"]["mean"] >= better_teacher for t in half)),
        (f"the better merge above {' and '.join(b.replace('_', ' ') for b in averaging)} at every N",
         ", ".join(f"N={n}: {max(summary[str(n)]['test'][v]['mean'] for v in ('student', 'student_paper')):.4f} vs "
                   f"{max(summary[str(n)]['test'][b]['mean'] for b in averaging):.4f}" for n in epochs),
         all(max(summary[str(n)]["test"][v]["mean"] for v in ("student", "student_paper"))
             > max(summary[str(n)]["test"][b]["mean"] for b in averaging) for n in epochs)),
    ])
    return "\n".join(lines)


def plot(summary: dict, epochs: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in summary[str(epochs[0])]["test"]:
        means = [summary[str(n)]["test"][name]["mean"] for n in epochs]
        stds = [summary[str(n)]["test"][name]["std"] for n in epochs]
        style = {"linewidth": 2.5} if name.startswith("student") else {"linestyle": "--" if name in ("ensemble", "keep") else "-"}
        ax.errorbar(epochs, means, yerr=stds, marker="o", capsize=3, label=name.replace("_", " "), **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(epochs, [str(n) for n in epochs])
    ax.set_xlabel("extra epochs N")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lenet-bn-fashion-mnist-given", help="a packaged recipe name or a recipe file")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="N as fractions of the teachers' epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-given-teachers")
    parser.add_argument("--name", help="stem of the result files (default: the recipe's name)")
    parser.add_argument("--rerun", nargs="+", choices=ROWS[1:-1] + ["ensemble"], metavar="STRATEGY",
                        help="rerun only these strategies on the committed result's teachers and replace their rows")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    name = args.name or recipe.name.replace("-", "_")
    extra: dict = {}
    if args.rerun:
        committed = json.loads((RESULTS / f"{name}.json").read_text())
        base = RecipeConfig.from_dict(committed["recipe"])
        epochs, seeds = committed["epochs"], [run["seed"] for run in committed["runs"]]
        settings = {"recipe": committed["recipe"], "epochs": epochs, "hf_netmerge": hm.__version__}
        rerun_settings = {**settings, "rerun": args.rerun, "rerun_recipe": recipe.to_dict()}
        work = cache_dir(args.work_dir, settings)
        fresh = pool_seeds(functools.partial(job, recipe=recipe, epochs=epochs, work=str(work), teacher_recipe=base, rerun=args.rerun),
                           seeds, args.work_dir, args.workers, rerun_settings)
        by_seed = {run["seed"]: run for run in fresh}
        runs = [{"seed": run["seed"], **{str(n): replaced(run[str(n)], by_seed[run["seed"]][str(n)], args.rerun) for n in epochs}}
                for run in committed["runs"]]
        changes = {k: v for k, v in recipe.merge.to_dict().items() if committed["recipe"]["merge"].get(k) != v}
        extra = {"first_command": committed.get("first_command", committed["command"]),
                 "rerun": {"strategies": args.rerun, "merge_changes": changes}}
        recipe, recipe_record = base, committed["recipe"]
    else:
        epochs = budgets(recipe, args.fractions)
        settings = {"recipe": recipe.to_dict(), "epochs": epochs, "hf_netmerge": hm.__version__}
        work = cache_dir(args.work_dir, settings)
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        runs = pool_seeds(functools.partial(job, recipe=recipe, epochs=epochs, work=str(work)), seeds, args.work_dir, args.workers, settings)
        recipe_record = recipe.to_dict()
    summary = summarize(runs, epochs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command(), **extra, "machine": machine(), "recipe": recipe_record,
                                                       "epochs": epochs, "summary": summary, "runs": runs}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(summary, runs, recipe, epochs, extra))
    plot(summary, epochs, RESULTS / f"{name}.png",
         f"{recipe.architecture} on {recipe.data.dataset}: given teachers + N epochs ({len(runs)} seeds)")
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
