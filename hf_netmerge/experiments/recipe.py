"""Recipes: a whole experiment as one typed config (teachers, the merge, the baselines, the data), loaded by name or path.

The paper's experiments ship as package data (``hf_netmerge/recipes/*.yaml``): ``load_recipe("sine")``
and ``load_recipe("path/to/recipe.yaml")`` both work, with dotted ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import (
    CONFIG_VERSION,
    AugmentConfig,
    CompileMode,
    MergeConfig,
    MergeSchedule,
    MixedPrecision,
    StageConfig,
    Task,
    TypedConfig,
    require,
)
from ..errors import ConfigError
from ..overrides import apply_overrides


@dataclass
class DataConfig(TypedConfig):
    """Where a recipe's data comes from (see :func:`hf_netmerge.data.load_data`) and how it is split.

    ``val_fraction`` of the training set is held out (same split for every strategy) to pick bo3's
    model; the test split scores everything. The generated sine problem draws its own validation
    set instead (10k training, 2k validation, 10k test examples per seed, see
    :func:`hf_netmerge.data.sine_splits`). ``eval_batch_size`` only changes float rounding of the test loss.
    """

    dataset: str = "sine"
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = None
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    num_workers: int = 0
    eval_batch_size: int = 256
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_train_samples", "max_test_samples", "eval_batch_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name} must be >= 1, got {value}")
        require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class PruningConfig(TypedConfig):
    """The channel-pruning baseline: a double-width network trained, pruned to half, fine-tuned.

    Channels go in ``prune_epochs`` equal steps, least important first by first-order Taylor
    importance (Molchanov et al. 2019): the squared gradient of the loss w.r.t. a per-channel mask.
    """

    train: StageConfig = field(default_factory=StageConfig)
    prune_epochs: int = 1
    prune_lr: float = 0.01
    finetune: StageConfig = field(default_factory=StageConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        require(self.prune_epochs >= 1, f"prune_epochs must be >= 1, got {self.prune_epochs}")
        require(self.prune_lr > 0, f"prune_lr must be > 0, got {self.prune_lr}")


@dataclass
class DistillConfig(TypedConfig):
    """Knowledge distillation from the teachers' ensemble (the ``distill`` and ``student_distill`` strategies).

    ``temperature`` and ``alpha`` weigh the soft targets; with a ``grid`` of ``[temperature, alpha]`` pairs,
    one network is trained per pair and the best on the validation set kept (never the test set).
    ``distill`` trains ``into`` a copy of the better teacher (picked on validation) or a ``fresh`` network.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    grid: list[list[float]] = field(default_factory=list)
    into: Literal["teacher", "fresh"] = "teacher"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        require(all(len(pair) == 2 for pair in self.grid), f"distill.grid holds [temperature, alpha] pairs, got {self.grid}")
        for t, a in self.settings():
            require(t > 0 and 0 <= a <= 1, f"distill: temperature must be > 0 and alpha in [0, 1], got {[t, a]}")

    def settings(self) -> list[tuple[float, float]]:
        """The (temperature, alpha) pairs to try: the grid, or the single setting."""
        return [(float(t), float(a)) for t, a in self.grid] if self.grid else [(self.temperature, self.alpha)]


Baseline = Literal["bo3", "one_model", "pruning", "continue", "distill", "weight_matching", "student_distill", "ensemble"]


