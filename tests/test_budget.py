"""Budgets by hand: multiply-add counting, schedule stretching, each strategy's epochs and MACs, equal compute."""

from __future__ import annotations

import pytest
import timm
import torch

import hf_netmerge as hm
from hf_netmerge.config import StageConfig, moved_milestones
from hf_netmerge.experiments import BestOf, ModelCost, OneModel, Pruning, Student, load_recipe
from hf_netmerge.experiments.budget import forward_macs


def test_forward_macs_counts_linear_and_conv_layers():
    mlp = timm.create_model("netmerge_sine_mlp")
    assert forward_macs(mlp, torch.zeros(1, 1)) == 100 + 100
    assert forward_macs(hm.concatenate(mlp, timm.create_model("netmerge_sine_mlp")), torch.zeros(1, 1)) == 200 + 200
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, groups=2))
    assert forward_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 100 * 3 * 9 + 8 * 64 * 4 * 9


@pytest.mark.parametrize(("milestones", "epochs", "new", "expected"), [([250], 300, 350, [292]), ([2, 3], 4, 2, [1]), ([100], 150, 1, [])])
def test_moved_milestones_stay_inside_the_new_schedule(milestones, epochs, new, expected):
    assert moved_milestones(milestones, epochs, new) == expected
    assert StageConfig(epochs=epochs, milestones=milestones).stretched(new).milestones == expected


def test_strategy_budgets_of_the_sine_recipe_by_hand():
    recipe = load_recipe("sine")
    cost = ModelCost(examples=10_000, network_macs=200, big_macs=400)  # 1 → 100 → 1 and its double width
    student = Student.from_recipe(recipe).budget(cost)
    assert student.epochs == 900 and student.macs == 3 * 10_000 * (600 * 200 + 150 * 400 + 150 * 200) == 6_300_000_000
    assert BestOf.from_recipe(recipe).budget(cost).macs == OneModel.from_recipe(recipe).budget(cost).macs == 5_400_000_000
    bo3, one = (s.at_compute(student.macs, cost) for s in (BestOf.from_recipe(recipe), OneModel.from_recipe(recipe)))
    # the committed sine benchmark's equal-compute budgets: bo3 members 350 epochs, one model 1050, drops moved
    assert (bo3.name, bo3.stage.epochs, bo3.stage.milestones) == ("bo3_equal_compute", 350, [292])
    assert (one.name, one.stage.epochs, one.stage.milestones) == ("one_model_equal_compute", 1050, [933])
    assert bo3.budget(cost).macs == one.budget(cost).macs == 6_300_000_000


def test_given_teachers_cost_the_student_nothing_and_pruning_counts_double_width():
    recipe = load_recipe("lenet-fashion-mnist-cpu", ["teachers=[a, b]"])
    cost = ModelCost(examples=100, network_macs=10, big_macs=30)
    assert Student.from_recipe(recipe).budget(cost).epochs == 4 and Student.from_recipe(recipe).budget(cost).macs == 3 * 100 * (2 * 10 + 2 * 30)
    pruning = Pruning.from_recipe(recipe).budget(cost)
    assert pruning.epochs == 12 and pruning.macs == 3 * 100 * (10 * 30 + 2 * 10)


def test_model_cost_measures_fresh_models_without_touching_the_global_rng():
    recipe = load_recipe("sine")
    data = type("Data", (), {"train": hm.data.TensorBatchDataset(torch.rand(7, 1), torch.rand(7, 1))})()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert ModelCost.measure(recipe, data) == ModelCost(examples=7, network_macs=200, big_macs=400)
    assert torch.equal(torch.rand(3), expected)
