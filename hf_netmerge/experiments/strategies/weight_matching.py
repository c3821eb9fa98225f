"""Align and average: teacher B permuted onto teacher A by weight matching, the two averaged, BatchNorm statistics
recomputed on the training set, then fine-tuned for the extra epochs (Git Re-Basin, Ainsworth et al. 2023)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ...adapters import resolve_spec
from ...config import StageConfig
from ...data import make_loader
from ...matching import match_weights, permute
from ...training import recalibrate_norms
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import RecipeConfig
from .base import Strategy, Trained, register_strategy, teacher_epochs


@register_strategy("weight_matching")
@dataclass(frozen=True)
class WeightMatching(Strategy):
    """The teachers aligned channel group by channel group (residual streams share one permutation, from the same
    :class:`~hf_netmerge.spec.MergeSpec` the merge uses), averaged, recalibrated, and trained for ``stage``."""

    stage: StageConfig
    teacher_epochs: int
    name: str = "weight_matching"
    seed_offset = 60

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> WeightMatching:
        return cls(stage=recipe.extra, teacher_epochs=teacher_epochs(recipe))

    def budget(self, cost: ModelCost) -> Budget:
        """Fine-tuning, plus one forward pass over the training set for the BatchNorm statistics."""
        epochs = self.teacher_epochs + self.stage.epochs
        return Budget(epochs, cost.training_macs(epochs) + cost.inference_macs(1))

    def train(self, ctx: SeedContext) -> Trained:
        a, b = ctx.teachers()
        spec = resolve_spec(a)
        seed = derive_seed(ctx.seed, self.seed_offset)
        aligned = permute(b, match_weights(a, b, spec, seed=seed), spec)
        model = copy.deepcopy(a)
        averaged = {k: (va + vb) / 2 if va.is_floating_point() else va for (k, va), vb in
                    zip(a.state_dict().items(), aligned.state_dict().values())}
        model.load_state_dict(averaged, strict=True)
        recalibrate_norms(model, make_loader(ctx.data.train, ctx.recipe.batch_size, shuffle=False), ctx.accelerator)
        before = ctx.validate(model.eval())[ctx.recipe.metric]
        report = ctx.train(model, self.stage, seed=seed, name=ctx.label(self.name), checkpoint=ctx.checkpoints.sub(self.name)("model"))
        return Trained(model.eval(), [report], {f"{self.name}_validation_before_finetune": before})
