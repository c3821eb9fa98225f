"""The one layer a big student needs that timm lacks: k LayerNorms over channels side by side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.layers.norm_act import LayerNormAct2d
from torch import nn


class SplitNorm(nn.Module):
    """A LayerNorm over channels (timm's ``LayerNorm2d`` or ``LayerNormAct2d`` on NCHW, or an ``nn.LayerNorm`` over the
    last dimension of a channels-last tensor) that normalizes each of ``parts`` equal slices of the channels on its own
    (then applies the wrapped norm's dropout and activation, if it has them).

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
        channels_first = isinstance(self.norm, (LayerNorm2d, LayerNormAct2d))
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
