"""Automatic channel-group discovery for timm CNNs without a declared adapter.

The model runs one real forward pass (eval mode, no grad) while every tensor is tagged with the
channel space it lives in. Weight layers start new spaces; norms, activations, pools, dropout and
flatten keep them; an element-wise op between two spaces (a residual add, a squeeze-excitation
product) joins them with union-find. Anything that would mix or reorder channels (normalization
across channels, a channel-mixing Conv1d as in ECA, grouped convolutions, reshapes, concatenation,
a bare parameter such as a layer scale) raises :class:`UnsupportedModelError` naming the module or op.

A real pass rather than ``torch.fx`` symbolic tracing: timm's CNNs branch on tensor shapes (VGG's
ConvMlp pools small inputs up to 7×7), which symbolic tracing cannot follow.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from ..spec import EXACT_WEIGHT_LAYERS, ChannelGroup, Consumer, MergeSpec

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish)
PASS_THROUGH = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Upsample,
    nn.ZeroPad2d,
)
# Functions (by name) that act on each channel separately.
_UNARY = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "sigmoid_", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "mish",
    "clamp", "clamp_", "clamp_min", "clamp_max", "dropout", "contiguous", "clone", "float", "to", "type_as",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate", "pad", "__neg__", "neg",
}
_BINARY = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__",
           "mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "__itruediv__"}
_SHAPE = {"size", "dim", "__len__", "numel", "shape", "__get__", "stride", "is_contiguous", "__bool__", "__format__", "__repr__"}
INPUT = -1


@dataclass
class _Space:
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Tag:
    """What the tracer knows about one tensor: its channel space and whether it passed a gate site."""

    space: int
    gated: bool = False


class _Tracer(TorchFunctionMode):
    """Tags tensors with channel spaces during one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.parent = [0]
        self.spaces: list[_Space] = [_Space()]
        self.tags: dict[int, _Tag] = {}
        self.alive: list[torch.Tensor] = []
        self.leaf_depth = 0
        self.calls: dict[str, int] = {}
        self.input_layers: list[str] = []
        self.stack: list[nn.Module] = []

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
        return a

    def new_space(self) -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(_Space())
        return len(self.parent) - 1

    def tag(self, t: torch.Tensor, tag: _Tag) -> None:
        self.tags[id(t)] = tag
        self.alive.append(t)

    def tag_of(self, t: Any) -> _Tag | None:
        return self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None

    # -- modules ---------------------------------------------------------------------------
    def module(self, module: nn.Module, args: tuple, output: Any) -> None:
        name = self.names.get(module, type(module).__name__)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1 and (isinstance(module, WEIGHT_LAYERS + NORMS + ACTIVATIONS)):
            raise UnsupportedModelError(f"module {name!r} is called more than once; give each use its own module")
        inputs = [self.tag_of(a) for a in args if isinstance(a, torch.Tensor)]
        tag = inputs[0] if inputs else None
        if tag is None:
            raise UnsupportedModelError(f"module {name!r} reads a tensor of unknown origin")
        if isinstance(module, WEIGHT_LAYERS):
            self._weight_layer(name, module, args[0], tag, output)
        elif isinstance(module, NORMS):
            if tag.space == INPUT:
                raise UnsupportedModelError(f"norm {name!r} normalizes the network input")
            space = self.spaces[self.find(tag.space)]
            space.norms.append(name)
            fused_act = getattr(module, "act", None)  # timm's BatchNormAct2d applies its activation inside
            has_act = fused_act is not None and not isinstance(fused_act, nn.Identity)
            if has_act:
                space.sites.append(name)
            self.tag(output, _Tag(tag.space, gated=has_act))
        elif isinstance(module, ACTIVATIONS):
            if tag.space != INPUT:
                self.spaces[self.find(tag.space)].sites.append(name)
            self.tag(output, _Tag(tag.space, gated=tag.space != INPUT))
        elif isinstance(module, PASS_THROUGH):
            self.tag(output, _Tag(tag.space, tag.gated))
        else:
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) cannot be merged exactly (it mixes channels or is unknown)"
            )

    def _weight_layer(self, name: str, module: nn.Module, x: torch.Tensor, tag: _Tag, output: torch.Tensor) -> None:
        if type(module) not in EXACT_WEIGHT_LAYERS:
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) transforms its weights; only plain Conv2d/Linear merge exactly"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise UnsupportedModelError(f"module {name!r} is a grouped or depthwise convolution (groups={module.groups})")
        if isinstance(module, nn.Linear) and x.dim() != 2:
            raise UnsupportedModelError(f"linear layer {name!r} reads a {x.dim()}-d tensor; it would mix non-channel dims")
        if tag.space == INPUT:
            self.input_layers.append(name)
        else:
            space = self.spaces[self.find(tag.space)]
            if not tag.gated:
                raise UnsupportedModelError(f"module {name!r} reads channels that passed no activation where a gate can sit")
            size = self._size(tag.space)
            in_size = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if in_size % size:
                raise UnsupportedModelError(f"module {name!r} reads {in_size} features from a group of {size} channels")
            space.consumers.append((name, in_size // size))
        out = self.new_space()
        self.spaces[out].producers.append(name)
        self.tag(output, _Tag(out))

    def _size(self, space: int) -> int:
        root = self.spaces[self.find(space)]
        module = self.modules_by_name[root.producers[0]]
        return module.out_features if isinstance(module, nn.Linear) else module.out_channels

    # -- functions -------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.leaf_depth:
            return output
        name = getattr(func, "__name__", str(func))
        leaves, _ = tree_flatten((args, kwargs))
        tagged = [self.tag_of(t) for t in leaves if isinstance(t, torch.Tensor)]
        if not any(t is not None for t in tagged) or not isinstance(output, torch.Tensor) or name in _SHAPE:
            return output
        if None in tagged:
            if all(t.dim() == 0 for t in leaves if isinstance(t, torch.Tensor) and self.tag_of(t) is None):
                tagged = [t for t in tagged if t is not None]
            else:
                raise UnsupportedModelError(
                    f"op {name!r}{self.where()} combines a channel group with a tensor of unknown origin (a layer scale?)"
                )
        first = tagged[0]
        if name in _BINARY and len(tagged) == 2:
            a, b = tagged
            if INPUT in (a.space, b.space):
                raise UnsupportedModelError(f"op {name!r}{self.where()} combines the network input with a channel group")
            multiply = "mul" in name
            gated = (a.gated or b.gated) if multiply else (a.gated and b.gated)
            self.tag(output, _Tag(self.union(a.space, b.space), gated))
        elif (
            name in _UNARY
            or name in _BINARY
            or (name == "flatten" and self._arg(args, kwargs, 1, "start_dim", 0) == 1)
            or (name in ("mean", "sum", "amax") and self._spatial_dims(args, kwargs))
        ):
            self.tag(output, _Tag(first.space, first.gated))
        else:
            raise UnsupportedModelError(f"op {name!r}{self.where()} mixes or reorders channels, so the merge cannot stay exact")
        return output

    @staticmethod
    def _arg(args: tuple, kwargs: dict, index: int, key: str, default: Any) -> Any:
        return kwargs.get(key, args[index] if len(args) > index else default)

    def _spatial_dims(self, args: tuple, kwargs: dict) -> bool:
        dims = self._arg(args, kwargs, 1, "dim", None)
        x = args[0]
        if dims is None or not isinstance(x, torch.Tensor):
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return all(d % x.dim() >= 2 for d in dims)

    def where(self) -> str:
        """' in module NAME (Class)' for the innermost module running now."""
        if not self.stack:
            return ""
        module = self.stack[-1]
        return f" in module {self.names.get(module) or '<root>'!r} ({type(module).__name__})"

    @contextlib.contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        leaf_types = WEIGHT_LAYERS + NORMS + ACTIVATIONS + PASS_THROUGH
        self.modules_by_name = {n: m for m, n in self.names.items()}
        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(self._push))
            handles.append(module.register_forward_hook(self._pop))
            own_params = any(True for _ in module.parameters(recurse=False))
            if isinstance(module, leaf_types) or own_params or _is_unsupported(module):
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
            if not isinstance(module, WEIGHT_LAYERS + NORMS + ACTIVATIONS + PASS_THROUGH):
                raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) cannot be merged exactly")
        self.leaf_depth += 1

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.leaf_depth -= 1
        if not self.leaf_depth:
            self.module(module, args, output)


