"""Keep training: the better teacher (picked on validation) trained for the extra epochs with a fresh schedule."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ...config import StageConfig
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import RecipeConfig
from .base import Strategy, Trained, register_strategy, teacher_epochs


@register_strategy("continue")
@dataclass(frozen=True)
class ContinueTraining(Strategy):
    """A copy of the better teacher on the validation set, trained for ``stage`` (the recipe's ``extra``)."""

    stage: StageConfig
    teacher_epochs: int
    name: str = "continue"
    seed_offset = 40

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> ContinueTraining:
        return cls(stage=recipe.extra, teacher_epochs=teacher_epochs(recipe))

    def budget(self, cost: ModelCost) -> Budget:
        epochs = self.teacher_epochs + self.stage.epochs
        return Budget(epochs, cost.training_macs(epochs))

    def train(self, ctx: SeedContext) -> Trained:
        teachers = ctx.teachers()
        best, validation = ctx.pick(teachers)
        model = copy.deepcopy(teachers[best])
        report = ctx.train(model, self.stage, seed=derive_seed(ctx.seed, self.seed_offset), name=ctx.label(self.name),
                           checkpoint=ctx.checkpoints.sub(self.name)("model"))
        return Trained(model.eval(), [report], {f"{self.name}_teachers_validation": validation, f"{self.name}_from": "ab"[best]})
