"""Datasets → DataLoaders, the up-front data checks, and the offline sine problem."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .errors import DatasetError


class _Batch(tuple):
    """A batch already assembled by a dataset's ``__getitems__`` (collation passes it through)."""


class TensorBatchDataset(Dataset):
    """In-memory inputs and targets; a whole batch is sliced in one indexing call.

    ``__getitems__`` makes the DataLoader fetch batches vectorized, which matters for tiny models
    such as the sine MLP where per-sample collation would cost more than the training step.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise DatasetError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> _Batch:
        index = torch.as_tensor(indices)
        return _Batch((self.inputs[index], self.targets[index]))


def collate(batch: Any) -> Any:
    """Default collation, except for batches a dataset already assembled."""
    return tuple(batch) if isinstance(batch, _Batch) else default_collate(batch)


class HFImageDataset(Dataset):
    """A ``datasets.Dataset`` with an image column and a label column, as ``(tensor, label)`` pairs.

    PIL images go through ``transform`` (timm's eval transform for the model) after conversion to
    ``mode``; array-valued images are taken as already-preprocessed float tensors.
    """

    def __init__(self, ds: Any, image_column: str, label_column: str, transform: Callable | None, mode: str) -> None:
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise DatasetError(f"dataset has no column(s) {missing}; its columns are {ds.column_names}")
        self.ds = ds
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        row = self.ds[index]
        image = row[self.image_column]
        if hasattr(image, "convert") and self.transform is not None:
            x = self.transform(image.convert(self.mode))
        else:
            x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        return x, row[self.label_column]

    def labels(self) -> list[Any]:
        """The label column, read without decoding images."""
        return list(self.ds[self.label_column])


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` (checked by duck type, so ``datasets`` need not be imported)."""
    return hasattr(data, "column_names") and hasattr(data, "features")


def as_torch_dataset(
    data: Any, image_column: str = "image", label_column: str = "label", transform: Callable | None = None, mode: str = "RGB"
) -> Dataset:
    """A torch Dataset from a ``datasets.Dataset``, a torch Dataset or a DataLoader (its dataset)."""
    if isinstance(data, DataLoader):
        return data.dataset
    if is_hf_dataset(data):
        return HFImageDataset(data, image_column, label_column, transform, mode)
    if isinstance(data, Dataset):
        return data
    raise DatasetError(f"unsupported data of type {type(data).__name__}: pass a datasets.Dataset, a torch Dataset or a DataLoader")


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
        raise DatasetError(f"{label} is empty")
    if size < min_size:
        raise DatasetError(f"{label} has {size} examples, fewer than one batch ({min_size}); lower batch_size or add data")
    targets = dataset_targets(dataset)
    if task == "classification":
        if targets.is_floating_point() and not bool((targets == targets.round()).all()):
            raise DatasetError(f"{label}: classification labels must be integers")
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise DatasetError(
                f"{label}: labels span [{low}, {high}] but the model has {num_classes} classes "
                f"(labels must be in [0, {num_classes - 1}])"
            )
    elif not bool(torch.isfinite(targets.float()).all()):
        raise DatasetError(f"{label}: regression targets hold NaN or Inf")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader with a seeded shuffle generator (reproducible order) and batch-aware collation."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers, collate_fn=collate
    )


def sine_data(size: int, generator: torch.Generator, noise_std: float = 0.2) -> TensorBatchDataset:
    """The paper's sine problem: ``x ~ U(0, 1)``, ``y = sin(10πx) + N(0, noise_std²)``; shapes ``(size, 1)``."""
    x = torch.rand(size, 1, generator=generator)
    y = torch.sin(10 * math.pi * x) + noise_std * torch.randn(size, 1, generator=generator)
    return TensorBatchDataset(x, y)


@dataclass(frozen=True)
class NamedData:
    """Training and evaluation data found from a name or path, and the task it implies."""

    train: Any
    eval: Any | None
    task: str
    name: str


def load_data(name_or_path: str, seed: int = 0) -> NamedData:
    """Data for the command line: ``sine`` (generated), a ``save_to_disk`` directory, an image folder, or a Hub dataset id.

    A dataset dict gives its ``train`` split for training and ``validation`` (else ``test``) for evaluation.
    """
    if name_or_path == "sine":
        stream = torch.Generator().manual_seed(seed)
        return NamedData(sine_data(10_000, stream), sine_data(2_000, stream), "regression", "sine")
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_dir() and any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        elif path.exists() or name_or_path.startswith((".", "/", "~")):
            raise DatasetError(f"{name_or_path}: not a dataset directory")
        else:
            loaded = datasets.load_dataset(name_or_path)
    except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DatasetError(f"cannot load dataset {name_or_path!r}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"dataset {name_or_path!r} has no 'train' split (splits: {list(loaded)})")
        held_out = next((loaded[s] for s in ("validation", "test") if s in loaded), None)
        return NamedData(loaded["train"], held_out, "classification", path.name or name_or_path)
    return NamedData(loaded, None, "classification", path.name or name_or_path)
