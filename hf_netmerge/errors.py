"""The project's typed errors: one base class, one subclass per kind of refused input.

Every error is raised before any optimizer step where the input can be checked up front, so a
caller can catch :class:`NetMergeError` and know that nothing was trained or written.
"""

from __future__ import annotations


class NetMergeError(Exception):
    """Base class of every error hf_netmerge raises on purpose."""


class ConfigError(NetMergeError, ValueError):
    """A config or recipe has an unknown key, a value of the wrong type, or an impossible value."""


class TeacherMismatchError(NetMergeError, ValueError):
    """The two teachers differ in architecture, classes, parameter names, shapes or dtypes."""


class NonFiniteWeightsError(NetMergeError, ValueError):
    """A teacher holds NaN or Inf weights."""


class UnsupportedModelError(NetMergeError, TypeError):
    """The model (or one of its layers) cannot be merged exactly; the message names the module."""


class DatasetError(NetMergeError, ValueError):
    """The training or evaluation data cannot be used (empty, too small, missing columns, bad labels)."""


class CheckpointError(NetMergeError, ValueError):
    """A checkpoint cannot be read safely (unknown format, pickle refused, missing files)."""


class OutputExistsError(NetMergeError, FileExistsError):
    """The output directory already exists and overwriting was not asked for."""


class NonFiniteLossError(NetMergeError, FloatingPointError):
    """The training loss became NaN or Inf; the message names the stage and epoch."""
