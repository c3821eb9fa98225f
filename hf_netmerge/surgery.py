"""All tensor work of the merge: widening two teachers into one, and selecting channels back out.

One small surgeon per layer type (weight layers, BatchNorm) does the slicing; :func:`widen_model`
and :func:`select_model` walk a :class:`~hf_netmerge.spec.MergeSpec` and call them. Modules are
deep-copied and their tensors replaced, so subclasses (timm's layers) keep their behaviour.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .spec import ChannelGroup, MergeSpec


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


class WeightSurgeon:
    """Linear and Conv2d: output channels on dim 0 of the weight, input channels on dim 1."""

    @staticmethod
    def widen(a: nn.Module, b: nn.Module, stack_out: bool, stack_in: bool) -> nn.Module:
        """Concatenate two layers.

        ``stack_out``: outputs stacked ``[A; B]`` (else averaged: the head). ``stack_in``: inputs
        block-diagonal (else shared: the first layer).
        """
        wa, wb = a.weight.detach(), b.weight.detach()
        if stack_out and stack_in:
            w = wa.new_zeros((2 * wa.shape[0], 2 * wa.shape[1], *wa.shape[2:]))
            w[: wa.shape[0], : wa.shape[1]] = wa
            w[wa.shape[0] :, wa.shape[1] :] = wb
        elif stack_out:
            w = torch.cat([wa, wb], 0)
        elif stack_in:
            w = torch.cat([wa / 2, wb / 2], 1)
        else:
            raise ValueError("a merged layer must widen its inputs, its outputs or both")
        out = _shell(a, ("weight", "bias"))
        out.weight = _param(w, a.weight)
        if a.bias is not None:
            ba, bb = a.bias.detach(), b.bias.detach()
            out.bias = _param(torch.cat([ba, bb]) if stack_out else (ba + bb) / 2, a.bias)
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
            bias = m.bias.detach()
            bias = bias.index_select(0, out_index.to(w.device)) if out_index is not None else bias.clone()
            out.bias = _param(bias, m.bias)
        _set_sizes(out, w.shape[0], w.shape[1])
        return out


class NormSurgeon:
    """BatchNorm: affine parameters and running statistics, all per channel."""

    _PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")

    @classmethod
    def widen(cls, a: nn.Module, b: nn.Module) -> nn.Module:
        """Concatenate two norms channel-wise, running statistics included."""
        out = _shell(a, cls._PER_CHANNEL)
        for name in cls._PER_CHANNEL:
            ta, tb = getattr(a, name), getattr(b, name)
            if ta is None:
                continue
            joined = torch.cat([ta.detach(), tb.detach()])
            if isinstance(ta, nn.Parameter):
                setattr(out, name, _param(joined, ta))
            else:
                setattr(out, name, joined)
        out.num_features = 2 * a.num_features
        return out

    @classmethod
    def select(cls, m: nn.Module, index: torch.Tensor) -> nn.Module:
        """Keep channels ``index``."""
        out = _shell(m, cls._PER_CHANNEL)
        for name in cls._PER_CHANNEL:
            t = getattr(m, name)
            if t is None:
                continue
            kept = t.detach().index_select(0, index.to(t.device))
            setattr(out, name, _param(kept, t) if isinstance(t, nn.Parameter) else kept)
        out.num_features = int(index.numel())
        return out


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _copy_skipping(root: nn.Module, names: list[str]) -> nn.Module:
    """Deep-copy ``root`` except the modules at ``names`` (left as None, to be replaced): no wasted tensor copies."""
    memo: dict[int, object] = {id(root.get_submodule(n)): None for n in names}
    return copy.deepcopy(root, memo)


def widen_model(a: nn.Module, b: nn.Module, spec: MergeSpec) -> nn.Module:
    """The big student: a copy of ``a`` whose every grouped layer is the concatenation of ``a``'s and ``b``'s."""
    roles, norms = spec.layer_roles(), spec.norm_groups()
    big = _copy_skipping(a, [*roles, *norms])
    modules_b = dict(b.named_modules())
    for name, (out_group, in_group, _) in roles.items():
        new = WeightSurgeon.widen(a.get_submodule(name), modules_b[name], out_group is not None, in_group is not None)
        replace_module(big, name, new)
    for name in norms:
        replace_module(big, name, NormSurgeon.widen(a.get_submodule(name), modules_b[name]))
    return big


def select_model(big: nn.Module, spec: MergeSpec, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``big`` keeping, for every group, the channels ``keep[group]`` on producers, norms and consumers."""
    roles, norms = spec.layer_roles(), spec.norm_groups()
    small = _copy_skipping(big, [*roles, *norms])
    for name, (out_group, in_group, expansion) in roles.items():
        out_index = keep[out_group.name] if out_group is not None else None
        in_index = expand_index(keep[in_group.name], expansion) if in_group is not None else None
        replace_module(small, name, WeightSurgeon.select(big.get_submodule(name), out_index, in_index))
    for name, group in norms.items():
        replace_module(small, name, NormSurgeon.select(big.get_submodule(name), keep[group.name]))
    return small


def group_origin(group: ChannelGroup, index: torch.Tensor) -> tuple[int, int]:
    """How many of the big student's channels ``index`` of ``group`` came from teacher A and from B."""
    from_a = int((index < group.size).sum())
    return from_a, int(index.numel()) - from_a


__all__ = [
    "NormSurgeon",
    "WeightSurgeon",
    "expand_index",
    "group_origin",
    "replace_module",
    "select_model",
    "widen_model",
]
