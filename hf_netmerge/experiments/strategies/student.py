"""The method: two teachers, merged (concatenate, gates, compress) and fine-tuned — the paper's student."""

from __future__ import annotations

from dataclasses import dataclass

from ...api import MergeResult, RunOptions, merge_models
from ...config import MergeSchedule, StageConfig
from ...training.checkpoint import CheckpointDir
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
        return self._budget(cost, self.schedule)

    def _budget(self, cost: ModelCost, schedule: MergeSchedule) -> Budget:
        teachers = 2 * self.teacher.epochs if self.teacher is not None else 0
        distilled = schedule.finetune_epochs if schedule.distill_alpha > 0 else 0  # the ensemble's two passes per example
        return Budget(teachers + schedule.gate_epochs + schedule.finetune_epochs,
                      cost.training_macs(teachers + schedule.finetune_epochs, big_epochs=schedule.gate_epochs)
                      + cost.inference_macs(2 * distilled))

    def _merge(self, ctx: SeedContext, schedule: MergeSchedule, checkpoints: CheckpointDir) -> MergeResult:
        a, b = ctx.teachers()
        run = RunOptions(accelerator=ctx.accelerator, progress=ctx.progress, checkpoint_dir=checkpoints.root,
                         checkpoint_every=checkpoints.every, stage_prefix=ctx.label(f"{self.name} "),
                         trainer=ctx.trainer)
        return merge_models(a, b, ctx.data.train, ctx.data.val, ctx.recipe.merge_config(ctx.seed, schedule), run=run)

    def _trained(self, ctx: SeedContext, merged: MergeResult, **record: object) -> Trained:
        record = {"gate_stats": [s.to_dict() for s in merged.gate_stats],
                  f"{self.name}_validation": {k: v.get(ctx.recipe.metric) for k, v in merged.metrics.items()},
                  f"{self.name}_undecided_gates": merged.undecided_gates, **record}
        return Trained(merged.student.eval(), merged.stages, record, merge=merged)

    def train(self, ctx: SeedContext) -> Trained:
        return self._trained(ctx, self._merge(ctx, self.schedule, ctx.checkpoints.sub(self.name)))
