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
CompileMode = Literal["no", "default", "reduce-overhead", "max-autotune"]
LrSchedule = Literal["step", "cosine"]
LambdaShape = Literal["per_epoch", "quadratic", "linear", "exponential"]
GateClosing = Literal["none", "cubic"]

C = TypeVar("C", bound="TypedConfig")
S = TypeVar("S", bound="MergeSchedule")


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


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


@dataclass
class StageConfig(TypedConfig):
    """One training stage: SGD with momentum, optional linear warm-up over ``warmup_epochs``, then the learning rate
    either multiplied by ``lr_gamma`` at each of ``milestones`` (epochs; ``lr_schedule: step``) or decayed to zero
    along a half cosine over the stage, step by step (``cosine``); optional gradient clipping."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    lr_schedule: LrSchedule = "step"
    warmup_epochs: int = 0
    max_grad_norm: float | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        require(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        require(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        require(list(self.milestones) == sorted(set(self.milestones)), f"milestones must increase, got {self.milestones}")
        require(self.lr_schedule == "step" or not self.milestones, f"milestones apply to lr_schedule 'step', not {self.lr_schedule!r}")

    def stretched(self, epochs: int) -> StageConfig:
        """This stage run for ``epochs`` epochs, its learning-rate drops moved in proportion."""
        return dataclasses.replace(self, epochs=epochs, milestones=moved_milestones(self.milestones, self.epochs, epochs))


def moved_milestones(milestones: list[int], epochs: int, new_epochs: int) -> list[int]:
    """Epoch milestones of an ``epochs``-long schedule moved in proportion to ``new_epochs`` (merged where they meet)."""
    return sorted({round(m * new_epochs / epochs) for m in milestones} & set(range(1, new_epochs)))


AugmentMode = Literal["auto", "none"]


@dataclass
class AugmentConfig(TypedConfig):
    """Train-time augmentation of image inputs (validation and test data always go through the eval transform).

    ``auto``: for images of 64 px and more, timm's training transform (RandomResizedCrop with ``scale`` and
    ``ratio``, flip, ``color_jitter``, ``auto_augment``, random erasing with ``re_prob``), as timm's
    ``train.py`` builds it; for smaller images (CIFAR / MNIST size), a random crop after ``pad`` pixels of
    padding and a horizontal flip with probability ``hflip`` (set 0 for digit-like data); in-memory image
    tensors get the same crop and flip on the batch. ``none``: the eval transform everywhere. Non-image
    inputs are never augmented. In YAML, ``augment: none`` is short for ``augment: {mode: none}``.
    """

    mode: AugmentMode = "auto"
    hflip: float = 0.5
    pad: int = 4
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    color_jitter: float = 0.4
    auto_augment: str | None = None
    re_prob: float = 0.0
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> AugmentConfig:
        return super().from_dict({"mode": data} if isinstance(data, str) else data)

    def __post_init__(self) -> None:
        require(0 <= self.hflip <= 1, f"augment.hflip must be in [0, 1], got {self.hflip}")
        require(0 <= self.re_prob <= 1, f"augment.re_prob must be in [0, 1], got {self.re_prob}")
        require(self.pad >= 0, f"augment.pad must be >= 0, got {self.pad}")
        require(self.color_jitter >= 0, f"augment.color_jitter must be >= 0, got {self.color_jitter}")
        for name in ("scale", "ratio"):
            low_high = getattr(self, name)
            require(len(low_high) == 2 and 0 < low_high[0] <= low_high[1], f"augment.{name} must be [low, high] with 0 < low <= high")

    @property
    def active(self) -> bool:
        """Whether training inputs are augmented at all."""
        return self.mode != "none"


@dataclass
class MergeSchedule(TypedConfig):
    """The method's own settings: how long and how the gate stage and fine-tuning train, and what recovers the
    half-width student after compression.

    The gate stage trains weights with SGD (``lr``) and gates with Adam (``gate_lr``, constant, no weight decay)
    under ``λ·Σ(½ − mean P[g>0])²``. ``lambda_schedule`` sets λ: ``quadratic``, ``linear`` or ``exponential`` move
    it step by step from ``lambda_init`` to ``lambda_final`` over the gate stage, so any stage length polarizes
    the gates (``quadratic`` is the paper's curve, ``(√λ0 + (√λ1 − √λ0)·t)²``, reached at the stage's end);
    ``per_epoch`` is the paper's own rule, λ ← λ + ``lambda_growth``·√λ after every epoch. With
    ``gate_distill_alpha`` > 0 the gate stage also learns from the teachers' ensemble (distillation at
    ``distill_temperature``), so the gated big student stays near the ensemble while the gates close.
    ``gate_closing: cubic`` holds the lowest-scored gates of every group closed for good, more and more of them on
    a cubic schedule (Zhu & Gupta 2017) from ``closing_start`` of the gate stage to its end, where all but the kept
    1/k are closed: the big student learns without the channels compression will remove, and compression removes
    no open gate (with ``none``, a group can end with more than half of its gates open). ``gate_head_start`` > 0
    adds that much to the initial ``log_alpha`` of the better teacher's gates (lowest loss on the recalibration
    examples: training data, so the evaluation data never steers training): the selection starts from that
    teacher's whole function and keeps the other's channels where training ranks them higher.
    After compression, ``recalibrate_norms`` recomputes the student's BatchNorm statistics on up to
    ``recalibration_samples`` training examples (the kept channels' statistics were those of a different
    network). Fine-tuning uses ``finetune_lr`` (``lr`` if unset) under ``finetune_schedule`` (``cosine`` to zero,
    or ``step``: ÷10 at ``finetune_milestones``); with ``distill_alpha`` > 0 it learns from the ensemble too.

    ``MergeSchedule()`` is the recommended recipe, chosen on validation data (``benchmarks/merge_levers.py``): given
    converged teachers, a quarter of the extra epochs on gates and the rest on fine-tuning distilled from the
    ensemble; :meth:`paper` is the paper's exact schedule. A recipe's ``merge:`` section is a MergeSchedule
    (``preset: paper`` starts it from the paper's values); what every strategy shares (task, batch size,
    precision, data columns) is set once at the recipe's top level.
    """

    gate_epochs: int = 1
    finetune_epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    finetune_lr: float | None = None
    finetune_schedule: LrSchedule = "cosine"
    finetune_milestones: list[int] = field(default_factory=list)
    gate_lr: float = 0.1
    gate_init_mean: float = 1.0
    gate_init_std: float = 0.01
    lambda_schedule: LambdaShape = "quadratic"
    lambda_init: float = 0.05
    lambda_final: float = 20.0
    lambda_growth: float = 0.05
    gate_closing: GateClosing = "cubic"
    closing_start: float = 0.25
    gate_head_start: float = 1.0
    max_grad_norm: float | None = None
    gate_distill_alpha: float = 0.0
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    recalibrate_norms: bool = True
    recalibration_samples: int = 10000
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("distill_alpha", "gate_distill_alpha"):
            require(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        require(self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}")
        require(self.gate_epochs >= 1, f"gate_epochs must be >= 1, got {self.gate_epochs}")
        require(self.finetune_epochs >= 0, f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        require(self.gate_lr > 0, f"gate_lr must be > 0, got {self.gate_lr}")
        require(self.gate_init_std >= 0, f"gate_init_std must be >= 0, got {self.gate_init_std}")
        require(self.lambda_init > 0, f"lambda_init must be > 0, got {self.lambda_init}")
        require(self.lambda_final > 0, f"lambda_final must be > 0, got {self.lambda_final}")
        require(self.lambda_growth >= 0, f"lambda_growth must be >= 0, got {self.lambda_growth}")
        require(self.gate_head_start >= 0, f"gate_head_start must be >= 0, got {self.gate_head_start}")
        require(0 <= self.closing_start < 1, f"closing_start must be in [0, 1), got {self.closing_start}")
        require(self.recalibration_samples >= 1, f"recalibration_samples must be >= 1, got {self.recalibration_samples}")
        require(self.finetune_schedule == "step" or not self.finetune_milestones,
                f"finetune_milestones {self.finetune_milestones} need finetune_schedule: step (the {self.finetune_schedule!r} "
                "schedule has no milestones)")
        self.gate_stage()
        self.finetune_stage()

    @classmethod
    def paper(cls: type[S], **changes: Any) -> S:
        """The paper's exact schedule (λ from 0.01 growing by 0.05·√λ per epoch, fine-tuning at ``lr`` without
        distillation, no recalibration), with ``changes`` applied: what the paper's recipes run."""
        return cls(**{**PAPER_SCHEDULE, **changes})

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        """As :meth:`TypedConfig.from_dict`; a ``preset: paper`` key starts from :meth:`paper`'s values."""
        if isinstance(data, dict) and "preset" in data:
            data = dict(data)
            preset = data.pop("preset")
            require(preset in PRESETS, f"preset: {preset!r} is not one of {sorted(PRESETS)}")
            data = {**PRESETS[preset], **data}
        return super().from_dict(data)

    def preset_name(self) -> str:
        """``recommended`` or ``paper`` when the method's settings (all but the stage lengths and learning rates) are
        that preset's, else ``custom``: what the card and the README say ran."""
        values = self.to_dict()
        for name, preset in PRESETS.items():
            if all(values[k] == v for k, v in preset.items() if k in METHOD_FIELDS):
                return name
        return "custom"

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
            lr_schedule=self.finetune_schedule,
            max_grad_norm=self.max_grad_norm,
        )


