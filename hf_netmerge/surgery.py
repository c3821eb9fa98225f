"""All tensor work of the merge: widening k teachers into one, and selecting channels back out.

One small surgeon per layer type (weight layers, grouped convolutions, norms) does the slicing;
:func:`widen_model` and :func:`select_model` walk a :class:`~hf_netmerge.spec.MergeSpec` and call
them. Modules are deep-copied and their tensors replaced, so subclasses (timm's layers) keep their
behaviour. Teacher ``i``'s channels of a group sit at ``[i·size, (i+1)·size)`` of the big student's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models.split_norm import SplitNorm, SplitResponseNorm, response_norm_layout
from .spec import ChannelGroup, MergeSpec, Parts, Width, channel_dim, channel_unit


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _shell(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Deep-copy ``module`` without copying the tensors ``names`` (they are about to be replaced)."""
    memo: dict[int, object] = {id(t): None for n in names if (t := getattr(module, n, None)) is not None}
    return copy.deepcopy(module, memo)


def _set_sizes(module: nn.Module, out_size: int, in_size: int) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_size, in_size
    else:
        module.out_channels, module.in_channels = out_size, in_size


def expand_index(index: torch.Tensor, expansion: int) -> torch.Tensor:
    """Channel indices → feature indices when every channel spans ``expansion`` consecutive features."""
    if expansion == 1:
        return index
    return (index[:, None] * expansion + torch.arange(expansion, device=index.device)).reshape(-1)


def teacher_features(parts: list[tuple[int, int]], teacher: int, teachers: int) -> torch.Tensor:
    """Where the big student holds each of teacher ``teacher``'s features of a layer covering ``parts`` (``(start, size)``
    in a teacher's features, tiling them in order): part by part, every teacher's slice in turn, so feature ``start + j``
    sits at ``teachers·start + teacher·size + j``."""
    return torch.cat([teachers * start + teacher * size + torch.arange(size) for start, size in parts])


def _joined(
    tensors: list[torch.Tensor | None], like: torch.Tensor | None, parts: list[tuple[int, int]] | None = None
) -> torch.Tensor | nn.Parameter | None:
    """The per-channel tensors of k modules concatenated (a Parameter when ``like`` is one); with ``parts``, part by
    part: for each ``(start, size)``, every teacher's slice (a norm after a concatenation)."""
    if like is None:
        return None
    parts = parts or [(0, like.shape[0])]
    joined = torch.cat([t.detach()[start : start + size] for start, size in parts for t in tensors])
    return _param(joined, like) if isinstance(like, nn.Parameter) else joined


