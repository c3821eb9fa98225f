"""The project's typed errors: one base class, one subclass per kind of refused input.

Every error is raised before any optimizer step where the input can be checked up front, so a
caller can catch :class:`NetMergeError` and know that nothing was trained or written.
"""

from __future__ import annotations

from pathlib import Path


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


# Teachers that do not match: one class per way they can differ.
class ArchitectureMismatchError(TeacherMismatchError):
    """The teachers are different architectures (or classes); merge two networks of one architecture."""


class NumClassesMismatchError(TeacherMismatchError):
    """The teachers have different numbers of classes; both heads must predict the same classes."""


class KeyMismatchError(TeacherMismatchError):
    """The teachers' state dicts have different tensor names (missing or unexpected keys)."""


class ShapeMismatchError(TeacherMismatchError):
    """A tensor has different shapes in the two teachers (different widths or model_args)."""


class DtypeMismatchError(TeacherMismatchError):
    """A tensor has different dtypes in the two teachers; cast both to one dtype first."""


# Checkpoint files that cannot be read safely.
class EmptyFileError(CheckpointError):
    """The weights file is empty."""


class TruncatedFileError(CheckpointError):
    """The weights file ends before the data its header announces."""


class CorruptHeaderError(CheckpointError):
    """The safetensors header is not valid JSON describing tensors."""


class OverlappingTensorsError(CorruptHeaderError):
    """Two tensors of the safetensors header claim overlapping bytes."""


class OversizedHeaderError(CheckpointError):
    """The safetensors header claims to be larger than allowed (100 MB) or than the file."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not fit the model its own config (or the run resuming it) builds: missing or
    unexpected tensors, other shapes or dtypes. Unlike :class:`TeacherMismatchError`, the file itself is inconsistent."""


class PickleRefusedError(CheckpointError):
    """A pickle checkpoint was found and pickles are refused (they can run code); pass allow_pickle=True to load it
    with ``torch.load(weights_only=True)``."""


class FormatMismatchError(CheckpointError):
    """The file's extension names another format than its first bytes show."""


class RepoNotFoundError(CheckpointError):
    """The Hub repository does not exist (or is private and the token cannot see it)."""


class RevisionNotFoundError(CheckpointError):
    """The Hub repository has no such branch, tag or commit."""


class RemoteFileNotFoundError(CheckpointError):
    """The Hub repository lacks config.json or model.safetensors at that revision."""


class OfflineNotCachedError(CheckpointError):
    """Offline mode is on and the reference is not in the local Hub cache."""


class UnreachableReferenceError(CheckpointError):
    """No local file or directory has that name, and the Hub cannot be reached now nor has it cached."""


class NotAStudentError(CheckpointError):
    """A directory to publish is not a saved student (config.json, model.safetensors, netmerge_config.json, README.md)."""


class CheckpointDirInUseError(CheckpointError):
    """The checkpoint directory holds the checkpoints of another merge (other teachers, data size or configuration):
    resuming from them would mix two runs. Choose another directory or delete that one."""


class HubPushError(NetMergeError, OSError):
    """Publishing to the Hub failed (the HTTP status and repo are named); nothing was committed, the local files are intact."""


class HubUnreachableError(HubPushError):
    """The Hub could not be reached while publishing (no route, timeout, TLS, proxy); the endpoint and repo are named,
    nothing was committed, the local files are intact."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) while a training stage ran. Not a :class:`NetMergeError`: it stays a ``KeyboardInterrupt`` for
    any caller that catches those, and says where it happened (``stage``, ``epoch`` of ``epochs``, from 1) and which
    complete checkpoint a rerun resumes from (``checkpoint``, or None)."""

    def __init__(self, stage: str, epoch: int, epochs: int, checkpoint: Path | None) -> None:
        super().__init__(f"stage {stage!r} interrupted in epoch {epoch} of {epochs}")
        self.stage, self.epoch, self.epochs, self.checkpoint = stage, epoch, epochs, checkpoint


# Data that cannot be trained on.
class EmptyDatasetError(DatasetError):
    """The dataset has no examples."""


class DatasetTooSmallError(DatasetError):
    """The dataset holds fewer examples than one batch."""


class LabelRangeError(DatasetError):
    """Labels are negative, not integers, or not below the model's number of classes."""


class DataModelMismatchError(DatasetError):
    """The teachers cannot read the data, or their outputs do not fit its targets (an image model on tabular data, ...)."""


class MissingColumnError(DatasetError):
    """The dataset lacks the image or label column named in the config."""


__all__ = [
    "ArchitectureMismatchError",
    "CheckpointDirInUseError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "CorruptHeaderError",
    "DataModelMismatchError",
    "DatasetError",
    "DatasetTooSmallError",
    "DtypeMismatchError",
    "EmptyDatasetError",
    "EmptyFileError",
    "FormatMismatchError",
    "HubPushError",
    "HubUnreachableError",
    "KeyMismatchError",
    "LabelRangeError",
    "MissingColumnError",
    "NetMergeError",
    "NotAStudentError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "NumClassesMismatchError",
    "OfflineNotCachedError",
    "OutputExistsError",
    "OverlappingTensorsError",
    "OversizedHeaderError",
    "PickleRefusedError",
    "RemoteFileNotFoundError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "ShapeMismatchError",
    "StageInterrupted",
    "TeacherMismatchError",
    "TruncatedFileError",
    "UnreachableReferenceError",
    "UnsupportedModelError",
]
