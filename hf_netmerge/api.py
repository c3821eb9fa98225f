"""The merge pipeline: concatenate → add gates → learn importance → compress → fine-tune."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._version import __version__
from .adapters import resolve_spec
from .card import render_card
from .config import MergeConfig
from .data import (
    Loader,
    Preprocessing,
    applied_augmentation,
    first_examples,
    make_loader,
    prepare_dataset,
    subset,
    training_view,
    warn_unused_classes,
)
from .errors import DataModelMismatchError, UnsupportedModelError
from .files import check_output_dir
from .formats import format_of, logits, save_student
from .formats import num_classes as classes_of
from .gates import ClosingSchedule, GatedModel, GateRegularizer, GroupStats, LambdaSchedule, add_gates, gates_removed
from .hub import TeacherInfo, load_teacher, push_folder
from .spec import MergeSpec
from .surgery import select_model, widen_model
from .training import (
    DistillationLoss,
    MeanEnsemble,
    StageJob,
    StageReport,
    evaluate,
    Trainer,
    make_accelerator,
    on_main_process,
    predict_with_targets,
    recalibrate_norms,
    score,
    task_loss,
    train_sequentially,
)
from .training.checkpoint import CheckpointDir, weights_digest
from .validation import check_teachers, teacher_key

RECORD_VERSION = 9  # 2: the record names its datasets (the card is rendered from it); 3: and the preprocessing; 4: its license;
# 5: any number of teachers (gate_stats' kept_per_teacher), gate units and exact_compression; 6: the preset, undecided gates;
# 7: the number of evaluation examples behind the metrics and the augmentation that ran; 8: the teacher given the gates' head start;
# 9: the checkpoint format (timm or transformers) the student is saved in
UNDECIDED_WARNING = 0.05  # above this share of undecided gates at the end of the gate stage, the log warns
logger = logging.getLogger("hf_netmerge")


def concatenate(teacher_a: nn.Module, teacher_b: nn.Module, *more: nn.Module) -> nn.Module:
    """The k-wide big student of k ≥ 2 teachers; in eval mode it computes exactly their mean, ``(a(x) + b(x)) / 2`` for two.

    The first layer shares the input, middle layers are block-diagonal with zero cross terms,
    norm statistics are concatenated, grouped convolutions get k times the groups, and the head
    averages the teachers. The teachers' spec and count are kept on the result as ``netmerge_spec``
    and ``netmerge_teachers`` for :func:`add_gates`.
    """
    teachers = [teacher_a, teacher_b, *more]
    check_teachers(*teachers)
    spec = resolve_spec(teacher_a)
    big = widen_model(teachers, spec)
    if spec.widths:
        _check_mean(big, teachers, spec)
    big.netmerge_spec = spec
    big.netmerge_teachers = len(teachers)
    return big


def _check_mean(big: nn.Module, teachers: list[nn.Module], spec: MergeSpec) -> None:
    """Refuse a big student that does not compute the teachers' mean on an example input: its forward splits channels
    by attributes (``spec.widths``) found by matching values, which a coincidence could get wrong."""
    from .adapters.traced import example_inputs

    modes = [m.training for m in (big, *teachers)]
    try:
        with torch.no_grad():
            for m in (big, *teachers):
                m.eval()
            *smaller, example = example_inputs(teachers[0])
            for candidate in smaller:  # the first size the model runs on (an Inception needs 75 px), as the trace did
                with contextlib.suppress(Exception):
                    teachers[0](candidate)
                    example = candidate
                    break
            mean = torch.stack([logits(t(example)) for t in teachers]).mean(0)
            error = float((logits(big(example)) - mean).abs().max() / mean.abs().max().clamp_min(1e-6))
    finally:
        for m, mode in zip((big, *teachers), modes):
            m.train(mode)
    if not error <= 1e-4:
        raise UnsupportedModelError(
            f"{spec.architecture}: the big student is off the teachers' mean by {error:.1e} (relative): its forward splits "
            f"channels by attributes {[w.path for w in spec.widths]}, some of them not what it splits by"
        )


def compress(gated: GatedModel) -> nn.Module:
    """The student: the most important half of every channel group of ``gated``, gates removed.

    The result has the teachers' architecture (same class, same state_dict keys and shapes);
    ``gated`` is left unchanged.
    """
    if not isinstance(gated, GatedModel):
        raise UnsupportedModelError("compress expects the GatedModel returned by hf_netmerge.add_gates")
    with gates_removed(gated) as big:
        student = select_model(big, gated.spec, gated.keep_indices(), gated.teachers)
    del student.netmerge_spec, student.netmerge_teachers
    return student


@dataclass(frozen=True)
class LoadOptions:
    """How teacher references become modules: ``.safetensors`` files are built as ``architecture`` (a timm name, or
    ``transformers:<model_type>``) with ``model_args``; pickle checkpoints are refused unless ``allow_pickle`` (then read
    with ``weights_only=True``)."""

    architecture: str | None = None
    model_args: dict[str, Any] | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class OutputOptions:
    """Where the student is saved at the end (the teachers' format + model card); an existing ``directory`` needs ``overwrite``.

    ``license`` and ``datasets`` go into the card's metadata; by default the license both teachers' cards declare
    (none when they differ or say nothing) and the training data's Hub name, when it has one."""

    directory: str | os.PathLike[str]
    overwrite: bool = False
    license: str | None = None
    datasets: list[str] | None = None


@dataclass(frozen=True)
class RunOptions:
    """How the stages run: the ``accelerator`` (one is made from the config if ``None``), progress bars, checkpoints
    under ``checkpoint_dir`` every ``checkpoint_every`` epochs (a rerun into the same directory resumes), and a
    ``stage_prefix`` for the stages' names (progress bars, tracker tags, reports), so the curves of several merges
    logged to one tracker stay apart. ``trainer`` runs the two stages (one at a time by default; an experiment's
    :class:`~hf_netmerge.training.StackingTrainer` stacks them with other merges')."""

    accelerator: Accelerator | None = None
    progress: bool = True
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int = 1
    stage_prefix: str = ""
    trainer: Trainer = train_sequentially


@dataclass
class MergeResult:
    """The merged student and everything measured on the way to it."""

    student: nn.Module
    gate_stats: list[GroupStats]
    metrics: dict[str, dict[str, float]]
    config: MergeConfig
    spec: MergeSpec
    teachers: tuple[TeacherInfo, ...]
    stages: list[StageReport]
    final_lambda: float
    undecided_gates: float = 0.0
    head_start_teacher: int | None = None
    function_gap: dict[str, float] = field(default_factory=dict)
    eval_examples: int = 0
    augmentation: dict[str, Any] = field(default_factory=dict)
    dataset_names: list[str] = field(default_factory=list)
    license: str | None = None
    label_names: list[str] | None = None
    preprocessing: Preprocessing | None = None

    @property
    def architecture(self) -> str:
        return self.spec.architecture

    def record(self) -> dict[str, Any]:
        """The content of ``netmerge_config.json``: exact config, teachers, gate stats, metrics, environment."""
        import accelerate
        import datasets
        import huggingface_hub
        import safetensors

        return {
            "version": RECORD_VERSION,
            "architecture": self.architecture,
            "format": format_of(self.student).name,
            "datasets": self.dataset_names,
            "license": self.license,
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing is not None else None,
            "merge_config": self.config.to_dict(),
            "preset": self.config.preset_name(),
            "teachers": [t.to_dict() for t in self.teachers],
            "spec": self.spec.to_dict(),
            "gate_stats": [s.to_dict() for s in self.gate_stats],
            "final_lambda": self.final_lambda,
            "undecided_gates": self.undecided_gates,
            "head_start_teacher": self.head_start_teacher,
            "metrics": self.metrics,
            "eval_examples": self.eval_examples,
            "augmentation": self.augmentation,
            "function_gap": self.function_gap,
            "stages": [{k: v for k, v in r.to_dict().items() if k != "history"} for r in self.stages],
            "environment": {
                "hf_netmerge": __version__,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "accelerate": accelerate.__version__,
                "datasets": datasets.__version__,
                "huggingface_hub": huggingface_hub.__version__,
                "safetensors": safetensors.__version__,
                **_format_library_version(self.student),
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
            },
        }

    def model_card(self) -> str:
        """The README.md model card, rendered from :meth:`record`."""
        return render_card(self.record())

    def save_pretrained(self, directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Save in the teachers' format (``config.json`` + ``model.safetensors``, and for transformers the image
        processor's ``preprocessor_config.json``) with ``netmerge_config.json`` and a model card.

        ``timm.create_model("local-dir:<directory>", pretrained=True)``, or for transformers' teachers
        ``AutoModelForImageClassification.from_pretrained(directory)``, loads the student back.
        """
        record = self.record()
        return save_student(
            self.student,
            directory,
            merge_record=record,
            card=render_card(record),
            label_names=self.label_names,
            preprocessing=self.preprocessing,
            overwrite=overwrite,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Add merged student (hf_netmerge)",
        token: str | None = None,
    ) -> str:
        """Publish the saved layout to the Hub in one commit (none when no file changed); returns the commit URL.

        The token comes from ``token``, ``HF_TOKEN`` or the cached ``hf auth login``. Under several processes only
        the main one publishes; every process returns the URL (or raises :class:`HubPushError`).
        """

        def push() -> str:
            with tempfile.TemporaryDirectory() as tmp:
                folder = self.save_pretrained(Path(tmp) / "student")
                return push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)

        return on_main_process(push)


def _format_library_version(model: nn.Module) -> dict[str, str]:
    """The version of the library a non-timm format's student is loaded with (transformers), for the record."""
    library = format_of(model).library
    if library == "timm":
        return {}
    return {library: importlib.import_module(library).__version__}


def check_teacher_reads(teacher: nn.Module, data: Dataset, task: str) -> None:
    """One forward pass and the task's loss on two examples, before anything trains: data a teacher cannot read (an
    image model on tabular data) or targets its outputs do not fit is refused with :class:`DataModelMismatchError`."""
    inputs, targets = next(iter(make_loader(data, 2, shuffle=False)))
    was_training = teacher.training
    try:
        with torch.no_grad():
            task_loss(task, logits(teacher.eval()(inputs)), targets)
    except (RuntimeError, ValueError, IndexError) as e:
        raise DataModelMismatchError(
            f"the teachers cannot be trained on this data ({task}, inputs of shape {tuple(inputs.shape[1:])}, targets of shape "
            f"{tuple(targets.shape[1:])}): {str(e).splitlines()[0]}; check the dataset against the teachers' input and task"
        ) from e
    finally:
        teacher.train(was_training)


def _shared_license(infos: tuple[TeacherInfo, ...]) -> str | None:
    """The license every teacher's card declares; None when one says nothing or they differ (the user decides)."""
    licenses = {info.license for info in infos}
    return licenses.pop() if len(licenses) == 1 else None


def _dataset_name(data: Any) -> list[str]:
    name = getattr(getattr(data, "info", None), "dataset_name", None)
    return [name] if name else []


def label_names_of(data: Any, label_column: str) -> list[str] | None:
    feature = getattr(data, "features", {}).get(label_column) if hasattr(data, "features") else None
    return list(feature.names) if getattr(feature, "names", None) else None


class _Evaluations:
    """Every network of a merge scored on the eval set with one pass each: the outputs are kept by name, so the
    ensemble is scored from its teachers' outputs and the compression gap from the gated and compressed students'."""

    def __init__(self, loader: Loader | None, batch_size: int, task: str, accelerator: Accelerator, progress: bool) -> None:
        self.loader, self.batch_size, self.task, self.accelerator, self.progress = loader, batch_size, task, accelerator, progress
        self.outputs: dict[str, torch.Tensor] = {}
        self.targets: torch.Tensor | None = None

    def measure(self, name: str, model: nn.Module, keep: bool = False) -> dict[str, float]:
        """``model``'s metrics (empty without eval data); with ``keep``, its outputs are kept under ``name`` for one
        later :meth:`mean_of` or :meth:`gap`."""
        if self.loader is None:
            return {}
        outputs, self.targets = predict_with_targets(model, self.loader, self.accelerator, progress=name if self.progress else None)
        if keep:
            self.outputs[name] = outputs
        return self.score(outputs)

    def mean_of(self, names: list[str]) -> dict[str, float]:
        """The metrics of the mean of ``names``' kept outputs (a mean ensemble of them), with no further pass."""
        return self.score(torch.stack([self.outputs.pop(n) for n in names]).mean(0)) if self.loader is not None else {}

    def gap(self, a: str, b: str) -> dict[str, float]:
        """Largest and mean absolute difference between the kept outputs of ``a`` and ``b``."""
        if self.loader is None:
            return {}
        diff = (self.outputs.pop(a) - self.outputs.pop(b)).abs()
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}

    def score(self, outputs: torch.Tensor) -> dict[str, float]:
        assert self.targets is not None
        return score(self.task, outputs, self.targets, self.batch_size)


def _recalibration_loader(train_set: Dataset, config: MergeConfig) -> DataLoader:
    """Up to ``recalibration_samples`` training examples (a seeded draw, eval transform) for the BatchNorm statistics."""
    if len(train_set) > config.recalibration_samples:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed))
        train_set = subset(train_set, order[: config.recalibration_samples].sort().values)
    return make_loader(train_set, config.batch_size, shuffle=False)


