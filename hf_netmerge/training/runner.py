"""One Accelerate training loop for every stage and strategy, and the evaluation that goes with it.

Teachers, the gate stage, fine-tuning and the baselines all run :func:`train_stage`; the gate
stage differs only by a regularizer (the half loss and its λ schedule) whose parameters get a
second optimizer. The loop only trains: data, models and reports come from the caller.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import is_compiled_module
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import CompileMode, StageConfig
from ..data import Loader, TensorLoader
from ..errors import CheckpointMismatchError, NonFiniteLossError, StageInterrupted
from ..formats import logits
from .accelerator import optimizer_needs_accelerate
from .checkpoint import StageCheckpoint

LOG_EVERY_SECONDS = 30  # without a progress bar (a log file), a line at least this often within an epoch


class Regularizer(Protocol):
    """An extra loss term ``weight(epoch)·penalty()`` with its own parameters and optimizer (the gates' half loss).

    ``penalty`` is computed from the current parameters of the model it regularizes (stacked training calls it with
    every network's parameters swapped in); ``weight`` is a plain number, a function of the stage's progress in
    (fractional) epochs only, so a resumed stage needs no state of it. ``prepare(epoch)`` runs before each step's
    forward pass; where it changes the model's parameters (``prepares_model``: the gates' closing schedule), the
    network cannot join a stack.
    """

    prepares_model: bool

    def parameters(self) -> list[nn.Parameter]: ...

    def optimizer(self) -> torch.optim.Optimizer: ...

    def penalty(self) -> torch.Tensor: ...

    def weight(self, epoch: float) -> float: ...

    def prepare(self, epoch: float) -> None: ...

    def log(self) -> dict[str, float]: ...


@dataclass
class StageReport:
    """What one stage did: epochs, optimizer steps, wall time (``compile_seconds`` of it spent in the compiled first
    step), and per-epoch logs."""

    stage: str
    epochs: int
    steps: int
    seconds: float
    samples: int
    history: list[dict[str, float]] = field(default_factory=list)
    compile_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression; always computed in fp32."""
    output = output if output.dtype == torch.float32 else output.float()
    if task == "classification":
        return F.cross_entropy(output, target.long())
    return F.mse_loss(output, target.float().view_as(output))


def lr_factor(stage: StageConfig) -> Callable[[float], float]:
    """The learning-rate multiplier at ``epoch`` (fractional: the steps done in the current epoch count): linear
    warm-up per epoch, then ×``lr_gamma`` at each milestone (``step``) or a half cosine to zero over the stage."""

    def factor(epoch: float) -> float:
        whole = math.floor(epoch)
        warm = min(1.0, (whole + 1) / stage.warmup_epochs) if stage.warmup_epochs else 1.0
        if stage.lr_schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(epoch / stage.epochs, 1.0)))
        return warm * stage.lr_gamma ** sum(whole >= m for m in stage.milestones)

    return factor


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_stage(
    model: nn.Module,
    loader: Loader,
    stage: StageConfig,
    *,
    task: str,
    accelerator: Accelerator,
    name: str,
    regularizer: Regularizer | None = None,
    distillation: DistillationLoss | None = None,
    checkpoint: StageCheckpoint | None = None,
    compile_mode: CompileMode = "no",
    channels_last: bool = False,
    progress: bool = True,
) -> StageReport:
    """Train ``model`` in place for ``stage.epochs`` epochs; returns the stage's report.

    Weights use SGD with momentum under :func:`lr_factor`'s schedule, with gradient accumulation
    (the accelerator's ``gradient_accumulation_steps``) and optional clipping. With a ``regularizer``,
    its loss is added each step and its parameters (kept fp32) are stepped by the regularizer's own optimizer.
    With ``distillation``, the task loss is replaced by its loss against its teacher's outputs on the same batch.
    With a ``checkpoint``, the stage resumes from its newest complete checkpoint
    and writes one at epoch boundaries. Metrics go to the accelerator's trackers as ``<name>/...``.
    With ``compile_mode`` other than ``"no"`` the model trains through ``torch.compile`` in that mode with static
    shapes: each epoch's last incomplete batch is skipped (as timm's ``train.py`` drops it) so one graph serves
    the stage, and the first step's time, compilation included, is reported as ``compile_seconds`` and left out
    of the epoch's ``samples_per_second``. ``channels_last`` trains in that memory format (4-D inputs and
    weights); the model is handed back in the default format.
    A :class:`TensorLoader` in a single process without accumulation or loss scaling is iterated and
    back-propagated directly, outside ``accelerator.accumulate`` (tiny models spend most of a step in per-batch
    overhead, and ``accelerator.backward`` adds a division); elsewhere Accelerate shards its DataLoader.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    extra = regularizer.parameters() if regularizer is not None else []
    extra_ids = {id(p) for p in extra}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in extra_ids]
    optimizer = torch.optim.SGD(weights, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay, fused=True)
    factor = lr_factor(stage)
    optimizers = [optimizer]
    if extra:
        optimizers.append(regularizer.optimizer())
    report = StageReport(stage=name, epochs=stage.epochs, steps=0, seconds=0.0, samples=0)
    if distillation is not None:
        distillation.to(accelerator.device)
    start_epoch = _resume(checkpoint, model, optimizers, loader, report)
    wrapped_optimizers = optimizer_needs_accelerate(accelerator)
    if wrapped_optimizers:
        optimizers = list(accelerator.prepare(*optimizers)) if len(optimizers) > 1 else [accelerator.prepare(optimizers[0])]
    direct = (
        isinstance(loader, TensorLoader)
        and accelerator.num_processes == 1
        and accelerator.gradient_accumulation_steps == 1
        and not wrapped_optimizers
    )
    if direct:
        train_model, train_loader = accelerator.prepare(model), loader.to(accelerator.device)
    else:
        train_model, train_loader = accelerator.prepare(model, _as_dataloader(loader))
    compiling = compile_mode != "no"
    if compiling and not is_compiled_module(train_model):
        train_model = torch.compile(train_model, mode=compile_mode, dynamic=False)
    full_batch: int | None = None
    batches = len(train_loader)
    shown = progress and accelerator.is_local_main_process
    bar = tqdm(  # counts batches, so a long epoch moves; None: no bar when stderr is not a terminal
        desc=name,
        unit="batch",
        leave=False,
        initial=start_epoch * batches,
        total=stage.epochs * batches,
        disable=None if shown else True,
    )
    lines = shown and bar.disable  # a log file: a plain line every tenth of the stage and every 30 s instead of a bar
    every = max(1, math.ceil(stage.epochs / 10))
    start = last_line = time.perf_counter()
    train_model.train()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, stage.epochs):
            epoch_start = time.perf_counter()
            _set_epoch(loader, epoch)
            losses: list[torch.Tensor] = []  # no host sync per step: read once at the end of the epoch
            sizes: list[int] = []
            warmup_seconds, warmup_samples = 0.0, 0
            lam = 0.0
            for index, (inputs, targets) in enumerate(train_loader):
                bar.update()
                if lines and time.perf_counter() - last_line >= LOG_EVERY_SECONDS:
                    print(f"{name}: epoch {epoch + 1}/{stage.epochs}, batch {index + 1}/{batches}", file=sys.stderr, flush=True)
                    last_line = time.perf_counter()
                position = epoch + index / batches  # the learning rate and λ move step by step
                lr = stage.lr * factor(position)
                if lr != optimizer.param_groups[0]["lr"]:  # a step schedule moves it once an epoch, the cosine every step
                    _set_lr(optimizer, lr)
                if compiling and full_batch is not None and len(targets) != full_batch:
                    continue
                if channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                first = compiling and full_batch is None
                step_start = time.perf_counter()
                if regularizer is not None:
                    regularizer.prepare(position)
                with contextlib.nullcontext() if direct else accelerator.accumulate(train_model):
                    output = logits(train_model(inputs))
                    loss = distillation(output, inputs, targets) if distillation is not None else task_loss(task, output, targets)
                    if regularizer is not None:
                        lam = regularizer.weight(position)
                        objective = loss + lam * regularizer.penalty()
                    else:
                        objective = loss
                    if direct:
                        objective.backward()
                    else:
                        accelerator.backward(objective)
                    if direct or accelerator.sync_gradients:
                        if stage.max_grad_norm is not None:
                            accelerator.clip_grad_norm_(weights, stage.max_grad_norm)
                        for opt in optimizers:
                            opt.step()
                            opt.zero_grad(set_to_none=True)
                        report.steps += 1
                losses.append(loss.detach())
                sizes.append(len(targets))
                if first:
                    _synchronize(accelerator.device)
                    full_batch, warmup_samples = len(targets), len(targets)
                    warmup_seconds = time.perf_counter() - step_start
                    report.compile_seconds += warmup_seconds
            seen = sum(sizes)
            total, first_bad = _epoch_loss(losses, sizes, accelerator.device)
            count = accelerator.reduce(torch.tensor(seen, device=accelerator.device), "sum")
            epoch_loss = float(accelerator.reduce(total, "sum")) / max(int(count), 1)
            bad = [int(b) for b in accelerator.gather(first_bad[None]) if b >= 0]  # every process sees the same and stops
            if bad or not math.isfinite(epoch_loss):
                step = f"batch {min(bad) + 1} of " if bad else ""
                raise NonFiniteLossError(
                    f"stage {name!r}: the training loss became non-finite at {step}epoch {epoch + 1}; "
                    "lower the learning rate or check the data (the last complete checkpoint is kept)"
                )
            entry = {
                "epoch": epoch + 1,
                "loss": epoch_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_second": _rate(seen, warmup_samples, time.perf_counter() - epoch_start, warmup_seconds) * accelerator.num_processes,
            }
            if regularizer is not None:
                entry.update(regularizer.log(), **{"lambda": lam})  # the λ of the epoch's last step
            report.history.append(entry)
            report.samples += seen
            accelerator.log({f"{name}/{k}": v for k, v in entry.items() if k != "epoch"}, step=epoch + 1)
            bar.set_postfix(epoch=f"{epoch + 1}/{stage.epochs}", loss=f"{epoch_loss:.4g}", samples_s=f"{entry['samples_per_second']:.0f}")
            if lines and ((epoch + 1) % every == 0 or epoch + 1 == stage.epochs):
                print(f"{name}: epoch {epoch + 1}/{stage.epochs}, loss {epoch_loss:.4g}, {entry['samples_per_second']:.0f} samples/s",
                      file=sys.stderr, flush=True)
            if checkpoint is not None and checkpoint.due(epoch + 1, stage.epochs):
                accelerator.wait_for_everyone()
                checkpoint.save(epoch + 1, _stage_state(model, optimizers, loader, report))
    except KeyboardInterrupt as e:  # Ctrl-C: say where, and which complete checkpoint a rerun resumes from
        bar.close()
        raise StageInterrupted(name, epoch + 1, stage.epochs, checkpoint.latest() if checkpoint is not None else None) from e
    report.seconds += time.perf_counter() - start
    bar.close()
    accelerator.unwrap_model(train_model, keep_fp32_wrapper=False)
    _release(accelerator)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return report


@dataclass
class StageJob:
    """One call of :func:`train_stage` as a value: what a :data:`Trainer` runs (see its arguments there)."""

    model: nn.Module
    loader: Loader
    stage: StageConfig
    task: str
    accelerator: Accelerator
    name: str
    regularizer: Regularizer | None = None
    distillation: DistillationLoss | None = None
    checkpoint: StageCheckpoint | None = None
    compile_mode: CompileMode = "no"
    channels_last: bool = False
    progress: bool = True

    def run(self) -> StageReport:
        """Train this job's model alone (:func:`train_stage`)."""
        return train_stage(self.model, self.loader, self.stage, task=self.task, accelerator=self.accelerator, name=self.name,
                           regularizer=self.regularizer, distillation=self.distillation, checkpoint=self.checkpoint,
                           compile_mode=self.compile_mode, channels_last=self.channels_last, progress=self.progress)


