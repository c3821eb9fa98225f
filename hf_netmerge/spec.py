"""Channel groups: which layers produce, normalize and consume each group of coupled channels.

A :class:`MergeSpec` is plain data (module names and sizes, JSON-serializable). Adapters declare
it; surgery and gates only read it. A module that consumes a group but produces none is the
averaging head; a module that produces a group but consumes none reads the shared input. Specs are
at one teacher's width; a big student of ``k`` teachers has ``k`` times each group's channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from timm.layers import Linear as TimmLinear
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from .errors import UnsupportedModelError
from .models.split_norm import SplitNorm, SplitResponseNorm, response_norm_layout

# timm's Linear only adds a dtype cast.
EXACT_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, TimmLinear)
# Norms over all channels of a position (LayerNorm2d, or a LayerNorm on channels-last tensors) or of the image (a global
# response norm): the big student normalizes each teacher's part on its own (SplitNorm, SplitResponseNorm), but a student
# keeping channels of several teachers normalizes them together, so its compression is not exact.
MIXING_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, SplitNorm, GlobalResponseNorm, SplitResponseNorm)
CALL = "#"  # a gate site ``name#i`` is the i-th call (from 0) of module ``name``, used several times in one forward
SUPPORTED_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, *MIXING_NORMS)


@dataclass(frozen=True)
class Consumer:
    """A layer reading a group on its input dimension.

    ``expansion`` is the number of consecutive input features per channel (``H*W`` for a linear
    layer after a flatten of a ``C×H×W`` map, 1 otherwise). ``offset`` is the input channel where
    the group starts when the layer reads a concatenation of several groups (at teacher width).
    """

    module: str
    expansion: int = 1
    offset: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or dropped together, with one gate.

    ``gate_sites`` are the modules whose outputs carry the group's activation; one gate (same
    parameters, same noise sample per forward) multiplies every one of them. A site ``name#i``
    is the i-th call of a parameter-free module used several times in one forward pass. ``channelwise`` are
    grouped or depthwise convolutions that map the group onto itself, conv group by conv group;
    ``scales`` are per-channel parameters (as dotted paths: layer scales; a ViT's class token and position embedding,
    channels on their last dim: see :func:`channel_dim`). ``unit``
    channels share one gate and are kept or dropped together: the widest conv group or GroupNorm
    group of the group's layers (1 when every channel stands alone). ``channels_last_sites`` are the
    gate sites whose output holds the channels on its last dimension (a ConvNeXt block's MLP). ``offsets`` say where the
    group starts among the channels of a producer, norm, gate site, grouped convolution or scale that holds other groups'
    channels too (a concatenation, or a layer whose output is split; 0 when not listed); a module listed several times
    holds the group several times (a fused q/k/v projection, the two halves of a ghost module). A group ``tied`` to
    another is written from it by grouped convolutions that change the width (listed in its ``channelwise``: conv group
    j reads the other group's unit j and writes this group's unit j); the two share one gate, unit by unit, so both keep
    the same conv groups.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    gate_sites: tuple[str, ...]
    norms: tuple[str, ...] = ()
    source: str = "declared"
    channelwise: tuple[str, ...] = ()
    scales: tuple[str, ...] = ()
    unit: int = 1
    channels_last_sites: tuple[str, ...] = ()
    offsets: tuple[tuple[str, int], ...] = ()
    tied: str = ""

    def offsets_of(self, module: str) -> tuple[int, ...]:
        """Where this group's channels start among the channels of ``module`` (a module name or scale path, at teacher
        width), once per time the module holds them: ``(0,)`` unless ``offsets`` lists it."""
        return tuple(offset for name, offset in self.offsets if name == module) or (0,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Width:
    """A module attribute holding a channel or head count the forward pass splits by (``split_indexes``, ``num_heads``):
    ``path`` (``module.attribute``) holds ``value`` in a teacher and ``k`` times it (each entry, for a sequence) in a big
    student of ``k`` teachers."""

    path: str
    value: int | tuple[int, ...]

    def at(self, teachers: int) -> int | tuple[int, ...]:
        """The value in a model ``teachers`` wide."""
        return self.value * teachers if isinstance(self.value, int) else tuple(v * teachers for v in self.value)


@dataclass(frozen=True)
class MergeSpec:
    """Every channel group of one architecture, at the teachers' width, and the attributes that scale with it."""

    architecture: str
    input_layer: str
    output_layer: str
    groups: tuple[ChannelGroup, ...] = field(default_factory=tuple)
    widths: tuple[Width, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "architecture": self.architecture,
            "input_layer": self.input_layer,
            "output_layer": self.output_layer,
            "groups": [g.to_dict() for g in self.groups],
            "widths": [asdict(w) for w in self.widths],
        }

    def layer_roles(self) -> dict[str, LayerRole]:
        """For each weight layer: the groups it writes and reads (each with its offset) and its input expansion."""
        roles: dict[str, LayerRole] = {}
        for g in self.groups:
            for name in dict.fromkeys(g.producers):
                role = roles.get(name, LayerRole())
                outputs = role.outputs + tuple((g, offset) for offset in g.offsets_of(name))
                roles[name] = replace(role, outputs=tuple(sorted(outputs, key=lambda part: part[1])))
            for c in g.consumers:
                role = roles.get(c.module, LayerRole())
                if role.inputs and role.expansion != c.expansion:
                    raise UnsupportedModelError(f"module {c.module!r} reads its groups with different expansions")
                inputs = tuple(sorted((*role.inputs, (g, c.offset)), key=lambda part: part[1]))
                roles[c.module] = replace(role, inputs=inputs, expansion=c.expansion)
        return roles

    def norm_groups(self) -> dict[str, Parts]:
        """For each normalization layer, the groups it normalizes with their offsets (several after a concatenation)."""
        return self._parts(lambda g: g.norms)

    def channelwise_groups(self) -> dict[str, Parts]:
        """For each grouped or depthwise convolution, the groups it maps onto themselves with their offsets."""
        return self._parts(lambda g: g.channelwise)

    def scale_groups(self) -> dict[str, Parts]:
        """For each per-channel scale (a parameter path), the groups it scales with their offsets."""
        return self._parts(lambda g: g.scales)

    def _parts(self, members: Callable[[ChannelGroup], tuple[str, ...]]) -> dict[str, Parts]:
        parts: dict[str, list[tuple[ChannelGroup, int]]] = {}
        for g in self.groups:
            for n in dict.fromkeys(members(g)):
                parts.setdefault(n, []).extend((g, offset) for offset in g.offsets_of(n))
        return {n: tuple(sorted(p, key=lambda part: part[1])) for n, p in parts.items()}