def merge_models(
    teacher_a: nn.Module | str | os.PathLike[str],
    teacher_b: nn.Module | str | os.PathLike[str],
    train_data: Any,
    eval_data: Any | None = None,
    config: MergeConfig | None = None,
    *,
    more_teachers: Sequence[nn.Module | str | os.PathLike[str]] = (),
    load: LoadOptions | None = None,
    output: OutputOptions | str | os.PathLike[str] | None = None,
    run: RunOptions | None = None,
) -> MergeResult:
    """Merge two (or, with ``more_teachers``, k) teachers of one architecture into a student of that architecture.

    Teachers are ``nn.Module`` s (timm's or transformers' ``AutoModelForImageClassification`` models), local
    directories in timm's or transformers' layout, Hub ids (``id@revision``) or ``.safetensors``
    files (see :class:`LoadOptions`); data is a ``datasets.Dataset`` (image/label columns), a torch
    Dataset or a DataLoader. Every input is checked before any training; with ``output`` (a directory
    or :class:`OutputOptions`) the student is saved there at the end; :class:`RunOptions` set the
    accelerator, progress bars and resumable checkpoints. With k teachers the big student is k wide and
    the gates keep 1/k of every channel group.
    """
    load = load or LoadOptions()
    output = output if output is None or isinstance(output, OutputOptions) else OutputOptions(output)
    run = run or RunOptions()
    config = config or MergeConfig()
    if output is not None:
        check_output_dir(output.directory, output.overwrite)
    loaded = [load_teacher(t, load.architecture, load.model_args, load.allow_pickle) for t in (teacher_a, teacher_b, *more_teachers)]
    teachers, infos = [m for m, _ in loaded], tuple(info for _, info in loaded)
    a = teachers[0]
    big = concatenate(*teachers)
    spec: MergeSpec = big.netmerge_spec
    num_classes = classes_of(a)
    prepare = functools.partial(
        prepare_dataset,
        model=a,
        task=config.task,
        num_classes=num_classes,
        image_column=config.image_column,
        label_column=config.label_column,
        image_size=config.image_size,
    )
    train_set = prepare(train_data, min_size=config.batch_size, label="train_data")
    eval_set = (first_examples(prepare(eval_data, min_size=1, label="eval_data"), config.eval_max_samples)
                if eval_data is not None else None)
    preprocessing = getattr(train_set, "preprocessing", None)
    check_teacher_reads(a, train_set, config.task)
    if config.task == "classification":
        warn_unused_classes(train_set, num_classes)
    plain_train = train_set
    augmentation = applied_augmentation(train_set, config.augment)
    train_set = training_view(train_set, config.augment, config.seed)

    accelerator = run.accelerator or make_accelerator(config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps)
    checkpoints = CheckpointDir(run.checkpoint_dir, run.checkpoint_every, writer=accelerator.is_main_process)
    checkpoints.claim({"config": config.to_dict(), "teachers": [weights_digest(t) for t in teachers], "train_examples": len(train_set)})
    set_seed(config.seed)
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, num_workers=config.num_workers)
    eval_batch = config.eval_batch_size or 4 * config.batch_size
    evals = _Evaluations(make_loader(eval_set, eval_batch, shuffle=False) if eval_set is not None else None, eval_batch,
                         config.task, accelerator, run.progress)

    def ensemble_targets(alpha: float) -> DistillationLoss | None:
        return DistillationLoss(MeanEnsemble(*teachers), config.task, config.distill_temperature, alpha) if alpha > 0 else None

    metrics = {teacher_key(i): evals.measure(teacher_key(i), t, keep=True) for i, t in enumerate(teachers)}
    metrics["ensemble"] = evals.mean_of([teacher_key(i) for i in range(len(teachers))])
    metrics["big_student"] = evals.measure("big_student", big)
    gated = add_gates(big, config.gate_init_mean, config.gate_init_std, noise_seed=config.seed)
    head_start = None
    if config.gate_head_start > 0:  # ranked on training examples: the evaluation data (maybe a test set) never steers training
        recalibration = _recalibration_loader(plain_train, config)
        scores = [evaluate(t, recalibration, task=config.task, accelerator=accelerator) for t in teachers]
        losses = [s.get("loss", s.get("mse")) for s in scores]  # a regression's loss is its mse
        head_start = min(range(len(teachers)), key=losses.__getitem__)
        gated.give_head_start(head_start, config.gate_head_start)
    regularizer = GateRegularizer(gated, LambdaSchedule.from_config(config), config.gate_lr, ClosingSchedule.from_config(config))
    job = functools.partial(StageJob, loader=train_loader, task=config.task, accelerator=accelerator, compile_mode=config.compile,
                            channels_last=config.channels_last, progress=run.progress)
    stages = run.trainer([job(gated, stage=config.gate_stage(), name=f"{run.stage_prefix}gates", regularizer=regularizer,
                              distillation=ensemble_targets(config.gate_distill_alpha), checkpoint=checkpoints("gates"))])
    final_lambda = stages[0].history[-1]["lambda"]
    regularizer.prepare(config.gate_epochs)  # the closing schedule's end (the last step came just before it)
    undecided = gated.undecided_fraction()
    if undecided > UNDECIDED_WARNING:
        logger.warning("%.1f%% of the gates are undecided (P[g>0] in (0.1, 0.9)) at the end of the gate stage (λ %.3g): "
                       "compression removes channels the gates still use; give the gates more steps (gate_epochs), a larger "
                       "gate_lr or lambda_final",
                       100 * undecided, final_lambda)
    metrics["gated_big_student"] = evals.measure("gated_big_student", gated, keep=True)
    student = compress(gated)
    copy.deepcopy(a).load_state_dict(student.state_dict(), strict=True)
    metrics["student_before_finetune"] = evals.measure("student_before_finetune", student, keep=True)
    gap = evals.gap("gated_big_student", "student_before_finetune")
    gate_stats = gated.statistics()
    del gated, big
    if config.recalibrate_norms:
        recalibrate_norms(student, _recalibration_loader(plain_train, config), accelerator)
        metrics["student_recalibrated"] = evals.measure("student_recalibrated", student)
    if config.finetune_epochs > 0:
        stages += run.trainer([job(student, stage=config.finetune_stage(), name=f"{run.stage_prefix}finetune",
                                   distillation=ensemble_targets(config.distill_alpha), checkpoint=checkpoints("finetune"))])
    student.eval()
    metrics["student"] = evals.measure("student", student)
    result = MergeResult(
        student=student,
        gate_stats=gate_stats,
        metrics={k: v for k, v in metrics.items() if v},
        config=config,
        spec=spec,
        teachers=infos,
        stages=stages,
        final_lambda=final_lambda,
        undecided_gates=undecided,
        head_start_teacher=head_start,
        function_gap=gap,
        eval_examples=len(eval_set) if eval_set is not None else 0,
        augmentation=augmentation,
        dataset_names=output.datasets if output is not None and output.datasets else _dataset_name(train_data),
        license=output.license if output is not None and output.license else _shared_license(infos),
        label_names=label_names_of(train_data, config.label_column),
        preprocessing=preprocessing,
    )
    if output is not None and accelerator.is_main_process:
        result.save_pretrained(output.directory, overwrite=output.overwrite)
    accelerator.wait_for_everyone()
    return result
