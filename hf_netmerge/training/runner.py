"""One Accelerate training loop for every stage and strategy, and the evaluation that goes with it.

Teachers, the gate stage, fine-tuning and the baselines all run :func:`train_stage`; the gate
stage differs only by a regularizer (the half loss and its λ schedule) whose parameters get a
second optimizer. The loop only trains: data, models and reports come from the caller.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import StageConfig
from ..errors import ConfigError, NonFiniteLossError


class Regularizer(Protocol):
    """An extra loss term with its own parameters and per-epoch schedule (the gates' half loss)."""

    def parameters(self) -> list[nn.Parameter]: ...

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def end_epoch(self) -> None: ...

    def log(self) -> dict[str, float]: ...


@dataclass
class StageReport:
    """What one stage did: epochs, optimizer steps, wall time, and per-epoch logs."""

    stage: str
    epochs: int
    steps: int
    seconds: float
    samples: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None, **kwargs: Any) -> Accelerator:
    """An Accelerator for ``mixed_precision``, on CPU when no GPU is present.

    Accelerate fixes the precision once per process; asking for another one later is refused
    with :class:`ConfigError` instead of Accelerate's generic error.
    """
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        raise ConfigError(
            f"this process already runs Accelerate with mixed_precision={AcceleratorState().mixed_precision!r}; "
            f"use the same value or a new process for {mixed_precision!r}"
        )
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)


def _optimizer_needs_accelerate(accelerator: Accelerator) -> bool:
    """Whether Accelerate must wrap the optimizers: fp16 loss scaling or an engine that owns the step.

    Plain, DDP and bf16 runs step the torch optimizers directly (DDP syncs gradients in backward);
    Accelerate's wrapper would add an import probe to every step, ~40% of a small model's step on CPU.
    """
    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.scaler is not None or accelerator.distributed_type not in plain


def task_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression; always computed in fp32."""
    output = output.float()
    if task == "classification":
        return F.cross_entropy(output, target.long())
    return F.mse_loss(output, target.float().view_as(output))


def train_stage(
    model: nn.Module,
    loader: DataLoader,
    stage: StageConfig,
    *,
    task: str,
    accelerator: Accelerator,
    name: str,
    regularizer: Regularizer | None = None,
    gate_lr: float = 0.1,
    progress: bool = True,
) -> StageReport:
    """Train ``model`` in place for ``stage.epochs`` epochs; returns the stage's report.

    Weights use SGD with momentum and a multi-step decay at ``stage.milestones`` (epochs). With a
    ``regularizer``, its loss is added each step and its parameters (kept fp32) get Adam at a
    constant ``gate_lr`` without weight decay.
    """
    extra = regularizer.parameters() if regularizer is not None else []
    extra_ids = {id(p) for p in extra}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in extra_ids]
    optimizer = torch.optim.SGD(weights, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=stage.milestones, gamma=stage.lr_gamma)
    optimizers = [optimizer]
    if extra:
        optimizers.append(torch.optim.Adam(extra, lr=gate_lr, weight_decay=0.0, foreach=True))
    if _optimizer_needs_accelerate(accelerator):
        optimizers = list(accelerator.prepare(*optimizers)) if len(optimizers) > 1 else [accelerator.prepare(optimizers[0])]
    train_model, train_loader = accelerator.prepare(model, loader)
    report = StageReport(stage=name, epochs=stage.epochs, steps=0, seconds=0.0, samples=0)
    bar = tqdm(range(stage.epochs), desc=name, leave=False, disable=not (progress and accelerator.is_local_main_process))
    start = time.perf_counter()
    train_model.train()
    for epoch in bar:
        total = torch.zeros((), device=accelerator.device)
        seen = 0
        for inputs, targets in train_loader:
            loss = task_loss(task, train_model(inputs), targets)
            objective = loss
            if regularizer is not None:
                objective = loss + regularizer.loss()[0]
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            accelerator.backward(objective)
            for opt in optimizers:
                opt.step()
            total += loss.detach() * len(targets)
            seen += len(targets)
            report.steps += 1
        epoch_loss = float(total) / max(seen, 1)
        if not math.isfinite(epoch_loss):
            raise NonFiniteLossError(f"stage {name!r}: training loss became {epoch_loss} in epoch {epoch + 1}")
        entry = {"epoch": epoch + 1, "loss": epoch_loss, "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        if regularizer is not None:
            entry.update(regularizer.log())
            regularizer.end_epoch()
        report.history.append(entry)
        report.samples += seen
        bar.set_postfix(loss=f"{epoch_loss:.4g}")
    report.seconds = time.perf_counter() - start
    accelerator.unwrap_model(train_model, keep_fp32_wrapper=False)
    accelerator.free_memory()
    return report


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, task: str, accelerator: Accelerator) -> dict[str, float]:
    """Mean loss (and accuracy for classification, ``mse`` for regression) of ``model`` in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    model.to(accelerator.device)
    eval_loader = accelerator.prepare_data_loader(loader)
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in eval_loader:
        with accelerator.autocast():
            output = model(inputs)
        output, targets = accelerator.gather_for_metrics((output.float(), targets))
        loss_sum += float(task_loss(task, output, targets)) * len(targets)
        if task == "classification":
            correct += int((output.argmax(-1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    if count == 0:
        return {}
    if task == "classification":
        return {"loss": loss_sum / count, "accuracy": correct / count}
    return {"mse": loss_sum / count}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> torch.Tensor:
    """All outputs of ``model`` (eval mode) over ``loader``, gathered, in loader order, fp32."""
    was_training = model.training
    model.eval()
    model.to(accelerator.device)
    outputs = []
    for inputs, _ in accelerator.prepare_data_loader(loader):
        with accelerator.autocast():
            outputs.append(accelerator.gather_for_metrics(model(inputs).float()))
    model.train(was_training)
    return torch.cat(outputs).cpu()


class MeanEnsemble(nn.Module):
    """The mean output of several models: the ensemble the big student must reproduce."""

    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)
