"""The paper's channel-pruning baseline: train a double-width network, prune it to half, fine-tune.

The double-width network is the concatenation of two freshly initialised networks (so it can be
compressed back to the architecture exactly); its channels are pruned in ``prune_epochs`` equal steps
by first-order Taylor importance (Molchanov et al. 2019), then the survivors are selected out.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ..adapters import resolve_spec
from ..config import PruningConfig, StageConfig
from ..gates import GatedModel, TaylorMask, gates_removed
from ..surgery import select_model, widen_model
from .checkpoint import CheckpointDir
from .strategies import Setup, Trained


def prune_baseline(setup: Setup, train_set: Dataset, cfg: PruningConfig, *, seed: int, name: str,
                   checkpoints: CheckpointDir | None = None) -> Trained:
    """Train at double width for ``cfg.train``, prune to half over ``cfg.prune_epochs``, fine-tune for ``cfg.finetune``."""
    checkpoint = checkpoints or CheckpointDir(None)
    halves = [setup.create(seed), setup.create(seed + 1)]
    spec = resolve_spec(halves[0])
    wide = GatedModel(widen_model(halves[0], halves[1], spec), spec, make_gate=TaylorMask)
    reports = [setup.train(wide, train_set, cfg.train, seed=seed, name=f"{name} wide", checkpoint=checkpoint("wide"))]
    prune_stage = StageConfig(epochs=1, lr=cfg.prune_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    for step in range(cfg.prune_epochs):
        stage_name = f"prune{step}"
        reports.append(setup.train(wide, train_set, prune_stage, seed=seed + 2 + step, name=f"{name} {stage_name}",
                                   checkpoint=checkpoint(stage_name)))
        for group in spec.groups:
            gate = wide.gates[group.name]
            gate.importance.copy_(setup.accelerator.reduce(gate.importance, "sum"))  # every process prunes the same channels
            target_closed = round(group.size * (step + 1) / cfg.prune_epochs)
            gate.prune(target_closed - int((gate.mask == 0).sum()))
    with gates_removed(wide) as big:
        student = select_model(big, spec, wide.keep_indices())
    reports.append(setup.train(student, train_set, cfg.finetune, seed=seed + 1, name=f"{name} finetune", checkpoint=checkpoint("finetune")))
    return Trained(student.eval(), reports, [])
