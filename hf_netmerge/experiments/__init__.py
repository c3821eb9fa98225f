"""Above the pipeline: experiments that compare the merged student with the alternatives at the same budget.

- :mod:`.recipe`: :class:`RecipeConfig` and friends, :func:`load_recipe` (a file or a packaged name), :func:`scale_recipe`
- :mod:`.protocol`: each seed's splits (:func:`load_seed_data`) and :func:`derive_seed`, defined once
- :mod:`.strategies`: the student and the baselines, registered once, each with its budget
- :mod:`.budget`: epochs and multiply-adds
- :mod:`.run`: :func:`run_seed` (every strategy of one seed), :func:`run_seeds` (many, optionally stacked) and
  :func:`run_recipe` (``hf-netmerge run``)
- :mod:`.observers`: timings, budgets, curves, saved students, trackers — they never change training
- :mod:`.report`: statistics and tables; :mod:`.demo`: ``hf-netmerge demo``
"""

from .budget import Budget, ModelCost, forward_macs
from .context import SeedContext
from .observers import Budgets, Curves, Observer, Printer, SaveNetworks, Timer, TrackTestScores, ValidationScores
from .protocol import SeedData, derive_seed, load_seed_data, probe_model
from .recipe import DataConfig, PruningConfig, RecipeConfig, available_recipes, load_recipe, scale_recipe
from .run import SeedResult, run_recipe, run_seed, run_seeds
from .strategies import STRATEGIES, BestOf, OneModel, Pruning, Strategy, StretchableStrategy, Student, Trained, register_strategy

__all__ = [
    "STRATEGIES",
    "BestOf",
    "Budget",
    "Budgets",
    "Curves",
    "DataConfig",
    "ModelCost",
    "Observer",
    "OneModel",
    "Printer",
    "Pruning",
    "PruningConfig",
    "RecipeConfig",
    "SaveNetworks",
    "SeedContext",
    "SeedData",
    "SeedResult",
    "Strategy",
    "StretchableStrategy",
    "Student",
    "Timer",
    "TrackTestScores",
    "Trained",
    "ValidationScores",
    "available_recipes",
    "derive_seed",
    "forward_macs",
    "load_recipe",
    "load_seed_data",
    "probe_model",
    "register_strategy",
    "run_recipe",
    "run_seed",
    "run_seeds",
    "scale_recipe",
]
