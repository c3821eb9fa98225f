"""What a strategy costs: epochs and training multiply-adds, and the stretch that gives a baseline the student's compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..api import concatenate
from ..formats import create_model
from .protocol import SeedData
from .recipe import RecipeConfig

# A training step costs about three forward passes (forward, and backward through activations and weights).
TRAINING_OVER_FORWARD = 3


def forward_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one forward pass per example, counted on every Linear and Conv2d."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.in_features if isinstance(module, nn.Linear) else (
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1])
        total += output.numel() // output.shape[0] * per_output

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


@dataclass(frozen=True)
class ModelCost:
    """Per-example forward multiply-adds of one network and of the double-width big student, and the training-set size."""

    examples: int
    network_macs: int
    big_macs: int

    @classmethod
    def measure(cls, recipe: RecipeConfig, data: SeedData) -> ModelCost:
        """Count on fresh models of the recipe's architecture with one training example (global RNG left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            a, b = (create_model(recipe.architecture, recipe.model_args) for _ in range(2))
        example = data.train[0][0].unsqueeze(0).cpu()  # the fresh models are on the CPU, the data may be on a GPU
        return cls(len(data.train), forward_macs(a, example), forward_macs(concatenate(a, b), example))

    def training_macs(self, network_epochs: float, big_epochs: float = 0) -> int:
        """Training multiply-adds of ``network_epochs`` epochs of single-width and ``big_epochs`` of double-width training."""
        return TRAINING_OVER_FORWARD * self.examples * round(network_epochs * self.network_macs + big_epochs * self.big_macs)

    def inference_macs(self, network_passes: float) -> int:
        """Multiply-adds of ``network_passes`` forward-only passes of one network over the training set (teachers'
        targets for distillation, a statistics pass)."""
        return self.examples * round(network_passes * self.network_macs)

    def network_epochs(self, macs: int, networks: int = 1) -> int:
        """Epochs per network that ``macs`` training multiply-adds buy for ``networks`` single-width networks (rounded)."""
        return round(macs / (TRAINING_OVER_FORWARD * self.examples * self.network_macs * networks))


@dataclass(frozen=True)
class Budget:
    """A strategy's training budget: epochs over the training set (summed over every network it trains) and multiply-adds."""

    epochs: int
    macs: int
