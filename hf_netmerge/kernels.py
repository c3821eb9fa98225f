"""The gated ReLU on CUDA as two Triton kernels: ``relu(x)·g`` in one pass forward, and one backward pass that writes
``dx`` and sums ``dy·y`` per (example, channel).

Written as PyTorch operations, the gated ReLU costs five more passes over each activation than a ReLU (the multiply,
then in backward the scaled gradient, the threshold, the product and its sum); on a GPU those passes are what the gate
stage costs over the big student. These kernels read and write what a ReLU does. They serve contiguous 4-D activations
on CUDA with a per-example gate (the gate stage's case); :func:`~hf_netmerge.gates.gated_relu` keeps its PyTorch
operations everywhere else.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the gated ReLU keeps its PyTorch operations
    triton = None


def serves(x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :class:`GatedReLU` takes ``x`` (``(batch, channels, h, w)``) gated by ``g`` (``(batch, channels, 1, 1)``)."""
    return (triton is not None and x.is_cuda and x.dim() == 4 and x.is_contiguous() and g.shape[:2] == x.shape[:2]
            and g.dtype == torch.float32)


if triton is not None:

    @triton.jit
    def _gate_offset(row, channels, g_stride_n, g_stride_c):  # noqa: ANN001, ANN202
        """Where a strided ``(batch, channels)`` gate holds the gate of activation plane ``row`` (example · channels + channel)."""
        example = row // channels
        return example * g_stride_n + (row - example * channels) * g_stride_c

    @triton.jit
    def _forward(x_ptr, g_ptr, y_ptr, elements, plane, channels, g_stride_n, g_stride_c, BLOCK: tl.constexpr):  # noqa: ANN001, N803
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < elements
        g = tl.load(g_ptr + _gate_offset(offsets // plane, channels, g_stride_n, g_stride_c), mask=inside, other=0.0)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        y = tl.maximum(x.to(tl.float32), 0.0) * g
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _backward(dy_ptr, y_ptr, g_ptr, dx_ptr, dg_ptr, plane, channels, g_stride_n, g_stride_c,  # noqa: ANN001, N803
                  BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        g = tl.load(g_ptr + _gate_offset(row, channels, g_stride_n, g_stride_c))
        base = row * plane
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, plane, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < plane
            dy = tl.load(dy_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_ptr + base + offsets, tl.where(y > 0, dy * g, 0.0).to(dx_ptr.dtype.element_ty), mask=inside)
            total += dy * y
        tl.store(dg_ptr + row, tl.where(g > 0, tl.sum(total, axis=0) / g, 0.0))


class GatedReLU(torch.autograd.Function):
    """``relu(x)·g`` for :func:`serves`' tensors, keeping only ``y`` and ``g`` for backward (as the PyTorch version
    does): ``dx = dy·g·[y > 0]`` and, where ``g > 0``, ``dg = Σ dy·y / g`` over each example's channel plane, summed in
    fp32. ``y`` is ``relu(x)·g`` computed in fp32 and rounded once to ``x``'s dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = x.shape
        plane = height * width
        y = torch.empty_like(x)
        block = 1024
        _forward[(triton.cdiv(x.numel(), block),)](x, g, y, x.numel(), plane, channels, g.stride(0), g.stride(1), BLOCK=block)
        ctx.save_for_backward(y, g)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, g = ctx.saved_tensors
        batch, channels, height, width = y.shape
        plane = height * width
        dy = dy.contiguous()
        dx = torch.empty_like(y)
        dg = torch.empty(batch, channels, 1, 1, device=y.device, dtype=torch.float32)
        block = min(1024, triton.next_power_of_2(plane))
        _backward[(batch * channels,)](dy, y, g, dx, dg, plane, channels, g.stride(0), g.stride(1), BLOCK=block)
        return dx, dg
