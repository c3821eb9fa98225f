"""Adapters declare, per model family, which channels are coupled and where gates go.

An adapter is a function ``model -> MergeSpec`` registered for one or more model classes; it
only names modules and reads sizes. All tensor work lives in :mod:`hf_netmerge.surgery`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import UnsupportedModelError
from ..spec import MergeSpec, validate_spec

Adapter = Callable[[nn.Module], MergeSpec]
_ADAPTERS: dict[type[nn.Module], Adapter] = {}


def register_adapter(*classes: type[nn.Module]) -> Callable[[Adapter], Adapter]:
    """Register ``fn`` as the adapter for ``classes`` (exact classes, not subclasses)."""

    def wrap(fn: Adapter) -> Adapter:
        for cls in classes:
            _ADAPTERS[cls] = fn
        return fn

    return wrap


def architecture_name(model: nn.Module) -> str:
    """The timm architecture name recorded on the model, else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def resolve_spec(model: nn.Module) -> MergeSpec:
    """The validated channel-group spec of a teacher-width ``model``."""
    adapter = _ADAPTERS.get(type(model))
    if adapter is None:
        known = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
        raise UnsupportedModelError(
            f"no channel-group adapter for {type(model).__name__} ({architecture_name(model)}); supported: {known}"
        )
    spec = adapter(model)
    validate_spec(model, spec)
    return spec


from . import lenet, mlp  # noqa: E402,F401  (register the built-in adapters)

__all__ = ["Adapter", "architecture_name", "register_adapter", "resolve_spec"]
