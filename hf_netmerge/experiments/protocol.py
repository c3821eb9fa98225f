"""The fair protocol, defined once: each seed's splits and the seeds every strategy derives from a run's seed.

Every strategy of a seed trains on the same training set, makes its choices (bo3's member, the
student's metrics) on the validation set, and is scored on a test set fixed per seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.utils.data import Dataset

from ..adapters import resolve_spec
from ..matching import check_matchable
from ..data import first_examples, load_data, prepare_dataset, sine_splits, split
from ..errors import ConfigError, DatasetTooSmallError
from ..formats import create_model, num_classes
from .recipe import RecipeConfig

SEED_STRIDE = 1000


def derive_seed(seed: int, offset: int) -> int:
    """The seed of one network of a run: ``seed · 1000 + offset`` (each strategy owns its offsets)."""
    return seed * SEED_STRIDE + offset


# Datasets generated from the run's seed: name -> seed -> (train, validation, test).
GENERATED: dict[str, Callable[[int], tuple[Dataset, Dataset, Dataset]]] = {"sine": sine_splits}


@dataclass(frozen=True)
class SeedData:
    """One seed's data: every strategy trains on ``train``, chooses on ``val`` and is scored on ``test``."""

    train: Dataset
    val: Dataset
    test: Dataset
    name: str


def depends_on_seed(recipe: RecipeConfig) -> bool:
    """Whether each seed gets its own data (generated datasets) or all seeds share one load."""
    return recipe.data.dataset in GENERATED


def probe_model(recipe: RecipeConfig) -> nn.Module:
    """A model of the recipe's architecture, after checking that it exists and that its layers can be merged (and matched,
    when the weight-matching baseline runs)."""
    probe = create_model(recipe.architecture, recipe.model_args)
    spec = resolve_spec(probe)
    if "weight_matching" in recipe.baselines:
        check_matchable(spec)
    return probe


def load_seed_data(recipe: RecipeConfig, seed: int, probe: nn.Module | None = None) -> SeedData:
    """The checked splits of ``seed`` for ``recipe``'s model (``probe``: a model of its architecture).

    Generated datasets draw their three splits from the seed; any other dataset gives its training
    split (first ``max_train_samples``), of which ``val_fraction`` is held out by a fixed split, and
    its test split (first ``max_test_samples``).
    """
    cfg = recipe.data
    probe = probe if probe is not None else probe_model(recipe)
    common = dict(model=probe, task=recipe.task, num_classes=num_classes(probe), image_column=cfg.image_column,
                  label_column=cfg.label_column, image_size=cfg.image_size)
    if cfg.dataset in GENERATED:
        train, val, test = GENERATED[cfg.dataset](seed)
        task, name = "regression", cfg.dataset
    else:
        loaded = load_data(cfg.dataset, seed=seed)
        if loaded.eval is None:
            raise ConfigError(f"dataset {cfg.dataset!r} has no test split to score the strategies on")
        train, val, test, task, name = loaded.train, None, loaded.eval, loaded.task, loaded.name
    if task != recipe.task:
        raise ConfigError(f"dataset {cfg.dataset!r} is a {task} task but the recipe says task={recipe.task!r}")
    train = first_examples(prepare_dataset(train, min_size=1, label="train split", **common), cfg.max_train_samples)
    test = first_examples(prepare_dataset(test, min_size=1, label="test split", **common), cfg.max_test_samples)
    if val is None:
        train, val = split(train, cfg.val_fraction, seed=0)
    else:
        val = prepare_dataset(val, min_size=1, label="validation split", **common)
    if len(train) < recipe.batch_size:
        raise DatasetTooSmallError(f"the training split has {len(train)} examples, fewer than one batch ({recipe.batch_size})")
    return SeedData(train=train, val=val, test=test, name=name)