# Trains independent jobs (in any order, or together) and returns their reports in the jobs' order.
Trainer = Callable[[Sequence[StageJob]], list[StageReport]]


def train_sequentially(jobs: Sequence[StageJob]) -> list[StageReport]:
    """The default :data:`Trainer`: each job alone, one after another."""
    return [job.run() for job in jobs]


def _release(accelerator: Accelerator) -> None:
    """Drop the accelerator's references to the stage's model, optimizers and loaders. Where the device caches memory,
    through ``free_memory`` (a full garbage collection, then the cache emptied); on the CPU, which caches nothing, without
    the collection, which costs about 0.1 s per stage with timm imported, more than an epoch of a small model."""
    if accelerator.device.type != "cpu":
        accelerator.free_memory()
        return
    for held in (accelerator._models, accelerator._optimizers, accelerator._dataloaders, accelerator._schedulers):
        held.clear()
    accelerator.step = 0


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so a host clock measures it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(samples: int, warmup_samples: int, seconds: float, warmup_seconds: float) -> float:
    """Samples per second, leaving out a compiled first step unless it was all the epoch did."""
    if samples > warmup_samples:
        return (samples - warmup_samples) / (seconds - warmup_seconds)
    return samples / seconds


def _set_epoch(loader: Loader, epoch: int) -> None:
    """Tell the dataset which epoch's augmentation to draw (in-memory tensors are augmented per (seed, epoch, example))."""
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _as_dataloader(loader: Loader) -> DataLoader:
    return loader.dataloader() if isinstance(loader, TensorLoader) else loader


