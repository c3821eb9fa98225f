"""Below the pipeline: the one stage runner, its checkpoints and the accelerator setup. Nothing here imports the pipeline."""

from .accelerator import make_accelerator, on_main_process
from .runner import DistillationLoss, MeanEnsemble, StageReport, evaluate, predict, recalibrate_norms, task_loss, train_stage

__all__ = [
    "DistillationLoss",
    "MeanEnsemble",
    "StageReport",
    "evaluate",
    "make_accelerator",
    "on_main_process",
    "predict",
    "recalibrate_norms",
    "task_loss",
    "train_stage",
]
