"""Up-front checks that refuse bad inputs before any training starts or anything is written."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapters import architecture_name
from .errors import (
    ArchitectureMismatchError,
    DtypeMismatchError,
    KeyMismatchError,
    NonFiniteWeightsError,
    NumClassesMismatchError,
    OutputExistsError,
    ShapeMismatchError,
)


def check_finite(model: nn.Module, label: str) -> None:
    """Refuse a model holding NaN or Inf in any floating-point parameter or buffer."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteWeightsError(f"{label}: tensor {name!r} holds NaN or Inf values; check or retrain this checkpoint")


def check_teachers(a: nn.Module, b: nn.Module) -> None:
    """Refuse two teachers that are not the same architecture with the same tensor names, shapes and dtypes."""
    if type(a) is not type(b):
        raise ArchitectureMismatchError(f"teachers are different classes: {type(a).__name__} and {type(b).__name__}")
    arch_a, arch_b = architecture_name(a), architecture_name(b)
    if arch_a != arch_b:
        raise ArchitectureMismatchError(f"teachers are different architectures: {arch_a} and {arch_b}")
    classes_a, classes_b = getattr(a, "num_classes", None), getattr(b, "num_classes", None)
    if classes_a != classes_b:
        raise NumClassesMismatchError(f"teachers have different num_classes: {classes_a} and {classes_b}")
    sd_a, sd_b = a.state_dict(), b.state_dict()
    missing, extra = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
    if missing or extra:
        raise KeyMismatchError(f"teachers have different tensors: only in A {missing[:5]}, only in B {extra[:5]}")
    for name, ta in sd_a.items():
        tb = sd_b[name]
        if ta.shape != tb.shape:
            raise ShapeMismatchError(f"tensor {name!r} has shape {tuple(ta.shape)} in A and {tuple(tb.shape)} in B")
        if ta.dtype != tb.dtype:
            raise DtypeMismatchError(f"tensor {name!r} is {ta.dtype} in A and {tb.dtype} in B; cast both to one dtype")
    check_finite(a, "teacher A")
    check_finite(b, "teacher B")


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another directory or pass overwrite=True (--overwrite)")
    return path
