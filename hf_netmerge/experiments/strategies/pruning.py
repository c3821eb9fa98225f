"""The paper's channel-pruning baseline: a double-width network trained, pruned to half by Taylor importance, fine-tuned.

The double-width network is the concatenation of two fresh networks (so it compresses back to the
architecture exactly, through the public :func:`~hf_netmerge.concatenate` / :func:`~hf_netmerge.compress`);
its gates are :class:`TaylorMask` s, fixed 0/1 masks that implement the :class:`~hf_netmerge.gates.Gate` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...api import compress, concatenate
from ...config import StageConfig
from ...gates import add_gates
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..protocol import derive_seed
from ..recipe import PruningConfig, RecipeConfig
from .base import Strategy, Trained, register_strategy


class TaylorMask(nn.Module):
    """A fixed 0/1 channel mask that measures first-order Taylor importance (Molchanov et al. 2019).

    Each backward adds, per channel and gate site, ``(Σ_batch,space activation·gradient)²``, the squared
    derivative of the loss w.r.t. a multiplicative gate at 1. :meth:`prune` closes the least important open channels.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mask", torch.ones(size))
        self.register_buffer("importance", torch.zeros(size))

    def clear_sample(self) -> None:
        """Masks draw no noise."""

    def prob_open(self) -> torch.Tensor:
        """A mask is open with certainty where it is 1."""
        return self.mask

    def eval_value(self) -> torch.Tensor:
        """The mask itself."""
        return self.mask

    def scores(self) -> torch.Tensor:
        """Open channels first (then by importance): compression keeps exactly the open ones when half are open."""
        return self.mask * (1.0 + self.importance.max()) + self.importance

    def value(self, batch: int) -> torch.Tensor:
        """The ``(1, size)`` mask; in training, a fresh leaf whose gradient (the loss's derivative w.r.t. a gate at 1,
        summed over the batch and space) is squared into ``importance`` for the open channels."""
        mask = self.mask.unsqueeze(0)
        if not (self.training and torch.is_grad_enabled()):
            return mask
        probe = mask.clone().requires_grad_(True)

        def accumulate(grad: torch.Tensor) -> None:
            self.importance.add_((grad[0].float() * self.mask) ** 2)

        probe.register_hook(accumulate)
        return probe

    def prune(self, count: int) -> None:
        """Close the ``count`` open channels of lowest importance (ties by index) and reset the importance."""
        open_index = torch.nonzero(self.mask, as_tuple=True)[0]
        order = torch.argsort(self.importance[open_index], stable=True)[:count]
        self.mask[open_index[order]] = 0.0
        self.importance.zero_()


@register_strategy("pruning")
@dataclass(frozen=True)
class Pruning(Strategy):
    """Train at double width for ``config.train``, prune to half over ``config.prune_epochs``, fine-tune for ``config.finetune``."""

    config: PruningConfig
    name: str = "pruning"
    seed_offset = 30

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig) -> Pruning:
        return cls(config=recipe.pruning)

    def budget(self, cost: ModelCost) -> Budget:
        """An upper bound: the network's width shrinks while it is pruned, but every pruning epoch is counted at double width."""
        cfg = self.config
        big = cfg.train.epochs + cfg.prune_epochs
        return Budget(big + cfg.finetune.epochs, cost.training_macs(cfg.finetune.epochs, big_epochs=big))

    def train(self, ctx: SeedContext) -> Trained:
        cfg, seed = self.config, derive_seed(ctx.seed, self.seed_offset)
        checkpoint = ctx.checkpoints.sub(self.name)
        wide = add_gates(concatenate(ctx.create(seed), ctx.create(seed + 1)), make_gate=TaylorMask)
        reports = [ctx.train(wide, cfg.train, seed=seed, name=ctx.label(f"{self.name} wide"), checkpoint=checkpoint("wide"))]
        prune_stage = StageConfig(epochs=1, lr=cfg.prune_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
        for step in range(cfg.prune_epochs):
            stage_name = f"prune{step}"
            reports.append(ctx.train(wide, prune_stage, seed=seed + 2 + step, name=ctx.label(f"{self.name} {stage_name}"),
                                     checkpoint=checkpoint(stage_name)))
            for group in (g for g in wide.spec.groups if not g.tied):  # a tied group shares its owner's gate
                gate = wide.gates[group.name]
                gate.importance.copy_(ctx.accelerator.reduce(gate.importance, "sum"))  # every process prunes the same channels
                target_closed = round(group.size // group.unit * (step + 1) / cfg.prune_epochs)
                gate.prune(target_closed - int((gate.mask == 0).sum()))
        student = compress(wide)
        reports.append(ctx.train(student, cfg.finetune, seed=seed + 1, name=ctx.label(f"{self.name} finetune"),
                                 checkpoint=checkpoint("finetune")))
        return Trained(student.eval(), reports)
