"""A whole experiment from a recipe: teachers, the merged student and the baselines, seed after seed.

Everything is checked before the first step (recipe, architecture, channel groups, data, given
teachers). Every stage checkpoints under ``<output>/checkpoints`` and a rerun of the same recipe into
the same directory resumes from the newest complete checkpoints. Results go to ``results.json`` and
``results.md``, next to the exact resolved recipe in ``recipe.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator

from ..adapters import resolve_spec
from ..api import merge_models
from ..config import RecipeConfig
from ..data import load_data, make_loader, prepare_dataset, split, subset
from ..errors import ConfigError, DatasetTooSmallError, OutputExistsError
from ..hub import load_teacher
from . import report
from .checkpoint import CheckpointDir
from .pruning import prune_baseline
from .runner import evaluate, make_accelerator
from .strategies import Setup, best_of, train_one

STRATEGIES = ["student", "bo3", "one_model", "pruning"]


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


class _Data:
    """One seed's training, validation and test sets, prepared and checked for the recipe's model."""

    def __init__(self, recipe: RecipeConfig, probe: torch.nn.Module, seed: int) -> None:
        cfg = recipe.data
        loaded = load_data(cfg.dataset, seed=seed)
        if loaded.task != recipe.task:
            raise ConfigError(f"dataset {cfg.dataset!r} is a {loaded.task} task but the recipe says task={recipe.task!r}")
        if loaded.eval is None:
            raise ConfigError(f"dataset {cfg.dataset!r} has no test split to score the strategies on")
        common = dict(
            model=probe,
            task=recipe.task,
            num_classes=int(getattr(probe, "num_classes", 0)),
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            image_size=cfg.image_size,
        )
        train = prepare_dataset(loaded.train, min_size=1, label="train split", **common)
        test = prepare_dataset(loaded.eval, min_size=1, label="test split", **common)
        if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
            train = subset(train, torch.arange(cfg.max_train_samples))
        if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
            test = subset(test, torch.arange(cfg.max_test_samples))
        self.train, self.val = split(train, cfg.val_fraction, seed=0)
        if len(self.train) < recipe.batch_size:
            raise DatasetTooSmallError(f"the training split has {len(self.train)} examples, fewer than one batch ({recipe.batch_size})")
        self.test = test
        self.name = loaded.name


def _check_recipe(recipe: RecipeConfig) -> torch.nn.Module:
    """A probe model of the recipe's architecture, after checking that it exists and can be merged."""
    if not timm.is_model(recipe.architecture):
        raise ConfigError(f"architecture {recipe.architecture!r} is not a timm model")
    try:
        probe = timm.create_model(recipe.architecture, **recipe.model_args)
    except TypeError as e:
        raise ConfigError(f"model_args do not fit {recipe.architecture}: {e}") from e
    resolve_spec(probe)
    return probe


