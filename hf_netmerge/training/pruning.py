"""The paper's channel-pruning baseline: train a double-width network, prune it to half, fine-tune.

The double-width network is the concatenation of two freshly initialised networks (so it can be
compressed back to the architecture exactly); its channels are pruned in ``prune_epochs`` equal steps
by first-order Taylor importance (Molchanov et al. 2019), then the survivors are selected out.
"""

from __future__ import annotations

from typing import Any

import timm
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import Dataset

from ..adapters import resolve_spec
from ..config import PruningConfig, StageConfig
from ..data import make_loader
from ..gates import GatedModel, TaylorMask, gates_removed
from ..surgery import select_model, widen_model
from .checkpoint import CheckpointDir
from .runner import train_stage
from .strategies import Trained


def prune_baseline(
    architecture: str,
    train_set: Dataset,
    cfg: PruningConfig,
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
    """Train at double width for ``cfg.train``, prune to half over ``cfg.prune_epochs``, fine-tune for ``cfg.finetune``."""
    checkpoint = checkpoints or CheckpointDir(None)
    set_seed(seed)
    halves = [timm.create_model(architecture, **(model_kwargs or {})) for _ in range(2)]
    spec = resolve_spec(halves[0])
    wide = GatedModel(widen_model(halves[0], halves[1], spec), spec, make_gate=TaylorMask)
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed)
    common = dict(task=task, accelerator=accelerator, progress=progress)
    reports = [train_stage(wide, loader, cfg.train, name=f"{name} wide", checkpoint=checkpoint("wide"), **common)]
    prune_stage = StageConfig(epochs=1, lr=cfg.prune_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    for step in range(cfg.prune_epochs):
        stage_name = f"prune{step}"
        reports.append(train_stage(wide, loader, prune_stage, name=f"{name} {stage_name}", checkpoint=checkpoint(stage_name), **common))
        for group in spec.groups:
            gate = wide.gates[group.name]
            gate.importance.copy_(accelerator.reduce(gate.importance, "sum"))  # every process prunes the same channels
            target_closed = round(group.size * (step + 1) / cfg.prune_epochs)
            gate.prune(target_closed - int((gate.mask == 0).sum()))
    with gates_removed(wide) as big:
        student = select_model(big, spec, wide.keep_indices())
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed + 1)
    reports.append(train_stage(student, loader, cfg.finetune, name=f"{name} finetune", checkpoint=checkpoint("finetune"), **common))
    return Trained(student.eval(), reports, [])