def _reshaped(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` in ``shape`` (a Parameter stays one, with its ``requires_grad``)."""
    if t.shape == t.reshape(shape).shape:
        return t
    return _param(t.detach().reshape(shape), t) if isinstance(t, nn.Parameter) else t.reshape(shape)


def _selected(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | nn.Parameter | None:
    if t is None:
        return None
    kept = t.detach().index_select(0, index.to(t.device))
    return _param(kept, t) if isinstance(t, nn.Parameter) else kept


class WeightSurgeon:
    """Linear and Conv2d: output channels on dim 0 of the weight, input channels on dim 1."""

    @staticmethod
    def widen(layers: list[nn.Module], out_parts: list[tuple[int, int]] | None, in_parts: list[tuple[int, int]] | None) -> nn.Module:
        """Concatenate k layers block-diagonally: teacher i's rows read only teacher i's features.

        ``out_parts`` / ``in_parts``: the ``(start, size)`` output / input features of each group the layer writes /
        reads (several after a split or a concatenation), each laid out part by part, teacher by teacher (see
        :func:`teacher_features`). ``out_parts`` None: the outputs are averaged (the head); ``in_parts`` None: the
        input is shared (the first layer).
        """
        if out_parts is None and in_parts is None:
            raise ValueError("a merged layer must widen its inputs, its outputs or both")
        weights = [m.weight.detach() for m in layers]
        first, k = weights[0], len(weights)
        shape = (first.shape[0] * (1 if out_parts is None else k), first.shape[1] * (1 if in_parts is None else k))
        w = first.new_zeros((*shape, *first.shape[2:]))
        rows = [torch.arange(shape[0]) if out_parts is None else teacher_features(out_parts, i, k) for i in range(k)]
        for i, x in enumerate(weights):
            columns = torch.arange(shape[1]) if in_parts is None else teacher_features(in_parts, i, k)
            w[rows[i][:, None], columns[None, :]] = x if out_parts is not None else x / k
        out = _shell(layers[0], ("weight", "bias"))
        out.weight = _param(w, layers[0].weight)
        if layers[0].bias is not None:
            biases = [m.bias.detach() for m in layers]
            if out_parts is None:
                bias = torch.stack(biases).mean(0)
            else:
                bias = biases[0].new_empty(shape[0])
                for i, b in enumerate(biases):
                    bias[rows[i]] = b
            out.bias = _param(bias, layers[0].bias)
        _set_sizes(out, w.shape[0], w.shape[1])
        return out

    @staticmethod
    def select(m: nn.Module, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> nn.Module:
        """Keep the output rows ``out_index`` and input columns ``in_index`` (None keeps all)."""
        w = m.weight.detach()
        if out_index is not None:
            w = w.index_select(0, out_index.to(w.device))
        if in_index is not None:
            w = w.index_select(1, in_index.to(w.device))
        out = _shell(m, ("weight", "bias"))
        out.weight = _param(w, m.weight)
        if m.bias is not None:
            out.bias = _selected(m.bias, out_index) if out_index is not None else _param(m.bias.detach().clone(), m.bias)
        _set_sizes(out, w.shape[0], w.shape[1])
        return out


class GroupedConvSurgeon:
    """A grouped or depthwise Conv2d mapping a group onto itself, or onto a group tied to it (a width-changing one): each
    output row reads only its own conv group, so widening stacks the rows (k times the conv groups) and selecting keeps
    whole conv groups' rows."""

    @staticmethod
    def widen(layers: list[nn.Module], parts: list[tuple[int, int]]) -> nn.Module:
        """Concatenate k grouped convolutions: the teachers' conv groups side by side, part by part (``(start, size)`` of
        each group the convolution maps; conv groups never straddle two)."""
        out = _shell(layers[0], ("weight", "bias"))
        out.weight = _joined([m.weight for m in layers], layers[0].weight, parts)
        out.bias = _joined([m.bias for m in layers], layers[0].bias, parts)
        out.groups = layers[0].groups * len(layers)
        _set_sizes(out, out.weight.shape[0], layers[0].in_channels * len(layers))
        return out

    @staticmethod
    def select(m: nn.Module, index: torch.Tensor) -> nn.Module:
        """Keep output channels ``index`` (whole conv groups: the spec's unit guarantees it) and the inputs they read."""
        out = _shell(m, ("weight", "bias"))
        out.weight = _selected(m.weight, index)
        out.bias = _selected(m.bias, index)
        out.groups = int(index.numel()) // (m.out_channels // m.groups)
        _set_sizes(out, int(index.numel()), out.groups * channel_unit(m))
        return out


class NormSurgeon:
    """BatchNorm, GroupNorm, LayerNorm over channels and global response norms: affine parameters and running
    statistics, all per channel. A GroupNorm keeps its group width (k times the groups when widened; whole groups kept
    when selected); k LayerNorms become one :class:`~hf_netmerge.models.split_norm.SplitNorm` and k response norms one
    :class:`~hf_netmerge.models.split_norm.SplitResponseNorm`, and a selection from either the teachers' norm again.
    Per-channel tensors held with singleton dimensions (transformers' GRN: ``(1, 1, 1, C)``) are handled flat."""

    _PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")

    @classmethod
    def _flat(cls, m: nn.Module) -> dict[str, torch.Tensor]:
        """``m``'s per-channel tensors, each 1-d."""
        return {n: _reshaped(t, (-1,)) for n in cls._PER_CHANNEL if isinstance(t := getattr(m, n, None), torch.Tensor)}

    @classmethod
    def _resized(cls, m: nn.Module, tensors: dict[str, torch.Tensor | None]) -> nn.Module:
        """A copy of norm ``m`` holding ``tensors`` (per channel, 1-d; shaped as ``m`` holds them), its sizes set to match."""
        out = _shell(m, cls._PER_CHANNEL)
        for name, t in tensors.items():
            setattr(out, name, _reshaped(t, (*getattr(m, name).shape[:-1], -1)) if t is not None else None)
        channels = next(t.numel() for t in tensors.values() if t is not None)
        if isinstance(out, nn.LayerNorm):
            out.normalized_shape = (channels,)
        elif isinstance(out, nn.GroupNorm):
            out.num_channels, out.num_groups = channels, channels // channel_unit(m)
        elif isinstance(out, nn.modules.batchnorm._NormBase):
            out.num_features = channels
        return out

    @classmethod
    def widen(cls, norms: list[nn.Module], parts: list[tuple[int, int]]) -> nn.Module:
        """Concatenate k norms channel-wise, running statistics included, part by part (``(start, size)`` of each group
        a norm after a concatenation covers; one part otherwise). k LayerNorms become one SplitNorm."""
        first = norms[0]
        flat = [cls._flat(m) for m in norms]
        out = cls._resized(first, {n: _joined([f[n] for f in flat], flat[0][n], parts) for n in flat[0]})
        if isinstance(first, nn.LayerNorm):
            return SplitNorm(out, len(norms))
        return SplitResponseNorm(out, len(norms)) if response_norm_layout(first) is not None else out

    @classmethod
    def select(cls, m: nn.Module, index: torch.Tensor) -> nn.Module:
        """Keep channels ``index`` (of a SplitNorm: its LayerNorm, whole again)."""
        m = m.norm if isinstance(m, (SplitNorm, SplitResponseNorm)) else m
        return cls._resized(m, {n: _selected(t, index) for n, t in cls._flat(m).items()})


class ScaleSurgeon:
    """A per-channel parameter held by a module (a layer scale's ``gamma``, a ViT's class token or position embedding,
    channels on the dim :func:`~hf_netmerge.spec.channel_dim` finds): concatenated, or indexed."""

    @staticmethod
    def widen(root: nn.Module, path: str, teachers: list[nn.Module], parts: list[tuple[int, int]]) -> None:
        """Set parameter ``path`` of ``root`` to the teachers' ``path`` side by side, part by part."""
        owner, _, attr = path.rpartition(".")
        tensors = [t.get_parameter(path) for t in teachers]
        dim = channel_dim(tensors[0])
        moved = [t.detach().movedim(dim, 0) for t in tensors]
        joined = torch.cat([t[start : start + size] for start, size in parts for t in moved]).movedim(0, dim)
        setattr(root.get_submodule(owner), attr, _param(joined, tensors[0]))

    @staticmethod
    def select(root: nn.Module, path: str, index: torch.Tensor) -> None:
        """Keep the entries ``index`` of parameter ``path`` of ``root``."""
        owner, _, attr = path.rpartition(".")
        t = root.get_parameter(path)
        setattr(root.get_submodule(owner), attr, _param(t.detach().index_select(channel_dim(t), index.to(t.device)), t))


def set_widths(root: nn.Module, widths: tuple[Width, ...], teachers: int) -> None:
    """Set every width attribute of ``root`` to its value in a model ``teachers`` wide (a list stays a list)."""
    for width in widths:
        owner, _, attr = width.path.rpartition(".")
        module = root.get_submodule(owner)
        value = width.at(teachers)
        setattr(module, attr, value if isinstance(value, int) else type(getattr(module, attr))(value))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _copy_skipping(root: nn.Module, names: list[str]) -> nn.Module:
    """Deep-copy ``root`` except the modules at ``names`` (left as None, to be replaced): no wasted tensor copies."""
    memo: dict[int, object] = {id(root.get_submodule(n)): None for n in names}
    return copy.deepcopy(root, memo)


def _feature_parts(parts: Parts, expansion: int = 1) -> list[tuple[int, int]]:
    """The ``(start, size)`` slices, in a teacher's features, of the groups a layer holds at their offsets."""
    return [(offset * expansion, g.size * expansion) for g, offset in parts]


def _kept(parts: Parts, keep: dict[str, torch.Tensor], teachers: int) -> torch.Tensor:
    """The big student's channels kept of a layer holding ``parts``: each group's kept channels past its k-wide offset."""
    return torch.cat([teachers * offset + keep[g.name] for g, offset in parts])


def widen_model(teachers: list[nn.Module], spec: MergeSpec) -> nn.Module:
    """The big student: a copy of the first teacher whose every grouped layer concatenates all ``teachers``' layers."""
    roles, norms, channelwise = spec.layer_roles(), spec.norm_groups(), spec.channelwise_groups()
    big = _copy_skipping(teachers[0], [*roles, *norms, *channelwise])
    tables = [dict(t.named_modules()) for t in teachers]
    for name, role in roles.items():
        out_parts = _feature_parts(role.outputs) if role.outputs else None
        in_parts = _feature_parts(role.inputs, role.expansion) if role.inputs else None
        replace_module(big, name, WeightSurgeon.widen([m[name] for m in tables], out_parts, in_parts))
    for name, parts in norms.items():
        replace_module(big, name, NormSurgeon.widen([m[name] for m in tables], _feature_parts(parts)))
    for name, parts in channelwise.items():
        replace_module(big, name, GroupedConvSurgeon.widen([m[name] for m in tables], _feature_parts(parts)))
    for path, parts in spec.scale_groups().items():
        ScaleSurgeon.widen(big, path, teachers, _feature_parts(parts))
    set_widths(big, spec.widths, len(teachers))
    return big


def select_model(big: nn.Module, spec: MergeSpec, keep: dict[str, torch.Tensor], teachers: int) -> nn.Module:
    """A copy of ``big`` (``teachers`` wide: 1 for a teacher) keeping, for every group, the channels ``keep[group]`` on
    producers, norms and consumers."""
    roles, norms, channelwise = spec.layer_roles(), spec.norm_groups(), spec.channelwise_groups()
    small = _copy_skipping(big, [*roles, *norms, *channelwise])
    for name, role in roles.items():
        out_index = _kept(role.outputs, keep, teachers) if role.outputs else None
        in_index = expand_index(_kept(role.inputs, keep, teachers), role.expansion) if role.inputs else None
        replace_module(small, name, WeightSurgeon.select(big.get_submodule(name), out_index, in_index))
    for name, parts in norms.items():
        replace_module(small, name, NormSurgeon.select(big.get_submodule(name), _kept(parts, keep, teachers)))
    for name, parts in channelwise.items():
        replace_module(small, name, GroupedConvSurgeon.select(big.get_submodule(name), _kept(parts, keep, teachers)))
    for path, parts in spec.scale_groups().items():
        ScaleSurgeon.select(small, path, _kept(parts, keep, teachers))
    set_widths(small, spec.widths, 1)
    return small


def group_origin(group: ChannelGroup, index: torch.Tensor, teachers: int) -> list[int]:
    """How many of the big student's channels ``index`` of ``group`` came from each of the ``teachers``."""
    return torch.bincount(index // group.size, minlength=teachers).tolist()


__all__ = [
    "GroupedConvSurgeon",
    "NormSurgeon",
    "ScaleSurgeon",
    "WeightSurgeon",
    "expand_index",
    "group_origin",
    "replace_module",
    "select_model",
    "set_widths",
    "teacher_features",
    "widen_model",
]
