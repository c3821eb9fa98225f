"""What the strategies of one seed share: the recipe, the seed's data, the accelerator, checkpoints, and the teachers."""

from __future__ import annotations

from dataclasses import dataclass, field

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from ..config import StageConfig
from ..data import make_loader, training_view
from ..formats import create_model
from ..training import DistillationLoss, StageJob, StageReport, Trainer, evaluate, train_sequentially
from ..training.checkpoint import CheckpointDir, StageCheckpoint
from .budget import ModelCost
from .protocol import SeedData, derive_seed
from .recipe import RecipeConfig

TEACHER_OFFSETS = (0, 1)
VALIDATION_BATCH_SIZE = 1024


def lower_is_better(task: str, metrics: dict[str, float]) -> float:
    """A validation score to minimize: MSE for regression, minus accuracy for classification."""
    return metrics["mse"] if task == "regression" else -metrics["accuracy"]


@dataclass
class SeedContext:
    """One seed of an experiment. Strategies create and train networks only through it, so every strategy of a
    seed uses the same data, precision, schedule machinery and checkpoint layout.

    ``teachers()`` trains the two teachers once per seed (or returns the recipe's given ones), for every
    strategy that starts from them. Every stage goes through ``trainer`` (one after another by default; a
    :class:`~hf_netmerge.training.StackingTrainer` stacks the stages of many seeds), and the networks a strategy
    trains independently (the teachers, bo3's members) are handed over together (:meth:`train_all`).
    """

    recipe: RecipeConfig
    seed: int
    data: SeedData
    accelerator: Accelerator
    checkpoints: CheckpointDir = field(default_factory=lambda: CheckpointDir(None))
    progress: bool = True
    given_teachers: list[nn.Module] = field(default_factory=list)
    trainer: Trainer = train_sequentially
    _teachers: list[nn.Module] | None = field(default=None, init=False, repr=False)
    _cost: ModelCost | None = field(default=None, init=False, repr=False)

    def label(self, what: str) -> str:
        """A stage name for progress bars and trackers: ``seed <N> <what>``."""
        return f"seed {self.seed} {what}"

    def create(self, seed: int) -> nn.Module:
        """A fresh network of the recipe's architecture (``create_model(architecture, model_args)``) initialised from ``seed``."""
        set_seed(seed)
        return create_model(self.recipe.architecture, self.recipe.model_args)

    def job(
        self,
        model: nn.Module,
        stage: StageConfig,
        *,
        seed: int,
        name: str,
        checkpoint: StageCheckpoint | None = None,
        distillation: DistillationLoss | None = None,
    ) -> StageJob:
        """One stage of ``model`` on the training set (through the recipe's train-time augmentation, drawn from
        ``seed``), shuffled from ``seed``; with ``distillation``, against its teacher too."""
        train = training_view(self.data.train, self.recipe.augment, seed)
        loader = make_loader(train, self.recipe.batch_size, shuffle=True, seed=seed, num_workers=self.recipe.data.num_workers)
        return StageJob(model, loader, stage, task=self.recipe.task, accelerator=self.accelerator, name=name, distillation=distillation,
                        checkpoint=checkpoint, compile_mode=self.recipe.compile, channels_last=self.recipe.channels_last,
                        progress=self.progress)

    def train_all(self, jobs: list[StageJob]) -> list[StageReport]:
        """Train independent jobs (made by :meth:`job`) through the context's trainer; their reports in order."""
        return self.trainer(jobs)

    def train(
        self,
        model: nn.Module,
        stage: StageConfig,
        *,
        seed: int,
        name: str,
        checkpoint: StageCheckpoint | None = None,
        distillation: DistillationLoss | None = None,
    ) -> StageReport:
        """One network's stage (see :meth:`job`), trained by :meth:`train_all`."""
        return self.train_all([self.job(model, stage, seed=seed, name=name, checkpoint=checkpoint, distillation=distillation)])[0]

    @property
    def teachers_trained(self) -> bool:
        """Whether ``teachers()`` has been asked for (and so the teachers exist for this seed)."""
        return self._teachers is not None

    def teachers(self) -> list[nn.Module]:
        """The two teachers (eval mode): the recipe's given checkpoints, or trained here once, from derived seeds."""
        if self._teachers is None:
            self._teachers = list(self.given_teachers) or self._train_teachers()
        return self._teachers

    def _train_teachers(self) -> list[nn.Module]:
        seeds = [derive_seed(self.seed, offset) for offset in TEACHER_OFFSETS]
        models = [self.create(seed) for seed in seeds]
        self.train_all([self.job(model, self.recipe.teacher, seed=seed, name=self.label(f"teacher {ab}"),
                                 checkpoint=self.checkpoints(f"teacher_{ab}")) for model, seed, ab in zip(models, seeds, "ab")])
        return [model.eval() for model in models]

    def validate(self, model: nn.Module) -> dict[str, float]:
        """``model``'s metrics on the validation set (the only data a strategy may choose on)."""
        loader = make_loader(self.data.val, VALIDATION_BATCH_SIZE, shuffle=False)
        return evaluate(model, loader, task=self.recipe.task, accelerator=self.accelerator)

    def pick(self, candidates: list[nn.Module]) -> tuple[int, list[float]]:
        """The index of the best of ``candidates`` on the validation set (the first on ties), and each one's metric."""
        metrics = [self.validate(model) for model in candidates]
        best = min(range(len(candidates)), key=lambda i: lower_is_better(self.recipe.task, metrics[i]))
        return best, [m[self.recipe.metric] for m in metrics]

    def cost(self) -> ModelCost:
        """Multiply-adds per example of one network and of the big student, and the training-set size (measured once)."""
        if self._cost is None:
            self._cost = ModelCost.measure(self.recipe, self.data)
        return self._cost
