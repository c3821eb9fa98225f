"""Should I merge? Two given checkpoints and N more epochs on the user's own data: every alternative a checkpoint holder
would try, at the same budget, chosen on a validation split; the winner saved in timm's layout with the whole table.

The alternatives are the experiment layer's strategies with given teachers: ``keep`` (the better teacher as it is, no
training), ``continue``, ``distill`` (the ensemble into the better teacher, T and α chosen on validation),
``weight_matching`` (where the architecture can be matched), the merge with the config given (``student``, the
recommended schedule by default) and with the paper's schedule (``student_paper``), and the ``ensemble`` for reference
(two networks at inference: shown, never chosen).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import resolve_spec
from ..api import LoadOptions, check_teacher_reads, label_names_of
from ..card import render_comparison_card
from ..config import MergeConfig, MergeSchedule, StageConfig
from ..data import prepare_dataset, split
from ..errors import ConfigError, UnsupportedModelError
from ..formats import format_of, model_args, num_classes, save_network
from ..hub import TeacherInfo, load_teacher
from ..matching import check_matchable
from ..training import make_accelerator
from ..files import check_output_dir
from ..validation import check_teachers
from .context import SeedContext, lower_is_better
from .observers import Budgets
from .protocol import SeedData
from .recipe import RecipeConfig
from .run import run_seed
from .strategies import ContinueTraining, Distill, Ensemble, Strategy, Student, WeightMatching

COMPARISON_VERSION = 2  # 2: the checkpoint format the winner is saved in
DISTILL_GRID = ((2.0, 0.5), (4.0, 0.9))
DESCRIPTIONS = {
    "keep": "the better teacher on validation, as it is (no training)",
    "continue": "the better teacher trained on for N epochs (cosine learning rate)",
    "distill": "the teachers' ensemble distilled into the better teacher for N epochs (T, α chosen on validation)",
    "weight_matching": "teacher B permuted onto A (weight matching), averaged, BatchNorm recomputed, N epochs",
    "student": "the merge (concatenate, gates, compress, fine-tune) with the config given: ¼ of N on gates, ¾ fine-tuning",
    "student_paper": "the merge with the paper's schedule (λ per epoch, no recovery levers): ½ of N on gates, ½ fine-tuning",
    "ensemble": "the mean of the teachers' outputs (two networks at inference; for reference, never chosen)",
}


@dataclass(frozen=True)
class ComparisonRow:
    """One alternative: its validation and test metric, the epochs and training multiply-adds it spent beyond the
    teachers, the networks it runs at inference, and whether it may be chosen (a single network of the architecture)."""

    strategy: str
    validation: float
    test: float | None
    epochs: float
    training_macs: int
    networks: int
    eligible: bool

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.strategy]


@dataclass
class Comparison:
    """Every alternative's row, the winner (best validation among the single networks) and its network; ``details`` holds
    what the strategies recorded (the merges' validation metrics stage by stage, their gate statistics, the share of
    undecided gates, distillation's chosen setting)."""

    rows: list[ComparisonRow]
    winner: str
    model: nn.Module
    metric: str
    epochs: int
    architecture: str
    teachers: tuple[TeacherInfo, ...]
    dataset: str
    config: MergeConfig
    label_names: list[str] | None = None
    preprocessing: Any = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The content of ``netmerge_compare.json``: the table, the winner, the budgets and the merge config."""
        return {"version": COMPARISON_VERSION, "architecture": self.architecture, "format": format_of(self.model).name,
                "dataset": self.dataset, "metric": self.metric, "epochs": self.epochs, "winner": self.winner,
                "teachers": [t.to_dict() for t in self.teachers],
                "rows": [{**dataclasses.asdict(r), "description": r.description} for r in self.rows],
                "merge_config": self.config.to_dict(), "preset": self.config.preset_name(), "details": self.details}

    def table(self) -> str:
        """The comparison as a plain-text table (what ``hf-netmerge compare`` prints)."""
        lines = [f"{'strategy':<16} {'validation':>10} {'test':>8} {'epochs':>6} {'train MACs':>11} {'nets':>4}"]
        for r in self.rows:
            test = f"{r.test:.4f}" if r.test is not None else "-"
            mark = "  <- chosen" if r.strategy == self.winner else ("" if r.eligible else "  (reference)")
            lines.append(f"{r.strategy:<16} {r.validation:>10.4f} {test:>8} {r.epochs:>6g} {r.training_macs:>11.3g} {r.networks:>4}{mark}")
        return "\n".join(lines)

    def save_pretrained(self, directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """The winner in the teachers' format with ``netmerge_compare.json`` and a model card that shows the whole table."""
        record = self.record()
        return save_network(self.model, directory, extra_files={"netmerge_compare.json": json.dumps(record, indent=2, sort_keys=True),
                                                                "README.md": render_comparison_card(record)},
                            label_names=self.label_names, preprocessing=self.preprocessing, overwrite=overwrite)


def _strategies(config: MergeConfig, epochs: int, matchable: bool, names: Sequence[str] | None) -> list[Strategy]:
    """The alternatives ``names`` (all but ``keep`` when None) at ``epochs`` each. The recommended merge spends a quarter
    of them on gates and the rest on fine-tuning (the split that won on validation in ``benchmarks/merge_levers.py``);
    the paper's splits them in half."""
    gate = max(1, epochs // 4)
    paper_gate = max(1, epochs // 2)
    extra = StageConfig(epochs=epochs, lr=config.finetune_lr or config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                        lr_schedule="cosine", max_grad_norm=config.max_grad_norm)
    schedule = dataclasses.replace(MergeSchedule.from_dict({k: v for k, v in config.to_dict().items()
                                                            if k not in MergeConfig.run_fields()}),
                                   gate_epochs=gate, finetune_epochs=epochs - gate, finetune_milestones=[])
    paper = MergeSchedule.paper(**{k: getattr(schedule, k) for k in ("lr", "momentum", "weight_decay", "gate_lr", "finetune_lr", "max_grad_norm")},
                                gate_epochs=paper_gate, finetune_epochs=epochs - paper_gate,
                                finetune_milestones=[max(1, round(0.75 * (epochs - paper_gate)))] if epochs - paper_gate > 1 else [])
    every: list[Strategy] = [ContinueTraining(extra, teacher_epochs=0), Distill(extra, DISTILL_GRID, "teacher", teacher_epochs=0),
                             WeightMatching(extra, teacher_epochs=0), Student(teacher=None, schedule=schedule),
                             Student(teacher=None, schedule=paper, name="student_paper"), Ensemble(teacher_epochs=0)]
    if names is None:
        return [s for s in every if matchable or s.name != "weight_matching"]
    return [s for s in every if s.name in names]


def compare_models(
    teacher_a: nn.Module | str | os.PathLike[str],
    teacher_b: nn.Module | str | os.PathLike[str],
    train_data: Any,
    test_data: Any | None = None,
    *,
    epochs: int,
    config: MergeConfig | None = None,
    val_fraction: float = 0.1,
    load: LoadOptions | None = None,
    dataset_name: str | None = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    strategies: Sequence[str] | None = None,
) -> Comparison:
    """Every alternative to merging two given teachers at ``epochs`` more epochs each, on ``train_data`` less a
    ``val_fraction`` validation split (every choice is made there), scored on ``test_data`` when given.

    ``config`` sets the merge (its schedule; the stage lengths become ``epochs``, a quarter for gates and the rest for
    fine-tuning) and what every alternative shares (batch size, precision, augmentation, data columns); the
    alternatives train at its learning rate (``finetune_lr`` when set) with a cosine schedule. With ``output`` the
    winner is saved there (see :meth:`Comparison.save_pretrained`); ``dataset_name`` names the data in the table and
    the card (default: a ``datasets.Dataset``'s own name). ``strategies`` names the alternatives to run (default:
    every one of :data:`DESCRIPTIONS` the architecture allows; ``keep`` is always scored). Bad inputs are refused
    before any training.
    """
    config = config or MergeConfig()
    load = load or LoadOptions()
    if epochs < 2:
        raise ConfigError(f"compare needs epochs >= 2 (the merge spends at least one gate and one fine-tune epoch), got {epochs}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    runnable = set(DESCRIPTIONS) - {"keep"}
    unknown = sorted(set(strategies or ()) - runnable)
    if unknown:
        raise ConfigError(f"unknown strategies {unknown}: choose among {sorted(runnable)} (keep is always scored)")
    if output is not None:
        check_output_dir(output, overwrite)
    (a, info_a), (b, info_b) = (load_teacher(t, load.architecture, load.model_args, load.allow_pickle) for t in (teacher_a, teacher_b))
    check_teachers(a, b)
    spec = resolve_spec(a)
    try:
        check_matchable(spec)
        matchable = True
    except UnsupportedModelError:
        if strategies is not None and "weight_matching" in strategies:
            raise
        matchable = False
    prepare = dict(model=a, task=config.task, num_classes=num_classes(a), image_column=config.image_column,
                   label_column=config.label_column, image_size=config.image_size)
    prepared = prepare_dataset(train_data, min_size=2 * config.batch_size, label="train_data", **prepare)
    train, val = split(prepared, val_fraction, seed=0)
    test = prepare_dataset(test_data, min_size=1, label="test_data", **prepare) if test_data is not None else None
    check_teacher_reads(a, train, config.task)
    recipe = RecipeConfig(name="compare", architecture=spec.architecture, model_args=model_args(a),
                          task=config.task, seeds=[config.seed], batch_size=config.batch_size, mixed_precision=config.mixed_precision,
                          gradient_accumulation_steps=config.gradient_accumulation_steps, compile=config.compile,
                          channels_last=config.channels_last, augment=config.augment, baselines=[])
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, image_column=config.image_column,
                                                                  label_column=config.label_column, image_size=config.image_size,
                                                                  num_workers=config.num_workers))
    accelerator = make_accelerator(config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps)
    dataset = dataset_name or getattr(getattr(train_data, "info", None), "dataset_name", None) or "custom"
    data = SeedData(train, val, test if test is not None else val, dataset)
    result = run_seed(recipe, config.seed, strategies=_strategies(config, epochs, matchable, strategies), data=data, accelerator=accelerator,
                      observers=[Budgets()], given_teachers=[a, b], progress=progress)
    ctx = SeedContext(recipe, config.seed, data, accelerator)  # the validation split and the choice the strategies use
    better, teacher_scores = ctx.pick([a, b])
    rows = [ComparisonRow("keep", teacher_scores[better], result.row[("teacher_a", "teacher_b")[better]] if test is not None else None,
                          0, 0, 1, True)]
    models = {"keep": (a, b)[better]}
    for name, trained in result.trained.items():
        models[name] = trained.model
        rows.append(ComparisonRow(name, ctx.validate(trained.model)[recipe.metric], result.row[name] if test is not None else None,
                                  result.row["epochs"][name], result.row["macs"][name], 2 if name == "ensemble" else 1, name != "ensemble"))
    winner = min((r for r in rows if r.eligible), key=lambda r: lower_is_better(config.task, {recipe.metric: r.validation})).strategy
    comparison = Comparison(rows, winner, models[winner], recipe.metric, epochs, spec.architecture, (info_a, info_b), data.name, config,
                            label_names_of(train_data, config.label_column), getattr(prepared, "preprocessing", None),
                            {k: v for k, v in result.row.items() if k not in {r.strategy for r in rows} | {"epochs", "macs"}})
    if output is not None and accelerator.is_main_process:
        comparison.save_pretrained(output, overwrite=overwrite)
    accelerator.wait_for_everyone()
    return comparison

