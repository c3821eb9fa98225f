"""Preprocessing for a model: the checked torch Dataset every stage reads, in its evaluation view or its training view."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..config import AugmentConfig
from .augment import Preprocessing, TensorAugment, image_transforms
from .checks import check_dataset
from .datasets import HFImageDataset, TensorBatchDataset, as_torch_dataset, is_hf_dataset


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
    """``data`` as a checked torch Dataset for ``model`` in its evaluation view: images of a ``datasets.Dataset``
    through timm's eval transform for the model (at ``image_size`` when given), labels in range."""
    mode = "L" if getattr(model, "in_chans", 3) == 1 else "RGB"
    preprocessing = Preprocessing.for_model(model, image_size) if is_hf_dataset(data) else None
    transform = preprocessing.eval_transform() if preprocessing is not None else None
    dataset = as_torch_dataset(data, image_column, label_column, transform, mode, preprocessing)
    check_dataset(dataset, task, num_classes, min_size=min_size, label=label)
    return dataset


def training_view(dataset: Dataset, augment: AugmentConfig, seed: int) -> Dataset:
    """The dataset the training stages read: ``dataset`` (from :func:`prepare_dataset`) through the train transform.

    Images of a ``datasets.Dataset`` get :func:`~hf_netmerge.data.augment.image_transforms`' train transform;
    in-memory image tensors a :class:`~hf_netmerge.data.augment.TensorAugment` keyed by ``seed``; anything
    else (non-image inputs, other datasets, ``augment: none``) is read as it is.
    """
    if not augment.active:
        return dataset
    if isinstance(dataset, HFImageDataset) and dataset.preprocessing is not None:
        return dataset.augmented(image_transforms(dataset.preprocessing, augment)[0])
    if isinstance(dataset, TensorBatchDataset) and dataset.inputs.dim() == 4:
        prep = dataset.preprocessing
        fill = [-m / s for m, s in zip(prep.mean, prep.std)] if prep is not None else 0.0  # a black pixel, normalized
        return dataset.augmented(TensorAugment(augment.pad, augment.hflip, seed, fill))
    return dataset
