"""Channel groups of timm's ResNet family and the CIFAR ResNet20.

One group per residual stream, shared by every layer writing into it (the stem, each block's last
conv and norm, the shortcut conv and norm) and gated after each add + ReLU; a stage whose first
block has a shortcut projection starts a new stream. Each block's inner channels get their own
group, and so does each inner layer of a deep stem. Variants with attention inside their blocks
(squeeze-excitation, ECA) or norms other than BatchNorm (``resnet50_gn``) are left to the traced
adapter, which gates what their extra layers read and refuses, by module, what cannot merge.
"""

from __future__ import annotations

from timm.layers import SelectAdaptivePool2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..errors import UnsupportedModelError
from ..formats import architecture_name
from ..models.cifar import CifarResNet
from ..spec import ChannelGroup, Consumer, MergeSpec
from . import register_adapter


class _Stream:
    """A residual stream being collected block by block."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.producers: list[str] = []
        self.norms: list[str] = []
        self.sites: list[str] = []
        self.consumers: list[str] = []

    def group(self) -> ChannelGroup:
        return ChannelGroup(
            name=self.name,
            size=self.size,
            producers=tuple(self.producers),
            norms=tuple(self.norms),
            consumers=tuple(Consumer(c) for c in self.consumers),
            gate_sites=tuple(self.sites),
        )


def _conv_norm(module: nn.Sequential, prefix: str) -> tuple[str, str]:
    """Names of the (single) conv and norm inside a shortcut ``Sequential`` (optionally led by an avg-pool)."""
    convs = [f"{prefix}.{n}" for n, m in module.named_children() if isinstance(m, nn.Conv2d)]
    norms = [f"{prefix}.{n}" for n, m in module.named_children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(convs) != 1 or len(norms) != 1:
        raise UnsupportedModelError(f"module {prefix!r} (a shortcut) is not a conv + BatchNorm projection")
    return convs[0], norms[0]


def _stem(model: nn.Module, groups: list[ChannelGroup]) -> tuple[str, str]:
    """Declare the inner groups of a deep stem; returns (input layer, stem output conv)."""
    if isinstance(model.conv1, nn.Conv2d):
        return "conv1", "conv1"
    layers = list(model.conv1.named_children())
    convs = [i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Conv2d)]
    for k, i in enumerate(convs[:-1]):
        norm, act = layers[i + 1][1], layers[i + 2][1]
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not isinstance(act, nn.ReLU):
            raise UnsupportedModelError(f"module 'conv1.{i}' (a deep stem layer) is not followed by BatchNorm → ReLU")
        groups.append(
            ChannelGroup(
                name=f"stem{k}",
                size=layers[i][1].out_channels,
                producers=(f"conv1.{i}",),
                norms=(f"conv1.{i + 1}",),
                consumers=(Consumer(f"conv1.{convs[k + 1]}"),),
                gate_sites=(f"conv1.{i + 2}",),
            )
        )
    return f"conv1.{convs[0]}", f"conv1.{convs[-1]}"


def _block_layers(block: nn.Module, name: str) -> list[tuple[str, str, str]]:
    """(conv, norm, act) names of block ``name``, in order; the last triple writes into the stream."""
    if isinstance(block, Bottleneck):
        return [("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"), ("conv3", "bn3", "act3")]
    if isinstance(block, BasicBlock):
        return [("conv1", "bn1", "act1"), ("conv2", "bn2", "act2")]
    raise UnsupportedModelError(f"module {name!r} ({type(block).__name__}) is not a residual block the ResNet adapter knows")


def _plain(model: nn.Module) -> bool:
    """Whether every norm is a BatchNorm and every block a BasicBlock or Bottleneck without an attention or anti-aliasing
    module: what this adapter declares (Res2Net, ResNeSt, SK blocks and the rest are traced)."""
    if any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules()):
        return False
    blocks = [b for n, stage in model.named_children() if n.startswith("layer") for b in stage]
    return all(isinstance(b, (BasicBlock, Bottleneck)) for b in blocks) and not any(
        getattr(b, attr, None) is not None and not isinstance(getattr(b, attr), nn.Identity) for b in blocks for attr in ("se", "aa"))


@register_adapter(ResNet, CifarResNet)
def resnet_spec(model: nn.Module) -> MergeSpec | None:
    """The declared groups of a plain ResNet; None (trace it) for variants with attention or other norms."""
    if not _plain(model):
        return None
    groups: list[ChannelGroup] = []
    input_layer, stem_out = _stem(model, groups)
    stream = _Stream("stream0", model.bn1.num_features)
    stream.producers.append(stem_out)
    stream.norms.append("bn1")
    stream.sites.append("act1")
    stages = [n for n, _ in model.named_children() if n.startswith("layer")]
    for stage in stages:
        for index, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{index}"
            layers = _block_layers(block, prefix)
            stream.consumers.append(f"{prefix}.{layers[0][0]}")
            if block.downsample is not None:
                conv, norm = _conv_norm(block.downsample, f"{prefix}.downsample")
                stream.consumers.append(conv)
                groups.append(stream.group())
                stream = _Stream(f"stream{len([g for g in groups if g.name.startswith('stream')])}", block.downsample[-1].num_features)
                stream.producers.append(conv)
                stream.norms.append(norm)
            for k, (conv, norm, act) in enumerate(layers[:-1]):
                groups.append(
                    ChannelGroup(
                        name=f"{stage}_{index}_inner{k + 1}",
                        size=getattr(block, conv).out_channels,
                        producers=(f"{prefix}.{conv}",),
                        norms=(f"{prefix}.{norm}",),
                        consumers=(Consumer(f"{prefix}.{layers[k + 1][0]}"),),
                        gate_sites=(f"{prefix}.{act}",),
                    )
                )
            conv, norm, act = layers[-1]
            stream.producers.append(f"{prefix}.{conv}")
            stream.norms.append(f"{prefix}.{norm}")
            stream.sites.append(f"{prefix}.{act}")
    pool = getattr(model, "global_pool", None)
    if not isinstance(pool, SelectAdaptivePool2d) or pool.pool_type not in ("avg", "max", "avgmax", "fast"):
        raise UnsupportedModelError(f"module 'global_pool' ({getattr(pool, 'pool_type', pool)!r}) mixes channels; use 'avg' or 'max'")
    if not isinstance(model.fc, nn.Linear):
        raise UnsupportedModelError("module 'fc' is not a linear classifier (num_classes=0?); merging needs the head")
    stream.consumers.append("fc")
    groups.append(stream.group())
    return MergeSpec(architecture_name(model), input_layer, "fc", tuple(groups))
