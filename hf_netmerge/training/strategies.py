"""Training strategies compared in the paper, all on the one stage runner: one model, best of k, the merged student."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import timm
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset

from ..config import StageConfig
from ..data import make_loader
from .checkpoint import CheckpointDir, StageCheckpoint
from .runner import StageReport, evaluate, train_stage


@dataclass
class Trained:
    """A model trained by a strategy, with its reports and (for best-of-k) every candidate's validation score."""

    model: nn.Module
    reports: list[StageReport]
    validation: list[dict[str, float]]


def score(task: str, metrics: dict[str, float]) -> float:
    """Lower is better: MSE for regression, minus accuracy for classification."""
    return metrics["mse"] if task == "regression" else -metrics["accuracy"]


@dataclass(frozen=True)
class Setup:
    """What every strategy of one experiment shares: the architecture, the task and how to train."""

    architecture: str
    task: str
    batch_size: int
    accelerator: Accelerator
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def create(self, seed: int) -> nn.Module:
        """A fresh ``timm.create_model(architecture, **model_kwargs)`` initialised from ``seed``."""
        set_seed(seed)
        return timm.create_model(self.architecture, **self.model_kwargs)

    def train(
        self, model: nn.Module, train_set: Dataset, stage: StageConfig, *, seed: int, name: str, checkpoint: StageCheckpoint | None = None
    ) -> StageReport:
        """One stage of :func:`~hf_netmerge.training.train_stage` on ``train_set`` shuffled from ``seed``."""
        loader = make_loader(train_set, self.batch_size, shuffle=True, seed=seed)
        return train_stage(
            model, loader, stage, task=self.task, accelerator=self.accelerator, name=name, checkpoint=checkpoint, progress=self.progress
        )


def train_one(setup: Setup, train_set: Dataset, stage: StageConfig, *, seed: int, name: str,
              checkpoint: StageCheckpoint | None = None) -> Trained:
    """A fresh model initialised from ``seed`` and trained for one stage."""
    model = setup.create(seed)
    report = setup.train(model, train_set, stage, seed=seed, name=name, checkpoint=checkpoint)
    return Trained(model.eval(), [report], [])


def best_of(k: int, setup: Setup, train_set: Dataset, val_set: Dataset, stage: StageConfig, *, seed: int, name: str,
            checkpoints: CheckpointDir | None = None) -> Trained:
    """Train ``k`` models (seeds ``seed``…``seed+k-1``) and keep the best on the validation set (never the test set)."""
    val_loader = make_loader(val_set, 1024, shuffle=False)
    checkpoints = checkpoints or CheckpointDir(None)
    best, best_score = None, math.inf
    reports, validation = [], []
    for i in range(k):
        trained = train_one(setup, train_set, stage, seed=seed + i, name=f"{name}[{i}]", checkpoint=checkpoints(f"member{i}"))
        metrics = evaluate(trained.model, val_loader, task=setup.task, accelerator=setup.accelerator)
        reports += trained.reports
        validation.append(metrics)
        if best is None or score(setup.task, metrics) < best_score:
            best, best_score = trained.model, score(setup.task, metrics)
    return Trained(best, reports, validation)
