"""Strategies, one file each, registered once: the student (the method) and the paper's baselines.

Adding one: a file with a :class:`Strategy` dataclass decorated with :func:`register_strategy`, imported below.
"""

from . import best_of, continue_training, distill, ensemble, one_model, pruning, student, student_distill, weight_matching  # noqa: F401
from .base import STRATEGIES, Strategy, StretchableStrategy, Trained, register_strategy, strategies_for
from .best_of import BestOf
from .continue_training import ContinueTraining
from .distill import Distill
from .ensemble import Ensemble
from .one_model import OneModel
from .pruning import Pruning, TaylorMask
from .student import Student
from .student_distill import StudentDistill
from .weight_matching import WeightMatching

__all__ = [
    "STRATEGIES",
    "BestOf",
    "ContinueTraining",
    "Distill",
    "Ensemble",
    "OneModel",
    "Pruning",
    "Strategy",
    "StretchableStrategy",
    "Student",
    "StudentDistill",
    "TaylorMask",
    "Trained",
    "WeightMatching",
    "register_strategy",
    "strategies_for",
]
