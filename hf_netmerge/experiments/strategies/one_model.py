"""One model: a single network trained for the whole budget."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import StageConfig
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import RecipeConfig
from .base import StretchableStrategy, Trained, register_strategy


@register_strategy("one_model")
@dataclass(frozen=True)
class OneModel(StretchableStrategy):
    """One network trained for ``stage`` (the recipe's ``one_model`` schedule)."""

    stage: StageConfig
    name: str = "one_model"
    seed_offset = 20
    networks = 1

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> OneModel:
        return cls(stage=recipe.one_model)

    def train(self, ctx: SeedContext) -> Trained:
        seed = derive_seed(ctx.seed, self.seed_offset)
        model = ctx.create(seed)
        report = ctx.train(model, self.stage, seed=seed, name=ctx.label(self.name.replace("_", " ")),
                           checkpoint=ctx.checkpoints.sub(self.name)("model"))
        return Trained(model.eval(), [report])
