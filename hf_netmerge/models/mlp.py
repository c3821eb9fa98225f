"""The paper's sine-problem network (1 → 100 → 1, ReLU) as a timm model, with optional depth and BatchNorm."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._head import LinearHeadMixin


class MLPBlock(nn.Module):
    """Linear → (BatchNorm1d) → ReLU."""

    def __init__(self, in_features: int, out_features: int, norm: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.norm = nn.BatchNorm1d(out_features) if norm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.fc(x)))


class MLP(LinearHeadMixin, nn.Module):
    """Fully connected network; inputs of any shape are flattened to ``in_chans`` features."""

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 1,
        hidden_sizes: tuple[int, ...] | list[int] = (100,),
        norm: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.hidden_sizes = tuple(hidden_sizes)
        widths = (in_chans, *self.hidden_sizes)
        self.blocks = nn.Sequential(*(MLPBlock(i, o, norm) for i, o in zip(widths[:-1], widths[1:])))
        self._init_head(widths[-1], num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.flatten(1))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1,
        "input_size": (1, 1, 1),
        "fixed_input_size": False,
        "mean": (0.0,),
        "std": (1.0,),
        "crop_pct": 1.0,
        "first_conv": "blocks.0.fc",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"netmerge_sine_mlp": _cfg(), "netmerge_mlp_bn": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> MLP:
    return build_model_with_cfg(MLP, variant, pretrained, **kwargs)


@register_model
def netmerge_sine_mlp(pretrained: bool = False, **kwargs: Any) -> MLP:
    """The sine problem's network: 1 input, 100 hidden ReLU units, 1 output."""
    return _create("netmerge_sine_mlp", pretrained, **dict(dict(hidden_sizes=(100,)), **kwargs))


@register_model
def netmerge_mlp_bn(pretrained: bool = False, **kwargs: Any) -> MLP:
    """Two hidden layers with BatchNorm: a small test bed for norm surgery on 1-d data."""
    return _create("netmerge_mlp_bn", pretrained, **dict(dict(hidden_sizes=(64, 32), norm=True), **kwargs))
