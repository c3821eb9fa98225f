"""Typed configs, validated up front and serialized as JSON or YAML with a version field."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import ConfigError

CONFIG_VERSION = 1
Task = Literal["classification", "regression"]
MixedPrecision = Literal["no", "bf16", "fp16"]

C = TypeVar("C", bound="TypedConfig")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints accepted as floats, lists for tuples)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


class TypedConfig:
    """Mixin for config dataclasses: strict ``from_dict`` (unknown keys and wrong types refused) and JSON/YAML I/O."""

    version: int

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build and validate; refuses unknown keys, wrong types and other versions with :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(names)}")
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"{cls.__name__}: config version {version!r} is not supported (expected {CONFIG_VERSION})")
        kwargs = {k: _coerce(hints[k], v, k) for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, keys in field order."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        """Load from a YAML file."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data or {})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class StageConfig(TypedConfig):
    """One training stage: SGD with momentum and a multi-step learning-rate decay (milestones in epochs)."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        _check(list(self.milestones) == sorted(set(self.milestones)), f"milestones must increase, got {self.milestones}")


@dataclass
class MergeConfig(TypedConfig):
    """Everything :func:`~hf_netmerge.merge_models` needs; the defaults suit a small CPU run.

    The gate stage trains weights with SGD (``lr``) and gates with Adam (``gate_lr``, constant, no
    weight decay); λ starts at ``lambda_init`` and grows each epoch by ``lambda_growth·√λ``.
    Fine-tuning uses ``finetune_lr`` (``lr`` if unset), divided by 10 at ``finetune_milestones``.
    Images of a ``datasets.Dataset`` go through timm's eval transform for the teachers, resized to
    ``image_size`` when set (else the architecture's default input size).
    """

    task: Task = "classification"
    gate_epochs: int = 2
    finetune_epochs: int = 2
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    finetune_lr: float | None = None
    finetune_milestones: list[int] = field(default_factory=list)
    gate_lr: float = 0.1
    gate_init_mean: float = 1.0
    gate_init_std: float = 0.01
    lambda_init: float = 0.01
    lambda_growth: float = 0.05
    mixed_precision: MixedPrecision = "no"
    seed: int = 0
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = None
    num_workers: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.image_size is None or self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _check(self.gate_epochs >= 1, f"gate_epochs must be >= 1, got {self.gate_epochs}")
        _check(self.finetune_epochs >= 0, f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.gate_lr > 0, f"gate_lr must be > 0, got {self.gate_lr}")
        _check(self.gate_init_std >= 0, f"gate_init_std must be >= 0, got {self.gate_init_std}")
        _check(self.lambda_init > 0, f"lambda_init must be > 0, got {self.lambda_init}")
        _check(self.lambda_growth >= 0, f"lambda_growth must be >= 0, got {self.lambda_growth}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        self.gate_stage()
        self.finetune_stage()

    def gate_stage(self) -> StageConfig:
        """The weights' schedule during the gate stage (constant learning rate)."""
        return StageConfig(epochs=self.gate_epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def finetune_stage(self) -> StageConfig:
        """The student's fine-tuning schedule."""
        return StageConfig(
            epochs=self.finetune_epochs,
            lr=self.finetune_lr if self.finetune_lr is not None else self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            milestones=list(self.finetune_milestones),
        )
