"""Running experiments: every strategy of one seed (:func:`run_seed`), and a whole recipe into a directory (:func:`run_recipe`).

Everything is checked before the first step (recipe, architecture, channel groups, data, given
teachers). In :func:`run_recipe` every stage checkpoints under ``<output>/checkpoints`` and a rerun
of the same recipe into the same directory resumes from the newest complete checkpoints. Results go
to ``results.json`` and ``results.md``, next to the exact resolved recipe in ``recipe.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..data import make_loader
from ..errors import ConfigError, OutputExistsError
from ..hub import load_teacher
from ..training import MeanEnsemble, StackingTrainer, Trainer, evaluate, make_accelerator, train_sequentially
from ..training.checkpoint import CheckpointDir
from . import report
from .context import SeedContext
from .observers import Observer, Printer, SaveNetworks, Timer, TrackTestScores
from .protocol import SeedData, depends_on_seed, load_seed_data, probe_model
from .recipe import RecipeConfig
from .strategies import Strategy, Trained, strategies_for


@dataclass
class SeedResult:
    """One seed: its result row (test scores and what observers added), each strategy's trained network, the teachers."""

    row: dict[str, Any]
    trained: dict[str, Trained]
    teachers: list[nn.Module]


def run_seed(
    recipe: RecipeConfig,
    seed: int,
    *,
    strategies: Sequence[Strategy] | None = None,
    data: SeedData | None = None,
    accelerator: Accelerator | None = None,
    observers: Sequence[Observer] = (),
    checkpoints: CheckpointDir | None = None,
    given_teachers: Sequence[nn.Module] = (),
    progress: bool = True,
    trainer: Trainer = train_sequentially,
) -> SeedResult:
    """Train ``strategies`` (default: the recipe's) on one seed's data and score each on its test set.

    The row holds ``seed``, each strategy's test metric, the teachers' and their ensemble's (when a
    strategy used the teachers), what the strategies record (validation scores, gate statistics) and
    what ``observers`` add (timings, budgets, curves). Every stage is trained by ``trainer``.
    """
    accelerator = accelerator or make_accelerator(recipe.mixed_precision, gradient_accumulation_steps=recipe.gradient_accumulation_steps)
    ctx = SeedContext(recipe, seed, data if data is not None else load_seed_data(recipe, seed), accelerator,
                      checkpoints or CheckpointDir(None), progress, list(given_teachers), trainer)
    test_loader = make_loader(ctx.data.test, recipe.data.eval_batch_size, shuffle=False)

    def score(model: nn.Module) -> float:
        return evaluate(model, test_loader, task=recipe.task, accelerator=accelerator)[recipe.metric]

    row: dict[str, Any] = {"seed": seed}
    scores: dict[str, float] = {}
    trained: dict[str, Trained] = {}
    for strategy in strategies if strategies is not None else strategies_for(recipe):
        for observer in observers:
            observer.on_strategy_start(ctx, strategy)
        trained[strategy.name] = result = strategy.train(ctx)
        for observer in observers:
            observer.on_strategy_end(ctx, strategy, result, row)
        row[strategy.name] = scores[strategy.name] = score(result.model)
        row.update(result.record)
    teachers = ctx.teachers() if ctx.teachers_trained else []
    if teachers:
        scores.update(teacher_a=score(teachers[0]), teacher_b=score(teachers[1]), ensemble=score(MeanEnsemble(*teachers)))
        row.update(scores)
    for observer in observers:
        observer.on_seed_end(ctx, row, scores)
    return SeedResult(row, trained, teachers)


