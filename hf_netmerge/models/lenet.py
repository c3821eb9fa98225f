"""LeNet as used in the paper: conv 6 and 16 channels, linear 400 → 120 → 80 → classes (28×28 input)."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._head import LinearHeadMixin


def _norm2d(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


def _norm1d(features: int, norm: bool) -> nn.Module:
    return nn.BatchNorm1d(features) if norm else nn.Identity()


class LeNet(LinearHeadMixin, nn.Module):
    """Two 5×5 convolutions with max-pooling, then three linear layers.

    The first convolution pads by 2 so that a 28×28 input gives the paper's 16×5×5 = 400 features.
    Each activation has its own module (``act1`` … ``act4``): those are where merge gates go.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | tuple[int, int] | list[int] = 28,
        channels: tuple[int, int] | list[int] = (6, 16),
        hidden_sizes: tuple[int, int] | list[int] = (120, 80),
        norm: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = (height, width)
        c1, c2 = channels
        h1, h2 = hidden_sizes
        side_h, side_w = (height // 2 - 4) // 2, (width // 2 - 4) // 2
        if min(side_h, side_w) < 1:
            raise ValueError(f"img_size={img_size} is too small for LeNet (need at least 12×12)")
        self.conv1 = nn.Conv2d(in_chans, c1, 5, padding=2, bias=not norm)
        self.bn1 = _norm2d(c1, norm)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, bias=not norm)
        self.bn2 = _norm2d(c2, norm)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.feature_size = (side_h, side_w)
        self.fc1 = nn.Linear(c2 * side_h * side_w, h1, bias=not norm)
        self.bn3 = _norm1d(h1, norm)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2, bias=not norm)
        self.bn4 = _norm1d(h2, norm)
        self.act4 = nn.ReLU()
        self._init_head(h2, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.pool2(self.act2(self.bn2(self.conv2(x))))
        x = self.act3(self.bn3(self.fc1(self.flatten(x))))
        return self.act4(self.bn4(self.fc2(x)))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 28, 28),
        "fixed_input_size": True,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"netmerge_lenet": _cfg(), "netmerge_lenet_bn": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> LeNet:
    return build_model_with_cfg(LeNet, variant, pretrained, **kwargs)


@register_model
def netmerge_lenet(pretrained: bool = False, **kwargs: Any) -> LeNet:
    """The paper's LeNet (28×28×3 input by default; ``in_chans``, ``img_size``, ``num_classes`` configurable)."""
    return _create("netmerge_lenet", pretrained, **kwargs)


@register_model
def netmerge_lenet_bn(pretrained: bool = False, **kwargs: Any) -> LeNet:
    """LeNet with BatchNorm after every hidden layer (no biases before the norms)."""
    return _create("netmerge_lenet_bn", pretrained, **dict(dict(norm=True), **kwargs))