def run_recipe(recipe: RecipeConfig, output_dir: str | os.PathLike[str], overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every seed of ``recipe`` into ``output_dir`` (resuming a same-recipe run there); returns the results."""
    out = Path(output_dir)
    probe = _check_recipe(recipe)
    # The sine data is generated per seed (checked here, reused below); any other dataset is loaded once.
    per_seed = recipe.seeds if recipe.data.dataset == "sine" else recipe.seeds[:1]
    loaded = {seed: _Data(recipe, probe, seed) for seed in per_seed}
    first = loaded[recipe.seeds[0]]
    given = [load_teacher(ref, recipe.architecture, recipe.model_args)[0] for ref in recipe.teachers]
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    accelerator = make_accelerator(
        recipe.mixed_precision,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        log_with=recipe.log_with,
        project_dir=str(out / "logs"),
    )
    resumed = _prepare_output(out, recipe, overwrite) if accelerator.is_main_process else False
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(out / "recipe.json", recipe.to_dict())
    if recipe.log_with:
        accelerator.init_trackers(recipe.name, config={"recipe": json.dumps(recipe.to_dict())})
    metric = "accuracy" if recipe.task == "classification" else "mse"
    strategies = ["student", *recipe.baselines]
    runs = []
    for seed in recipe.seeds:
        data = loaded.get(seed, first)
        checkpoints = CheckpointDir(out / "checkpoints", recipe.checkpoint_every, accelerator.is_main_process).sub(f"seed{seed}")
        row = _run_seed(recipe, seed, data, given, accelerator, checkpoints, out, metric, progress)
        runs.append(row)
        if accelerator.is_main_process:
            print(f"seed {seed}: " + ", ".join(f"{k} {row[k]:.4f}" for k in strategies), flush=True)
    summary = report.summarize(runs, strategies + ["teacher_a", "teacher_b"], recipe.task == "classification", recipe.baselines)
    results = {"recipe": recipe.name, "metric": metric, "dataset": first.name, "runs": runs, "summary": summary, "resumed": resumed}
    if accelerator.is_main_process:
        _write_json(out / "results.json", results)
        (out / "results.md").write_text(f"# {recipe.name}\n\n" + report.markdown_table(summary, strategies, metric))
        print(report.text_table(summary, strategies, metric), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _run_seed(
    recipe: RecipeConfig,
    seed: int,
    data: _Data,
    given: list[torch.nn.Module],
    accelerator: Accelerator,
    checkpoints: CheckpointDir,
    out: Path,
    metric: str,
    progress: bool,
) -> dict[str, Any]:
    """Every strategy for one seed; the merged student is saved to ``out/seed<seed>/student``."""
    setup = Setup(recipe.architecture, recipe.task, recipe.batch_size, accelerator, dict(recipe.model_args), progress)
    test_loader = make_loader(data.test, max(recipe.batch_size, 256), shuffle=False)

    def score(model: torch.nn.Module) -> float:
        return evaluate(model, test_loader, task=recipe.task, accelerator=accelerator)[metric]

    row: dict[str, Any] = {"seed": seed, "seconds": {}}
    start = time.perf_counter()
    teachers = given or [
        train_one(setup, data.train, recipe.teacher, seed=seed * 1000 + i, name=f"seed {seed} teacher {ab}",
                  checkpoint=checkpoints(f"teacher_{ab}")).model
        for i, ab in enumerate("ab")
    ]
    merged = merge_models(teachers[0], teachers[1], data.train, data.val, recipe.merge_config(seed), accelerator=accelerator,
                          progress=progress, checkpoints=checkpoints.sub("student"))
    row["seconds"]["student"] = time.perf_counter() - start
    if accelerator.is_main_process:
        merged.save_pretrained(out / f"seed{seed}" / "student", overwrite=True)
    row["student"], row["teacher_a"], row["teacher_b"] = score(merged.student), score(teachers[0]), score(teachers[1])
    row["gate_stats"] = [s.to_dict() for s in merged.gate_stats]
    for name in recipe.baselines:
        start = time.perf_counter()
        row[name] = score(_baseline(name, recipe, setup, seed, data, checkpoints.sub(name)))
        row["seconds"][name] = time.perf_counter() - start
    return row


def _baseline(name: str, recipe: RecipeConfig, setup: Setup, seed: int, data: _Data, checkpoints: CheckpointDir) -> torch.nn.Module:
    if name == "bo3":
        return best_of(3, setup, data.train, data.val, recipe.teacher, seed=seed * 1000 + 10, name=f"seed {seed} bo3",
                       checkpoints=checkpoints).model
    if name == "one_model":
        return train_one(setup, data.train, recipe.one_model, seed=seed * 1000 + 20, name=f"seed {seed} one model",
                         checkpoint=checkpoints("model")).model
    return prune_baseline(setup, data.train, recipe.pruning, seed=seed * 1000 + 30, name=f"seed {seed} pruning",
                          checkpoints=checkpoints).model
