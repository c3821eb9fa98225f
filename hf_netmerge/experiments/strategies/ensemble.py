"""The teachers' ensemble: no training beyond the teachers, at twice the inference cost — the reference line."""

from __future__ import annotations

from dataclasses import dataclass

from ...training import MeanEnsemble
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..recipe import RecipeConfig
from .base import Strategy, Trained, register_strategy, teacher_epochs


@register_strategy("ensemble")
@dataclass(frozen=True)
class Ensemble(Strategy):
    """The mean of the two teachers' outputs (two networks at inference)."""

    teacher_epochs: int
    name: str = "ensemble"
    seed_offset = 80  # draws nothing

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> Ensemble:
        return cls(teacher_epochs=teacher_epochs(recipe))

    def budget(self, cost: ModelCost) -> Budget:
        return Budget(self.teacher_epochs, cost.training_macs(self.teacher_epochs))

    def train(self, ctx: SeedContext) -> Trained:
        return Trained(MeanEnsemble(*ctx.teachers()).eval(), [], {"ensemble_inference_networks": 2})