Parts = tuple[tuple[ChannelGroup, int], ...]  # groups at the channel where each starts, in order


@dataclass(frozen=True)
class LayerRole:
    """What one weight layer does: the groups it writes with the output channel each starts at (empty: the averaging
    head), the groups it reads with the input channel each starts at (empty: the shared network input) and the input
    features per channel (``expansion``)."""

    outputs: Parts = ()
    inputs: Parts = ()
    expansion: int = 1


def tiles(parts: Parts) -> bool:
    """Whether ``parts`` (groups at offsets) cover their channels exactly once, from 0, in order."""
    start = 0
    for group, offset in parts:
        if offset != start:
            return False
        start += group.size
    return True


def exact_weight_layer(module: nn.Module) -> bool:
    """A plain Conv2d or Linear: one of :data:`EXACT_WEIGHT_LAYERS`, or a subclass that changes only its construction
    (transformers' ``EfficientNetDepthwiseConv2d``). Subclasses that transform their weights in the forward (timm's
    StdConv2d, ScaledStdConv2d) would not stay exact under block-diagonal concatenation."""
    if type(module) in EXACT_WEIGHT_LAYERS:
        return True
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def channel_dim(t: torch.Tensor) -> int:
    """Where a per-channel parameter holds its channels: dim 0 of a vector (trailing singleton dims allowed: ``(C, 1, 1)``),
    else its last dim (a class token ``(1, 1, C)``, a position embedding ``(1, N, C)``)."""
    return 0 if t.numel() == t.shape[0] else t.dim() - 1


def site_module(site: str) -> str:
    """The module of gate site ``site`` (``name`` or ``name#i``)."""
    return site.partition(CALL)[0]


