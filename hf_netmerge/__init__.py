"""hf_netmerge: merge two networks of one architecture into one better network of that architecture.

Implements *Merging of Neural Networks* (Pašen & Boža, 2024) as a timm / Hugging Face plugin.
Importing the package registers its own architectures with timm.
"""

from . import models  # noqa: F401  (registers the netmerge_* architectures with timm)
from ._version import __version__
from .api import LoadOptions, MergeResult, OutputOptions, RunOptions, compress, concatenate, merge_models
from .config import MergeConfig, MergeSchedule, StageConfig
from .errors import *  # noqa: F403  (the typed errors: NetMergeError and its subclasses)
from .errors import __all__ as _error_names
from .gates import Gate, GatedModel, HardConcreteGate, add_gates, remove_gates
from .experiments.compare import Comparison, compare_models

__all__ = [
    *_error_names,
    "Comparison",
    "Gate",
    "GatedModel",
    "HardConcreteGate",
    "LoadOptions",
    "MergeConfig",
    "MergeResult",
    "MergeSchedule",
    "OutputOptions",
    "RunOptions",
    "StageConfig",
    "__version__",
    "add_gates",
    "compare_models",
    "compress",
    "concatenate",
    "merge_models",
    "remove_gates",
]