# The paper's schedule: λ per epoch, no recovery levers. Stage lengths and learning rates stay each recipe's own.
PAPER_SCHEDULE: dict[str, Any] = {
    "lambda_schedule": "per_epoch",
    "lambda_init": 0.01,
    "lambda_growth": 0.05,
    "gate_closing": "none",
    "gate_head_start": 0.0,
    "finetune_schedule": "step",
    "gate_distill_alpha": 0.0,
    "distill_alpha": 0.0,
    "distill_temperature": 4.0,
    "recalibrate_norms": False,
}
# The fields that tell the presets apart (how λ moves and which recovery levers run), for preset_name.
METHOD_FIELDS = frozenset({"lambda_schedule", "gate_closing", "gate_head_start", "finetune_schedule", "gate_distill_alpha", "distill_alpha", "recalibrate_norms"})
PRESETS: dict[str, dict[str, Any]] = {
    "recommended": {k: v for k, v in MergeSchedule().to_dict().items() if k in METHOD_FIELDS},
    "paper": PAPER_SCHEDULE,
}


@dataclass
class MergeConfig(MergeSchedule):
    """Everything :func:`~hf_netmerge.merge_models` needs: the :class:`MergeSchedule` plus how to read the data and run.

    The defaults suit a small CPU run. Images of a ``datasets.Dataset`` go through timm's transforms for
    the teachers at ``image_size`` when set (else the architecture's input size): the training stages
    through the train transform that ``augment`` describes, evaluation through the eval transform.
    ``compile`` runs every training stage through ``torch.compile`` in that mode (see
    :func:`~hf_netmerge.training.train_stage`); ``channels_last`` trains conv nets in that memory format.
    Every network is evaluated once on the first ``eval_max_samples`` evaluation examples (all when None) in batches
    of ``eval_batch_size`` (4 × ``batch_size`` when None: evaluation keeps no activations for a backward pass).
    """

    task: Task = "classification"
    batch_size: int = 64
    eval_batch_size: int | None = None
    eval_max_samples: int | None = None
    mixed_precision: MixedPrecision = "no"
    seed: int = 0
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 0
    gradient_accumulation_steps: int = 1
    compile: CompileMode = "no"
    channels_last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.gradient_accumulation_steps >= 1, f"gradient_accumulation_steps must be >= 1: {self.gradient_accumulation_steps}")
        require(self.image_size is None or self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.eval_batch_size is None or self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        require(self.eval_max_samples is None or self.eval_max_samples >= 1, f"eval_max_samples must be >= 1, got {self.eval_max_samples}")
        require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")

    @classmethod
    def run_fields(cls) -> list[str]:
        """The fields MergeConfig adds to a :class:`MergeSchedule` (set once per experiment in a recipe)."""
        own = {f.name for f in dataclasses.fields(MergeSchedule)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in own]
