"""Recipes: every paper experiment validates, bad recipes and data are refused before training, small runs complete."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import safetensors.torch
import timm
import torch
import yaml

from hf_netmerge.cli import main
from hf_netmerge.experiments import RecipeConfig, load_recipe, run_recipe

from conftest import image_dataset, record_output_dtypes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "hf_netmerge" / "recipes").glob("*.yaml"))
TINY_SINE = ["seeds=[0]", "teacher.epochs=2", "teacher.milestones=[1]", "merge.gate_epochs=2", "merge.finetune_epochs=1",
             "merge.finetune_milestones=[]", "one_model.epochs=2", "one_model.milestones=[]", "baselines=[one_model]"]


def _sine(*overrides: str) -> RecipeConfig:
    return load_recipe("sine-cpu", [*TINY_SINE, *overrides])


def test_every_experiment_of_the_paper_has_a_valid_recipe():
    names = {p.stem for p in RECIPES}
    assert {"sine", "lenet-imagewoof", "resnet18-imagewoof", "resnet20-cifar100", "vgg11-cifar10", "resnet18-imagenet",
            "sine-cpu", "lenet-fashion-mnist-cpu"} <= names
    for path in RECIPES:
        recipe = RecipeConfig.from_dict(yaml.safe_load(path.read_text()))
        assert timm.is_model(recipe.architecture), path
        assert RecipeConfig.from_dict(recipe.to_dict()) == recipe


def test_sine_recipe_keeps_the_papers_budget():
    recipe = load_recipe(ROOT / "recipes" / "sine.yaml")  # by path, through the top-level recipes/ link
    student = 2 * recipe.teacher.epochs + recipe.merge.gate_epochs + recipe.merge.finetune_epochs
    assert student == 3 * recipe.teacher.epochs == recipe.one_model.epochs == 900 and len(recipe.seeds) == 50


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_small_run_completes_and_writes_results(tmp_path, precision, monkeypatch):
    dtypes = record_output_dtypes(monkeypatch, torch.nn.Linear)
    recipe = _sine(f"mixed_precision={precision}", "log_with=[tensorboard]")
    results = run_recipe(recipe, tmp_path / "run", progress=False)
    assert (torch.bfloat16 in dtypes) == (precision == "bf16")  # the precision asked for is the one used
    run = results["runs"][0]
    assert run["student"] > 0 and run["one_model"] > 0 and "bo3" not in run
    assert json.loads((tmp_path / "run" / "recipe.json").read_text()) == recipe.to_dict()
    assert "| student |" in (tmp_path / "run" / "results.md").read_text()
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    student = timm.create_model(f"local-dir:{tmp_path / 'run' / 'seed0' / 'student'}", pretrained=True)
    assert student(torch.rand(2, 1)).shape == (2, 1)


def test_a_run_exports_every_trained_network_in_timms_layout(tmp_path):
    from hf_netmerge.data import make_loader
    from hf_netmerge.experiments import load_seed_data
    from hf_netmerge.training import evaluate, make_accelerator

    recipe = _sine()
    row = run_recipe(recipe, tmp_path / "run", progress=False)["runs"][0]
    test = make_loader(load_seed_data(recipe, 0).test, recipe.data.eval_batch_size, shuffle=False)
    for name in ("teacher_a", "teacher_b", "one_model", "student"):
        model = timm.create_model(f"local-dir:{tmp_path / 'run' / 'seed0' / name}", pretrained=True)
        mse = evaluate(model, test, task="regression", accelerator=make_accelerator("no"))["mse"]
        assert mse == pytest.approx(row[name], rel=1e-6), name  # the exported network is the one that was scored


def test_pruning_baseline_gives_the_teachers_architecture(tmp_path):
    data = datasets.DatasetDict({"train": image_dataset(96, 4, seed=0), "test": image_dataset(32, 4, seed=1)})
    data.save_to_disk(str(tmp_path / "data"))
    recipe = RecipeConfig.from_dict({
        "name": "tiny-lenet", "architecture": "netmerge_lenet", "model_args": {"num_classes": 4}, "batch_size": 16,
        "data": {"dataset": str(tmp_path / "data")}, "teacher": {"epochs": 1}, "merge": {"gate_epochs": 1, "finetune_epochs": 1},
        "pruning": {"train": {"epochs": 1}, "prune_epochs": 2, "finetune": {"epochs": 1}}, "baselines": ["pruning"],
    })
    results = run_recipe(recipe, tmp_path / "run", progress=False)
    assert 0 <= results["runs"][0]["pruning"] <= 1 and results["summary"]["student_wins"].keys() == {"pruning"}
    pruned = safetensors.torch.load_file(str(tmp_path / "run" / "seed0" / "pruning" / "model.safetensors"))
    timm.create_model("netmerge_lenet", num_classes=4).load_state_dict(pruned, strict=True)  # the teachers' architecture


def _refused(tmp_path, recipe_text: str, *overrides: str, capsys) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text)
    out = tmp_path / "out"
    assert main(["run", str(path), *overrides, "--output-dir", str(out), "--no-progress"]) == 2
    assert not out.exists()  # refused before anything was written or trained
    return capsys.readouterr().err


@pytest.fixture
def lenet_data(tmp_path):
    train, test = image_dataset(64, 4, seed=0), image_dataset(16, 4, seed=1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "ok"))
    datasets.DatasetDict({"train": train.rename_column("label", "y"), "test": test.rename_column("label", "y")}).save_to_disk(
        str(tmp_path / "renamed"))
    return tmp_path


LENET = """
name: refused
architecture: netmerge_lenet
model_args: {{num_classes: {classes}}}
batch_size: {batch}
data: {{dataset: {dataset}}}
"""


@pytest.mark.parametrize(
    "case,overrides,match",
    [
        ("unknown key", ["bogus=1"], "unknown key"),
        ("wrong type", ["teacher.epochs=abc"], "expected an integer"),
        ("bad value", ["baselines=[bo4]"], "not one of"),
        ("missing column", ["data.dataset={renamed}"], "no column"),
        ("labels out of range", ["model_args.num_classes=3"], "labels span"),
        ("too small for a batch", ["batch_size=128"], "fewer than one batch"),
        ("unknown architecture", ["architecture=no_such_net"], "not a timm model"),
        ("merge owns a recipe key", ["merge.batch_size=4"], "top level"),
        ("weight matching a grouped conv net", ["architecture=regnetx_002", "baselines=[weight_matching]"],
         "weight matching permutes single channels"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_recipes_and_data_are_refused_before_training(lenet_data, capsys, case, overrides, match):
    text = LENET.format(classes=4, batch=16, dataset=lenet_data / "ok")
    overrides = [o.format(renamed=lenet_data / "renamed") for o in overrides]
    assert match in _refused(lenet_data, text, *overrides, capsys=capsys)


def test_another_recipe_in_the_same_output_dir_needs_overwrite(tmp_path):
    run_recipe(_sine(), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="another run"):
        run_recipe(_sine("teacher.epochs=3"), tmp_path / "run", progress=False)


def test_run_takes_a_packaged_recipe_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "sine-cpu", *TINY_SINE, "baselines=[]", "data.max_train_samples=512", "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "sine-cpu" and "student" in results["runs"][0]
    assert main(["run", "no-such-recipe", "--output-dir", str(tmp_path / "x")]) == 2
    assert "no packaged recipe of that name" in capsys.readouterr().err and not (tmp_path / "x").exists()
