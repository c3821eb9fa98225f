"""Best of k (the paper's bo3): k networks from different seeds, the best on the validation set kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...config import StageConfig
from ...data import make_loader
from ...training import evaluate
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import RecipeConfig
from .base import StretchableStrategy, Trained, register_strategy

SELECTION_BATCH_SIZE = 1024


def score(task: str, metrics: dict[str, float]) -> float:
    """Lower is better: MSE for regression, minus accuracy for classification."""
    return metrics["mse"] if task == "regression" else -metrics["accuracy"]


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
        val_loader = make_loader(ctx.data.val, SELECTION_BATCH_SIZE, shuffle=False)
        checkpoints = ctx.checkpoints.sub(self.name)
        best, best_score, reports, validation = None, math.inf, [], []
        for i in range(self.k):
            seed = derive_seed(ctx.seed, self.seed_offset) + i
            model = ctx.create(seed)
            reports.append(ctx.train(model, self.stage, seed=seed, name=ctx.label(f"{self.name}[{i}]"), checkpoint=checkpoints(f"member{i}")))
            metrics = evaluate(model.eval(), val_loader, task=ctx.recipe.task, accelerator=ctx.accelerator)
            validation.append(metrics[ctx.recipe.metric])
            if best is None or score(ctx.recipe.task, metrics) < best_score:
                best, best_score = model, score(ctx.recipe.task, metrics)
        return Trained(best, reports, {f"{self.name}_validation": validation})
