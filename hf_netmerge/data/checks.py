"""Up-front data checks: sizes, label ranges and finite targets, read without decoding images where possible."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError, DatasetTooSmallError, EmptyDatasetError, LabelRangeError
from .datasets import HFImageDataset, TensorBatchDataset

logger = logging.getLogger("hf_netmerge")


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


def warn_unused_classes(dataset: Dataset, num_classes: int) -> None:
    """Log a warning when the training labels reach fewer classes than the model predicts (e.g. 100-class teachers on
    10-class data): the merge still runs, but the classes the data never shows are only pulled down."""
    high = int(dataset_targets(dataset).max())
    if high + 1 < num_classes:
        logger.warning("the teachers predict %d classes but the training labels reach only %d (0 to %d): the student keeps "
                       "all %d outputs and learns nothing about the other %d; check that the data and teachers belong "
                       "together", num_classes, high + 1, high, num_classes, num_classes - high - 1)
