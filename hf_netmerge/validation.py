"""Up-front checks that refuse bad inputs before any training starts or anything is written."""

from __future__ import annotations

import torch
from torch import nn

from .errors import (
    ArchitectureMismatchError,
    DtypeMismatchError,
    KeyMismatchError,
    NonFiniteWeightsError,
    NumClassesMismatchError,
    ShapeMismatchError,
)
from .formats import architecture_name, num_classes


def check_finite(model: nn.Module, label: str) -> None:
    """Refuse a model holding NaN or Inf in any floating-point parameter or buffer."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteWeightsError(f"{label}: tensor {name!r} holds NaN or Inf values; check or retrain this checkpoint")


def teacher_label(index: int) -> str:
    """``teacher A``, ``teacher B``, … for the teacher at ``index``."""
    return f"teacher {chr(ord('A') + index)}" if index < 26 else f"teacher {index + 1}"


def teacher_key(index: int) -> str:
    """``teacher_a``, ``teacher_b``, …: the teacher's key in metrics and results."""
    return teacher_label(index).replace(" ", "_").lower()


def check_teachers(*teachers: nn.Module) -> None:
    """Refuse teachers that are not all the same architecture with the same tensor names, shapes and dtypes."""
    a = teachers[0]
    sd_a = a.state_dict()
    for index, b in enumerate(teachers[1:], start=1):
        la, lb = "A", teacher_label(index).split()[-1]
        if type(a) is not type(b):
            raise ArchitectureMismatchError(f"teachers are different classes: {type(a).__name__} ({la}) and {type(b).__name__} ({lb})")
        arch_a, arch_b = architecture_name(a), architecture_name(b)
        if arch_a != arch_b:
            raise ArchitectureMismatchError(f"teachers are different architectures: {arch_a} ({la}) and {arch_b} ({lb})")
        classes_a, classes_b = num_classes(a), num_classes(b)
        if classes_a != classes_b:
            raise NumClassesMismatchError(f"teachers have different num_classes: {classes_a} ({la}) and {classes_b} ({lb})")
        sd_b = b.state_dict()
        missing, extra = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
        if missing or extra:
            raise KeyMismatchError(f"teachers have different tensors: only in {la} {missing[:5]}, only in {lb} {extra[:5]}")
        for name, ta in sd_a.items():
            tb = sd_b[name]
            if ta.shape != tb.shape:
                raise ShapeMismatchError(f"tensor {name!r} has shape {tuple(ta.shape)} in {la} and {tuple(tb.shape)} in {lb}")
            if ta.dtype != tb.dtype:
                raise DtypeMismatchError(f"tensor {name!r} is {ta.dtype} in {la} and {tb.dtype} in {lb}; cast all teachers to one dtype")
    for index, teacher in enumerate(teachers):
        check_finite(teacher, teacher_label(index))
