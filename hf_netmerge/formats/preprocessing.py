"""How images become a model's inputs: the evaluation preprocessing, recorded with the student in its format."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from torch import nn


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
    """The evaluation transform as timm's data config: ``input_size`` (C, H, W), normalization, resize and crop. A
    format reads it from what it saves (timm's ``pretrained_cfg``, transformers' image processor) and writes it back
    with the student."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @classmethod
    def for_model(cls, model: nn.Module, image_size: int | None = None) -> Preprocessing:
        """How ``model``'s format preprocesses its inputs (timm's data config, or transformers' image processor), at
        ``image_size`` when given."""
        from . import format_of  # the formats build preprocessings

        return format_of(model).preprocessing(model, image_size)

    @classmethod
    def fitted(cls, input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...], interpolation: str,
               crop_pct: float, crop_mode: str) -> Preprocessing:
        """A preprocessing whose statistics fit its channels: RGB statistics for a 1-channel model become their
        average per channel, as timm does."""
        channels = input_size[0]
        if len(mean) != channels:
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
        return cls(tuple(input_size), tuple(mean), tuple(std), interpolation, float(crop_pct), crop_mode)

    def to_dict(self) -> dict[str, object]:
        """The keys timm reads from a ``pretrained_cfg`` (lists, as JSON has them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def eval_transform(self) -> Callable:
        """timm's evaluation transform for PIL images."""
        from timm.data import create_transform

        return create_transform(**asdict(self), is_training=False)
