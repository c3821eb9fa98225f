"""Knowledge distillation from the teachers' ensemble into the better teacher (or a fresh network)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ...config import StageConfig
from ...training import DistillationLoss, MeanEnsemble
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import RecipeConfig
from .base import Strategy, Trained, register_strategy, teacher_epochs


@register_strategy("distill")
@dataclass(frozen=True)
class Distill(Strategy):
    """For each (temperature, alpha) of ``settings``, a network trained for ``stage`` (the recipe's ``extra``) against
    the teachers' ensemble's outputs on the same augmented batches (Hinton et al. 2015); the best on validation is kept.
    It starts from a copy of the better teacher (``into="teacher"``) or from scratch (``"fresh"``)."""

    stage: StageConfig
    settings: tuple[tuple[float, float], ...]
    into: str
    teacher_epochs: int
    name: str = "distill"
    seed_offset = 50

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> Distill:
        return cls(recipe.extra, tuple(recipe.distill.settings()), recipe.distill.into, teacher_epochs(recipe))

    def budget(self, cost: ModelCost) -> Budget:
        """Every setting's training, plus the ensemble's two forward passes per example and epoch."""
        extra = self.stage.epochs * len(self.settings)
        return Budget(self.teacher_epochs + extra, cost.training_macs(self.teacher_epochs + extra) + cost.inference_macs(2 * extra))

    def train(self, ctx: SeedContext) -> Trained:
        teachers = ctx.teachers()
        start = ctx.pick(teachers)[0] if self.into == "teacher" else None
        ensemble, seed = MeanEnsemble(*teachers), derive_seed(ctx.seed, self.seed_offset)
        checkpoints = ctx.checkpoints.sub(self.name)
        models, reports = [], []
        for i, (temperature, alpha) in enumerate(self.settings):
            model = copy.deepcopy(teachers[start]) if start is not None else ctx.create(seed)
            loss = DistillationLoss(ensemble, ctx.recipe.task, temperature, alpha)
            reports.append(ctx.train(model, self.stage, seed=seed, name=ctx.label(f"{self.name} T={temperature} α={alpha}"),
                                     checkpoint=checkpoints(f"setting{i}"), distillation=loss))
            models.append(model.eval())
        best, validation = ctx.pick(models)
        return Trained(models[best], reports, {f"{self.name}_validation": validation, f"{self.name}_setting": list(self.settings[best])})
