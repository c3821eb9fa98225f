"""Training: the one stage runner and the strategies built on it (student, bo3, one model)."""

from .runner import MeanEnsemble, StageReport, evaluate, make_accelerator, predict, task_loss, train_stage

__all__ = ["MeanEnsemble", "StageReport", "evaluate", "make_accelerator", "predict", "task_loss", "train_stage"]