def _is_unsupported(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d))


def _example_input(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, *size = cfg.get("input_size", (getattr(model, "in_chans", 3), 64, 64))
    if not cfg.get("fixed_input_size", False):
        size = [min(s, 64) for s in size]
    param = next(model.parameters())
    return torch.randn(2, channels, *size, device=param.device, dtype=param.dtype)


def discover_spec(model: nn.Module, architecture: str, example: torch.Tensor | None = None) -> MergeSpec:
    """Find the channel groups of ``model`` from one forward pass; see the module docstring."""
    tracer = _Tracer(model)
    example = _example_input(model) if example is None else example
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracer.hooks(model), tracer:
            tracer.tag(example, _Tag(INPUT))
            output = model(example)
    except UnsupportedModelError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise UnsupportedModelError(
            f"{architecture}: no declared adapter, and a forward pass on a {tuple(example.shape)} input to discover "
            f"channel groups failed: {e}"
        ) from e
    finally:
        model.train(was_training)
    out_tag = tracer.tag_of(output)
    if out_tag is None or out_tag.space == INPUT:
        raise UnsupportedModelError(f"{architecture}: the output does not come from a weight layer")
    output_space = tracer.find(out_tag.space)
    merged: dict[int, _Space] = {}
    for index in range(len(tracer.spaces)):
        root = tracer.find(index)
        into = merged.setdefault(root, _Space())
        part = tracer.spaces[index]
        into.producers += part.producers
        into.norms += part.norms
        into.sites += part.sites
        into.consumers += part.consumers
    heads = merged[output_space].producers
    if len(heads) != 1:
        raise UnsupportedModelError(f"{architecture}: the output is written by {heads}; expected one classifier layer")
    groups = []
    for root, space in merged.items():
        if root == output_space or not space.producers:
            continue
        if not space.sites:
            raise UnsupportedModelError(
                f"{architecture}: channels written by {space.producers[0]!r} pass no activation where a gate can sit"
            )
        groups.append(
            ChannelGroup(
                name=space.sites[0].replace(".", "_"),
                size=tracer._size(root),
                producers=tuple(space.producers),
                norms=tuple(space.norms),
                consumers=tuple(Consumer(c, e) for c, e in space.consumers),
                gate_sites=tuple(space.sites),
                source="discovered",
            )
        )
    if not tracer.input_layers:
        raise UnsupportedModelError(f"{architecture}: no weight layer reads the input")
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    input_layer = first_conv if first_conv in tracer.input_layers else tracer.input_layers[0]
    return MergeSpec(architecture, input_layer, heads[0], tuple(groups))
