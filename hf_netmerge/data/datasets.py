"""Dataset wrappers: in-memory tensors, ``datasets.Dataset`` columns, subsets and seeded splits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..errors import DatasetError, MissingColumnError
from .augment import Preprocessing, TensorAugment


class _Batch(tuple):
    """A batch already assembled by a dataset's ``__getitems__`` (collation passes it through)."""


class TensorBatchDataset(Dataset):
    """In-memory inputs and targets; a whole batch is sliced in one indexing call.

    ``__getitems__`` makes the DataLoader fetch batches vectorized, which matters for tiny models
    such as the sine MLP where per-sample collation would cost more than the training step.
    ``preprocessing`` says how image inputs were made from images (recorded with a student trained on
    them); ``augment`` (a :class:`~hf_netmerge.data.augment.TensorAugment`) augments every batch read,
    for the epoch last given to :meth:`set_epoch`.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        preprocessing: Preprocessing | None = None,
        augment: TensorAugment | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise DatasetError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        self.inputs = inputs
        self.targets = targets
        self.preprocessing = preprocessing
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation the next batches get."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices: list[int] | torch.Tensor) -> _Batch:
        index = torch.as_tensor(indices)
        inputs = self.inputs[index]
        if self.augment is not None:
            inputs = self.augment(inputs, index, self.epoch, len(self))
        return _Batch((inputs, self.targets[index]))

    def augmented(self, augment: TensorAugment | None) -> TensorBatchDataset:
        """The same tensors read through ``augment`` (the training view of a dataset whose evaluation view is ``self``)."""
        return TensorBatchDataset(self.inputs, self.targets, self.preprocessing, augment)


def collate(batch: Any) -> Any:
    """Default collation, except for batches a dataset already assembled."""
    return tuple(batch) if isinstance(batch, _Batch) else default_collate(batch)


class HFImageDataset(Dataset):
    """A ``datasets.Dataset`` with an image column and a label column, as ``(tensor, label)`` pairs.

    PIL images are decoded lazily, a batch per Arrow read (in the DataLoader's workers when it has
    some), converted to ``mode`` and put through ``transform`` (the model's eval transform, or a train
    transform for :meth:`augmented` views); array-valued images are taken as already-preprocessed
    float tensors. ``preprocessing`` is the eval transform's timm data config.
    """

    def __init__(
        self,
        ds: Any,
        image_column: str,
        label_column: str,
        transform: Callable | None,
        mode: str,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise MissingColumnError(
                f"dataset has no column(s) {missing}; its columns are {ds.column_names} (set image_column / label_column)"
            )
        self.ds = ds
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.mode = mode
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.ds)

    def _input(self, image: Any) -> torch.Tensor:
        if hasattr(image, "convert") and self.transform is not None:
            return self.transform(image.convert(self.mode))
        return torch.as_tensor(np.asarray(image), dtype=torch.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        row = self.ds[index]
        return self._input(row[self.image_column]), row[self.label_column]

    def __getitems__(self, indices: list[int]) -> _Batch:
        rows = self.ds[[int(i) for i in indices]]
        inputs = torch.stack([self._input(image) for image in rows[self.image_column]])
        return _Batch((inputs, torch.as_tensor(rows[self.label_column])))

    def augmented(self, transform: Callable) -> HFImageDataset:
        """The same rows read through ``transform`` (the training view of a dataset whose evaluation view is ``self``)."""
        return HFImageDataset(self.ds, self.image_column, self.label_column, transform, self.mode, self.preprocessing)

    def labels(self) -> list[Any]:
        """The label column, read without decoding images."""
        return list(self.ds[self.label_column])


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` (checked by duck type, so ``datasets`` need not be imported)."""
    return hasattr(data, "column_names") and hasattr(data, "features")


def as_torch_dataset(
    data: Any,
    image_column: str = "image",
    label_column: str = "label",
    transform: Callable | None = None,
    mode: str = "RGB",
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """A torch Dataset from a ``datasets.Dataset``, a torch Dataset or a DataLoader (its dataset)."""
    batches_of = getattr(data, "dataset", None)  # a DataLoader or TensorLoader: its dataset
    if isinstance(batches_of, Dataset) and not isinstance(data, Dataset):
        return batches_of
    if is_hf_dataset(data):
        return HFImageDataset(data, image_column, label_column, transform, mode, preprocessing)
    if isinstance(data, Dataset):
        return data
    raise DatasetError(f"unsupported data of type {type(data).__name__}: pass a datasets.Dataset, a torch Dataset or a DataLoader")


def subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """The examples ``indices`` of ``dataset``, keeping in-memory tensors and HF columns cheap to read."""
    if isinstance(dataset, TensorBatchDataset):
        return TensorBatchDataset(dataset.inputs[indices], dataset.targets[indices], dataset.preprocessing, dataset.augment)
    if isinstance(dataset, HFImageDataset):
        rows = dataset.ds.select(indices.tolist())
        return HFImageDataset(rows, dataset.image_column, dataset.label_column, dataset.transform, dataset.mode, dataset.preprocessing)
    return torch.utils.data.Subset(dataset, indices.tolist())


def first_examples(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` examples of ``dataset`` (all of it when ``limit`` is None or not smaller): a raw
    ``datasets.Dataset`` through ``select`` (so it keeps its features), anything else through :func:`subset`."""
    if limit is None or limit >= len(dataset):
        return dataset
    if is_hf_dataset(dataset):
        return dataset.select(range(limit))
    return subset(dataset, torch.arange(limit))


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random (1 - fraction, fraction) split: the training and validation sets."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(len(dataset) * fraction))
    return subset(dataset, order[held:].sort().values), subset(dataset, order[:held].sort().values)


