"""Dependencies point one way (docs/architecture.md): every module imports only from its own layer or the ones before it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_netmerge"
LAYERS = [
    {"errors", "_version", "files"},
    {"config", "overrides"},
    {"models", "formats"},
    {"spec", "adapters"},
    {"surgery"},
    {"matching"},
    {"gates", "kernels"},
    {"data"},
    {"training"},
    {"hub", "card", "validation"},
    {"api"},
    {"experiments"},
    {"cli", "__main__", "__init__"},
]


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imported(path: Path) -> set[str]:
    """The first component below ``hf_netmerge`` of every package-internal module ``path`` imports."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = (*base, *(node.module.split(".") if node.module else []))
            names = [target] if node.module else [(*target, alias.name) for alias in node.names]
            found.update(t[0] for t in names if t)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_netmerge."):
            found.add(node.module.split(".")[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_point_down_the_layers(path):
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    upward = {top for top in _imported(path) if _layer(top) > _layer(own)}
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports from later layers: {sorted(upward)}"


def test_relative_imports_are_resolved_at_every_depth():
    assert {"config", "data", "errors"} <= _imported(PACKAGE / "training" / "runner.py")
    assert {"api", "config"} <= _imported(PACKAGE / "experiments" / "strategies" / "student.py")
    assert "api" not in _imported(PACKAGE / "training" / "runner.py") and _layer("api") > _layer("training")
