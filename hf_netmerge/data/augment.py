"""Train-time augmentation on top of a model's evaluation preprocessing.

:func:`image_transforms` gives the train and eval transforms of PIL images from a
:class:`~hf_netmerge.formats.preprocessing.Preprocessing` (what the model's format says its inputs go through);
:class:`TensorAugment` augments in-memory image tensors a batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

from ..config import AugmentConfig
from ..formats.preprocessing import Preprocessing

SMALL_IMAGE = 64  # below this (CIFAR / MNIST sizes) "auto" pads and crops instead of RandomResizedCrop


def image_transforms(preprocessing: Preprocessing, augment: AugmentConfig) -> tuple[Callable, Callable]:
    """The (train, eval) transforms of PIL images: see :class:`~hf_netmerge.config.AugmentConfig` for what ``auto`` does."""
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    evaluate = preprocessing.eval_transform()
    if not augment.active:
        return evaluate, evaluate
    _, height, width = preprocessing.input_size
    if min(height, width) >= SMALL_IMAGE:
        train = create_transform(**asdict(preprocessing), is_training=True, hflip=augment.hflip, scale=tuple(augment.scale),
                                 ratio=tuple(augment.ratio), color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
                                 re_prob=augment.re_prob)
        return train, evaluate
    steps = [*evaluate.transforms[:-2], T.RandomCrop((height, width), padding=augment.pad), T.RandomHorizontalFlip(augment.hflip),
             *evaluate.transforms[-2:]]  # eval's resize and crop, then pad-crop and flip, then eval's to-tensor and normalize
    if augment.re_prob > 0:
        steps.append(RandomErasing(augment.re_prob, mode="pixel", device="cpu"))
    return T.Compose(steps), evaluate


class TensorAugment:
    """Random crop after ``pad`` pixels of padding and a horizontal flip (probability ``hflip``) of image tensors.

    Each example's crop and flip are drawn from a generator keyed by (``seed``, epoch) and indexed by the
    example's position in the dataset, so they do not depend on batching, shuffling or the number of
    processes. Padding uses ``fill`` (the normalized value of a black pixel, as a padded PIL image gets).
    """

    def __init__(self, pad: int, hflip: float, seed: int, fill: torch.Tensor | float = 0.0) -> None:
        self.pad, self.hflip, self.seed = pad, hflip, seed
        self.fill = torch.as_tensor(fill, dtype=torch.float32)
        self._table: tuple[int, int, torch.device, torch.Tensor, torch.Tensor] | None = None  # (epoch, size, device, offsets, flips)

    def _draws(self, epoch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[:3] != (epoch, size, device):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offsets = torch.randint(0, 2 * self.pad + 1, (size, 2), generator=gen)
            flips = torch.rand(size, generator=gen) < self.hflip
            self._table = (epoch, size, device, offsets.to(device), flips.to(device))
        return self._table[3], self._table[4]

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int, size: int) -> torch.Tensor:
        """``images`` (batch, C, H, W) of dataset positions ``index`` (of ``size``) augmented for ``epoch``, on their device."""
        device = images.device
        offsets, flips = self._draws(epoch, size, device)
        index = index.to(device)
        batch, channels, height, width = images.shape
        pad = self.pad
        fill = self.fill.to(device, images.dtype).reshape(1, -1, 1, 1)
        padded = fill.expand(batch, channels, height + 2 * pad, width + 2 * pad).clone()
        padded[:, :, pad : pad + height, pad : pad + width] = images
        dy, dx, flip = offsets[index, 0], offsets[index, 1], flips[index]
        rows = dy[:, None] + torch.arange(height, device=device)
        ascending, descending = torch.arange(width, device=device), torch.arange(width - 1, -1, -1, device=device)
        cols = torch.where(flip[:, None], dx[:, None] + descending, dx[:, None] + ascending)
        return padded[torch.arange(batch, device=device)[:, None, None, None], torch.arange(channels, device=device)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]
