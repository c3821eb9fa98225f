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
        if value is False and "no" in get_args(tp):
            value = "no"  # YAML 1.1 reads an unquoted `no` as false
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
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, TypedConfig):
        try:
            return tp.from_dict(value)
        except ConfigError as e:
            raise ConfigError(f"{key}.{e}") from e
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
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(names)}")
        try:
            hints = typing.get_type_hints(cls)
        except NameError as e:  # a forward reference not resolvable here
            raise ConfigError(str(e)) from e
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
    """One training stage: SGD with momentum, optional linear warm-up over ``warmup_epochs``, the learning rate
    multiplied by ``lr_gamma`` at each of ``milestones`` (epochs), optional gradient clipping."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    max_grad_norm: float | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
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
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.gradient_accumulation_steps >= 1, f"gradient_accumulation_steps must be >= 1: {self.gradient_accumulation_steps}")
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
        return StageConfig(
            epochs=self.gate_epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm
        )

    def finetune_stage(self) -> StageConfig:
        """The student's fine-tuning schedule."""
        return StageConfig(
            epochs=self.finetune_epochs,
            lr=self.finetune_lr if self.finetune_lr is not None else self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            milestones=list(self.finetune_milestones),
            max_grad_norm=self.max_grad_norm,
        )


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


@dataclass
class DataConfig(TypedConfig):
    """Where a recipe's data comes from (see :func:`hf_netmerge.data.load_data`) and how it is split.

    ``val_fraction`` of the training set is held out (same split for every strategy) to pick bo3's
    model when the dataset has no validation split of its own; the test split scores everything.
    """

    dataset: str = "sine"
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = None
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_train_samples", "max_test_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1, got {value}")


@dataclass
class PruningConfig(TypedConfig):
    """The channel-pruning baseline: a double-width network trained, pruned to half, fine-tuned.

    Channels go in ``prune_epochs`` equal steps, least important first by first-order Taylor
    importance (Molchanov et al. 2019): the squared gradient of the loss w.r.t. a per-channel mask.
    """

    train: StageConfig = field(default_factory=StageConfig)
    prune_epochs: int = 1
    prune_lr: float = 0.01
    finetune: StageConfig = field(default_factory=StageConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.prune_epochs >= 1, f"prune_epochs must be >= 1, got {self.prune_epochs}")
        _check(self.prune_lr > 0, f"prune_lr must be > 0, got {self.prune_lr}")


Baseline = Literal["bo3", "one_model", "pruning"]
# MergeConfig fields a recipe sets once for every strategy, at its top level.
RECIPE_OWNED = (
    "task", "batch_size", "mixed_precision", "seed", "image_column", "label_column", "image_size", "gradient_accumulation_steps"
)


@dataclass
class RecipeConfig(TypedConfig):
    """A whole experiment: teachers (trained, or given), the merge, and the baselines at the same budget."""

    name: str = "experiment"
    architecture: str = "netmerge_sine_mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    task: Task = "classification"
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 64
    mixed_precision: MixedPrecision = "no"
    gradient_accumulation_steps: int = 1
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    teachers: list[str] = field(default_factory=list)
    teacher: StageConfig = field(default_factory=StageConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    baselines: list[Baseline] = field(default_factory=lambda: ["bo3", "one_model"])
    one_model: StageConfig = field(default_factory=StageConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    checkpoint_every: int = 1
    log_with: list[str] = field(default_factory=list)
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        owned = sorted(set(RECIPE_OWNED) & set((data or {}).get("merge") or {}))
        if owned:
            raise ConfigError(f"merge: {owned} are set once for every strategy, at the recipe's top level")
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; the merge section leaves out what the recipe sets at its top level."""
        data = super().to_dict()
        data["merge"] = {k: v for k, v in data["merge"].items() if k not in RECIPE_OWNED}
        return data

    def __post_init__(self) -> None:
        _check(bool(self.seeds), "seeds must not be empty")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(len(self.teachers) in (0, 2), f"teachers must list two checkpoints or none, got {len(self.teachers)}")
        _check(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _check(len(set(self.baselines)) == len(self.baselines), f"baselines repeat: {self.baselines}")
        _check(set(self.log_with) <= {"tensorboard"}, f"log_with supports 'tensorboard', got {self.log_with}")

    def merge_config(self, seed: int) -> MergeConfig:
        """The merge section completed with the recipe-wide settings."""
        return dataclasses.replace(
            self.merge,
            task=self.task,
            batch_size=self.batch_size,
            mixed_precision=self.mixed_precision,
            seed=seed,
            image_column=self.data.image_column,
            label_column=self.data.label_column,
            image_size=self.data.image_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
        )
