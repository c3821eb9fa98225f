"""Below the pipeline: the one stage runner, its checkpoints and the accelerator setup. Nothing here imports the pipeline."""

from .accelerator import make_accelerator, on_main_process
from .runner import (
    DistillationLoss,
    MeanEnsemble,
    StageJob,
    StageReport,
    Trainer,
    evaluate,
    predict,
    predict_with_targets,
    recalibrate_norms,
    score,
    task_loss,
    train_sequentially,
    train_stage,
)
from .stacked import StackingTrainer, train_stacked

__all__ = [
    "DistillationLoss",
    "MeanEnsemble",
    "StackingTrainer",
    "StageJob",
    "StageReport",
    "Trainer",
    "evaluate",
    "make_accelerator",
    "on_main_process",
    "predict",
    "predict_with_targets",
    "recalibrate_norms",
    "score",
    "task_loss",
    "train_sequentially",
    "train_stacked",
    "train_stage",
]
