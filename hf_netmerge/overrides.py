"""Dotted ``key=value`` overrides for any config or recipe mapping (the CLI's ``--set`` and ``run`` arguments)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from .errors import ConfigError


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with dotted ``key=value`` overrides applied (values parsed as YAML: ``3``, ``0.1``, ``[1, 2]``, ``bf16``)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {e}") from e
    return data

