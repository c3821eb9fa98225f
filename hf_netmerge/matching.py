"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): permute one network's channels to line up with another's.

Per channel group of the :class:`~hf_netmerge.spec.MergeSpec` (residual streams share one permutation, as
they share one gate), the permutation of ``b``'s channels that maximizes the summed correlation of the
weights of every layer touching the group with ``a``'s — producers' rows, norms' affine parameters,
consumers' columns (flattened blocks included) — is a linear assignment problem. Groups are solved one
at a time, in a seeded random order, the others held fixed, until no permutation improves. The tensor
work is :func:`~hf_netmerge.surgery.select_model`'s: with a full permutation per group it returns the
same network with its channels reordered.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import resolve_spec
from .errors import UnsupportedModelError
from .spec import ChannelGroup, MergeSpec, channel_dim
from .surgery import select_model


def permute(model: nn.Module, perms: dict[str, torch.Tensor], spec: MergeSpec | None = None) -> nn.Module:
    """A copy of ``model`` with channel ``perms[g][i]`` of every group ``g`` moved to position ``i`` (same function; a
    group tied to another must move its units as that one does)."""
    return select_model(model, spec or resolve_spec(model), perms, teachers=1)


def _rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """A layer's parameter as one row per channel of a group of ``size`` channels on its first dimension (on the CPU,
    where the assignment is solved)."""
    return tensor.detach().float().cpu().reshape(size, -1)


def _channels_first(model: nn.Module, name: str, attr: str | None) -> torch.Tensor | None:
    """Module ``name``'s tensor ``attr`` (None when it has none), or with ``attr`` None the per-channel parameter at path
    ``name`` with its channels moved to dim 0 (a ViT's position embedding holds them last)."""
    if attr is not None:
        return getattr(model.get_submodule(name), attr, None)
    t = model.get_parameter(name)
    return t.movedim(channel_dim(t), 0)


def _similarity(a: nn.Module, b: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``[i, j]``: how well channel ``j`` of ``b`` matches channel ``i`` of ``a``, summed over the group's layers."""
    n, total = group.size, torch.zeros(group.size, group.size)
    tensors = [(name, p) for name in dict.fromkeys((*group.producers, *group.norms, *group.channelwise)) for p in ("weight", "bias")]
    for name, p in [*tensors, *((path, None) for path in group.scales)]:
        ta, tb = (_channels_first(m, name, p) for m in (a, b))
        if isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor):
            for start in group.offsets_of(name):  # the group's part of a layer holding other groups too
                total += _rows(ta.narrow(0, start, n), n) @ _rows(tb.narrow(0, start, n), n).T
    for consumer in group.consumers:
        wa, wb = (m.get_submodule(consumer.module).weight.narrow(1, consumer.offset * consumer.expansion, n * consumer.expansion)
                  for m in (a, b))
        columns = [w.detach().float().cpu().reshape(w.shape[0], n, -1).transpose(0, 1) for w in (wa, wb)]  # (n, out, block)
        total += _rows(columns[0], n) @ _rows(columns[1], n).T
    return total


def check_matchable(spec: MergeSpec) -> None:
    """Refuse a spec whose groups tie channels in units (grouped convolutions, GroupNorm): matching permutes single channels."""
    for g in spec.groups:
        if g.unit > 1:
            raise UnsupportedModelError(
                f"{spec.architecture}: group {g.name!r} ties its channels in units of {g.unit} (grouped convolutions or "
                "GroupNorm); weight matching permutes single channels"
            )


def match_weights(
    a: nn.Module, b: nn.Module, spec: MergeSpec | None = None, *, max_iterations: int = 100, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per group, the permutation of ``b``'s channels that aligns ``b`` with ``a`` (apply it with :func:`permute`)."""
    from scipy.optimize import linear_sum_assignment

    spec = spec or resolve_spec(a)
    check_matchable(spec)
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    order = torch.Generator().manual_seed(seed)
    for _ in range(max_iterations):
        improved = False
        for index in torch.randperm(len(spec.groups), generator=order).tolist():
            group = spec.groups[index]
            others_aligned = permute(b, {**perms, group.name: torch.arange(group.size)}, spec)
            similarity = _similarity(a, others_aligned, group)
            new = torch.as_tensor(linear_sum_assignment(similarity.numpy(), maximize=True)[1])
            rows = torch.arange(group.size)
            if similarity[rows, new].sum() > similarity[rows, perms[group.name]].sum() + 1e-9:
                perms[group.name], improved = new, True
        if not improved:
            break
    return perms
