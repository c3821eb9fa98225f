"""Data: dataset wrappers, up-front checks, preprocessing, loaders, the offline datasets and datasets by name.

One module per concern; the names below are the package's public surface.
"""

from .augment import Preprocessing, TensorAugment, image_transforms
from .checks import check_dataset, dataset_targets, warn_unused_classes
from .datasets import HFImageDataset, TensorBatchDataset, as_torch_dataset, collate, first_examples, is_hf_dataset, split, subset
from .loaders import Loader, TensorLoader, make_loader
from .named import NamedData, load_data
from .offline import SINE_TEST_SIZE, SINE_TRAIN_SIZE, SINE_VAL_SIZE, fashion_mnist, fashion_mnist_images, mnist, mnist_images, sine_data, sine_splits
from .transforms import applied_augmentation, prepare_dataset, training_view

__all__ = [
    "SINE_TEST_SIZE",
    "SINE_TRAIN_SIZE",
    "SINE_VAL_SIZE",
    "HFImageDataset",
    "Loader",
    "NamedData",
    "Preprocessing",
    "TensorBatchDataset",
    "TensorAugment",
    "TensorLoader",
    "applied_augmentation",
    "as_torch_dataset",
    "check_dataset",
    "collate",
    "dataset_targets",
    "fashion_mnist",
    "fashion_mnist_images",
    "first_examples",
    "is_hf_dataset",
    "load_data",
    "make_loader",
    "mnist",
    "mnist_images",
    "image_transforms",
    "prepare_dataset",
    "sine_data",
    "sine_splits",
    "split",
    "subset",
    "training_view",
    "warn_unused_classes",
]
