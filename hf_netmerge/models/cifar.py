"""The paper's CIFAR networks: ResNet20 (3 stages × 3 BasicBlocks, 16/32/64 channels, 3×3 stem, no max-pool)
and the VGG11 without BatchNorm or biases used in the comparison with OTFusion.

ResNet20 reuses timm's ``BasicBlock`` and timm ResNet's module names (``conv1``/``bn1``/``act1``,
``layer1``…, ``global_pool``, ``fc``), so the same channel-group adapter serves both.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem, stages of BasicBlocks, 1×1 conv + BN shortcuts when the shape changes."""

    def __init__(
        self,
        layers: tuple[int, ...] | list[int] = (3, 3, 3),
        channels: tuple[int, ...] | list[int] = (16, 32, 64),
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        inplanes = channels[0]
        self.stage_names = []
        for index, (depth, planes) in enumerate(zip(layers, channels)):
            blocks = []
            for j in range(depth):
                stride = 2 if index > 0 and j == 0 else 1
                downsample = None
                if stride != 1 or inplanes != planes:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, stride=stride, downsample=downsample))
                inplanes = planes
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.num_features = self.head_hidden_size = inplanes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarVGG(nn.Module):
    """VGG without BatchNorm or biases: 3×3 convs with ReLU and max-pooling, then one bias-free linear layer."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] | list[int | str] = VGG11_CFG,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | tuple[int, int] | list[int] = 32,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = (height, width)
        layers: list[nn.Module] = []
        channels = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                height, width = height // 2, width // 2
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1, bias=False), nn.ReLU(inplace=True)]
                channels = int(v)
        if min(height, width) < 1:
            raise ValueError(f"img_size={img_size} is too small for {cfg.count('M')} poolings")
        self.features = nn.Sequential(*layers)
        self.feature_size = (height, width)
        self.flatten = nn.Flatten(1)
        self.num_features = self.head_hidden_size = channels * height * width
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "netmerge_resnet20": _cfg(num_classes=100),
        "netmerge_vgg11_cifar": _cfg(num_classes=10, fixed_input_size=True, first_conv="features.0", classifier="head"),
    }
)


@register_model
def netmerge_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet20 for CIFAR (3 stages × 3 BasicBlocks, 16/32/64 channels), as in the paper's CIFAR-100 experiment."""
    return build_model_with_cfg(CifarResNet, "netmerge_resnet20", pretrained, **kwargs)


@register_model
def netmerge_vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG11 for CIFAR-10 without BatchNorm or biases (the OTFusion / GAMF comparison network)."""
    return build_model_with_cfg(CifarVGG, "netmerge_vgg11_cifar", pretrained, **kwargs)
