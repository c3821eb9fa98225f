"""Below the pipeline: the one stage runner, its checkpoints and the accelerator setup. Nothing here imports the pipeline."""

from .accelerator import make_accelerator
from .runner import MeanEnsemble, StageReport, evaluate, predict, task_loss, train_stage

__all__ = ["MeanEnsemble", "StageReport", "evaluate", "make_accelerator", "predict", "task_loss", "train_stage"]
