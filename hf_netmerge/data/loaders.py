"""Batches: a DataLoader with a seeded shuffle, or the faster :class:`TensorLoader` for in-memory tensors."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import TensorBatchDataset, collate


class TensorLoader:
    """Shuffled batches of a :class:`TensorBatchDataset` by tensor slicing: a DataLoader without its per-batch machinery.

    Each epoch draws from ``generator`` what a shuffling DataLoader draws (its iterator's base seed,
    the permutation, and RandomSampler's empty tail permutation), so both give the same batches; it turns
    into that DataLoader with :meth:`dataloader` wherever Accelerate must shard or track the batches. Tensors held in GPU memory are indexed there, by a
    permutation moved once per epoch (a CPU index would cost a host-device synchronization per batch). Up to
    :attr:`CHUNK_BATCHES` batches (:attr:`CHUNK_BYTES` at most) are gathered at once and handed out as slices.
    """

    # Batches gathered (and augmented) at once, then sliced: one indexing per chunk instead of per batch.
    CHUNK_BATCHES = 64
    CHUNK_BYTES = 1 << 24

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

    def epoch_order(self) -> torch.Tensor:
        """The next epoch's example order, drawn as a shuffling DataLoader's epoch draws it (its iterator's base seed,
        the permutation, RandomSampler's emptied tail permutation); the identity without shuffling."""
        size = len(self.dataset)
        if self.generator is None:
            return torch.arange(size)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(size, generator=self.generator)
        torch.randperm(size, generator=self.generator)
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.dataset
        order = self.epoch_order().to(data.inputs.device)
        move = self.device is not None and self.device != data.inputs.device
        example_bytes = data.inputs[:1].nbytes + data.targets[:1].nbytes
        chunk = self.batch_size * max(1, min(self.CHUNK_BATCHES, self.CHUNK_BYTES // max(1, self.batch_size * example_bytes)))
        for start in range(0, len(order), chunk):
            inputs, targets = data.__getitems__(order[start : start + chunk])
            if move:
                inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            yield from zip(inputs.split(self.batch_size), targets.split(self.batch_size))

    def dataloader(self) -> DataLoader:
        """The equivalent DataLoader, sharing this loader's generator (so its shuffle state too)."""
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.generator is not None, generator=self.generator, collate_fn=collate
        )


Loader = DataLoader | TensorLoader


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> Loader:
    """Batches with a seeded shuffle generator (reproducible order).

    In-memory tensors get a :class:`TensorLoader` (sliced in the main process: workers would add nothing);
    anything else a DataLoader with batch-aware collation that decodes in ``num_workers`` persistent
    worker processes, pinning memory when a GPU is present.
    """
    if isinstance(dataset, TensorBatchDataset):
        return TensorLoader(dataset, batch_size, shuffle, seed)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
