"""Strategies, one file each, registered once: the student (the method) and the paper's baselines.

Adding one: a file with a :class:`Strategy` dataclass decorated with :func:`register_strategy`, imported below.
"""

from . import best_of, one_model, pruning, student  # noqa: F401  (register the strategies)
from .base import STRATEGIES, Strategy, StretchableStrategy, Trained, register_strategy, strategies_for
from .best_of import BestOf
from .one_model import OneModel
from .pruning import Pruning, TaylorMask
from .student import Student

__all__ = [
    "STRATEGIES",
    "BestOf",
    "OneModel",
    "Pruning",
    "Strategy",
    "StretchableStrategy",
    "Student",
    "TaylorMask",
    "Trained",
    "register_strategy",
    "strategies_for",
]
