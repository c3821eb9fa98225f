"""Adapters declare, per model family, which channels are coupled and where gates go.

An adapter is a function ``model -> MergeSpec`` registered for one or more model classes; it
only names modules and reads sizes, and returns None for a variant it leaves to tracing. All
tensor work lives in :mod:`hf_netmerge.surgery`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from torch import nn

from ..errors import UnsupportedModelError
from ..formats import architecture_name
from ..spec import MergeSpec, validate_spec

Adapter = Callable[[nn.Module], MergeSpec | None]
_ADAPTERS: dict[type[nn.Module] | str, Adapter] = {}


def register_adapter(*classes: type[nn.Module] | str) -> Callable[[Adapter], Adapter]:
    """Register ``fn`` as the adapter for ``classes`` (exact classes, not subclasses), each a class or its qualified name
    (``module.Class``: a class of an optional library, registered without importing it)."""

    def wrap(fn: Adapter) -> Adapter:
        for cls in classes:
            _ADAPTERS[cls] = fn
        return fn

    return wrap


def declared_spec(model: nn.Module) -> MergeSpec | None:
    """The spec the registered adapter of ``model``'s class declares, or None when there is none (or it declines)."""
    cls = type(model)
    adapter = _ADAPTERS.get(cls) or _ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
    return adapter(model) if adapter is not None else None


def resolve_spec(model: nn.Module, discover: bool = False) -> MergeSpec:
    """The validated channel-group spec of a teacher-width ``model``.

    Declared by the model family's adapter when there is one, else (or with ``discover=True``)
    discovered by tracing one forward pass. The spec's first and last layers must match the
    ``first_conv`` / ``classifier`` of the model's ``pretrained_cfg`` where it names them.
    """
    from .traced import discover_spec

    architecture = architecture_name(model)
    spec = None if discover else declared_spec(model)
    if spec is None:
        try:
            spec = discover_spec(model, architecture)
        except UnsupportedModelError as e:  # every refusal names the architecture (a transformers model type included)
            message = str(e) if str(e).startswith(f"{architecture}:") else f"{architecture}: {e}"
            raise UnsupportedModelError(message) from e  # the tracer's own subclasses are its business
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    writers = lambda g: g.producers or g.channelwise  # noqa: E731  (a tied group is written by its grouped convolutions)
    spec = replace(spec, groups=tuple(sorted(spec.groups, key=lambda g: min(order.get(p, 0) for p in writers(g)))))
    validate_spec(model, spec)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for key, layer in (("first_conv", spec.input_layer), ("classifier", spec.output_layer)):
        if isinstance(cfg.get(key), str) and cfg[key] != layer:
            raise UnsupportedModelError(
                f"{spec.architecture}: pretrained_cfg[{key!r}] is {cfg[key]!r} but the channel groups make {layer!r} that layer"
            )
    return spec


from . import lenet, mlp, resnet, vgg, vit  # noqa: E402,F401  (register the built-in adapters)

__all__ = ["Adapter", "declared_spec", "register_adapter", "resolve_spec"]
