"""Hard-concrete L0 gates (Louizos et al. 2017) on every channel group of a big student.

Gates are injected PEFT-style: each gate site (the activation carrying a group) is wrapped by a
:class:`GateSite` that multiplies its output by the group's gate; all gates live in
:class:`GatedModel.gates`, so a gate shared by several sites (a residual stream) has one set of
parameters and draws one noise sample per forward pass. A gated ReLU runs as one autograd function that
keeps only its output for backward, the tensor the next layer keeps anyway (:func:`gated_relu`), so gating
adds no activation memory; on CUDA it is two Triton kernels (:mod:`hf_netmerge.kernels`) that read and write what a
ReLU does.

A gated step of a small model is mostly per-operation overhead, so eager training takes fast paths that compute the same
numbers: the noise of many passes is hashed at once (:class:`GateNoise`), every gate of a pass is sampled in one
autograd node with a hand-written gradient, and the half penalty covers every gate in one pass. Traced passes
(``torch.compile``, ``torch.func``'s ``vmap`` in stacked training) run the same formulas as plain operations, which
the compiler fuses and the transforms batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, get_args, runtime_checkable

import torch
from accelerate.state import PartialState
from torch import nn

from . import kernels
from .config import LambdaShape, MergeSchedule
from .errors import UnsupportedModelError
from .spec import CALL, ChannelGroup, MergeSpec, gate_owner, mixing_norm, validate_spec
from .surgery import expand_index, group_origin, replace_module

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
_LOG_RATIO = math.log(-GAMMA / ZETA)
_EPS = 1e-6  # the global-RNG sample keeps its uniform noise this far inside (0, 1)
UNDECIDED = (0.1, 0.9)  # a gate whose P[g>0] lies strictly between these has not polarized
# A gate held closed: its samples, eval value and P[g>0] are 0 (P < 1e-21) and no gradient reaches it, so it stays closed.
CLOSED_LOG_ALPHA = -50.0


@runtime_checkable
class Gate(Protocol):
    """What :class:`GatedModel` needs of a gate on a channel group of ``size`` channels (an ``nn.Module``).

    ``value(batch)`` is this forward pass's fp32 multiplier, ``(batch, size)`` or ``(1, size)``, that
    :class:`GateSite` applies to a ``(batch, size, ...)`` activation; ``scores`` ranks channels for compression (the
    highest half is kept); ``prob_open`` and ``eval_value`` give P[g>0] and the eval-mode gate per
    channel (for the half loss and the statistics); ``clear_sample`` ends a forward pass, so a gate
    shared by several sites draws one sample per pass. :class:`HardConcreteGate` is the method's gate;
    the pruning baseline's masks are another.
    """

    size: int

    def value(self, batch: int) -> torch.Tensor: ...

    def scores(self) -> torch.Tensor: ...

    def prob_open(self) -> torch.Tensor: ...

    def eval_value(self) -> torch.Tensor: ...

    def clear_sample(self) -> None: ...


GateFactory = Callable[[int], Gate]


class HardConcreteGate(nn.Module):
    """A stretched, clamped concrete gate per channel, with a fp32 ``log_alpha`` parameter.

    In training each forward draws one sample per (example, channel); in eval the gate is the
    deterministic ``clamp(sigmoid(log_alpha)·(ζ−γ)+γ, 0, 1)``.
    """

    def __init__(self, size: int, init_mean: float = 1.0, init_std: float = 0.01) -> None:
        super().__init__()
        self.size = size
        self.log_alpha = nn.Parameter(torch.empty(size, dtype=torch.float32).normal_(init_mean, init_std))
        self._sample: torch.Tensor | None = None

    def prob_open(self) -> torch.Tensor:
        """P[g > 0] per channel."""
        return torch.sigmoid(self.log_alpha - BETA * _LOG_RATIO)

    def eval_value(self) -> torch.Tensor:
        """The deterministic gate value used in eval mode."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def sample(self, batch: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A ``(batch, size)`` draw of the stretched, clamped concrete distribution from standard logistic ``noise``,
        or from the global RNG when none is given (a :class:`GatedModel` draws all its gates' samples itself)."""
        if noise is None:
            noise = (torch.rand(batch, self.size, device=self.log_alpha.device) * (1.0 - 2 * _EPS) + _EPS).logit()
        return draw_hard_concrete(self.log_alpha, noise)

    def set_sample(self, sample: torch.Tensor) -> None:
        """This forward pass's ``(batch, size)`` sample, drawn elsewhere (a :class:`GatedModel` draws all its gates' at once)."""
        object.__setattr__(self, "_sample", sample)  # every step: past nn.Module's slower __setattr__ (a plain attribute either way)

    def clear_sample(self) -> None:
        """Forget this forward pass's sample."""
        object.__setattr__(self, "_sample", None)

    def scores(self) -> torch.Tensor:
        """Channel importance for compression: ``log_alpha``."""
        return self.log_alpha

    def close_lowest(self, count: int) -> None:
        """Hold the ``count`` lowest-scored units closed (those closed already count): their ``log_alpha`` becomes
        :data:`CLOSED_LOG_ALPHA`. The state is ``log_alpha`` itself, so a checkpoint resumes it."""
        with torch.no_grad():
            if count > int((self.log_alpha <= CLOSED_LOG_ALPHA).sum()):
                self.log_alpha[torch.argsort(self.log_alpha, stable=True)[:count]] = CLOSED_LOG_ALPHA

    def value(self, batch: int) -> torch.Tensor:
        """This pass's gate: the ``(batch, size)`` sample in training (drawn once per pass: from the global RNG unless
        :meth:`set_sample` gave it), ``(1, size)`` in eval."""
        if not self.training:
            return self.eval_value().unsqueeze(0)
        if self._sample is None:
            self.set_sample(self.sample(batch))
        return self._sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` gated: each example's channels scaled by this pass's gate."""
        return scale_channels(x, self.value(x.shape[0]))

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _per_channel(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(batch | 1, channels)`` gate as a view that broadcasts over ``x``'s trailing (spatial) dimensions."""
    return g.view(*g.shape, *([1] * (x.dim() - 2)))


def scale_channels(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x`` (``(batch, channels, ...)``) times the fp32 gate ``g`` (``(batch | 1, channels)``), in ``x``'s dtype."""
    return x * _per_channel(g, x).to(x.dtype)


def _traced() -> bool:
    """Whether this pass is traced by ``torch.compile`` or transformed by ``torch.func`` (stacked training's ``vmap``):
    then gating runs as plain operations, which those can fuse and batch, instead of the eager fast paths."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def hard_concrete(log_alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The hard-concrete sample ``clamp(σ((noise + log α)/β)·(ζ−γ)+γ, 0, 1)`` from logistic ``noise``, as plain operations."""
    return torch.clamp(torch.sigmoid((noise + log_alpha) * (1.0 / BETA)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def draw_hard_concrete(log_alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """:func:`hard_concrete`, in eager training as one autograd node (:class:`_HardConcrete`)."""
    return hard_concrete(log_alpha, noise) if _traced() else _HardConcrete.apply(log_alpha, noise)


class _HardConcrete(torch.autograd.Function):
    """:func:`hard_concrete` in one autograd node that keeps only the sample ``g`` for backward.

    Where the clamp passes it (0 < g < 1), ``dg/dlog α = (ζ−γ)·s(1−s)/β`` with ``s = (g−γ)/(ζ−γ)``, which is
    ``(g−γ)(ζ−g)/((ζ−γ)β) = (g(1−g) − γζ)/((ζ−γ)β)`` because ζ + γ = 1.
    """

    @staticmethod
    def forward(ctx: Any, log_alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        g = torch.add(noise, log_alpha).mul_(1.0 / BETA).sigmoid_().mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0.0, 1.0)
        ctx.save_for_backward(g)
        return g

    @staticmethod
    def backward(ctx: Any, dg: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (g,) = ctx.saved_tensors
        inside = torch.addcmul(g, g, g, value=-1.0)  # g(1−g) ≥ 0, positive exactly where the clamp passes the gradient
        slope = torch.add(inside, torch.sign(inside), alpha=-GAMMA * ZETA)  # (g(1−g) − γζ)·[0 < g < 1]
        return (dg * slope).sum(0).mul_(1.0 / ((ZETA - GAMMA) * BETA)), None


class _GatedReLU(torch.autograd.Function):
    """``relu(x)·g`` keeping only the output ``y`` and ``g`` for backward.

    The plain ``relu`` then multiply keeps ``relu(x)`` (for both ops) besides the ``y`` the next layer keeps: one
    extra activation per gate site. Both gradients come back from ``y``: ``dx = dy·g·[y > 0]`` and, where
    ``g > 0``, ``dg = Σ dy·y / g``. Where ``g = 0`` this returns ``dg = 0`` instead of ``Σ dy·relu(x)``; a
    hard-concrete gate is 0 only where its clamp is saturated, which passes no gradient either way.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x).mul_(g.to(x.dtype))
        ctx.save_for_backward(y, g)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        y, g = ctx.saved_tensors
        low = g.to(y.dtype)
        dx = torch.ops.aten.threshold_backward(dy * low, y, 0) if ctx.needs_input_grad[0] else None  # dy·g where y > 0
        dg = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(y.dim()) if g.shape[d] == 1 and y.shape[d] != 1]
            products = dy * y
            sums = products.sum(dims, keepdim=True, dtype=torch.float32) if dims else products.float()
            dg = sums / low.float().clamp_min(torch.finfo(torch.float32).tiny)  # where g = 0, y = 0 and so sums = 0
        return dx, dg


SMALL_ACTIVATION = 1 << 16  # elements: below this, an extra saved activation costs less than a custom node's overhead


def gated_relu(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``relu(x)`` gated by the fp32 gate ``g`` (``(batch | 1, channels)``) without an extra saved activation, on CUDA
    in Triton's two passes where :func:`~hf_netmerge.kernels.serves` says so. Traced passes, and activations under
    :data:`SMALL_ACTIVATION` elements (whose step is per-operation overhead), run it as plain operations: the compiler
    then decides what to keep (traced as the custom function, it compiled to a slower step), and small ones keep
    ``relu(x)`` (a few KiB)."""
    g = _per_channel(g, x)
    if x.numel() < SMALL_ACTIVATION or _traced():
        return torch.relu(x) * g.to(x.dtype)
    if kernels.serves(x, g):
        return kernels.GatedReLU.apply(x, g)
    return _GatedReLU.apply(x, g)


class GateSite(nn.Module):
    """Wraps the module whose output carries a channel group and gates that output (fused with it when it is a ReLU).

    Each gate value covers ``unit`` consecutive channels (a conv group or norm group kept or dropped whole); with
    ``channels_last`` the output holds its channels on the last dimension. After a concatenation the output holds
    several groups: ``more`` are the ``(gate, unit)`` of the groups whose channels follow this gate's, in order."""

    def __init__(self, base: nn.Module, gate: nn.Module, unit: int = 1, channels_last: bool = False,
                 more: tuple[tuple[nn.Module, int], ...] = ()) -> None:
        super().__init__()
        self.base = base
        self.channels_last = channels_last
        self.fused = type(base) is nn.ReLU and not channels_last
        self.unit = unit
        # Not registered as submodules: the gates belong to GatedModel.gates (one copy even when shared).
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "more", more)

    def _value(self, batch: int) -> torch.Tensor:
        if self.unit == 1 and not self.more:  # the common site: one gate, a value per channel (every step: kept lean)
            return self.gate.value(batch)
        values = [g.value(batch) if unit == 1 else g.value(batch).repeat_interleave(unit, dim=1)
                  for g, unit in ((self.gate, self.unit), *self.more)]
        return torch.cat(values, dim=1)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return gated_relu(args[0], self._value(args[0].shape[0]))
        out = self.base(*args, **kwargs)
        g = self._value(out.shape[0])
        if self.channels_last:
            return out * g.view(g.shape[0], *([1] * (out.dim() - 2)), g.shape[1]).to(out.dtype)
        return scale_channels(out, g)


class ReusedGateSite(nn.Module):
    """Wraps a parameter-free module called several times per forward pass (SENet's and HRNet's shared ReLU), each call
    a gate site of its own: call ``i`` goes through ``calls[i]`` (a :class:`GateSite`), calls not listed through ``base``.
    The count restarts with every pass of the :class:`GatedModel` (:meth:`restart`)."""

    def __init__(self, base: nn.Module, calls: dict[int, GateSite]) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "calls", calls)  # not submodules: they share ``base``; their gates live in GatedModel
        self.made = 0

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        site = self.calls.get(self.made, self.base)
        self.made += 1
        return site(*args, **kwargs)

    def restart(self) -> None:
        """A new forward pass starts: the next call is call 0."""
        self.made = 0


@dataclass(frozen=True)
class GroupStats:
    """What the gate stage decided for one channel group."""

    group: str
    size: int
    kept: int
    kept_per_teacher: tuple[int, ...]
    mean_p_open: float
    open_fraction: float
    min_kept_gate: float
    unit: int = 1
    exact_compression: bool = True
    undecided_fraction: float = 0.0

    @property
    def kept_from_a(self) -> int:
        """Kept channels that came from the first teacher."""
        return self.kept_per_teacher[0]

    @property
    def kept_from_b(self) -> int:
        """Kept channels that came from the second teacher."""
        return self.kept_per_teacher[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "kept_per_teacher": list(self.kept_per_teacher)}


def _int32(value: int) -> int:
    """``value``'s low 32 bits as a two's-complement int32."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


_MIX = (_int32(0x85EBCA6B), _int32(0xC2B2AE35))  # MurmurHash3's finalizer constants
_WEYL = _int32(0x9E3779B1)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on an int32 tensor, in place: products wrap in two's complement (as every PyTorch
    backend computes them) and shifts are arithmetic, which keeps each xor-shift a bijection of 32-bit words."""
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16)).mul_(_MIX[0])
    h.bitwise_xor_(torch.bitwise_right_shift(h, 13)).mul_(_MIX[1])
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16))


@dataclass
class _NoiseBlock:
    """The noise of passes ``first … first + len(tables) − 1`` for one ``(batch, channels)``, and the pass counter's
    state when it was last advanced (``counter`` is the buffer, ``version`` its in-place version): while both still
    hold, ``next`` is the counter's value without reading the tensor (no host sync on a GPU)."""

    tables: torch.Tensor
    first: int
    next: int
    counter: torch.Tensor
    version: int

    def tracks(self, passes: torch.Tensor) -> bool:
        """Whether ``passes`` is the counter this block last advanced, untouched since (so ``next`` is its value)."""
        return self.counter is passes and self.version == passes._version

    def serves(self, passes: torch.Tensor, batch: int, channels: int) -> bool:
        """Whether this block holds the next pass's noise for ``(batch, channels)``, the counter untouched since."""
        return self.tracks(passes) and self.tables.shape[1:] == (batch, channels) and self.next < self.first + len(self.tables)


class GateNoise(nn.Module):
    """The logistic noise of every hard-concrete gate in a training pass, computed as a hash of (seed, pass number,
    the example's position in the global batch, channel) instead of drawn from an RNG.

    So the noise of an example does not depend on how many processes share the batch (process ``rank`` of
    ``world`` computes rows ``rank·b … rank·b + b − 1`` of the global batch, as Accelerate splits it), there is no
    generator state to keep in step across processes, the pass counter is a buffer (a resumed stage continues
    the same sequence), and ``torch.compile`` traces it into the graph. Eager passes hash up to :attr:`BLOCK` values of
    upcoming passes at once and read their pass's slice: the same numbers for a fraction of the per-operation cost.
    """

    BLOCK = 1 << 16  # noise values hashed at once (256 KiB: the hash's passes over them stay in cache) ...
    BLOCK_PASSES = 64  # ... for at most this many passes

    def __init__(self, seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.rank, self.world = rank, world
        self.register_buffer("passes", torch.zeros((), dtype=torch.int64))
        # A buffer, not an attribute, so stacked copies of a gated model (torch.func) each keep their own; not saved.
        self.register_buffer("seed_key", _mix32(torch.tensor(_int32(seed), dtype=torch.int32)), persistent=False)
        self._block: _NoiseBlock | None = None

    def logistic(self, passes: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
        """The float32 standard logistic noise ``logit(u)`` of passes ``passes`` (an int64 tensor of any shape ``P``),
        ``(*P, batch, channels)``; ``u`` takes 2²³ values, exact in float32, strictly inside (0, 1)."""
        device = passes.device
        base = _mix32(_mix32(passes.to(torch.int32)) ^ self.seed_key)
        rows = _mix32(base[..., None] ^ torch.arange(self.rank * batch, (self.rank + 1) * batch, device=device, dtype=torch.int32))
        columns = torch.arange(channels, device=device, dtype=torch.int32).mul_(_WEYL)
        bits = _mix32(rows[..., None] ^ columns).bitwise_and_(0x7FFFFF)
        return bits.add(0.5).mul_(2.0**-23).logit_()

    def next_table(self, batch: int, channels: int) -> torch.Tensor:
        """This pass's ``(batch, channels)`` logistic noise, then the pass counter advances."""
        if _traced():
            table = self.logistic(self.passes, batch, channels)
            self.passes += 1
            return table
        block, passes = self._block, self.passes
        if block is None or not block.serves(passes, batch, channels):
            first = block.next if block is not None and block.tracks(passes) else int(passes)
            count = max(1, min(self.BLOCK_PASSES, self.BLOCK // max(1, batch * channels)))
            tables = self.logistic(torch.arange(first, first + count, device=passes.device), batch, channels)
            block = _NoiseBlock(tables, first, first, passes, passes._version)
            object.__setattr__(self, "_block", block)  # a plain attribute: not state, recomputed from the counter
        table = block.tables[block.next - block.first]
        passes += 1
        block.next, block.version = block.next + 1, passes._version
        return table

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world={self.world}"


class GatedModel(nn.Module):
    """A big student of ``teachers`` teachers with a :class:`Gate` on every channel group (see :func:`add_gates`).

    Gates are hard-concrete by default; ``make_gate(size)`` builds another kind of :class:`Gate` (the
    pruning baseline's masks). A gate has one value per unit of its group (``size / unit`` per teacher) and
    ranks its units by ``scores()``; compression keeps the best ``1 / teachers`` of them.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: MergeSpec,
        init_mean: float = 1.0,
        init_std: float = 0.01,
        make_gate: GateFactory | None = None,
        noise_seed: int = 0,
        teachers: int = 2,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.teachers = teachers
        make_gate = make_gate or (lambda size: HardConcreteGate(size, init_mean, init_std))
        gates = {g.name: make_gate(teachers * g.size // g.unit) for g in spec.groups if not g.tied}  # a tied group: its owner's
        self._gate_names = {g.name: gate_owner(spec, g) for g in spec.groups}
        for name, gate in gates.items():
            if not isinstance(gate, nn.Module) or not isinstance(gate, Gate):
                raise UnsupportedModelError(f"the gate for group {name!r} ({type(gate).__name__}) is not an nn.Module implementing Gate")
        self.gates = nn.ModuleDict(gates)
        # Groups normalized over all their channels at once: compressing them is exact only when one teacher's part is kept.
        self.mixed_norm_groups = {g.name for g in spec.groups if any(mixing_norm(model.get_submodule(n)) for n in g.norms)}
        state = PartialState() if PartialState._shared_state else None
        self.noise = GateNoise(noise_seed, state.process_index if state else 0, state.num_processes if state else 1)
        self._noisy = [gate for gate in self.gates.values() if isinstance(gate, HardConcreteGate)]
        self._noise_sizes = [gate.size for gate in self._noisy]
        # Per hard-concrete gate, its units: the half penalty's segments when every gate is one (not saved).
        self.register_buffer("gate_sizes", torch.tensor(self._noise_sizes, dtype=torch.int64), persistent=False)
        groups_at: dict[str, list[tuple[int, ChannelGroup]]] = {}  # site → its groups by offset (several after a concat)
        for g in spec.groups:
            for site in g.gate_sites:
                groups_at.setdefault(site, []).extend((offset, g) for offset in g.offsets_of(site))
        calls: dict[str, dict[int, GateSite]] = {}
        for site, parts in groups_at.items():
            (_, first), *rest = sorted(parts, key=lambda part: part[0])
            name, _, call = site.partition(CALL)
            wrapped = GateSite(model.get_submodule(name), self.gate_of(first), first.unit, site in first.channels_last_sites,
                               tuple((self.gate_of(g), g.unit) for _, g in rest))
            if call:
                calls.setdefault(name, {})[int(call)] = wrapped
            else:
                replace_module(model, name, wrapped)
        self._reused = [ReusedGateSite(model.get_submodule(name), by_call) for name, by_call in calls.items()]
        for name, site in zip(calls, self._reused):
            replace_module(model, name, site)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self._noisy:
            noise = self.noise.next_table(x.shape[0], sum(self._noise_sizes))
            samples = draw_hard_concrete(self._log_alphas(), noise)  # every gate in one draw: a few kernels, not a few per gate
            for gate, sample in zip(self._noisy, samples.split(self._noise_sizes, dim=1)):
                gate.set_sample(sample)
        try:
            return self.model(x)
        finally:
            for gate in self.gates.values():
                gate.clear_sample()
            for site in self._reused:
                site.restart()

    def gate_of(self, group: ChannelGroup) -> Gate:
        """The gate of ``group``: its own, or that of the untied group its ties lead to (unit by unit, the same decisions)."""
        return self.gates[self._gate_names[group.name]]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates' parameters (hard-concrete ``log_alpha``; they get their own optimizer)."""
        return [p for gate in self.gates.values() for p in gate.parameters()]

    def half_penalty(self) -> torch.Tensor:
        """Σ over groups of (1/k − mean P[g>0])² for k teachers: zero when every group keeps 1/k of its units open
        (the paper's half penalty for two)."""
        target = 1.0 / self.teachers
        if self._noisy and len(self._noisy) == len(self.gates) and not _traced():  # all hard-concrete: one pass over all units
            p_open = torch.sigmoid(self._log_alphas() - BETA * _LOG_RATIO)
            return (target - torch.segment_reduce(p_open, "mean", lengths=self.gate_sizes)).square().sum()
        terms = [(target - gate.prob_open().mean()) ** 2 for gate in self.gates.values()]
        return torch.stack(terms).sum()

    def _log_alphas(self) -> torch.Tensor:
        """Every hard-concrete gate's ``log_alpha``, concatenated in :attr:`gates` order."""
        return torch.cat([gate.log_alpha for gate in self._noisy]) if len(self._noisy) > 1 else self._noisy[0].log_alpha

    def give_head_start(self, teacher: int, margin: float) -> None:
        """Add ``margin`` to the ``log_alpha`` of teacher ``teacher``'s units in every hard-concrete gate."""
        with torch.no_grad():
            for gate in self._noisy:
                gate.log_alpha.view(self.teachers, -1)[teacher] += margin

    def close(self, fraction: float) -> None:
        """Hold closed ``fraction`` of the units each group's compression removes (the lowest-scored of every
        hard-concrete gate): at 1, only the kept ``1/k`` are open."""
        for gate in self._noisy:
            gate.close_lowest(round(fraction * (gate.size - gate.size // self.teachers)))

    def undecided_fraction(self) -> float:
        """The share of all gate values whose P[g>0] lies in (0.1, 0.9): how far the gates are from polarized."""
        with torch.no_grad():
            p = torch.cat([gate.prob_open().detach().flatten().float().cpu() for gate in self.gates.values()])
        return float(_undecided(p).float().mean())

    def keep_units(self) -> dict[str, torch.Tensor]:
        """Per group, the ``1/k`` of the units with the highest scores (``log_alpha``; ties by index), in original order."""
        keep = {}
        for g in self.spec.groups:
            scores = self.gate_of(g).scores().detach().cpu()
            order = torch.argsort(-scores, stable=True)[: g.size // g.unit]
            keep[g.name] = torch.sort(order).values
        return keep

    def keep_indices(self) -> dict[str, torch.Tensor]:
        """Per group, the channels of :meth:`keep_units` (a unit's channels together), in original order."""
        units = self.keep_units()
        return {g.name: expand_index(units[g.name], g.unit) for g in self.spec.groups}

    def statistics(self) -> list[GroupStats]:
        """Per group: kept channels by teacher, mean P[g>0], fraction open in eval, weakest kept gate, and whether
        compressing it is exact (not for a LayerNorm over channels of several teachers)."""
        stats = []
        units, channels = self.keep_units(), self.keep_indices()
        for g in self.spec.groups:
            gate = self.gate_of(g)
            with torch.no_grad():
                value = gate.eval_value().cpu()
                per_teacher = tuple(group_origin(g, channels[g.name], self.teachers))
                stats.append(
                    GroupStats(
                        group=g.name,
                        size=gate.size * g.unit,
                        kept=int(channels[g.name].numel()),
                        kept_per_teacher=per_teacher,
                        mean_p_open=float(gate.prob_open().mean()),
                        open_fraction=float((value > 0).float().mean()),
                        min_kept_gate=float(value[units[g.name]].min()),
                        unit=g.unit,
                        exact_compression=g.name not in self.mixed_norm_groups or max(per_teacher) == g.size,
                        undecided_fraction=float(_undecided(gate.prob_open().cpu()).float().mean()),
                    )
                )
        return stats


def _undecided(p_open: torch.Tensor) -> torch.Tensor:
    return (p_open > UNDECIDED[0]) & (p_open < UNDECIDED[1])


def add_gates(
    big: nn.Module, init_mean: float = 1.0, init_std: float = 0.01, *, make_gate: GateFactory | None = None, noise_seed: int = 0
) -> GatedModel:
    """Wrap a big student from :func:`~hf_netmerge.concatenate` with gates on every channel group.

    The big student is modified in place (its gate sites are wrapped, so ``big(x)`` is no longer the
    teachers' mean) and owned by the result. Hard-concrete ``log_alpha`` starts at N(init_mean, init_std),
    the reference init (P[g>0] ≈ 0.93); ``make_gate(size)`` puts another kind of :class:`Gate` instead. The
    gates' training noise comes from :class:`GateNoise` keyed by ``noise_seed`` (the same for any process count).
    """
    spec, teachers = getattr(big, "netmerge_spec", None), getattr(big, "netmerge_teachers", None)
    if not isinstance(spec, MergeSpec) or not isinstance(teachers, int):
        raise UnsupportedModelError("add_gates expects a big student made by hf_netmerge.concatenate(teacher_a, teacher_b, ...)")
    validate_spec(big, spec, width=teachers)
    return GatedModel(big, spec, init_mean, init_std, make_gate, noise_seed, teachers)


def remove_gates(model: nn.Module) -> nn.Module:
    """Unwrap every :class:`GateSite` (and :class:`ReusedGateSite`) inside ``model`` in place (the gates' effect is dropped)."""
    sites = [name for name, m in model.named_modules() if isinstance(m, (GateSite, ReusedGateSite))]
    for name in sites:
        replace_module(model, name, model.get_submodule(name).base)
    return model


@contextlib.contextmanager
def gates_removed(gated: GatedModel) -> Iterator[nn.Module]:
    """The big student with its gate sites unwrapped for the duration of the block, then re-wrapped as they were."""
    sites = {name: m for name, m in gated.model.named_modules() if isinstance(m, (GateSite, ReusedGateSite))}
    remove_gates(gated.model)
    try:
        yield gated.model
    finally:
        for name, site in sites.items():
            replace_module(gated.model, name, site)


@dataclass(frozen=True)
class LambdaSchedule:
    """λ of the half loss as a function of the gate stage's progress (no state: a resumed stage recomputes it).

    ``per_epoch`` is the paper's rule: λ starts at ``initial`` and grows by ``growth·√λ`` after each whole epoch
    (quadratic in the epoch count), so where it ends depends on the stage's length. The other shapes move λ step
    by step from ``initial`` to ``final``, reached at the end of the stage's ``epochs``: ``quadratic``
    (``(√λ0 + (√λ1 − √λ0)·t)²``, the paper's curve), ``linear`` and ``exponential`` (geometric).
    """

    shape: str = "quadratic"
    initial: float = 0.05
    final: float = 20.0
    growth: float = 0.05
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.shape not in LAMBDA_SHAPES:
            raise ValueError(f"lambda_schedule must be one of {LAMBDA_SHAPES}, got {self.shape!r}")
        if self.initial <= 0 or self.final <= 0 or self.growth < 0 or self.epochs < 1:
            raise ValueError("lambda_init and lambda_final must be > 0, lambda_growth >= 0 and the stage at least one epoch long")

    @classmethod
    def from_config(cls, config: MergeSchedule) -> LambdaSchedule:
        """The schedule a :class:`~hf_netmerge.config.MergeSchedule` describes, over its gate stage."""
        return cls(config.lambda_schedule, config.lambda_init, config.lambda_final, config.lambda_growth, config.gate_epochs)

    def at(self, epoch: float) -> float:
        """λ after ``epoch`` epochs of the stage (a fraction counts the steps done in the current epoch)."""
        if self.shape == "per_epoch":
            return _grown(self.initial, self.growth, int(epoch))
        t = min(max(epoch / self.epochs, 0.0), 1.0)
        if self.shape == "quadratic":
            return (math.sqrt(self.initial) + (math.sqrt(self.final) - math.sqrt(self.initial)) * t) ** 2
        if self.shape == "linear":
            return self.initial + (self.final - self.initial) * t
        return self.initial * (self.final / self.initial) ** t


LAMBDA_SHAPES = get_args(LambdaShape)


@functools.lru_cache(maxsize=1024)
def _grown(initial: float, growth: float, epochs: int) -> float:
    """λ after ``epochs`` growth steps λ ← λ + growth·√λ (cached: asked every optimizer step, computed once per epoch)."""
    value = initial
    for _ in range(epochs):
        value += growth * math.sqrt(value)
    return value


@dataclass(frozen=True)
class ClosingSchedule:
    """The share of the gates to be removed that are held closed, as a function of the gate stage's progress: 0 until
    ``start`` (a fraction of the stage), then ``1 − (1 − t)³`` over the rest (Zhu & Gupta's gradual pruning), 1 at
    the end. Stateless: a resumed stage recomputes it."""

    start: float = 0.25
    epochs: int = 1

    def at(self, epoch: float) -> float:
        """The share held closed after ``epoch`` (fractional) epochs."""
        t = min(max((epoch / self.epochs - self.start) / (1.0 - self.start), 0.0), 1.0)
        return 1.0 - (1.0 - t) ** 3

    @classmethod
    def from_config(cls, config: MergeSchedule) -> ClosingSchedule | None:
        """The schedule of ``config.gate_closing`` over its gate stage (None for ``none``)."""
        return cls(config.closing_start, config.gate_epochs) if config.gate_closing == "cubic" else None


class GateRegularizer:
    """The gate stage's extra objective: ``λ·half_penalty``, with its λ schedule, gate parameters and their
    optimizer (Adam at a constant ``lr``, no weight decay, fp32 gates); with a ``closing`` schedule it also holds
    the lowest-scored gates closed, step by step (:meth:`prepare`)."""

    def __init__(self, gated: GatedModel, schedule: LambdaSchedule, lr: float = 0.1, closing: ClosingSchedule | None = None) -> None:
        self.gated = gated
        self.schedule = schedule
        self.lr = lr
        self.closing = closing

    def parameters(self) -> list[nn.Parameter]:
        """The gates' parameters: the runner keeps them out of the weights' optimizer."""
        return self.gated.gate_parameters()

    def optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer for :meth:`parameters`."""
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=0.0, fused=True)

    def penalty(self) -> torch.Tensor:
        """The half penalty of the gated model's current gates."""
        return self.gated.half_penalty()

    def weight(self, epoch: float) -> float:
        """λ at ``epoch`` (fractional) epochs into the stage."""
        return self.schedule.at(epoch)

    @property
    def prepares_model(self) -> bool:
        """Whether :meth:`prepare` changes the gates (a closing schedule): such a stage cannot join a stack."""
        return self.closing is not None

    def prepare(self, epoch: float) -> None:
        """Before the step at ``epoch`` (fractional) epochs: close the gates the closing schedule has reached."""
        if self.closing is not None:
            self.gated.close(self.closing.at(epoch))

    def log(self) -> dict[str, float]:
        """The penalty, each group's mean P[g>0] and the share of undecided gates, for trackers."""
        with torch.no_grad():
            out = {"penalty": float(self.gated.half_penalty()), "undecided": self.gated.undecided_fraction()}
            for name, gate in self.gated.gates.items():
                out[f"p_open/{name}"] = float(gate.prob_open().mean())
        return out
