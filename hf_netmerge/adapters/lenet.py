"""Channel groups of :class:`hf_netmerge.models.LeNet`: two conv groups and two linear groups.

The second conv group reaches ``fc1`` through a flatten, so each of its channels is
``H*W`` consecutive input features of ``fc1``.
"""

from __future__ import annotations

from torch import nn

from ..formats import architecture_name
from ..models.lenet import LeNet
from ..spec import ChainLink, MergeSpec, chain_spec
from . import register_adapter


def _norm(model: LeNet, name: str) -> str | None:
    return name if isinstance(getattr(model, name), nn.modules.batchnorm._BatchNorm) else None


@register_adapter(LeNet)
def lenet_spec(model: LeNet) -> MergeSpec:
    side_h, side_w = model.feature_size
    links = [
        ChainLink("conv1", "conv1", "act1", model.conv1.out_channels, _norm(model, "bn1")),
        ChainLink("conv2", "conv2", "act2", model.conv2.out_channels, _norm(model, "bn2"), expansion=side_h * side_w),
        ChainLink("fc1", "fc1", "act3", model.fc1.out_features, _norm(model, "bn3")),
        ChainLink("fc2", "fc2", "act4", model.fc2.out_features, _norm(model, "bn4")),
    ]
    return chain_spec(architecture_name(model), links, head="head")