def _epoch_loss(losses: list[torch.Tensor], sizes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The size-weighted loss sum of an epoch's batches and the index of the first non-finite one (-1: none)."""
    if not losses:
        return torch.zeros((), device=device), torch.full((), -1, dtype=torch.long, device=device)
    values = torch.stack(losses).float()
    bad = ~torch.isfinite(values)
    first_bad = torch.where(bad.any(), bad.long().argmax(), -1)
    return (values * torch.tensor(sizes, dtype=values.dtype, device=device)).sum(), first_bad


def _unwrapped(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)


def _stage_state(model: nn.Module, optimizers: list, loader: Loader, report: StageReport) -> dict[str, Any]:
    """What a resumed stage needs (the learning rate and λ are functions of the epoch: nothing to keep of them)."""
    generator = getattr(loader, "generator", None)
    return {
        "model": model.state_dict(),
        "optimizers": [_unwrapped(o).state_dict() for o in optimizers],
        "loader_generator": generator.get_state() if generator is not None else None,
        "report": report.to_dict(),
    }


def _resume(checkpoint: StageCheckpoint | None, model: nn.Module, optimizers: list, loader: Loader, report: StageReport) -> int:
    """Restore the newest complete checkpoint into the stage's objects; returns the epochs already done."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return 0
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint.latest()} does not fit this stage's model (another recipe or code wrote it); "
            f"use another output directory or --overwrite: {str(e).splitlines()[0]}"
        ) from e
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    if state["loader_generator"] is not None:
        loader.generator.set_state(state["loader_generator"])
    saved = state["report"]
    report.steps, report.samples, report.seconds, report.history = saved["steps"], saved["samples"], saved["seconds"], saved["history"]
    report.compile_seconds = saved.get("compile_seconds", 0.0)  # absent from checkpoints written before it existed
    return int(state["epochs_done"])


class _Sums:
    """Running loss sum, correct count and example count over evaluation batches."""

    def __init__(self, task: str) -> None:
        self.task, self.loss, self.correct, self.count = task, 0.0, 0, 0

    def add(self, output: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss += float(task_loss(self.task, output, targets)) * len(targets)
        if self.task == "classification":
            self.correct += int((output.argmax(-1) == targets).sum())
        self.count += len(targets)

    def metrics(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        if self.task == "classification":
            return {"loss": self.loss / self.count, "accuracy": self.correct / self.count}
        return {"mse": self.loss / self.count}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, *, task: str, accelerator: Accelerator) -> dict[str, float]:
    """Mean loss (and accuracy for classification, ``mse`` for regression) of ``model`` in eval mode.

    The model's train/eval mode is restored afterwards, and so is the global RNG (each pass over a DataLoader draws
    its base seed from it): how often a network is evaluated never changes what trains next.
    """
    was_training = model.training
    model.eval()
    model.to(accelerator.device)
    sums = _Sums(task)
    with torch.random.fork_rng(devices=[]):
        for inputs, targets in accelerator.prepare_data_loader(_as_dataloader(loader)):
            with accelerator.autocast():
                output = logits(model(inputs))
            sums.add(*accelerator.gather_for_metrics((output.float(), targets)))
    model.train(was_training)
    return sums.metrics()


def score(task: str, outputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> dict[str, float]:
    """:func:`evaluate`'s metrics of outputs already computed (e.g. by :func:`predict_with_targets`), summed batch by
    batch as ``evaluate`` sums them, so equal outputs give equal numbers."""
    sums = _Sums(task)
    for output, target in zip(outputs.split(batch_size), targets.split(batch_size)):
        sums.add(output, target)
    return sums.metrics()


@torch.no_grad()
def predict(model: nn.Module, loader: Loader, accelerator: Accelerator) -> torch.Tensor:
    """All outputs of ``model`` (eval mode) over ``loader``, gathered, in loader order, fp32."""
    return predict_with_targets(model, loader, accelerator)[0]


@torch.no_grad()
def predict_with_targets(model: nn.Module, loader: Loader, accelerator: Accelerator, *,
                         progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All outputs of ``model`` (eval mode, fp32) and the targets over ``loader``, gathered, in loader order, on the CPU.
    With ``progress`` (a name), a progress bar over the batches when stderr is a terminal, else one line at the end.
    Like :func:`evaluate`, it leaves the global RNG as it found it."""
    was_training = model.training
    model.eval()
    model.to(accelerator.device)
    outputs, targets = [], []
    shown = progress is not None and accelerator.is_local_main_process
    start = time.perf_counter()
    bar = tqdm(accelerator.prepare_data_loader(_as_dataloader(loader)), desc=f"eval {progress}", unit="batch", leave=False,
               disable=None if shown else True)
    with torch.random.fork_rng(devices=[]):
        for inputs, target in bar:
            with accelerator.autocast():
                output, target = accelerator.gather_for_metrics((logits(model(inputs)).float(), target))
            outputs.append(output.cpu())
            targets.append(target.cpu())
    model.train(was_training)
    if shown and bar.disable:  # a log file
        print(f"eval {progress}: {sum(len(t) for t in targets)} examples in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return torch.cat(outputs), torch.cat(targets)


@torch.no_grad()
def recalibrate_norms(model: nn.Module, loader: Loader, accelerator: Accelerator) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over one pass of ``loader`` (train-mode
    forward, no gradient): what an averaged network needs before it is evaluated (Git Re-Basin's "REPAIR"-free reset)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    was_training = model.training
    model.train()
    model.to(accelerator.device)
    for inputs, _ in accelerator.prepare_data_loader(_as_dataloader(loader)):
        with accelerator.autocast():
            model(inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if accelerator.num_processes > 1:  # each process saw its shard: every copy gets the mean over all of them
            m.running_mean.copy_(accelerator.reduce(m.running_mean, "mean"))
            m.running_var.copy_(accelerator.reduce(m.running_var, "mean"))
    model.train(was_training)


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al. 2015) from ``teacher``'s outputs on the same (augmented) batch.

    Classification: ``α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·cross-entropy``; regression:
    ``α·MSE(student, teacher) + (1−α)·MSE(student, target)``. The teacher runs in eval mode without gradients (its
    parameters are left as they are: it may be trained elsewhere).
    """

    def __init__(self, teacher: nn.Module, task: str, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        self.task, self.temperature, self.alpha = task, temperature, alpha

    def train(self, mode: bool = True) -> DistillationLoss:
        """The teacher stays in eval mode."""
        return self

    def forward(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = logits(self.teacher(inputs)).float()
        output = output.float()
        if self.task == "classification":
            t = self.temperature
            soft = F.kl_div(F.log_softmax(output / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean")
            return self.alpha * t * t * soft + (1 - self.alpha) * task_loss(self.task, output, targets)
        return self.alpha * F.mse_loss(output, teacher) + (1 - self.alpha) * task_loss(self.task, output, targets)


class MeanEnsemble(nn.Module):
    """The mean output of several models: the ensemble the big student must reproduce."""

    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([logits(m(x)) for m in self.members]).mean(0)
