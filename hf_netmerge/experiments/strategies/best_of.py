"""Best of k (the paper's bo3): k networks from different seeds, the best on the validation set kept."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import StageConfig
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import RecipeConfig
from .base import StretchableStrategy, Trained, register_strategy


@register_strategy("bo3")
@dataclass(frozen=True)
class BestOf(StretchableStrategy):
    """``k`` networks, each trained for ``stage`` (the teachers' schedule by default); the best on validation is kept."""

    stage: StageConfig
    k: int = 3
    name: str = "bo3"
    seed_offset = 10

    @property
    def networks(self) -> int:  # type: ignore[override]
        return self.k

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> BestOf:
        return cls(stage=recipe.teacher)

    def train(self, ctx: SeedContext) -> Trained:
        checkpoints = ctx.checkpoints.sub(self.name)
        seeds = [derive_seed(ctx.seed, self.seed_offset) + i for i in range(self.k)]
        members = [ctx.create(seed) for seed in seeds]
        jobs = [ctx.job(model, self.stage, seed=seed, name=ctx.label(f"{self.name}[{i}]"), checkpoint=checkpoints(f"member{i}"))
                for i, (model, seed) in enumerate(zip(members, seeds))]
        reports = ctx.train_all(jobs)  # independent: a stacked run trains them as one model
        members = [model.eval() for model in members]
        best, validation = ctx.pick(members)
        return Trained(members[best], reports, {f"{self.name}_validation": validation})