def _out_size(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_size(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def supported_norm(module: nn.Module) -> bool:
    """A norm whose per-channel tensors surgery widens and selects (transformers' GRN included, known by its layout)."""
    return isinstance(module, SUPPORTED_NORMS) or mixing_norm(module)


def mixing_norm(module: nn.Module) -> bool:
    """A norm whose statistics span the channels (see :data:`MIXING_NORMS`)."""
    return isinstance(module, MIXING_NORMS) or response_norm_layout(module) is not None


def _norm_size(module: nn.Module) -> int:
    if isinstance(module, (SplitNorm, SplitResponseNorm)):
        module = module.norm
    if response_norm_layout(module) is not None:
        return module.weight.numel()
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features


def channel_unit(module: nn.Module) -> int:
    """Channels of one teacher that ``module`` ties together: a conv group's width, a GroupNorm group's width, else 1."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups
    if isinstance(module, nn.GroupNorm):
        return module.num_channels // module.num_groups
    return 1


def common_unit(modules: list[nn.Module]) -> int:
    """The smallest gate granularity that keeps every one of ``modules``' channel ties whole."""
    return math.lcm(1, *(channel_unit(m) for m in modules))


def validate_spec(model: nn.Module, spec: MergeSpec, width: int = 1) -> None:
    """Check that ``spec`` describes ``model`` (at ``width`` times the spec's sizes: a big student of ``width``
    teachers) exactly.

    Every module holding parameters or buffers must be covered by the spec, be of a supported
    type, and have the sizes the spec says; every group's ``unit`` must keep its conv and norm
    groups whole; otherwise :class:`UnsupportedModelError` names the module.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    roles = spec.layer_roles()
    norms = spec.norm_groups()
    channelwise = spec.channelwise_groups()
    scales = spec.scale_groups()
    seen_names: set[str] = set()
    for g in spec.groups:
        if not g.name.isidentifier():
            raise UnsupportedModelError(f"channel group name {g.name!r} must be a Python identifier")
        if g.name in seen_names:
            raise UnsupportedModelError(f"channel group {g.name!r} is declared twice")
        seen_names.add(g.name)
        if not g.tied and (not g.producers or not g.gate_sites):  # a tied group: written from, and gated by, its owner
            raise UnsupportedModelError(f"channel group {g.name!r} needs producers and a gate site")
        if not set(g.channels_last_sites) <= set(g.gate_sites):
            raise UnsupportedModelError(f"channel group {g.name!r}: its channels-last sites must be gate sites")
        if g.unit < 1 or g.size % g.unit:
            raise UnsupportedModelError(f"channel group {g.name!r}: unit {g.unit} does not divide its {g.size} channels")
        for name in (*g.producers, *g.norms, *g.channelwise, *(c.module for c in g.consumers), *(site_module(s) for s in g.gate_sites)):
            if name not in modules:
                raise UnsupportedModelError(f"{spec.architecture}: channel group {g.name!r} names a missing module {name!r}")
    for path, parts in scales.items():
        size = sum(g.size for g, _ in parts) * width
        if not isinstance(t := params.get(path), nn.Parameter) or t.shape[channel_dim(t)] != size or not tiles(parts):
            raise UnsupportedModelError(
                f"{spec.architecture}: channel groups {[g.name for g, _ in parts]} name {path!r} as a per-channel scale "
                f"of {size} values, which the model does not hold"
            )
    for name, role in roles.items():
        module = modules[name]
        if not exact_weight_layer(module):
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} ({type(module).__name__}) is not a supported weight layer"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} is a grouped convolution (groups={module.groups}) that changes "
                "the channel group; only one mapping a group onto itself (in = out channels) merges"
            )
        writes = sum(g.size for g, _ in role.outputs) * width
        if role.outputs and (_out_size(module) != writes or not tiles(role.outputs)):
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} has {_out_size(module)} outputs; its groups "
                f"{[(g.name, offset) for g, offset in role.outputs]} (name, offset) give {writes}, or leave gaps"
            )
        reads = sum(g.size for g, _ in role.inputs) * width * role.expansion
        if role.inputs and (_in_size(module) != reads or not tiles(role.inputs)):
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} has {_in_size(module)} inputs; its groups "
                f"{[(g.name, offset) for g, offset in role.inputs]} (name, offset) give {reads}, or leave gaps"
            )
    by_name = {g.name: g for g in spec.groups}
    for g in spec.groups:
        if g.tied:
            _check_tied(spec, g, by_name.get(g.tied), [modules[n] for n in g.channelwise], width)
    for name, parts in channelwise.items():
        module = modules[name]
        if not (isinstance(module, nn.Conv2d) and exact_weight_layer(module)):
            raise UnsupportedModelError(f"{spec.architecture}: module {name!r} ({type(module).__name__}) is not a grouped Conv2d")
        if module.in_channels != module.out_channels:
            if len(parts) != 1 or not parts[0][0].tied:
                raise UnsupportedModelError(
                    f"{spec.architecture}: grouped convolution {name!r} changes the width ({module.in_channels} → "
                    f"{module.out_channels}) but writes no group tied to the group it reads"
                )
            continue
        size = sum(g.size for g, _ in parts) * width
        if module.out_channels != size or not tiles(parts) or any(g.unit % channel_unit(module) for g, _ in parts):
            raise UnsupportedModelError(
                f"{spec.architecture}: grouped convolution {name!r} ({module.out_channels} channels, conv groups of "
                f"{channel_unit(module)}) does not fit its groups {[(g.name, g.unit) for g, _ in parts]} (name, unit), "
                f"{size} channels"
            )
    for name, parts in norms.items():
        module = modules[name]
        if not supported_norm(module):
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} ({type(module).__name__}) is not a supported normalization"
            )
        if len(parts) > 1 and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(f"{spec.architecture}: norm {name!r} spans several groups; only a BatchNorm can")
        size = sum(g.size for g, _ in parts) * width
        if _norm_size(module) != size or not tiles(parts) or any(g.unit % channel_unit(module) for g, _ in parts):
            raise UnsupportedModelError(
                f"{spec.architecture}: norm {name!r} has {_norm_size(module)} channels in groups of {channel_unit(module)}; "
                f"its groups {[(g.name, g.unit) for g, _ in parts]} (name, unit) expect {size}"
            )
    for w in spec.widths:
        owner, _, attr = w.path.rpartition(".")
        held = getattr(modules.get(owner), attr, None)
        if (tuple(held) if isinstance(held, (list, tuple)) else held) != w.at(width):
            raise UnsupportedModelError(
                f"{spec.architecture}: attribute {w.path!r} holds {held!r}, not the {w.at(width)!r} of a model {width} wide"
            )
    if spec.input_layer not in roles or roles[spec.input_layer].inputs or not roles[spec.input_layer].outputs:
        raise UnsupportedModelError(f"{spec.architecture}: input layer {spec.input_layer!r} must produce a group and consume none")
    if spec.output_layer not in roles or roles[spec.output_layer].outputs:
        raise UnsupportedModelError(f"{spec.architecture}: output layer {spec.output_layer!r} must consume a group and produce none")
    wrapped = {f"{n}.norm" for n in norms if isinstance(modules[n], (SplitNorm, SplitResponseNorm))}
    covered = set(roles) | set(norms) | set(channelwise) | wrapped
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if own and name not in covered and not all((f"{name}.{n}" if name else n) in scales for n, _ in own):
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} ({type(module).__name__}) holds weights that no channel group covers"
            )


def gate_owner(spec: MergeSpec, group: ChannelGroup) -> str | None:
    """The untied group at the end of ``group``'s chain of ties, whose gate it shares (itself when untied); None for a
    chain that loops or names a missing group."""
    by_name, seen = {g.name: g for g in spec.groups}, set()
    while group.tied:
        if group.name in seen or group.tied not in by_name:
            return None
        seen.add(group.name)
        group = by_name[group.tied]
    return group.name


def _check_tied(spec: MergeSpec, group: ChannelGroup, owner: ChannelGroup | None, convs: list[nn.Module], width: int) -> None:
    """A tied group: its owner present, as many units, a chain of ties ending at an untied group, and every grouped
    convolution writing it reading the owner with conv groups that its and the owner's units keep whole, unit for unit."""
    if owner is None or owner.size // owner.unit != group.size // group.unit or gate_owner(spec, group) is None:
        raise UnsupportedModelError(
            f"{spec.architecture}: channel group {group.name!r} is tied to {group.tied!r}, which is missing, has another "
            "number of units or is tied back to it"
        )
    for conv in convs:
        if conv.in_channels == conv.out_channels:
            continue
        per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        if (conv.in_channels, conv.out_channels) != (owner.size * width, group.size * width) or owner.unit % per_in \
                or group.unit % per_out or owner.unit // per_in != group.unit // per_out:
            raise UnsupportedModelError(
                f"{spec.architecture}: grouped convolution ({conv.in_channels} → {conv.out_channels}, groups={conv.groups}) "
                f"does not map group {owner.name!r} (unit {owner.unit}) onto {group.name!r} (unit {group.unit}) conv group by "
                "conv group"
            )


@dataclass(frozen=True)
class ChainLink:
    """One layer of a plain feed-forward chain: producer → (norm) → activation (the gate site)."""

    group: str
    producer: str
    gate_site: str
    size: int
    norm: str | None = None
    expansion: int = 1


def chain_spec(architecture: str, links: list[ChainLink], head: str) -> MergeSpec:
    """The spec of a chain where each link's group is consumed by the next link's producer (the last by ``head``).

    ``expansion`` of a link is the number of features each of its channels becomes for the next
    layer (``H*W`` when a flatten sits between a convolution and a linear layer).
    """
    groups = []
    for i, link in enumerate(links):
        consumer = links[i + 1].producer if i + 1 < len(links) else head
        groups.append(
            ChannelGroup(
                name=link.group,
                size=link.size,
                producers=(link.producer,),
                norms=(link.norm,) if link.norm else (),
                consumers=(Consumer(consumer, link.expansion),),
                gate_sites=(link.gate_site,),
            )
        )
    return MergeSpec(architecture=architecture, input_layer=links[0].producer, output_layer=head, groups=tuple(groups))
