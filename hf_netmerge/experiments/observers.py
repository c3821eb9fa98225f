"""Observers of an experiment: they read what each strategy did and add to the seed's result row, never change training.

Each hook gets the seed's context; ``on_strategy_start`` runs right before a strategy trains and
``on_strategy_end`` right after (before it is scored), ``on_seed_end`` once the row is complete, with the
seed's test scores apart (the row also holds what strategies record, validation scores among them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import TensorBatchDataset, make_loader
from ..formats import save_network
from ..training import predict
from .context import SeedContext
from .strategies import Strategy, Trained


class Observer:
    """Base observer: every hook does nothing."""

    def on_strategy_start(self, ctx: SeedContext, strategy: Strategy) -> None:
        """Called right before ``strategy`` trains."""

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        """Called right after ``strategy`` trained; may add entries to ``row``."""

    def on_seed_end(self, ctx: SeedContext, row: dict[str, Any], scores: dict[str, float]) -> None:
        """Called once the seed's row is complete; ``scores``: the test metric of every strategy (and of the teachers)."""


class Timer(Observer):
    """Wall-clock ``seconds`` and process ``cpu_seconds`` per strategy (the student's include training its teachers)."""

    def on_strategy_start(self, ctx: SeedContext, strategy: Strategy) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        wall, cpu = self._start
        row.setdefault("seconds", {})[strategy.name] = time.perf_counter() - wall
        row.setdefault("cpu_seconds", {})[strategy.name] = time.process_time() - cpu


class Budgets(Observer):
    """Each strategy's budget: ``epochs`` (over the training set, every network counted) and training ``macs``."""

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        budget = strategy.budget(ctx.cost())
        row.setdefault("epochs", {})[strategy.name] = budget.epochs
        row.setdefault("macs", {})[strategy.name] = budget.macs


class Printer(Observer):
    """One line per strategy and per seed on the main process."""

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        seconds = row.get("seconds", {}).get(strategy.name)
        if ctx.accelerator.is_main_process:
            took = f" in {seconds:.1f}s" if seconds is not None else ""
            print(f"seed {ctx.seed}: {strategy.name} done{took}", flush=True)

    def on_seed_end(self, ctx: SeedContext, row: dict[str, Any], scores: dict[str, float]) -> None:
        if ctx.accelerator.is_main_process:
            listed = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in scores.items())
            print(f"seed {ctx.seed}: test {ctx.recipe.metric} {listed}", flush=True)


class ValidationScores(Observer):
    """Each strategy's final network scored on the validation set, as ``validation[<strategy>]``: what a choice
    between runs (of batch sizes, of settings) may be made on, never the test set."""

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        row.setdefault("validation", {})[strategy.name] = ctx.validate(trained.model)[ctx.recipe.metric]


class Curves(Observer):
    """Each strategy's predictions on a 1-d input ``grid`` (the learned functions of the sine problem, the paper's Fig. 10)."""

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid = grid.view(-1, 1)

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        loader = make_loader(TensorBatchDataset(self.grid, torch.zeros_like(self.grid)), len(self.grid), shuffle=False)
        row.setdefault("curves", {})[strategy.name] = predict(trained.model, loader, ctx.accelerator)[:, 0].tolist()


class SaveNetworks(Observer):
    """Saves every trained network of a seed under ``<directory>/seed<N>/`` on the main process, so it can be merged,
    shared or evaluated later: each merged student as ``<strategy>/`` (timm layout + model card), every other
    strategy's final network as ``<strategy>/`` and the trained teachers as ``teacher_a/``, ``teacher_b/`` (timm
    layout, with the preprocessing of the data they were trained on)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_strategy_end(self, ctx: SeedContext, strategy: Strategy, trained: Trained, row: dict[str, Any]) -> None:
        if not ctx.accelerator.is_main_process:
            return
        target = self.directory / f"seed{ctx.seed}" / strategy.name
        if trained.merge is not None:
            trained.merge.save_pretrained(target, overwrite=True)
        else:
            self._save(ctx, trained.model, target)

    def on_seed_end(self, ctx: SeedContext, row: dict[str, Any], scores: dict[str, float]) -> None:
        if ctx.accelerator.is_main_process and ctx.teachers_trained and not ctx.given_teachers:
            for name, teacher in zip(("teacher_a", "teacher_b"), ctx.teachers()):
                self._save(ctx, teacher, self.directory / f"seed{ctx.seed}" / name)

    @staticmethod
    def _save(ctx: SeedContext, model: nn.Module, target: Path) -> None:
        save_network(model, target, preprocessing=getattr(ctx.data.train, "preprocessing", None), overwrite=True)


class TrackTestScores(Observer):
    """Logs every test score to the accelerator's trackers as ``test/<strategy>``, stepped by seed."""

    def on_seed_end(self, ctx: SeedContext, row: dict[str, Any], scores: dict[str, float]) -> None:
        ctx.accelerator.log({f"test/{name}": value for name, value in scores.items()}, step=ctx.seed)
