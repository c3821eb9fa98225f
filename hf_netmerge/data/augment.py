"""What a model's inputs went through: the eval preprocessing (recorded with the student) and train-time augmentation.

:class:`Preprocessing` is timm's data config of the evaluation transform; it is written into the saved
student's ``config.json`` so that ``timm.data.resolve_data_config({}, model=student)`` + ``create_transform``
rebuild it. :func:`image_transforms` gives the train and eval transforms of PIL images;
:class:`TensorAugment` augments in-memory image tensors a batch at a time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..adapters import input_channels
from ..config import AugmentConfig

SMALL_IMAGE = 64  # below this (CIFAR / MNIST sizes) "auto" pads and crops instead of RandomResizedCrop


class _ChannelStatsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "does not match" not in record.getMessage()


@contextlib.contextmanager
def channel_stats_notice_silenced() -> Iterator[None]:
    """Without timm's notice that a pretrained mean or std does not match a model's channels (each time timm resolves
    a 1-channel model's data config: ~10 times a run): :meth:`Preprocessing.for_model` averages them itself, and a
    saved network records the statistics it was trained with."""
    quiet = _ChannelStatsNotice()
    loggers = [logging.getLogger(name) for name in ("timm.data.config", "timm.data.model_config")]
    for log in loggers:
        log.addFilter(quiet)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(quiet)


@dataclass(frozen=True)
class Preprocessing:
    """timm's data config of the evaluation transform: ``input_size`` (C, H, W), normalization, resize and crop."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @classmethod
    def for_model(cls, model: nn.Module, image_size: int | None = None) -> Preprocessing:
        """timm's resolved data config for ``model`` (from its ``pretrained_cfg``), at ``image_size`` when given."""
        from timm.data import resolve_data_config

        with channel_stats_notice_silenced():
            cfg = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {}, model=model)
        channels = input_channels(model)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != channels:  # e.g. a 1-channel model with RGB statistics: their average per channel, as timm does
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
        return cls((channels, *cfg["input_size"][1:]), mean, std, cfg["interpolation"], float(cfg["crop_pct"]),
                   cfg.get("crop_mode", "center"))

    def to_dict(self) -> dict[str, object]:
        """The keys timm reads from a ``pretrained_cfg`` (lists, as JSON has them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def eval_transform(self) -> Callable:
        """timm's evaluation transform for PIL images."""
        from timm.data import create_transform

        return create_transform(**asdict(self), is_training=False)


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
