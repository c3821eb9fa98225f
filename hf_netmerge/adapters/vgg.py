"""Channel groups of timm's VGG (with or without BatchNorm, ConvMlp pre-logits) and the CIFAR VGG11.

Every conv of ``features`` is one group gated after its ReLU (before pooling); timm's ``ConvMlp``
adds one group per hidden conv.
"""

from __future__ import annotations

from timm.models.vgg import VGG
from torch import nn

from ..errors import UnsupportedModelError
from ..formats import architecture_name
from ..models.cifar import CifarVGG
from ..spec import ChainLink, MergeSpec, chain_spec
from . import register_adapter


def feature_links(features: nn.Sequential, prefix: str = "features") -> list[ChainLink]:
    """One link per conv of a conv → (norm) → activation → (pool) sequence."""
    links = []
    layers = list(features.named_children())
    for i, (name, module) in enumerate(layers):
        if not isinstance(module, nn.Conv2d):
            continue
        j = i + 1
        norm = None
        if j < len(layers) and isinstance(layers[j][1], nn.modules.batchnorm._BatchNorm):
            norm, j = f"{prefix}.{layers[j][0]}", j + 1
        if j >= len(layers) or not isinstance(layers[j][1], nn.ReLU):
            raise UnsupportedModelError(f"{prefix}.{name} is not followed by a ReLU")
        links.append(ChainLink(f"conv{len(links)}", f"{prefix}.{name}", f"{prefix}.{layers[j][0]}", module.out_channels, norm))
    return links


@register_adapter(VGG)
def vgg_spec(model: VGG) -> MergeSpec:
    links = feature_links(model.features)
    mlp = model.pre_logits
    links.append(ChainLink("mlp1", "pre_logits.fc1", "pre_logits.act1", mlp.fc1.out_channels))
    links.append(ChainLink("mlp2", "pre_logits.fc2", "pre_logits.act2", mlp.fc2.out_channels))
    if not isinstance(model.head.fc, nn.Linear) or model.head.global_pool.pool_type not in ("avg", "max", "avgmax", "fast"):
        raise UnsupportedModelError("VGG head must be a linear classifier after avg or max pooling")
    return chain_spec(architecture_name(model), links, head="head.fc")


@register_adapter(CifarVGG)
def cifar_vgg_spec(model: CifarVGG) -> MergeSpec:
    links = feature_links(model.features)
    height, width = model.feature_size
    last = links[-1]
    links[-1] = ChainLink(last.group, last.producer, last.gate_site, last.size, last.norm, expansion=height * width)
    return chain_spec(architecture_name(model), links, head="head")
