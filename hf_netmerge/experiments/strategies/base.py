"""The strategy interface and its registry: a strategy turns one seed's context into a trained network."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import nn

from ...api import MergeResult
from ...config import StageConfig
from ...errors import ConfigError
from ...training import StageReport
from ..budget import Budget, ModelCost
from ..context import SeedContext
from ..recipe import RecipeConfig


@dataclass
class Trained:
    """A strategy's network with its stage reports; ``record`` holds what goes into the seed's result row
    (validation scores, gate statistics); ``merge`` the full merge result where the strategy merged."""

    model: nn.Module
    reports: list[StageReport]
    record: dict[str, Any] = field(default_factory=dict)
    merge: MergeResult | None = None


class Strategy(ABC):
    """One way to spend a seed's budget. Subclasses are dataclasses registered with :func:`register_strategy`.

    ``seed_offset`` is the first of the offsets (:func:`~hf_netmerge.experiments.protocol.derive_seed`)
    its networks are initialised and shuffled from, distinct per registered strategy (a strategy of k
    networks uses the next k − 1 too, so offsets lie 10 apart); ``name`` is its column in results.
    """

    seed_offset: ClassVar[int]
    name: str

    @classmethod
    @abstractmethod
    def from_recipe(cls, recipe: RecipeConfig) -> Strategy:
        """The strategy with the recipe's budget."""

    @abstractmethod
    def budget(self, cost: ModelCost) -> Budget:
        """Epochs and training multiply-adds this strategy spends."""

    @abstractmethod
    def train(self, ctx: SeedContext) -> Trained:
        """Train on ``ctx``'s training set (choices on its validation set only); the network comes back in eval mode."""


class StretchableStrategy(Strategy):
    """A strategy of ``networks`` single-width networks, each trained for ``stage``: its budget can be set in compute."""

    networks: ClassVar[int]
    stage: StageConfig

    def budget(self, cost: ModelCost) -> Budget:
        epochs = self.networks * self.stage.epochs
        return Budget(epochs, cost.training_macs(epochs))

    def at_compute(self, macs: int, cost: ModelCost) -> StretchableStrategy:
        """This strategy given ``macs`` training multiply-adds: more (or fewer) epochs, drops moved in proportion."""
        epochs = max(1, cost.network_epochs(macs, self.networks))
        return dataclasses.replace(self, name=f"{self.name}_equal_compute", stage=self.stage.stretched(epochs))


def teacher_epochs(recipe: RecipeConfig) -> int:
    """Epochs a seed spends training its two teachers (none when the recipe gives them): counted in the budget of
    every strategy that starts from them."""
    return 0 if recipe.teachers else 2 * recipe.teacher.epochs


S = TypeVar("S", bound=type[Strategy])
STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(kind: str) -> Callable[[S], S]:
    """Class decorator: make a strategy available to recipes under ``kind``."""

    def register(cls: S) -> S:
        if kind in STRATEGIES:
            raise ValueError(f"strategy {kind!r} is already registered")
        taken = {other.seed_offset: name for name, other in STRATEGIES.items()}
        if cls.seed_offset in taken:
            raise ValueError(f"strategy {kind!r}: seed_offset {cls.seed_offset} is already {taken[cls.seed_offset]!r}'s")
        STRATEGIES[kind] = cls
        return cls

    return register


def strategies_for(recipe: RecipeConfig) -> list[Strategy]:
    """The recipe's strategies: the student, then each of ``baselines``."""
    names = ["student", *recipe.baselines]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategies {unknown}; registered: {sorted(STRATEGIES)}")
    return [STRATEGIES[n].from_recipe(recipe) for n in names]
