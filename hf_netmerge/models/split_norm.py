"""The layers a big student needs that timm lacks: k LayerNorms over channels side by side, and k global response
norms (ConvNeXt V2's) side by side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerNorm2d
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm_act import LayerNormAct2d
from torch import nn


# Exact classes whose forward is a LayerNorm over the last dimension, or over dim 1 of an NCHW tensor.
_CHANNELS_LAST = (nn.LayerNorm, LayerNorm)
_CHANNELS_FIRST = (LayerNorm2d, LayerNormAct2d)
_DATA_FORMATS = {"channels_last": "last", "channels_first": "first"}


def layer_norm_layout(norm: nn.Module) -> str | None:
    """Where a LayerNorm over channels finds them: ``last`` (a channels-last tensor), ``first`` (dim 1 of NCHW), or None
    for a LayerNorm this project does not know. transformers' ConvNeXt-style LayerNorms say it in ``data_format``."""
    if type(norm) in _CHANNELS_LAST:
        return "last"
    if type(norm) in _CHANNELS_FIRST:
        return "first"
    if isinstance(norm, nn.LayerNorm) and type(norm).__module__.startswith("transformers."):
        return _DATA_FORMATS.get(getattr(norm, "data_format", None))
    return None


def response_norm_layout(norm: nn.Module) -> str | None:
    """Where a global response norm (ConvNeXt V2's GRN: each channel's spatial L2 norm divided by the mean over the
    channels) finds the channels: ``last`` or ``first``; None for a module that is not one. timm's
    ``GlobalResponseNorm`` says it in ``channel_dim``; transformers' ``ConvNextV2GRN`` reads channels-last tensors."""
    if type(norm) is GlobalResponseNorm:
        return "last" if norm.channel_dim == -1 else "first"
    if type(norm).__name__ == "ConvNextV2GRN" and type(norm).__module__.startswith("transformers."):
        return "last"
    return None


class SplitResponseNorm(nn.Module):
    """A global response norm whose mean over the channels is taken over each of ``parts`` equal slices on its own
    (each teacher's channels of a big student), then ``x + bias + weight · x · norm``, as the wrapped ``norm`` does
    over all channels. ``norm`` holds the k teachers' ``weight`` and ``bias`` side by side."""

    def __init__(self, norm: nn.Module, parts: int) -> None:
        super().__init__()
        self.layout = response_norm_layout(norm)
        channels = norm.weight.numel()
        if self.layout is None or channels % parts:
            raise ValueError(f"cannot split a {type(norm).__name__} over {channels} channels into {parts} equal parts")
        self.norm = norm
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.layout == "last"
        spatial, shape = ((1, 2), (1, 1, 1, -1)) if last else ((2, 3), (1, -1, 1, 1))
        g = torch.linalg.vector_norm(x, ord=2, dim=spatial, keepdim=True)
        parts = g.reshape(*g.shape[:-1], self.parts, -1) if last else g.reshape(g.shape[0], self.parts, -1, 1, 1)
        mean = parts.mean(dim=-1 if last else 2, keepdim=True).expand_as(parts).reshape(g.shape)
        eps = getattr(self.norm, "eps", 1e-6)  # transformers' GRN fixes 1e-6
        return x + self.norm.bias.reshape(shape) + self.norm.weight.reshape(shape) * (x * (g / (mean + eps)))

    def extra_repr(self) -> str:
        return f"parts={self.parts}"


class SplitNorm(nn.Module):
    """A LayerNorm over channels (timm's ``LayerNorm2d`` or ``LayerNormAct2d`` or transformers' channels-first LayerNorm
    on NCHW, or an ``nn.LayerNorm`` over the last dimension of a channels-last tensor) that normalizes each of ``parts``
    equal slices of the channels on its own (then applies the wrapped norm's dropout and activation, if it has them).

    ``norm`` is the wrapped LayerNorm holding the k teachers' affine parameters side by side; one LayerNorm over all
    of them would mix the teachers' statistics, so a big student of k teachers normalizes each teacher's part alone.
    """

    def __init__(self, norm: nn.LayerNorm, parts: int) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1 or norm.normalized_shape[0] % parts:
            raise ValueError(f"cannot split a LayerNorm over {tuple(norm.normalized_shape)} into {parts} equal parts")
        self.norm = norm
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_first = layer_norm_layout(self.norm) == "first"
        if channels_first:
            x = x.permute(0, 2, 3, 1)
        part = x.shape[-1] // self.parts
        y = F.layer_norm(x.reshape(*x.shape[:-1], self.parts, part), (part,), eps=self.norm.eps).reshape(x.shape)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        y = y.permute(0, 3, 1, 2) if channels_first else y
        if isinstance(self.norm, LayerNormAct2d):
            y = self.norm.act(self.norm.drop(y))
        return y

    def extra_repr(self) -> str:
        return f"parts={self.parts}"
