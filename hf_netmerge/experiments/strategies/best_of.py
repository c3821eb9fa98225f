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
        members, reports = [], []
        for i in range(self.k):
            seed = derive_seed(ctx.seed, self.seed_offset) + i
            model = ctx.create(seed)
            reports.append(ctx.train(model, self.stage, seed=seed, name=ctx.label(f"{self.name}[{i}]"), checkpoint=checkpoints(f"member{i}")))
            members.append(model.eval())
        best, validation = ctx.pick(members)
        return Trained(members[best], reports, {f"{self.name}_validation": validation})
