"""Which settings recover the half-width student? The recommended merge schedule against the paper's and against itself
with one lever changed at a time, on given converged teachers; every choice on the validation split.

    .venv/bin/python benchmarks/merge_levers.py [--recipe lenet-bn-fashion-mnist-given] [--seeds 2] [--workers 2]
        [--variants recommended paper ...] [--set key=value ...] [--name NAME]

Per seed, the recipe's two teachers are trained once (checkpointed under ``--work-dir``, so an interrupted run
resumes), then each variant of :data:`VARIANTS` merges them with the recipe's stage lengths and learning rates and
records its validation accuracy stage by stage (ensemble → big student → gated → compressed → recalibrated → final),
the share of undecided gates at the end of the gate stage and its test accuracy (reported, never used to choose).
``continue`` and ``distill`` (the recipe's ``extra`` stage) run beside them as the yardsticks. Writes ``<name>.json``
and ``<name>.md`` into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from _common import RESULTS, cache_dir, command, machine, pool_seeds
from hf_netmerge.config import MergeSchedule
from hf_netmerge.experiments import RecipeConfig, Student, load_recipe, run_seed
from hf_netmerge.experiments.report import stats
from hf_netmerge.experiments.strategies import STRATEGIES
from hf_netmerge.training.checkpoint import CheckpointDir

ROOT = Path(__file__).resolve().parents[1]
# name → (what changes against the recipe's merge schedule, in words; the changes). The recipe's schedule is the
# recommended one (MergeSchedule's defaults) with the recipe's stage lengths and learning rates.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "recommended": ("MergeSchedule() defaults: λ quadratic per step 0.05 → 20, gates closed on a cubic schedule from ¼, the better "
                    "teacher's gates 1.0 ahead, BN recalibration, fine-tune cosine + ensemble KD (α 0.5, T 2)", {}),
    "no_closing": ("no gate closing and no head start (the default before them)", {"gate_closing": "none", "gate_head_start": 0.0}),
    "paper": ("the paper's schedule (λ per epoch from 0.5, growth 2.0; no recalibration, no KD, fine-tune ÷10 at ¾)",
              {"preset": "paper", "lambda_init": 0.5, "lambda_growth": 2.0}),
    "no_distill": ("fine-tuning on the labels alone (distill_alpha 0)", {"distill_alpha": 0.0}),
    "no_recalibration": ("no BatchNorm recalibration after compression", {"recalibrate_norms": False}),
    "step_finetune": ("fine-tune lr ÷10 at ¾ instead of cosine", {"finetune_schedule": "step", "finetune_milestones": "¾"}),
    "lambda_5": ("λ ends at 5", {"lambda_final": 5.0}),
    "lambda_80": ("λ ends at 80", {"lambda_final": 80.0}),
    "lambda_exponential": ("λ exponential per step 0.05 → 20", {"lambda_schedule": "exponential"}),
    "gate_distill": ("ensemble KD in the gate stage too (α 0.5)", {"gate_distill_alpha": 0.5}),
    "distill_t4": ("fine-tune KD at T 4, α 0.9", {"distill_temperature": 4.0, "distill_alpha": 0.9}),
    "short_gates": ("¼ of N for gates, ¾ for fine-tuning", {"gate_epochs": "¼"}),
    "finetune_lr_x2": ("fine-tune lr twice the gate stage's", {"finetune_lr": "×2"}),
    "gate_lr_x3": ("gates' Adam lr 0.3 instead of 0.1 (for short gate stages)", {"gate_lr": 0.3}),
    "gate_lr_x10": ("gates' Adam lr 1.0 instead of 0.1 (for short gate stages)", {"gate_lr": 1.0}),
    "closing": ("lowest-scored gates held closed on a cubic schedule from ¼ of the gate stage (all removed ones by its end), "
                "no head start", {"gate_closing": "cubic", "gate_head_start": 0.0}),
    "closing_head_start": ("closing, and the better teacher's gates start 1.0 higher in log α", {"gate_closing": "cubic", "gate_head_start": 1.0}),
    "closing_head_start_2": ("closing, and the better teacher's gates start 2.0 higher in log α", {"gate_closing": "cubic", "gate_head_start": 2.0}),
}
STAGES = ["ensemble", "big_student", "gated_big_student", "student_before_finetune", "student_recalibrated", "student"]


def schedule(base: MergeSchedule, changes: dict[str, Any]) -> MergeSchedule:
    """``base`` with ``changes``; the fractions ¾ and ¼ and the factor ×2 are read against ``base``'s stage lengths."""
    budget = base.gate_epochs + base.finetune_epochs
    values = dict(changes)
    if values.get("finetune_milestones") == "¾":
        values["finetune_milestones"] = [round(0.75 * base.finetune_epochs)]
    if values.get("gate_epochs") == "¼":
        values.update(gate_epochs=max(1, budget // 4), finetune_epochs=budget - max(1, budget // 4))
    if values.get("finetune_lr") == "×2":
        values["finetune_lr"] = 2 * base.lr
    if values.pop("preset", None) == "paper":
        kept = {k: v for k, v in base.to_dict().items() if k in ("gate_epochs", "finetune_epochs", "lr", "momentum", "weight_decay",
                                                                  "gate_lr", "max_grad_norm", "finetune_lr")}
        fields = {**kept, "finetune_milestones": [round(0.75 * base.finetune_epochs)], **values}
        return MergeSchedule.paper(**fields)
    return dataclasses.replace(base, **values)


def job(seed: int, recipe: RecipeConfig, names: list[str], checkpoints: str) -> dict:
    variants = [Student(teacher=None, schedule=schedule(recipe.merge, VARIANTS[name][1]), name=f"merge_{name}") for name in names]
    yardsticks = [STRATEGIES[name].from_recipe(recipe) for name in ("continue", "distill")]
    return run_seed(recipe, seed, strategies=[*variants, *yardsticks], checkpoints=CheckpointDir(checkpoints).sub(f"seed{seed}"),
                    progress=False).row


def summarize(runs: list[dict], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        key = f"merge_{name}"
        out[name] = {
            "validation": {stage: stats([r[f"{key}_validation"][stage] for r in runs])["mean"] for stage in STAGES
                           if all(stage in r[f"{key}_validation"] for r in runs)},
            "undecided_gates": stats([r[f"{key}_undecided_gates"] for r in runs])["mean"],
            "test": stats([r[key] for r in runs]),
        }
    for name in ("continue", "distill", "teacher_a", "teacher_b", "ensemble"):
        out[name] = {"test": stats([r[name] for r in runs])}
    out["distill"]["validation"] = stats([max(r["distill_validation"]) for r in runs])["mean"]
    out["chosen"] = max(names, key=lambda n: out[n]["validation"]["student"])
    return out


def markdown(summary: dict, runs: list[dict], recipe: RecipeConfig, names: list[str]) -> str:
    n = len(runs)
    merge = recipe.merge
    lines = [f"# Merge levers: {recipe.architecture} on {recipe.data.dataset}, given converged teachers ({n} seeds, "
             f"{machine()['cpu']}, 1 thread per seed)", "", f"Command: `{command()}`", "",
             f"Training set: the first {recipe.data.max_train_samples} training images, {recipe.data.val_fraction:.0%} held out "
             f"(validation: every number below but the test column). Teachers {recipe.teacher.epochs} epochs (lr {recipe.teacher.lr}, "
             f"÷10 at {recipe.teacher.milestones}); then N = {merge.gate_epochs + merge.finetune_epochs} epochs "
             f"({merge.gate_epochs} gate + {merge.finetune_epochs} fine-tune unless the row says otherwise). Mean over seeds; "
             "validation accuracy at each stage of the merge; undecided: the share of gates with P[g>0] in (0.1, 0.9) at the "
             "end of the gate stage.", "",
             "| variant | change | ensemble | big student | gated | compressed | recalibrated | final (val) | undecided | test (mean ± std) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        words, s = VARIANTS[name][0], summary[name]
        v = s["validation"]
        cells = " | ".join(f"{v[stage]:.4f}" if stage in v else "–" for stage in STAGES)
        mark = " **(chosen)**" if name == summary["chosen"] else ""
        lines.append(f"| {name}{mark} | {words} | {cells} | {100 * s['undecided_gates']:.1f}% | {s['test']['mean']:.4f} ± "
                     f"{s['test']['std']:.4f} |")
    for name in ("continue", "distill"):
        s = summary[name]
        val = f"{s['validation']:.4f}" if "validation" in s else "–"
        lines.append(f"| {name} | the recipe's extra stage ({recipe.extra.epochs} epochs) | | | | | | {val} | | "
                     f"{s['test']['mean']:.4f} ± {s['test']['std']:.4f} |")
    for name in ("teacher_a", "teacher_b", "ensemble"):
        lines.append(f"| {name} | | | | | | | | | {summary[name]['test']['mean']:.4f} ± {summary[name]['test']['std']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lenet-bn-fashion-mnist-given", help="a packaged recipe name or a recipe file")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="the variants to run (default all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-merge-levers")
    parser.add_argument("--name", help="stem of the result files (default: merge_levers_<recipe name>)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    name = args.name or f"merge_levers_{recipe.name.replace('-', '_')}"
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings = {"recipe": recipe.to_dict(), "variants": {k: VARIANTS[k][1] for k in args.variants}}
    checkpoints = cache_dir(args.work_dir, settings) / "checkpoints"
    runs = pool_seeds(functools.partial(job, recipe=recipe, names=args.variants, checkpoints=str(checkpoints)), seeds, args.work_dir,
                      args.workers, settings)
    summary = summarize(runs, args.variants)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command(), "machine": machine(), "recipe": recipe.to_dict(),
                                                       "variants": {k: {"change": VARIANTS[k][0], "settings": VARIANTS[k][1]}
                                                                    for k in args.variants},
                                                       "summary": summary, "runs": runs}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(summary, runs, recipe, args.variants))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