@dataclass
class RecipeConfig(TypedConfig):
    """A whole experiment: teachers (trained, or given), the merge, and the baselines at the same budget.

    Baselines that start from the two teachers (``continue``, ``distill``, ``weight_matching``) spend the
    ``extra`` stage after them; ``student`` and ``student_distill`` spend the merge's gate and fine-tune epochs.

    What every strategy shares (task, batch size, precision, compilation and memory format, the data's columns and
    image size, the train-time ``augment``) is set once here; the ``merge:`` section is the method's
    :class:`~hf_netmerge.config.MergeSchedule`. ``stacked`` trains all seeds together, each stage as one stacked model
    (:func:`~hf_netmerge.experiments.run_seeds`): for small models, fp32, one process, no checkpoints.
    """

    name: str = "experiment"
    architecture: str = "netmerge_sine_mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    task: Task = "classification"
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 64
    mixed_precision: MixedPrecision = "no"
    gradient_accumulation_steps: int = 1
    compile: CompileMode = "no"
    channels_last: bool = False
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teachers: list[str] = field(default_factory=list)
    teacher: StageConfig = field(default_factory=StageConfig)
    merge: MergeSchedule = field(default_factory=MergeSchedule)
    baselines: list[Baseline] = field(default_factory=lambda: ["bo3", "one_model"])
    one_model: StageConfig = field(default_factory=StageConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    extra: StageConfig = field(default_factory=StageConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint_every: int = 1
    log_with: list[str] = field(default_factory=list)
    stacked: bool = False
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        merge = data.get("merge") if isinstance(data, dict) else None
        misplaced = sorted(set(MergeConfig.run_fields()) & set(merge)) if isinstance(merge, dict) else []
        if misplaced:
            raise ConfigError(f"merge: {misplaced} are set once for every strategy, at the recipe's top level")
        return super().from_dict(data)

    def __post_init__(self) -> None:
        require(bool(self.seeds), "seeds must not be empty")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        require(len(self.teachers) in (0, 2), f"teachers must list two checkpoints or none, got {len(self.teachers)}")
        require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        require(len(set(self.baselines)) == len(self.baselines), f"baselines repeat: {self.baselines}")
        require(set(self.log_with) <= {"tensorboard"}, f"log_with supports 'tensorboard', got {self.log_with}")
        require(not self.stacked or (self.mixed_precision == "no" and self.compile == "no" and not self.channels_last
                                     and self.gradient_accumulation_steps == 1),
                "stacked: true trains fp32, eager, in the default memory format, without gradient accumulation")

    @property
    def metric(self) -> str:
        """The test metric: ``accuracy`` for classification, ``mse`` for regression."""
        return "accuracy" if self.task == "classification" else "mse"

    def merge_config(self, seed: int, schedule: MergeSchedule | None = None) -> MergeConfig:
        """``schedule`` (default: the recipe's ``merge``) completed with the recipe-wide settings and ``seed``."""
        return MergeConfig(
            **(schedule or self.merge).to_dict(),
            task=self.task,
            batch_size=self.batch_size,
            eval_batch_size=self.data.eval_batch_size,
            mixed_precision=self.mixed_precision,
            seed=seed,
            image_column=self.data.image_column,
            label_column=self.data.label_column,
            image_size=self.data.image_size,
            augment=self.augment,
            num_workers=self.data.num_workers,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            compile=self.compile,
            channels_last=self.channels_last,
        )


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``hf-netmerge run NAME``)."""
    folder = importlib.resources.files("hf_netmerge") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(name_or_path: str | Path) -> str:
    """The YAML of a recipe file, or of a packaged recipe by name."""
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text()
    packaged = importlib.resources.files("hf_netmerge") / "recipes" / f"{name_or_path}.yaml"
    if str(name_or_path) in available_recipes():
        return packaged.read_text()
    raise ConfigError(f"no recipe file {str(name_or_path)!r} and no packaged recipe of that name (packaged: {available_recipes()})")


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """A validated recipe from a file or a packaged name, with dotted ``key=value`` overrides applied."""
    try:
        data = yaml.safe_load(recipe_text(name_or_path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read recipe {name_or_path}: {e}") from e
    return RecipeConfig.from_dict(apply_overrides(data, list(overrides)))


def scale_recipe(recipe: RecipeConfig, factor: float) -> RecipeConfig:
    """``recipe`` with every stage's epochs times ``factor`` (at least 1), drops moved in proportion.

    The ``per_epoch`` λ schedule's growth is divided by ``factor`` so λ ends where it would after the full gate stage
    (the per-step schedules reach ``lambda_final`` at the end of any stage length by themselves).
    """
    require(factor > 0, f"the epochs scale must be > 0, got {factor}")

    def epochs(n: int) -> int:
        return max(1, round(n * factor))

    def stage(s: StageConfig) -> StageConfig:
        return s.stretched(epochs(s.epochs))

    merge = recipe.merge
    finetune = stage(merge.finetune_stage())
    merge = dataclasses.replace(merge, gate_epochs=epochs(merge.gate_epochs), finetune_epochs=finetune.epochs,
                                finetune_milestones=finetune.milestones, lambda_growth=merge.lambda_growth / factor)
    pruning = dataclasses.replace(recipe.pruning, train=stage(recipe.pruning.train), finetune=stage(recipe.pruning.finetune),
                                  prune_epochs=epochs(recipe.pruning.prune_epochs))
    return dataclasses.replace(recipe, teacher=stage(recipe.teacher), one_model=stage(recipe.one_model), extra=stage(recipe.extra),
                               merge=merge, pruning=pruning)
