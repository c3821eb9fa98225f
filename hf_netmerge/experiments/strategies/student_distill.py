"""The method with distillation: the merged student fine-tuned against the teachers' ensemble too.

Merging gives the initialization, distillation the targets. Every (temperature, alpha) setting reuses the
student's seed, so its gate stage is the student's and only the fine-tuning differs; the best setting on
the validation set is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..recipe import RecipeConfig
from .base import Trained, register_strategy
from .student import Student


@register_strategy("student_distill")
@dataclass(frozen=True)
class StudentDistill(Student):
    """:class:`Student` whose fine-tuning adds the distillation loss, for each of ``settings`` (temperature, alpha)."""

    settings: tuple[tuple[float, float], ...] = ((4.0, 0.9),)
    name: str = "student_distill"
    seed_offset = 70

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> StudentDistill:
        return cls(teacher=None if recipe.teachers else recipe.teacher, schedule=recipe.merge, settings=tuple(recipe.distill.settings()))

    def _schedules(self) -> list:
        return [dataclasses.replace(self.schedule, distill_temperature=t, distill_alpha=a) for t, a in self.settings]

    def budget(self, cost: ModelCost) -> Budget:
        budgets = [self._budget(cost, schedule) for schedule in self._schedules()]
        teachers = 2 * self.teacher.epochs if self.teacher is not None else 0
        teacher_macs = cost.training_macs(teachers)
        return Budget(teachers + sum(b.epochs - teachers for b in budgets), teacher_macs + sum(b.macs - teacher_macs for b in budgets))

    def train(self, ctx: SeedContext) -> Trained:
        checkpoints = ctx.checkpoints.sub(self.name)
        merges = [self._merge(ctx, schedule, checkpoints.sub(f"setting{i}")) for i, schedule in enumerate(self._schedules())]
        best, validation = ctx.pick([m.student for m in merges])
        return self._trained(ctx, merges[best], **{f"{self.name}_settings_validation": validation,
                                                   f"{self.name}_setting": list(self.settings[best])})
