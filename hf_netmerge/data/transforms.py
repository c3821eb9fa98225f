"""Preprocessing for a model: the checked torch Dataset every stage reads, in its evaluation view or its training view."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..formats import input_channels
from ..config import AugmentConfig
from .augment import SMALL_IMAGE, Preprocessing, TensorAugment, image_transforms
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
    mode = "L" if input_channels(model) == 1 else "RGB"
    preprocessing = Preprocessing.for_model(model, image_size) if is_hf_dataset(data) else None
    transform = preprocessing.eval_transform() if preprocessing is not None else None
    dataset = as_torch_dataset(data, image_column, label_column, transform, mode, preprocessing)
    check_dataset(dataset, task, num_classes, min_size=min_size, label=label)
    return dataset


def _augmentation_kind(dataset: Dataset, augment: AugmentConfig) -> str | None:
    """Which train-time augmentation ``dataset`` gets: ``resized-crop`` (PIL images of at least ``SMALL_IMAGE`` px),
    ``pad-crop`` (smaller PIL images), ``tensor-pad-crop`` (in-memory image tensors) or None."""
    if not augment.active:
        return None
    if isinstance(dataset, HFImageDataset) and dataset.preprocessing is not None:
        return "resized-crop" if min(dataset.preprocessing.input_size[1:]) >= SMALL_IMAGE else "pad-crop"
    if isinstance(dataset, TensorBatchDataset) and dataset.inputs.dim() == 4:
        return "tensor-pad-crop"
    return None


def training_view(dataset: Dataset, augment: AugmentConfig, seed: int) -> Dataset:
    """The dataset the training stages read: ``dataset`` (from :func:`prepare_dataset`) through the train transform.

    Images of a ``datasets.Dataset`` get :func:`~hf_netmerge.data.augment.image_transforms`' train transform;
    in-memory image tensors a :class:`~hf_netmerge.data.augment.TensorAugment` keyed by ``seed``; anything
    else (non-image inputs, other datasets, ``augment: none``) is read as it is.
    """
    kind = _augmentation_kind(dataset, augment)
    if kind in ("resized-crop", "pad-crop"):
        return dataset.augmented(image_transforms(dataset.preprocessing, augment)[0])
    if kind == "tensor-pad-crop":
        prep = dataset.preprocessing
        fill = [-m / s for m, s in zip(prep.mean, prep.std)] if prep is not None else 0.0  # a black pixel, normalized
        return dataset.augmented(TensorAugment(augment.pad, augment.hflip, seed, fill))
    return dataset


def applied_augmentation(dataset: Dataset, augment: AugmentConfig) -> dict[str, object]:
    """The augmentation settings :func:`training_view` really applies to ``dataset`` (empty when none): what a card or
    record should list, since ``augment``'s other knobs do not act on small or in-memory images."""
    kind = _augmentation_kind(dataset, augment)
    if kind == "resized-crop":
        knobs = {"scale": augment.scale, "ratio": augment.ratio, "hflip": augment.hflip, "color_jitter": augment.color_jitter,
                 "auto_augment": augment.auto_augment, "re_prob": augment.re_prob}
    elif kind == "pad-crop":
        knobs = {"pad": augment.pad, "hflip": augment.hflip, "re_prob": augment.re_prob}
    elif kind == "tensor-pad-crop":
        knobs = {"pad": augment.pad, "hflip": augment.hflip}
    else:
        return {}
    return {"transform": kind, **{k: v for k, v in knobs.items() if v not in (None, 0, 0.0)}}
