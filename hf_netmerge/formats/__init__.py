"""Checkpoint formats: one module per layout on disk (timm's, transformers'), behind :class:`CheckpointFormat`.

A directory's format is what its ``config.json`` says; a module's, what its class is (anything not another format's
is timm's). The student is saved in its teachers' format. A third format is one new module added to ``FORMATS``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import files
from ..errors import CheckpointError, NotAStudentError, PickleRefusedError, UnsupportedModelError
from .base import CheckpointFormat
from .preprocessing import Preprocessing
from .timm_layout import CONFIG_NAME, WEIGHTS_NAME, TimmFormat
from .transformers_layout import TransformersFormat
from .weights import load_state, read_weights, sha256

FORMATS: tuple[CheckpointFormat, ...] = (TransformersFormat(), TimmFormat())  # asked in order; timm's owns any module
MERGE_CONFIG_NAME = "netmerge_config.json"
CARD_NAME = "README.md"
STUDENT_FILES = (CONFIG_NAME, WEIGHTS_NAME, MERGE_CONFIG_NAME, CARD_NAME)


def format_of(model: nn.Module) -> CheckpointFormat:
    """The format ``model`` belongs to (and is saved in)."""
    return next(f for f in FORMATS if f.owns(model))


def format_of_directory(directory: Path, reference: str) -> CheckpointFormat:
    """The format whose ``config.json`` ``directory`` holds; :class:`CheckpointError` when none claims it."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{reference}: no {CONFIG_NAME} (expected timm's or transformers' layout: {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{reference}: {CONFIG_NAME} is not valid JSON ({e})") from e
    if isinstance(config, dict):
        for fmt in FORMATS:
            if fmt.claims(config):
                return fmt
    raise CheckpointError(
        f"{reference}: {CONFIG_NAME} has neither timm's 'architecture' nor transformers' 'model_type'; "
        "expected a directory saved by timm's save_for_hf or transformers' save_pretrained"
    )


def format_for_architecture(architecture: str) -> CheckpointFormat:
    """The format that builds fresh networks of ``architecture`` (``transformers:<model_type>`` or a timm name)."""
    return next((f for f in FORMATS if f.handles(architecture)), FORMATS[-1])


def architecture_name(model: nn.Module) -> str:
    """The architecture of ``model``: a timm name (else the class name), or ``transformers:<model_type>``."""
    return format_of(model).architecture(model)


def input_channels(model: nn.Module) -> int:
    """The channels ``model`` reads."""
    return format_of(model).input_channels(model)


def num_classes(model: nn.Module) -> int:
    """The outputs of ``model``'s classifier (0 without one)."""
    return format_of(model).num_classes(model)


def logits(output: Any) -> torch.Tensor:
    """The prediction tensor of a forward's ``output``: the output itself, or what a format wraps in it (transformers'
    ``ModelOutput.logits``). Read from the output, not the model, so that wrapped models (DDP, compiled) work too."""
    if isinstance(output, torch.Tensor):  # every training step passes here: timm's plain tensors need no lookup
        return output
    for fmt in FORMATS:
        tensor = fmt.logits(output)
        if isinstance(tensor, torch.Tensor):
            return tensor
    raise UnsupportedModelError(f"the forward returns {type(output).__name__}, neither a tensor nor a model output with logits: "
                                "only classifiers merge")


def create_model(architecture: str, model_args: dict[str, Any]) -> nn.Module:
    """A fresh network of ``architecture`` built with ``model_args`` (a recipe's architecture)."""
    return format_for_architecture(architecture).create(architecture, model_args)


def model_args(model: nn.Module) -> dict[str, Any]:
    """The ``model_args`` with which :func:`create_model` builds ``model``'s architecture again."""
    return format_of(model).model_args(model)


def weights_file(directory: Path, allow_pickle: bool) -> Path:
    """The weights file of a saved network: model.safetensors, else (when allowed) a pickle one."""
    if (directory / WEIGHTS_NAME).is_file():
        return directory / WEIGHTS_NAME
    if (directory / f"{WEIGHTS_NAME}.index.json").is_file():
        raise CheckpointError(f"{directory}: sharded weights ({WEIGHTS_NAME}.index.json) are not supported; save the teacher unsharded")
    pickles = [directory / n for n in ("pytorch_model.bin", "pytorch_model.pth", "model.pth") if (directory / n).is_file()]
    if pickles and not allow_pickle:
        raise PickleRefusedError(
            f"{directory} holds only {pickles[0].name}, a pickle; convert it to safetensors or pass allow_pickle=True"
        )
    if pickles:
        return pickles[0]
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}; expected {CONFIG_NAME} + {WEIGHTS_NAME}")


def load_directory(directory: Path, reference: str, allow_pickle: bool = False) -> tuple[nn.Module, Path]:
    """The network saved in ``directory`` (in whichever format its config says), strictly loaded, and its weights file."""
    fmt = format_of_directory(directory, reference)
    path = weights_file(directory, allow_pickle)
    state = read_weights(path, allow_pickle)
    model = fmt.build(directory, reference)
    load_state(model, state, reference)
    return model, path


def save_network(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    extra_files: dict[str, str] | None = None,
    label_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in its format (``config.json``, ``model.safetensors`` and the format's files) plus
    ``extra_files`` (name → text), atomically (see :func:`~hf_netmerge.files.replace_directory`)."""
    target = files.check_output_dir(directory, overwrite)
    fmt = format_of(model)

    def fill(folder: Path) -> None:
        fmt.save(model, folder, label_names=label_names, preprocessing=preprocessing, license=license)
        for name, text in (extra_files or {}).items():
            files.write_file(folder / name, text)

    return files.replace_directory(target, fill)


def save_student(
    student: nn.Module,
    directory: str | os.PathLike[str],
    *,
    merge_record: dict[str, Any],
    card: str,
    label_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the student (its format's files), ``netmerge_config.json`` and ``README.md`` atomically."""
    extra = {MERGE_CONFIG_NAME: json.dumps(merge_record, indent=2), CARD_NAME: card}  # in record order: the card renders from it
    return save_network(student, directory, extra_files=extra, label_names=label_names, preprocessing=preprocessing,
                        license=merge_record.get("license"), overwrite=overwrite)


def check_student_dir(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path if it holds a saved student's files, else :class:`NotAStudentError` naming what is missing."""
    path = Path(folder)
    missing = [name for name in STUDENT_FILES if not (path / name).is_file()]
    if missing:
        raise NotAStudentError(f"{path} is not a saved student: it lacks {', '.join(missing)} (save one with merge --output-dir)")
    return path


__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMATS",
    "MERGE_CONFIG_NAME",
    "Preprocessing",
    "STUDENT_FILES",
    "WEIGHTS_NAME",
    "CheckpointFormat",
    "architecture_name",
    "check_student_dir",
    "create_model",
    "format_for_architecture",
    "format_of",
    "format_of_directory",
    "input_channels",
    "load_directory",
    "logits",
    "model_args",
    "num_classes",
    "save_network",
    "save_student",
    "sha256",
]
