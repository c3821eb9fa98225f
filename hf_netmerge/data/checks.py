"""Up-front data checks: sizes, label ranges and finite targets, read without decoding images where possible."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError, DatasetTooSmallError, EmptyDatasetError, LabelRangeError
from .datasets import HFImageDataset, TensorBatchDataset


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """All targets of ``dataset`` as one tensor, read cheaply where the dataset allows it."""
    if isinstance(dataset, TensorBatchDataset):
        return dataset.targets
    if isinstance(dataset, HFImageDataset):
        values: Any = dataset.labels()
    elif hasattr(dataset, "targets"):
        values = dataset.targets
    elif hasattr(dataset, "tensors"):
        values = dataset.tensors[-1]
    else:
        values = [dataset[i][1] for i in range(len(dataset))]
    try:
        return torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError) as e:
        raise DatasetError(f"targets cannot be read as numbers: {e}") from e


def check_dataset(dataset: Dataset, task: str, num_classes: int, min_size: int = 1, label: str = "train_data") -> None:
    """Refuse empty or too-small data, non-finite regression targets, and class labels outside ``[0, num_classes)``."""
    size = len(dataset)
    if size == 0:
        raise EmptyDatasetError(f"{label} is empty; pass a dataset with examples")
    if size < min_size:
        raise DatasetTooSmallError(f"{label} has {size} examples, fewer than one batch ({min_size}); lower batch_size or add data")
    targets = dataset_targets(dataset)
    if task == "classification":
        if targets.is_floating_point() and not bool((targets == targets.round()).all()):
            raise LabelRangeError(f"{label}: classification labels must be integers")
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise LabelRangeError(
                f"{label}: labels span [{low}, {high}] but the model has {num_classes} classes "
                f"(labels must be in [0, {num_classes - 1}])"
            )
    elif not bool(torch.isfinite(targets.float()).all()):
        raise DatasetError(f"{label}: regression targets hold NaN or Inf")