def run_seeds(
    recipe: RecipeConfig,
    seeds: Sequence[int],
    *,
    stacked: bool = False,
    strategies: Callable[[int], Sequence[Strategy]] | None = None,
    data: Callable[[int], SeedData] | None = None,
    observers: Sequence[Observer] = (),
    checkpoints: CheckpointDir | None = None,
    **options: Any,
) -> list[SeedResult]:
    """:func:`run_seed` for each of ``seeds`` (``strategies(seed)`` and ``data(seed)``, default the recipe's; each seed
    checkpoints under ``checkpoints/seed<N>``; ``options`` pass on), in seed order.

    With ``stacked``, the seeds run together and every stage that can (in-memory data, one process, fp32, no
    checkpoints, no distillation, BatchNorm or dropout) trains in a stack with the same stage of the other seeds
    (:class:`~hf_netmerge.training.StackingTrainer`): a network gets what it gets alone, to float rounding, at a
    fraction of the time for small models. Observers are called from the seeds' threads, one at a time; timing
    observers measure the whole process, so time a stacked run as a whole.
    """
    if stacked and checkpoints is not None and checkpoints.root is not None:
        raise ConfigError("a stacked run does not checkpoint (its stages would train one by one); pass no checkpoints")

    def one(seed: int, trainer: Trainer = train_sequentially) -> SeedResult:
        return run_seed(recipe, seed, strategies=strategies(seed) if strategies else None, data=data(seed) if data else None,
                        observers=observers, checkpoints=checkpoints.sub(f"seed{seed}") if checkpoints else None, trainer=trainer,
                        **options)

    if not stacked:
        return [one(seed) for seed in seeds]
    trainer = StackingTrainer()
    return trainer.map(lambda seed: one(seed, trainer), list(seeds))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _prepare_output(out: Path, recipe: RecipeConfig, overwrite: bool) -> bool:
    """Create ``out``; returns True when it holds an earlier run of the same recipe to resume."""
    if out.exists() and any(out.iterdir()):
        saved = out / "recipe.json"
        if saved.is_file() and json.loads(saved.read_text()) == recipe.to_dict():
            return True
        if not overwrite:
            raise OutputExistsError(f"{out} holds another run; choose another --output-dir or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def run_recipe(recipe: RecipeConfig, output_dir: str | os.PathLike[str], overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every seed of ``recipe`` into ``output_dir`` (resuming a same-recipe run there); returns the results.

    Each seed's merged student is saved as ``seed<N>/student`` (timm layout + model card). A ``stacked`` recipe trains
    its seeds together (:func:`run_seeds`) without checkpoints; ``results.json`` records the run's wall and CPU seconds.
    """
    out = Path(output_dir)
    probe = probe_model(recipe)
    # Generated data is made per seed (every seed checked here, reused below); a dataset is loaded once.
    loaded = {seed: load_seed_data(recipe, seed, probe) for seed in (recipe.seeds if depends_on_seed(recipe) else recipe.seeds[:1])}
    given = [load_teacher(ref, recipe.architecture, recipe.model_args)[0] for ref in recipe.teachers]
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    accelerator = make_accelerator(recipe.mixed_precision, gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                                   log_with=recipe.log_with, project_dir=str(out / "logs"))
    resumed = _prepare_output(out, recipe, overwrite) if accelerator.is_main_process else False
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(out / "recipe.json", recipe.to_dict())
    if recipe.log_with:
        accelerator.init_trackers(recipe.name, config={"recipe": json.dumps(recipe.to_dict())})
    if recipe.stacked and accelerator.num_processes > 1:
        raise ConfigError("stacked: true trains in one process; run it without accelerate launch's processes")
    timer = [] if recipe.stacked else [Timer()]  # per-strategy times mean nothing when the seeds' stages are stacked
    observers = [*timer, SaveNetworks(out), Printer(), TrackTestScores()]
    checkpoints = CheckpointDir(None if recipe.stacked else out / "checkpoints", recipe.checkpoint_every, accelerator.is_main_process)
    start = time.perf_counter(), time.process_time()
    seeds = run_seeds(recipe, recipe.seeds, stacked=recipe.stacked, data=lambda seed: loaded.get(seed, loaded[recipe.seeds[0]]),
                      observers=observers, checkpoints=checkpoints, accelerator=accelerator, given_teachers=given, progress=progress)
    runs = [result.row for result in seeds]
    elapsed = {"seconds": time.perf_counter() - start[0], "cpu_seconds": time.process_time() - start[1], "stacked": recipe.stacked}
    strategies = ["student", *recipe.baselines]
    summary = report.summarize(runs, [*strategies, "teacher_a", "teacher_b", "ensemble"], recipe.task == "classification",
                               recipe.baselines)
    results = {"recipe": recipe.name, "metric": recipe.metric, "dataset": loaded[recipe.seeds[0]].name, "runs": runs,
               "summary": summary, "resumed": resumed, "time": elapsed}
    if accelerator.is_main_process:
        _write_json(out / "results.json", results)
        (out / "results.md").write_text(f"# {recipe.name}\n\n" + report.markdown_table(summary, strategies, recipe.metric))
        print(report.text_table(summary, strategies, recipe.metric), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
