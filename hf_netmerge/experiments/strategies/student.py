"""The method: two teachers, merged (concatenate, gates, compress) and fine-tuned — the paper's student."""

from __future__ import annotations

from dataclasses import dataclass

from ...api import RunOptions, merge_models
from ...config import MergeSchedule, StageConfig
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..recipe import RecipeConfig
from .base import Strategy, Trained, register_strategy


@register_strategy("student")
@dataclass(frozen=True)
class Student(Strategy):
    """Teachers (``teacher`` epochs each, or given: ``None``) merged with ``schedule``; gates and fine-tuning see the seed's
    training set, the merge's metrics its validation set."""

    teacher: StageConfig | None
    schedule: MergeSchedule
    name: str = "student"
    seed_offset = 0  # the teachers' offsets 0 and 1 (SeedContext.teachers)

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> Student:
        return cls(teacher=None if recipe.teachers else recipe.teacher, schedule=recipe.merge)

    def budget(self, cost: ModelCost) -> Budget:
        teachers = 2 * self.teacher.epochs if self.teacher is not None else 0
        s = self.schedule
        return Budget(teachers + s.gate_epochs + s.finetune_epochs,
                      cost.training_macs(teachers + s.finetune_epochs, big_epochs=s.gate_epochs))

    def train(self, ctx: SeedContext) -> Trained:
        a, b = ctx.teachers()
        checkpoints = ctx.checkpoints.sub(self.name)
        run = RunOptions(accelerator=ctx.accelerator, progress=ctx.progress, checkpoint_dir=checkpoints.root,
                         checkpoint_every=checkpoints.every)
        merged = merge_models(a, b, ctx.data.train, ctx.data.val, ctx.recipe.merge_config(ctx.seed, self.schedule), run=run)
        record = {
            "gate_stats": [s.to_dict() for s in merged.gate_stats],
            f"{self.name}_validation": {k: v.get(ctx.recipe.metric) for k, v in merged.metrics.items()},
        }
        return Trained(merged.student.eval(), merged.stages, record, merge=merged)
