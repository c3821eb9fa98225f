"""Training strategies compared in the paper, all on the one stage runner: one model, best of k, the merged student."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


def train_one(
    architecture: str,
    train_set: Dataset,
    stage: StageConfig,
    *,
    task: str,
    batch_size: int,
    seed: int,
    accelerator: Accelerator,
    name: str,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint: StageCheckpoint | None = None,
    progress: bool = True,
) -> Trained:
    """A fresh ``timm.create_model(architecture)`` initialised from ``seed`` and trained for one stage."""
    set_seed(seed)
    model = timm.create_model(architecture, **(model_kwargs or {}))
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed)
    report = train_stage(
        model, loader, stage, task=task, accelerator=accelerator, name=name, checkpoint=checkpoint, progress=progress
    )
    return Trained(model.eval(), [report], [])


def best_of(
    k: int,
    architecture: str,
    train_set: Dataset,
    val_set: Dataset,
    stage: StageConfig,
    *,
    task: str,
    batch_size: int,
    seed: int,
    accelerator: Accelerator,
    name: str,
    model_kwargs: dict[str, Any] | None = None,
    checkpoints: CheckpointDir | None = None,
    progress: bool = True,
) -> Trained:
    """Train ``k`` models (seeds ``seed``…``seed+k-1``) and keep the best on the validation set (never the test set)."""
    val_loader = make_loader(val_set, 1024, shuffle=False)
    best, best_score = None, math.inf
    reports, validation = [], []
    for i in range(k):
        trained = train_one(
            architecture,
            train_set,
            stage,
            task=task,
            batch_size=batch_size,
            seed=seed + i,
            accelerator=accelerator,
            name=f"{name}[{i}]",
            model_kwargs=model_kwargs,
            checkpoint=(checkpoints or CheckpointDir(None))(f"member{i}"),
            progress=progress,
        )
        metrics = evaluate(trained.model, val_loader, task=task, accelerator=accelerator)
        reports += trained.reports
        validation.append(metrics)
        if best is None or score(task, metrics) < best_score:
            best, best_score = trained.model, score(task, metrics)
    return Trained(best, reports, validation)
