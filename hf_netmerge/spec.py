"""Channel groups: which layers produce, normalize and consume each group of coupled channels.

A :class:`MergeSpec` is plain data (module names and sizes, JSON-serializable). Adapters declare
it; surgery and gates only read it. A module that consumes a group but produces none is the
averaging head; a module that produces a group but consumes none reads the shared input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from timm.layers import Linear as TimmLinear
from torch import nn

from .errors import UnsupportedModelError

# Exact classes only: subclasses that transform their weights (timm's StdConv2d, ScaledStdConv2d) would not
# stay exact under block-diagonal concatenation. timm's Linear only adds a dtype cast.
EXACT_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, TimmLinear)
SUPPORTED_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Consumer:
    """A layer reading a group on its input dimension.

    ``expansion`` is the number of consecutive input features per channel (``H*W`` for a linear
    layer after a flatten of a ``C×H×W`` map, 1 otherwise).
    """

    module: str
    expansion: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or dropped together, with one gate.

    ``gate_sites`` are the modules whose outputs carry the group's activation; one gate (same
    parameters, same noise sample per forward) multiplies every one of them.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    gate_sites: tuple[str, ...]
    norms: tuple[str, ...] = ()
    source: str = "declared"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class MergeSpec:
    """Every channel group of one architecture, at the teachers' width."""

    architecture: str
    input_layer: str
    output_layer: str
    groups: tuple[ChannelGroup, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "architecture": self.architecture,
            "input_layer": self.input_layer,
            "output_layer": self.output_layer,
            "groups": [g.to_dict() for g in self.groups],
        }

    def layer_roles(self) -> dict[str, tuple[ChannelGroup | None, ChannelGroup | None, int]]:
        """For each weight layer: (group on its output, group on its input, input expansion)."""
        roles: dict[str, tuple[ChannelGroup | None, ChannelGroup | None, int]] = {}
        for g in self.groups:
            for name in g.producers:
                out, inp, exp = roles.get(name, (None, None, 1))
                if out is not None:
                    raise UnsupportedModelError(f"module {name!r} produces both {out.name!r} and {g.name!r}")
                roles[name] = (g, inp, exp)
            for c in g.consumers:
                out, inp, _ = roles.get(c.module, (None, None, 1))
                if inp is not None:
                    raise UnsupportedModelError(f"module {c.module!r} consumes both {inp.name!r} and {g.name!r}")
                roles[c.module] = (out, g, c.expansion)
        return roles

    def norm_groups(self) -> dict[str, ChannelGroup]:
        """For each normalization layer, the group it normalizes."""
        return {n: g for g in self.groups for n in g.norms}


def _out_size(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_size(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def validate_spec(model: nn.Module, spec: MergeSpec, width: int = 1) -> None:
    """Check that ``spec`` describes ``model`` (at ``width`` times the spec's sizes) exactly.

    Every module holding parameters or buffers must be covered by the spec, be of a supported
    type, and have the sizes the spec says; otherwise :class:`UnsupportedModelError` names it.
    """
    modules = dict(model.named_modules())
    roles = spec.layer_roles()
    norms = spec.norm_groups()
    seen_names: set[str] = set()
    for g in spec.groups:
        if not g.name.isidentifier():
            raise UnsupportedModelError(f"channel group name {g.name!r} must be a Python identifier")
        if g.name in seen_names:
            raise UnsupportedModelError(f"channel group {g.name!r} is declared twice")
        seen_names.add(g.name)
        if not g.producers or not g.gate_sites:
            raise UnsupportedModelError(f"channel group {g.name!r} needs producers and a gate site")
        for name in (*g.producers, *g.norms, *(c.module for c in g.consumers), *g.gate_sites):
            if name not in modules:
                raise UnsupportedModelError(f"{spec.architecture}: channel group {g.name!r} names a missing module {name!r}")
    for name, (out_group, in_group, expansion) in roles.items():
        module = modules[name]
        if type(module) not in EXACT_WEIGHT_LAYERS:
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} ({type(module).__name__}) is not a supported weight layer"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} is a grouped convolution (groups={module.groups}), "
                "which cannot be concatenated block-diagonally"
            )
        if out_group is not None and _out_size(module) != out_group.size * width:
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} has {_out_size(module)} outputs, "
                f"group {out_group.name!r} expects {out_group.size * width}"
            )
        if in_group is not None and _in_size(module) != in_group.size * width * expansion:
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} has {_in_size(module)} inputs, "
                f"group {in_group.name!r} expects {in_group.size * width * expansion}"
            )
    for name, group in norms.items():
        module = modules[name]
        if not isinstance(module, SUPPORTED_NORMS):
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} ({type(module).__name__}) is not a supported normalization"
            )
        if module.num_features != group.size * width:
            raise UnsupportedModelError(
                f"{spec.architecture}: norm {name!r} has {module.num_features} features, "
                f"group {group.name!r} expects {group.size * width}"
            )
    if spec.input_layer not in roles or roles[spec.input_layer][1] is not None:
        raise UnsupportedModelError(f"{spec.architecture}: input layer {spec.input_layer!r} must produce a group and consume none")
    if spec.output_layer not in roles or roles[spec.output_layer][0] is not None:
        raise UnsupportedModelError(f"{spec.architecture}: output layer {spec.output_layer!r} must consume a group and produce none")
    covered = set(roles) | set(norms)
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if own and name not in covered:
            raise UnsupportedModelError(
                f"{spec.architecture}: module {name!r} ({type(module).__name__}) holds weights that no channel group covers"
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
