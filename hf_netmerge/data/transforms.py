"""Preprocessing for a model: timm's transform for its images, and the checked torch Dataset every stage reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .checks import check_dataset
from .datasets import as_torch_dataset, is_hf_dataset


def model_transform(model: nn.Module, image_size: int | None = None) -> Callable:
    """timm's eval transform for ``model`` (resize, crop, normalize), at ``image_size`` when given."""
    from timm.data import create_transform, resolve_data_config

    args = {"input_size": (getattr(model, "in_chans", 3), image_size, image_size)} if image_size else {}
    return create_transform(**resolve_data_config(args, model=model), is_training=False)


def prepare_dataset(
    data: Any,
    *,
    model: nn.Module,
    task: str,
    num_classes: int,
    image_column: str = "image",
    label_column: str = "label",
    image_size: int | None = None,
    min_size: int = 1,
    label: str = "data",
) -> Dataset:
    """``data`` as a checked torch Dataset for ``model``: images through its timm transform, labels in range."""
    mode = "L" if getattr(model, "in_chans", 3) == 1 else "RGB"
    transform = model_transform(model, image_size) if is_hf_dataset(data) else None
    dataset = as_torch_dataset(data, image_column, label_column, transform, mode)
    check_dataset(dataset, task, num_classes, min_size=min_size, label=label)
    return dataset


