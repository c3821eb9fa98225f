"""Automatic channel-group discovery for timm CNNs without a declared adapter.

The model runs a real forward pass (eval mode, no grad) while every tensor is tagged with the
channel space it lives in. Weight layers start new spaces; norms, activations, pools, dropout and
flatten keep them; an element-wise op between two spaces (a residual add, a squeeze-excitation
product) joins them with union-find; a grouped or depthwise convolution with as many outputs as
inputs maps a space onto itself, conv group by conv group (the space's gates then cover whole conv
groups, as they cover whole GroupNorm groups). A permute to NHWC and back is followed (linear layers,
LayerNorm and activations may act on the channels-last tensor between). A concatenation along the channels is a
sequence of spaces at offsets. A split or slice along the channels (``split``, ``chunk``, ``x[:, a:b]``) cuts the
spaces it spans into slices, each a space of its own: every role recorded on the whole (its producers, norms, gate
sites, consumers) belongs to each slice at the slice's offset, and an element-wise op joins two tensors slice by slice.
The module attributes holding the sizes a forward splits by become :class:`~hf_netmerge.spec.Width` s. Anything that
would mix or reorder channels (a channel-mixing Conv1d as in ECA, reshapes, a stack of paths, a parameter shared by all
channels) raises :class:`UnsupportedModelError` naming the module or op.

Every layer that mixes channels must read them *gated*: zero on a channel whose gate is closed, so
dropping that channel changes nothing. Each tensor's tag records which modules' ungated values reach
it (a conv's or norm's output not yet through a gate). A pass that finds a consumer reading ungated
values (a squeeze-excitation pooling a norm's output, the linear bottleneck of a MobileNet reading a
residual stream without activation) names those modules; they become gate sites and the pass runs
again. Values no gate can zero (a sigmoid's) are refused where a layer reads them.

A real pass rather than ``torch.fx`` symbolic tracing: timm's CNNs branch on tensor shapes (VGG's
ConvMlp pools small inputs up to 7×7), which symbolic tracing cannot follow.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from timm.layers import LayerScale, LayerScale2d
from timm.layers.grn import GlobalResponseNorm
from timm.models import fastvit, swiftformer
from timm.layers import activations as timm_activations
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from ..formats import Preprocessing, logits
from ..models.split_norm import layer_norm_layout, response_norm_layout
from ..spec import CALL, ChannelGroup, Consumer, MergeSpec, Width, common_unit, exact_weight_layer

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, GlobalResponseNorm)  # and transformers' GRN: _is_norm
# A per-channel ``gamma`` ((C,) viewed as (1, C, 1, 1), or (C, 1, 1)) multiplying the input.
SCALES = (LayerScale2d, fastvit.LayerScale2d, swiftformer.LayerScale2d)
LAST_SCALES = (LayerScale,)  # the same on a channels-last tensor: ``x * gamma`` with a (C,) gamma
# Activations by class; a gate after each. timm's own classes are the functional forms wrapped as modules.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
               nn.Mish, nn.PReLU, *(getattr(timm_activations, n) for n in (
                   "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh", "QuickGELU",
                   "PReLU") if hasattr(timm_activations, n)))
LAYOUT_FREE = (nn.Identity, nn.Dropout)  # pass-through in either layout; the rest of PASS_THROUGH needs channels first
PASS_THROUGH = (
    *LAYOUT_FREE,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Upsample,
    nn.ZeroPad2d,
)
# Functions (by name) that act on each channel separately and map 0 to 0 (a gated channel stays gated) ...
_ZERO_KEEPING = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "tanh", "tanh_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "mish_", "dropout", "contiguous", "clone", "float", "to",
    "type_as", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate", "pad", "__neg__",
    "neg", "abs", "square",
}
# ... and those that act on each channel separately but do not (their output is never gated).
_SPATIAL = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate", "pad", "flatten", "mean",
            "sum", "amax"}  # need channels on dim 1
_ZERO_MOVING = {"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp"}
_CLAMP = {"clamp", "clamp_", "clamp_min", "clamp_max"}  # zero-keeping when 0 lies within the bounds
_ADD = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__"}
_MUL = {"mul", "mul_", "__mul__", "__imul__", "__rmul__"}
_DIV = {"div", "div_", "__truediv__", "__itruediv__"}
_REDUCE = {"mean", "sum", "amax"}  # per channel when reducing spatial dims only
_SPLITS = {"split", "split_with_sizes", "chunk"}  # along the channels: pieces of the channel spaces
_SHAPE = {"size", "dim", "__len__", "numel", "shape", "__get__", "stride", "is_contiguous", "__bool__", "__format__", "__repr__"}
INPUT = -1
CONCAT = -2  # the space of a concatenation of channel spaces: see ``_Tag.parts``
UNGATEABLE = ""  # in a tag's ``ungated``: values that no gate can make zero (a sigmoid's output)


@dataclass
class _Space:
    """What one channel space is made of. Once split (``children``: the spaces of its consecutive slices, in order), every
    role recorded on it belongs to each slice, at the slice's offset; ``offsets`` say where the space starts among the
    channels of each producer, norm, gate site and grouped convolution holding it."""

    size: int = 0
    children: list[int] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    scales: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    last_sites: list[str] = field(default_factory=list)
    offsets: list[tuple[str, int]] = field(default_factory=list)
    consumers: list[tuple[str, int, int]] = field(default_factory=list)  # (module, expansion, offset)
    tied: int | None = None  # the space a width-changing grouped convolution wrote this one from, conv group by conv group
    widened: list[str] = field(default_factory=list)  # the width-changing grouped convolutions reading this space

    def hold(self, role: list[str], name: str, offset: int = 0) -> None:
        """Module (or parameter path) ``name`` takes ``role`` (one of this space's lists) for this space's channels, which
        start at channel ``offset`` of its own."""
        role.append(name)
        self.offsets.append((name, offset))

    def merge(self, other: _Space, shift: int) -> None:
        """Add ``other``'s roles, its offsets moved by ``shift`` (``other`` is a space this one is a slice of)."""
        self.producers += other.producers
        self.norms += other.norms
        self.channelwise += other.channelwise
        self.scales += other.scales
        self.sites += other.sites
        self.last_sites += other.last_sites
        self.offsets += [(name, offset + shift) for name, offset in other.offsets]
        self.widened += other.widened
        self.tied = self.tied if other.tied is None else other.tied
        self.consumers += [(name, expansion, offset + shift) for name, expansion, offset in other.consumers]


class _Refused(Exception):
    """Carries a refusal out of an operator call (see :meth:`_Tracer.__torch_function__`)."""

    def __init__(self, error: UnsupportedModelError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Tag:
    """What the tracer knows about one tensor: its channel space and the modules whose ungated values reach it
    (empty: the tensor is gated, zero wherever the space's gate is closed)."""

    space: int
    ungated: frozenset[str] = frozenset()
    parameter: bool = False  # a bare per-channel parameter, before its (1, C, 1, 1) view
    last: bool = False  # channels on the last dimension (after a permute to NHWC), not on dim 1
    parts: tuple[tuple[int, int], ...] = ()  # a concatenation (space CONCAT): each input's space and channels, in order


def _ungated_product(a: _Tag, b: _Tag) -> frozenset[str]:
    """A product is gated when either factor is; otherwise gating the factor that can be gated suffices."""
    if not a.ungated or not b.ungated:
        return frozenset()
    if UNGATEABLE in a.ungated:
        return b.ungated
    return a.ungated


class _Tracer(TorchFunctionMode):
    """Tags tensors with channel spaces during one forward pass; ``forced`` modules get a gate on their output."""

    def __init__(self, model: nn.Module, forced: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.forced = forced
        self.parent = [0]
        self.spaces: list[_Space] = [_Space(size=1)]
        self.tags: dict[int, _Tag] = {}
        self.alive: list[torch.Tensor] = []
        self.leaf_depth = 0
        self.calls: dict[str, int] = {}
        self.input_layers: list[str] = []
        self.stack: list[nn.Module] = []
        self.needs_gate: set[str] = set()
        self.widths: dict[str, int | tuple[int, ...]] = {}
        self.op = ""  # the function running now, for refusals

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        """Join two spaces of the same size; split ones are split alike first, and joined slice by slice."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size(a) != self.size(b):
            raise UnsupportedModelError(
                f"op {self.op!r}{self.where()} combines channel groups of {self.size(a)} and {self.size(b)} channels (a broadcast "
                "across channels), so the merge cannot follow them"
            )
        if self.spaces[a].children or self.spaces[b].children:
            for at in self.boundaries(a) | self.boundaries(b):
                self.cut(a, at)
                self.cut(b, at)
            for (x, _), (y, _) in zip(self.leaves(a), self.leaves(b)):
                self.union(x, y)
        self.parent[b] = a
        return a

    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(_Space(size=size))
        return len(self.parent) - 1

    def size(self, space: int) -> int:
        return self.spaces[self.find(space)].size

    def cut(self, space: int, at: int) -> None:
        """Split ``space`` (or the slice of it holding channel ``at``) into two slices at channel ``at``."""
        record = self.spaces[self.find(space)]
        if not 0 < at < record.size:
            return
        if not record.children:
            record.children = [self.new_space(at), self.new_space(record.size - at)]
            return
        start = 0
        for child in record.children:
            if start < at < start + self.size(child):
                self.cut(child, at - start)
                return
            start += self.size(child)

    def leaves(self, space: int) -> list[tuple[int, int]]:
        """The unsplit slices of ``space``, each with the channel where it starts: ``[(space, 0)]`` when never split."""
        root = self.find(space)
        children = self.spaces[root].children
        if not children:
            return [(root, 0)]
        starts = [sum(self.size(c) for c in children[:i]) for i in range(len(children))]
        return [(leaf, start + offset) for child, start in zip(children, starts) for leaf, offset in self.leaves(child)]

    def boundaries(self, space: int) -> set[int]:
        """Where the slices of ``space`` start (0 excluded)."""
        return {offset for _, offset in self.leaves(space) if offset}

    def sliced(self, tag: _Tag, start: int, stop: int) -> _Tag:
        """The tag of channels ``[start, stop)`` of ``tag``'s tensor: the spaces they span are split where they end."""
        if tag.space == INPUT:
            raise UnsupportedModelError(f"op {self.op!r}{self.where()} splits the network input's channels")
        self.cut_at(tag, start)
        self.cut_at(tag, stop)
        parts = []
        for space, size, offset in self.parts(tag):
            leaves = self.leaves(space)
            ends = [offset + leaf_start for _, leaf_start in leaves] + [offset + size]
            parts += [(leaf, end - begin) for (leaf, _), begin, end in zip(leaves, ends, ends[1:]) if start <= begin and end <= stop]
        if not parts:
            raise UnsupportedModelError(f"op {self.op!r}{self.where()} takes no channel of a channel group")
        if len(parts) == 1:
            return replace(tag, space=parts[0][0], parts=())
        return replace(tag, space=CONCAT, parts=tuple(parts))

    def cut_at(self, tag: _Tag, at: int) -> None:
        """Split the space holding channel ``at`` of ``tag``'s tensor there (nothing where a space starts or ends)."""
        for space, _, offset in self.parts(tag):
            self.cut(space, at - offset)

    def aligned(self, a: _Tag, b: _Tag) -> _Tag:
        """The tag of an element-wise op of two tensors (one or both concatenations): their spaces joined channel by
        channel, split alike where either is split."""
        cuts = {offset + at for tag in (a, b) for space, _, offset in self.parts(tag) for at in {0, *self.boundaries(space)}}
        for at in cuts:
            self.cut_at(a, at)
            self.cut_at(b, at)
        left, right = (self._leaf_parts(t) for t in (a, b))
        parts = tuple((self.union(x, y), size) for (x, size), (y, _) in zip(left, right))
        return _Tag(parts[0][0], parts=()) if len(parts) == 1 else _Tag(CONCAT, parts=parts)

    def _leaf_parts(self, tag: _Tag) -> list[tuple[int, int]]:
        """``(space, channels)`` of each unsplit slice of ``tag``'s tensor, in order."""
        whole = self.sliced(tag, 0, self.size_of(tag))
        return list(whole.parts) or [(whole.space, self.size(whole.space))]

    def tag(self, t: torch.Tensor, tag: _Tag) -> None:
        self.tags[id(t)] = tag
        self.alive.append(t)

    def tag_of(self, t: Any) -> _Tag | None:
        return self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None

    def parts(self, tag: _Tag) -> list[tuple[int, int, int]]:
        """``(space, channels, offset)`` of each channel space of a tensor: one, or the parts of a concatenation."""
        parts = tag.parts or ((tag.space, self.size(tag.space)),)
        offsets = [sum(size for _, size in parts[:i]) for i in range(len(parts))]
        return [(space, size, offset) for (space, size), offset in zip(parts, offsets)]

    def add_site(self, site: str, tag: _Tag) -> None:
        """Make ``site`` a gate site of every channel space of ``tag``'s tensor (at its offset, after a concatenation)."""
        for space, _, offset in self.parts(tag):
            record = self.spaces[self.find(space)]
            record.hold(record.sites, site, offset)
            if tag.last:
                record.last_sites.append(site)

    def _written(self, name: str, tag: _Tag) -> frozenset[str]:
        """The ``ungated`` of the values module ``name`` writes into ``tag``'s spaces: none when it is a forced gate site."""
        if name in self.forced:
            self.add_site(name, tag)
            return frozenset()
        return frozenset({name})

    def reads_gated(self, tag: _Tag, reader: str) -> None:
        """``reader`` mixes the channels of ``tag``'s tensor: note the modules that must gate it first, or refuse."""
        if UNGATEABLE in tag.ungated:
            raise UnsupportedModelError(
                f"module {reader!r} reads channels that passed no activation where a gate can sit (a sigmoid or a "
                "shifted value), so dropping a channel would change its output"
            )
        self.needs_gate |= tag.ungated

    # -- modules ---------------------------------------------------------------------------
    def module(self, module: nn.Module, args: tuple, output: Any) -> None:
        name = self.names.get(module, type(module).__name__)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1 and (isinstance(module, WEIGHT_LAYERS) or _is_norm(module)):
            raise UnsupportedModelError(f"module {name!r} is called more than once; give each use its own module")
        inputs = [self.tag_of(a) for a in args if isinstance(a, torch.Tensor)]
        tag = inputs[0] if inputs else None
        if tag is None:
            raise UnsupportedModelError(f"module {name!r} reads a tensor of unknown origin")
        if tag.parts and not isinstance(module, (*WEIGHT_LAYERS, nn.modules.batchnorm._BatchNorm, *ACTIVATIONS, *PASS_THROUGH)):
            raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) reads a concatenation of channel groups; "
                                        "only convolutions, linear layers, BatchNorm, activations and pooling can")
        if isinstance(module, LAST_SCALES) and not tag.last:
            raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) scales the last dim of a channels-first tensor")
        if tag.last and not (isinstance(module, (nn.Linear, nn.LayerNorm, *ACTIVATIONS, *LAYOUT_FREE, *LAST_SCALES)) or _is_norm(module)):
            raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) reads a channels-last tensor; only linear "
                                        "layers, LayerNorm, activations and dropout can")
        if isinstance(module, WEIGHT_LAYERS):
            self._weight_layer(name, module, args[0], tag, output)
        elif _is_norm(module):
            self._norm(name, module, tag, output)
        elif isinstance(module, ACTIVATIONS):
            if tag.space == INPUT:
                self.tag(output, _Tag(INPUT))
            else:  # an activation used several times (SENet's, HRNet's) gates each use: its call's site
                self.add_site(name if self.calls[name] == 1 else f"{name}{CALL}{self.calls[name] - 1}", tag)
                self.tag(output, replace(tag, ungated=frozenset()))
        elif isinstance(module, (*SCALES, *LAST_SCALES)):
            record = self.spaces[self.find(tag.space)]
            record.hold(record.scales, f"{name}.gamma")
            self.tag(output, _Tag(tag.space, tag.ungated, last=tag.last))
        elif isinstance(module, PASS_THROUGH):
            self.tag(output, tag)
        else:
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) cannot be merged exactly (it mixes channels or is unknown)"
            )

    def _norm(self, name: str, module: nn.Module, tag: _Tag, output: torch.Tensor) -> None:
        if tag.space == INPUT:
            raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) normalizes the network input")
        if response_norm_layout(module) not in (None, "last" if tag.last else "first"):
            raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) does not find the channels where they are "
                                        f"(channels {'last' if tag.last else 'on dim 1'})")
        if isinstance(module, nn.LayerNorm):
            # on a (batch, channels) tensor the channels are last as well as on dim 1 (ConvNeXt's norm after pooling)
            layouts = ("last",) if tag.last else ("first", "last") if output.dim() == 2 else ("first",)
            if layer_norm_layout(module) not in layouts or len(module.normalized_shape) != 1:
                raise UnsupportedModelError(
                    f"module {name!r} ({type(module).__name__}) does not normalize over the channels alone "
                    f"(normalized shape {tuple(module.normalized_shape)}, channels {'last' if tag.last else 'on dim 1'})"
                )
        for space, _, offset in self.parts(tag):
            record = self.spaces[self.find(space)]
            record.hold(record.norms, name, offset)
        fused_act = getattr(module, "act", None)  # timm's BatchNormAct2d applies its activation inside
        if fused_act is not None and not isinstance(fused_act, nn.Identity):
            self.add_site(name, tag)
            self.tag(output, replace(tag, ungated=frozenset()))
        else:
            self.tag(output, replace(tag, ungated=self._written(name, tag)))

    def _weight_layer(self, name: str, module: nn.Module, x: torch.Tensor, tag: _Tag, output: torch.Tensor) -> None:
        if not exact_weight_layer(module):
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) transforms its weights; only plain Conv2d/Linear merge exactly"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            self._grouped_conv(name, module, tag, output)
            return
        if isinstance(module, nn.Linear) and x.dim() != 2 and not tag.last:
            raise UnsupportedModelError(f"linear layer {name!r} reads a {x.dim()}-d tensor; it would mix non-channel dims")
        if tag.space == INPUT:
            self.input_layers.append(name)
        else:
            self.reads_gated(tag, name)
            parts = self.parts(tag)
            size = sum(channels for _, channels, _ in parts)
            in_size = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if in_size % size:
                raise UnsupportedModelError(f"module {name!r} reads {in_size} features from a group of {size} channels")
            for space, _, offset in parts:
                self.spaces[self.find(space)].consumers.append((name, in_size // size, offset))
        out = self.new_space(module.out_features if isinstance(module, nn.Linear) else module.out_channels)
        self.spaces[out].hold(self.spaces[out].producers, name)
        written = _Tag(out, last=tag.last)
        self.tag(output, replace(written, ungated=self._written(name, written)))

    def _grouped_conv(self, name: str, module: nn.Conv2d, tag: _Tag, output: torch.Tensor) -> None:
        """A grouped or depthwise convolution maps its input space onto itself, conv group by conv group; one that
        changes the width writes a new space tied to its input's (one gate for both, conv group by conv group)."""
        if module.in_channels != module.out_channels:
            if tag.space in (INPUT, CONCAT):
                raise UnsupportedModelError(
                    f"module {name!r} is a grouped convolution (groups={module.groups}) from {module.in_channels} to "
                    f"{module.out_channels} channels on the network input or a concatenation"
                )
            self.spaces[self.find(tag.space)].widened.append(name)
            out = self.new_space(module.out_channels)
            self.spaces[out].hold(self.spaces[out].channelwise, name)
            self.spaces[out].tied = tag.space
            written = _Tag(out, tag.ungated, last=tag.last)
            self.tag(output, written if module.bias is None else replace(written, ungated=self._written(name, written)))
            return
        if tag.space == INPUT:
            raise UnsupportedModelError(f"module {name!r} is a grouped convolution (groups={module.groups}) on the network input")
        for space, _, offset in self.parts(tag):  # conv groups straddling two spaces are refused by validate_spec
            record = self.spaces[self.find(space)]
            record.hold(record.channelwise, name, offset)
        # Without a bias a closed (zero) channel stays zero; a bias writes a new value.
        ungated = tag.ungated if module.bias is None else self._written(name, tag)
        self.tag(output, replace(tag, ungated=ungated))

    # -- functions -------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.leaf_depth:
            return output
        try:
            return self._function(func, args, kwargs, output)
        except UnsupportedModelError as e:
            # Not a TypeError on the way out: torch turns a TypeError inside an operator (``x ** 2``) into NotImplemented.
            raise _Refused(e) from None

    def _function(self, func: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        """Tag ``output`` of ``func`` from its inputs' tags, or refuse an op that would mix or reorder channels."""
        name = self.op = getattr(func, "__name__", str(func))
        leaves, _ = tree_flatten((args, kwargs))
        tagged = [self.tag_of(t) for t in leaves if isinstance(t, torch.Tensor)]
        if not any(t is not None for t in tagged) or name in _SHAPE:
            return output
        if isinstance(output, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in output):
            self._split(name, args, kwargs, output)
            return output
        if not isinstance(output, torch.Tensor):
            return output
        # a number operand (adding 0, as FastViT's absent identity branch does, shifts nothing)
        scalar_operand = any(isinstance(v, numbers.Number) and not isinstance(v, bool) and v != 0 for v in args[1:])
        if None in tagged:
            if all(t.dim() == 0 for t in leaves if isinstance(t, torch.Tensor) and self.tag_of(t) is None):
                tagged, scalar_operand = [t for t in tagged if t is not None], True
            else:
                raise UnsupportedModelError(
                    f"op {name!r}{self.where()} combines a channel group with a tensor of unknown origin (a layer scale?)"
                )
        first = tagged[0]
        if name == "cat":
            self.tag(output, self._concatenated(args, kwargs, output))
            return output
        if name == "__getitem__" and not first.parameter and (channels := self._channel_slice(first, args[0], args[1])) is not None:
            start, stop, bounds = channels
            if bounds:  # bounds the code wrote (``x[:, :self.out_chs]``): a wider model needs them wider
                self.note_widths(bounds)
            self.tag(output, self.sliced(first, start, stop))
            return output
        if first.parameter and name in ("reshape", "view") and tuple(output.shape) == (1, output.numel(), 1, 1):
            self.tag(output, _Tag(first.space, first.ungated))  # a per-channel parameter viewed as (1, C, 1, 1)
            return output
        if name in _MUL and len(tagged) == 2 and self._scales_channels_last(leaves, tagged):
            scale, x = sorted(tagged, key=lambda t: not t.parameter)
            self.tag(output, _Tag(self.union(scale.space, x.space), _ungated_product(replace(scale, parameter=False), x), last=True))
            return output
        if any(t.parameter for t in tagged):
            raise UnsupportedModelError(
                f"op {name!r}{self.where()} uses a parameter of its module other than as a (1, C, 1, 1) per-channel view "
                "(a class token, a position embedding or a value shared by all channels cannot be split per teacher)"
            )
        if any(t.parts for t in tagged) and (name == "permute" or (len(tagged) > 1 and name not in _ADD | _MUL | _DIV)):
            raise UnsupportedModelError(f"op {name!r}{self.where()} combines or reorders a concatenation of channel groups")
        if name == "permute":
            self.tag(output, replace(first, last=self._permuted(first, args, kwargs)))
            return output
        if first.last and name in _SPATIAL and not (name in _REDUCE and self._spatial_dims(args, kwargs, last=True)):
            raise UnsupportedModelError(f"op {name!r}{self.where()} reads a channels-last tensor as if its channels were on dim 1")
        if len(tagged) == 2 and name in _ADD | _MUL | _DIV:
            a, b = tagged
            if INPUT in (a.space, b.space):
                raise UnsupportedModelError(f"op {name!r}{self.where()} combines the network input with a channel group")
            if a.last != b.last:
                raise UnsupportedModelError(f"op {name!r}{self.where()} combines a channels-last tensor with a channels-first one")
            ungated = _ungated_product(a, b) if name in _MUL else a.ungated if name in _DIV else a.ungated | b.ungated
            joined = self.aligned(a, b) if a.parts or b.parts else _Tag(self.union(a.space, b.space))
            self.tag(output, replace(joined, ungated=ungated, last=a.last))
        elif len(tagged) == 1 and name in _ADD:
            self.tag(output, replace(first, ungated=first.ungated | ({UNGATEABLE} if scalar_operand else frozenset())))
        elif len(tagged) == 1 and name in _MUL | _DIV:
            self.tag(output, first)
        elif name in _ZERO_MOVING or (name in _CLAMP and not self._clamp_keeps_zero(name, args, kwargs)):
            self.tag(output, replace(first, ungated=frozenset({UNGATEABLE})))
        elif (
            name in _ZERO_KEEPING
            or name in _CLAMP
            or (name in ("pow", "__pow__") and isinstance(e := self._arg(args, kwargs, 1, "exponent", None), numbers.Number) and e > 0)
            or (name == "flatten" and self._arg(args, kwargs, 1, "start_dim", 0) == 1)
            or (name in ("reshape", "view") and not first.last and output.shape[:2] == args[0].shape[:2])
            or (name in _REDUCE and self._spatial_dims(args, kwargs, last=first.last))
        ):
            self.tag(output, first)
        else:
            raise UnsupportedModelError(f"op {name!r}{self.where()} mixes or reorders channels, so the merge cannot stay exact")
        return output

    def _split(self, name: str, args: tuple, kwargs: dict, outputs: tuple | list) -> None:
        """Tag the pieces of a split (``split``, ``chunk``) along the channels: each piece holds a slice of the input's
        spaces, which are split where the pieces end. Along any other dim, or into unequal chunks: refused."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        tag = self.tag_of(x)
        if name not in _SPLITS or tag is None or not all(isinstance(o, torch.Tensor) for o in outputs):
            raise UnsupportedModelError(f"op {name!r}{self.where()} returns several tensors in a way the merge cannot follow")
        dim = self._arg(args, kwargs, 2, "dim", 0)
        channel_dim = _channel_dim(x, tag.last)
        if not isinstance(dim, int) or dim % x.dim() != channel_dim:
            raise UnsupportedModelError(
                f"op {name!r}{self.where()} splits along dim {dim}, not the channels, so the merge cannot follow them"
            )
        sizes = self._arg(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_sizes"))
        if name == "chunk" and x.shape[channel_dim] % len(outputs):
            raise UnsupportedModelError(f"op 'chunk'{self.where()} cuts {x.shape[channel_dim]} channels into {len(outputs)} "
                                        "unequal chunks, which a wider model would cut elsewhere")
        if name != "chunk" and isinstance(sizes, int):  # split sizes come from the code: a wider model needs them wider
            self.note_widths({sizes, x.shape[channel_dim]})
        elif name != "chunk":
            self.note_widths(set(sizes), tuple(sizes))
        start = 0
        for piece in outputs:
            stop = start + piece.shape[channel_dim]
            self.tag(piece, self.sliced(tag, start, stop))
            start = stop

    def note_widths(self, counts: set[int], sections: tuple[int, ...] = ()) -> None:
        """The innermost running module's attributes holding ``counts`` (or the sequence ``sections``), which the op splits
        by: they become :class:`~hf_netmerge.spec.Width` s, scaled in a big student. None found: refused (the sizes come
        from where surgery cannot reach them)."""
        module = self.stack[-1] if self.stack else None
        found = [(attr, value) for attr, value in (vars(module) if module is not None else {}).items()
                 if not attr.startswith("_") and not isinstance(value, bool)
                 and ((isinstance(value, int) and value in counts)
                      or (sections and isinstance(value, (list, tuple)) and tuple(value) == sections))]
        if not found:
            raise UnsupportedModelError(
                f"op {self.op!r}{self.where()} splits channels at {sorted(counts)}, which no attribute of the module holds, so a wider "
                "model cannot split alike"
            )
        prefix = self.names.get(module) or ""
        for attr, value in found:
            self.widths[f"{prefix}.{attr}".lstrip(".")] = value if isinstance(value, int) else tuple(value)

    def size_of(self, tag: _Tag) -> int:
        """Channels of ``tag``'s tensor."""
        return sum(size for _, size, _ in self.parts(tag))

    def _channel_slice(self, tag: _Tag, x: torch.Tensor, index: Any) -> tuple[int, int, set[int]] | None:
        """``(start, stop, bounds)`` of the channels ``x[index]`` keeps when the index is plain slicing (``x[:, a:b]``,
        ``x[..., a:b]`` channels last, ``x[:, :, ::2]``): consecutive channels, whatever it takes of the other dims;
        ``bounds``: the channel bounds written in the index. None for other indexing (an integer, a tensor), which the
        caller refuses."""
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(i, slice) or i is Ellipsis for i in index) or index.count(Ellipsis) > 1:
            return None
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (x.dim() - len(index) + 1) + index[at + 1 :]
        channel_dim = _channel_dim(x, tag.last)
        channels = (*index, *(slice(None),) * x.dim())[channel_dim]
        if channels.step not in (None, 1):
            raise UnsupportedModelError(f"op '__getitem__'{self.where()} takes every {channels.step}th channel, so the "
                                        "merge cannot follow them")
        start, stop, _ = channels.indices(x.shape[channel_dim])
        return start, stop, {b for b in (channels.start, channels.stop) if b}

    def _scales_channels_last(self, leaves: list, tagged: list[_Tag]) -> bool:
        """Whether a product multiplies a channels-last tensor by a block's bare per-channel parameter (transformers'
        ConvNeXt layer scale): the parameter broadcasts along the channels, as a (1, C, 1, 1) view does channels first."""
        tensors = [t for t in leaves if isinstance(t, torch.Tensor) and self.tag_of(t) is not None]
        if len(tensors) != 2 or [t.parameter for t in tagged].count(True) != 1:
            return False
        (scale, _), (x, x_tag) = sorted(zip(tensors, tagged), key=lambda pair: not pair[1].parameter)
        return x_tag.last and not x_tag.parts and scale.dim() == 1 and scale.shape[0] == x.shape[-1]

    def _concatenated(self, args: tuple, kwargs: dict, output: torch.Tensor) -> _Tag:
        """The tag of a concatenation along the channels: each input's spaces in order (refused along other dims)."""
        tensors = list(self._arg(args, kwargs, 0, "tensors", ()))
        dim = self._arg(args, kwargs, 1, "dim", 0)
        tags = [self.tag_of(t) for t in tensors]
        last = bool(tags) and all(t is not None and t.last for t in tags)  # channels-last tensors joined on their last dim
        channel_dim = _channel_dim(output, last)
        if output.dim() < 2 or dim % output.dim() != channel_dim or any(t is None or t.last != last or t.space == INPUT for t in tags):
            raise UnsupportedModelError(
                f"op 'cat'{self.where()} concatenates along dim {dim}, the network input or a tensor of unknown origin"
            )
        parts = tuple(part for t, x in zip(tags, tensors) for part in (t.parts or ((t.space, x.shape[channel_dim]),)))
        return _Tag(CONCAT, frozenset().union(*(t.ungated for t in tags)), last=last, parts=parts)

    def _permuted(self, tag: _Tag, args: tuple, kwargs: dict) -> bool:
        """Whether a 4-d permute leaves the channels last: NCHW → NHWC or back; any other order is refused."""
        dims = kwargs.get("dims", args[1:] if len(args) > 2 else args[1] if len(args) > 1 else ())
        dims = tuple(dims)
        if dims == (0, 2, 3, 1) and not tag.last:
            return True
        if dims == (0, 3, 1, 2) and tag.last:
            return False
        raise UnsupportedModelError(f"op 'permute'{self.where()} reorders dimensions {dims}, so the merge cannot follow the channels")

    def _clamp_keeps_zero(self, name: str, args: tuple, kwargs: dict) -> bool:
        low, high = self._arg(args, kwargs, 1, "min", None), self._arg(args, kwargs, 2, "max", None)
        if name == "clamp_max":
            low, high = None, self._arg(args, kwargs, 1, "max", None)
        return not (isinstance(low, numbers.Number) and low > 0) and not (isinstance(high, numbers.Number) and high < 0)

    @staticmethod
    def _arg(args: tuple, kwargs: dict, index: int, key: str, default: Any) -> Any:
        return kwargs.get(key, args[index] if len(args) > index else default)

    def _spatial_dims(self, args: tuple, kwargs: dict, last: bool = False) -> bool:
        dims = self._arg(args, kwargs, 1, "dim", None)
        x = args[0]
        if dims is None or not isinstance(x, torch.Tensor):
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return all(d % x.dim() not in (0, _channel_dim(x, last)) for d in dims)

    def where(self) -> str:
        """' in module NAME (Class)' for the innermost module running now."""
        if not self.stack:
            return ""
        module = self.stack[-1]
        return f" in module {self.names.get(module) or '<root>'!r} ({type(module).__name__})"

    @contextlib.contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        leaf_types = WEIGHT_LAYERS + NORMS + ACTIVATIONS + SCALES + LAST_SCALES + PASS_THROUGH
        self.modules_by_name = {n: m for m, n in self.names.items()}
        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(self._push))
            handles.append(module.register_forward_hook(self._pop))
            own_params = dict(module.named_parameters(recurse=False))
            if own_params and not (isinstance(module, leaf_types) or _is_norm(module) or _is_unsupported(module)):
                # A block's bare parameters: a layer scale (a space joined where it multiplies, widened per channel), or
                # anything else, refused at the op that uses it (a class token's concatenation, a position embedding's add).
                scales = _holds_scales(module)
                for attr, param in own_params.items():
                    space = self.new_space(param.shape[0] if param.dim() else 1)
                    if scales:
                        self.spaces[space].hold(self.spaces[space].scales, f"{self.names[module]}.{attr}".lstrip("."))
                    self.tag(param, _Tag(space, frozenset({UNGATEABLE}), parameter=True))
            elif isinstance(module, leaf_types) or _is_norm(module) or _is_unsupported(module):
                handles.append(module.register_forward_pre_hook(self._enter))
                handles.append(module.register_forward_hook(self._leave))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _push(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(module)

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.stack.pop()

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not self.leaf_depth:
            name = self.names.get(module) or f"<root {type(module).__name__}>"
            if not (isinstance(module, WEIGHT_LAYERS + NORMS + ACTIVATIONS + SCALES + LAST_SCALES + PASS_THROUGH) or _is_norm(module)):
                raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) cannot be merged exactly")
        self.leaf_depth += 1

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.leaf_depth -= 1
        if not self.leaf_depth:
            self.module(module, args, output)


def _channel_dim(x: torch.Tensor, last: bool) -> int:
    """The dim holding ``x``'s channels: the last for a channels-last tensor, else 1."""
    return x.dim() - 1 if last else 1


def _unit(tracer: _Tracer, space: _Space) -> int:
    """The gate unit of a space: its conv groups', norm groups' and the conv groups its width-changing grouped
    convolutions read, whole (a tied space's unit follows its owner's in :func:`_tied`)."""
    modules = [tracer.modules_by_name[n] for n in dict.fromkeys((*space.channelwise, *space.norms))]
    own = [m for m in modules if not (isinstance(m, nn.Conv2d) and m.in_channels != m.out_channels)]
    widened = [tracer.modules_by_name[n] for n in dict.fromkeys(space.widened)]
    return math.lcm(common_unit(own), *(m.in_channels // m.groups for m in widened))


def _tied(tracer: _Tracer, merged: dict[int, _Space], by_root: dict[int, ChannelGroup]) -> list[ChannelGroup]:
    """The groups (by unsplit space), each written by a width-changing grouped convolution tied to the group that
    convolution reads, its unit as many conv groups' outputs as the owner's unit holds conv groups' inputs (an owner may
    be tied in turn: FastViT's downsampling convolutions, stage after stage). Refused when the owner was split."""
    done: dict[int, ChannelGroup] = {}

    def resolve(root: int) -> ChannelGroup:
        if root not in done:
            group, space = by_root[root], merged[root]
            if space.tied is not None:
                owner = tracer.leaves(space.tied)
                if len(owner) != 1 or owner[0][0] not in by_root:
                    raise UnsupportedModelError(f"module {group.channelwise[0]!r} is a grouped convolution changing the width "
                                                "of a channel group that is split or has no gate")
                conv = next(m for m in (tracer.modules_by_name[n] for n in group.channelwise) if m.in_channels != m.out_channels)
                owner_group = resolve(owner[0][0])
                per_unit = owner_group.unit // (conv.in_channels // conv.groups)  # conv groups per owner unit
                group = replace(group, tied=owner_group.name,
                                unit=math.lcm(group.unit, per_unit * (conv.out_channels // conv.groups)))
            done[root] = group
        return done[root]

    return [resolve(root) for root in by_root]


def _group_name(writer: str, sites: list[str], groups: list[ChannelGroup]) -> str:
    """A group's name: its first gate site's; its first writer's when it has none (a tied group) or another group has
    that site (groups meeting at one site after a concatenation), numbered when that is taken too (the slices of a
    split)."""
    taken = {g.name for g in groups}
    first = sites[0] if sites and sites[0] not in {s for g in groups for s in g.gate_sites} else writer
    first = first.replace(".", "_").replace(CALL, "_")
    return next(name for n in range(len(taken) + 2) if (name := first if n == 0 else f"{first}_{n}") not in taken)


def _call_site(site: str, calls: dict[str, int]) -> str:
    """``site``, or ``site#0`` when its module was called more than once (its later calls are ``site#1``, ...)."""
    return f"{site}{CALL}0" if calls.get(site, 0) > 1 else site


def _holds_scales(module: nn.Module) -> bool:
    """A container whose own parameters are all 1-d and no buffers: per-channel scales used inside its forward."""
    return (any(True for _ in module.children()) and not any(True for _ in module.buffers(recurse=False))
            and all(p.dim() == 1 for p in module.parameters(recurse=False)))


def _is_norm(module: nn.Module) -> bool:
    """A normalization the tracer follows: one of :data:`NORMS`, or transformers' global response norm."""
    return isinstance(module, NORMS) or response_norm_layout(module) is not None


def _is_unsupported(module: nn.Module) -> bool:
    return isinstance(module, (nn.InstanceNorm2d, nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d))


def example_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Inputs to run the model on, to try in order: at most 64 px (fast) unless the model fixes its size, then the size
    its format preprocesses to (an Inception needs 75 px, transformers' CLIP its ``image_size``) in case the small one
    fails. A model with a patch embedding takes the size it was built for (a ViT made with ``img_size=28``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, *size = Preprocessing.for_model(model).input_size
    param = next(model.parameters())
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built, tuple) and len(built) == 2:  # a patch embedding checks the size it was built for
        sizes = [list(built)]
    else:
        sizes = [size] if cfg.get("fixed_input_size", False) else [[min(s, 64) for s in size], size]
    return [torch.randn(2, channels, *s, device=param.device, dtype=param.dtype) for s in dict.fromkeys(map(tuple, sizes))]


class _ForwardFailed(UnsupportedModelError):
    """The model could not run on the example input (a smaller one than it needs, say)."""


def _trace_once(model: nn.Module, architecture: str, example: torch.Tensor, forced: frozenset[str]) -> tuple[_Tracer, Any]:
    tracer = _Tracer(model, forced)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer.hooks(model), tracer:
            tracer.tag(example, _Tag(INPUT))
            return tracer, model(example)
    except UnsupportedModelError:
        raise
    except _Refused as e:
        raise e.error from None
    except Exception as e:  # the model cannot run on this input (timm models assert sizes): a typed refusal, with the reason
        raise _ForwardFailed(
            f"{architecture}: no declared adapter, and a forward pass on a {tuple(example.shape)} input to discover "
            f"channel groups failed: {e}"
        ) from e
    finally:
        model.train(was_training)


def _trace(model: nn.Module, architecture: str, examples: list[torch.Tensor], forced: frozenset[str]) -> tuple[_Tracer, Any]:
    """One tagged forward pass with gates on the ``forced`` modules' outputs, on the first of ``examples`` the model
    runs on."""
    for example in examples[:-1]:
        with contextlib.suppress(_ForwardFailed):
            return _trace_once(model, architecture, example, forced)
    return _trace_once(model, architecture, examples[-1], forced)


def discover_spec(model: nn.Module, architecture: str, example: torch.Tensor | None = None) -> MergeSpec:
    """Find the channel groups of ``model`` from a forward pass (two when some values need gates); see the module docstring."""
    examples = example_inputs(model) if example is None else [example]
    forced: frozenset[str] = frozenset()
    tracer, output = _trace(model, architecture, examples, forced)
    if tracer.needs_gate:  # a second pass with gates where the first found ungated reads; it needs no more
        forced = frozenset(tracer.needs_gate)
        tracer, output = _trace(model, architecture, examples, forced)
        if tracer.needs_gate - forced:
            raise UnsupportedModelError(f"{architecture}: modules {sorted(tracer.needs_gate - forced)} still need gates")
    out_tag = tracer.tag_of(logits(output))
    if out_tag is None or out_tag.space == INPUT:
        raise UnsupportedModelError(f"{architecture}: the output does not come from a weight layer")
    if out_tag.space == CONCAT:
        raise UnsupportedModelError(f"{architecture}: the output is a concatenation, not one weight layer's")
    merged: dict[int, _Space] = {}  # per unsplit space: its roles and those of every space it is a slice of
    for index in range(len(tracer.spaces)):
        for leaf, shift in tracer.leaves(index):
            merged.setdefault(leaf, _Space(size=tracer.size(leaf))).merge(tracer.spaces[index], shift)
    # Usually one classifier; a distilled model's heads (RepViT, LeViT) are averaged into the output: each is a head
    # of the big student, averaging the teachers, and the first is the spec's output layer.
    output_leaves = [leaf for leaf, _ in tracer.leaves(out_tag.space)]
    heads = merged[output_leaves[0]].producers
    by_root: dict[int, ChannelGroup] = {}  # unsplit space → its group
    for root, space in merged.items():
        if root in output_leaves or not (space.producers or space.tied is not None):
            continue
        writer = (space.producers or space.channelwise)[0]
        if not space.sites and space.tied is None:  # a tied space without bias is zero where its owner's gate closes
            raise UnsupportedModelError(f"{architecture}: channels written by {writer!r} pass no activation where a gate can sit")
        sites = list(dict.fromkeys(_call_site(n, tracer.calls) for n in space.sites))
        offsets = list(dict.fromkeys((_call_site(n, tracer.calls), offset) for n, offset in space.offsets))
        held = {n: [o for m, o in offsets if m == n] for n, _ in offsets}
        by_root[root] = ChannelGroup(
            name=_group_name(writer, sites, list(by_root.values())),
            size=space.size,
            producers=tuple(dict.fromkeys(space.producers)),
            norms=tuple(dict.fromkeys(space.norms)),
            consumers=tuple(Consumer(c, e, offset) for c, e, offset in dict.fromkeys(space.consumers)),
            gate_sites=tuple(sites),
            source="discovered",
            channelwise=tuple(dict.fromkeys(space.channelwise)),
            scales=tuple(dict.fromkeys(space.scales)),
            channels_last_sites=tuple(dict.fromkeys(_call_site(n, tracer.calls) for n in space.last_sites)),
            unit=_unit(tracer, space),
            offsets=tuple((n, o) for n, o in offsets if held[n] != [0]),  # where a module holds more than this group
        )
    groups = _tied(tracer, merged, by_root)
    if not tracer.input_layers:
        raise UnsupportedModelError(f"{architecture}: no weight layer reads the input")
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    input_layer = first_conv if first_conv in tracer.input_layers else tracer.input_layers[0]
    widths = tuple(Width(path, value) for path, value in tracer.widths.items())
    return MergeSpec(architecture, input_layer, heads[0], tuple(groups), widths)
