"""The experiment layer: recipes by name, the protocol, strategies composed from the public pipeline, observers, extension."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from accelerate.utils import set_seed

import hf_netmerge as hm
from hf_netmerge.card import render_card
from hf_netmerge.config import StageConfig
from hf_netmerge.data import make_loader, sine_splits
from hf_netmerge.experiments import (
    STRATEGIES,
    Budget,
    Curves,
    SeedContext,
    Strategy,
    Timer,
    Trained,
    available_recipes,
    derive_seed,
    load_recipe,
    load_seed_data,
    register_strategy,
    run_seed,
    scale_recipe,
)
from hf_netmerge.gates import Gate, HardConcreteGate
from hf_netmerge.training import evaluate, make_accelerator, train_stage
from hf_netmerge.training.checkpoint import StageCheckpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["seeds=[4]", "teacher.epochs=2", "teacher.milestones=[1]", "merge.gate_epochs=2", "merge.finetune_epochs=1",
        "merge.finetune_milestones=[]", "one_model.epochs=2", "one_model.milestones=[]", "data.max_train_samples=512"]


def _tiny(*overrides: str):
    return load_recipe("sine-cpu", [*TINY, *overrides])


def test_packaged_recipes_load_by_name_and_by_path():
    assert {"sine", "sine-cpu", "resnet20-cifar100", "lenet-fashion-mnist-cpu"} <= set(available_recipes())
    assert load_recipe("sine") == load_recipe(ROOT / "recipes" / "sine.yaml") == load_recipe(ROOT / "hf_netmerge" / "recipes" / "sine.yaml")
    with pytest.raises(hm.ConfigError, match="no packaged recipe.*sine-cpu"):
        load_recipe("sine-gpu")


def test_recipe_merge_section_holds_only_the_schedule():
    recipe = load_recipe("sine")
    assert isinstance(recipe.merge, hm.MergeSchedule) and not isinstance(recipe.merge, hm.MergeConfig)
    config = recipe.merge_config(7)
    assert config.seed == 7 and config.task == "regression" and config.batch_size == recipe.batch_size
    assert config.gate_epochs == 150 and config.lambda_growth == 0.05
    assert set(hm.MergeConfig.run_fields()) == {"task", "batch_size", "eval_batch_size", "eval_max_samples", "mixed_precision", "seed",
                                                "image_column", "label_column", "image_size", "augment", "num_workers",
                                                "gradient_accumulation_steps", "compile", "channels_last"}
    assert config.eval_batch_size == recipe.data.eval_batch_size


def test_every_stage_of_a_seed_is_named_with_the_seed_so_tracker_curves_stay_apart():
    result = run_seed(_tiny("baselines=[one_model]"), 5, progress=False)
    names = [report.stage for trained in result.trained.values() for report in trained.reports]
    assert "seed 5 student gates" in names and "seed 5 student finetune" in names
    assert all(name.startswith("seed 5 ") for name in names), names


def test_sine_protocol_is_defined_once():
    recipe = _tiny()
    data = load_seed_data(recipe, 4)
    train, val, test = sine_splits(4)
    assert torch.equal(data.train.inputs, train.inputs[:512]) and torch.equal(data.val.inputs, val.inputs)
    assert torch.equal(data.test.targets, test.targets) and len(data.test) == 10_000
    assert torch.equal(hm.data.load_data("sine", seed=4).eval.targets, test.targets)  # `merge --dataset sine` scores the same set
    assert derive_seed(4, 10) == 4010


def test_run_seed_composes_the_public_pipeline(tmp_path):
    """The experiment layer's student and one model equal a reference built by hand from the public API."""
    recipe = _tiny("baselines=[one_model]")
    result = run_seed(recipe, 4, progress=False)
    data = load_seed_data(recipe, 4)
    accelerator = make_accelerator("no")
    teachers = []
    for offset in (0, 1):
        seed = derive_seed(4, offset)
        set_seed(seed)
        model = timm.create_model(recipe.architecture)
        train_stage(model, make_loader(data.train, recipe.batch_size, shuffle=True, seed=seed), recipe.teacher, task=recipe.task,
                    accelerator=accelerator, name="reference", progress=False)
        teachers.append(model.eval())
    merged = hm.merge_models(*teachers, data.train, data.val, recipe.merge_config(4), run=hm.RunOptions(progress=False))
    test = make_loader(data.test, recipe.data.eval_batch_size, shuffle=False)
    expected = evaluate(merged.student, test, task=recipe.task, accelerator=accelerator)["mse"]
    assert result.row["student"] == expected
    assert result.row["teacher_a"] == evaluate(teachers[0], test, task=recipe.task, accelerator=accelerator)["mse"]
    assert result.row["gate_stats"] == [s.to_dict() for s in merged.gate_stats]
    assert set(result.row) >= {"seed", "student", "one_model", "teacher_a", "teacher_b", "ensemble", "student_validation"}


def test_observers_never_change_training():
    recipe = _tiny("baselines=[bo3]", "teacher.epochs=1", "teacher.milestones=[]")
    plain = run_seed(recipe, 4, progress=False).row
    observed = run_seed(recipe, 4, observers=[Timer(), Curves(torch.linspace(0, 1, 11))], progress=False).row
    assert {k: observed[k] for k in plain} == plain
    assert set(observed["curves"]) == {"student", "bo3"} and len(observed["curves"]["bo3"]) == 11
    assert set(observed["cpu_seconds"]) == {"student", "bo3"} and len(observed["bo3_validation"]) == 3


def test_a_new_strategy_is_one_registered_class():
    @register_strategy("teacher_a_continued")
    @dataclasses.dataclass(frozen=True)
    class ContinueTeacherA(Strategy):
        stage: StageConfig
        name: str = "teacher_a_continued"
        seed_offset = 90

        @classmethod
        def from_recipe(cls, recipe):
            return cls(stage=recipe.teacher)

        def budget(self, cost):
            return Budget(self.stage.epochs, cost.training_macs(self.stage.epochs))

        def train(self, ctx: SeedContext) -> Trained:
            model = ctx.teachers()[0]
            report = ctx.train(model, self.stage, seed=derive_seed(ctx.seed, self.seed_offset), name=ctx.label(self.name))
            return Trained(model.eval(), [report])

    try:
        recipe = _tiny("teacher.epochs=1", "teacher.milestones=[]")
        row = run_seed(recipe, 4, strategies=[ContinueTeacherA.from_recipe(recipe)], progress=False).row
        assert set(row) == {"seed", "teacher_a_continued", "teacher_a", "teacher_b", "ensemble"}
        assert row["teacher_a_continued"] == row["teacher_a"]  # the teacher was trained further in place: the same network
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("teacher_a_continued")(ContinueTeacherA)
        with pytest.raises(ValueError, match="seed_offset 90 is already 'teacher_a_continued'"):
            register_strategy("another")(ContinueTeacherA)
    finally:
        STRATEGIES.pop("teacher_a_continued")


def test_gates_follow_the_gate_protocol():
    from hf_netmerge.experiments.strategies import TaylorMask

    assert isinstance(HardConcreteGate(4), Gate) and isinstance(TaylorMask(4), Gate)
    big = hm.concatenate(timm.create_model("netmerge_sine_mlp"), timm.create_model("netmerge_sine_mlp"))
    with pytest.raises(hm.UnsupportedModelError, match="not an nn.Module implementing Gate"):
        hm.add_gates(big, make_gate=lambda size: torch.nn.Identity())


@pytest.mark.parametrize("name,kwargs", [("netmerge_lenet_bn", {"num_classes": 4}), ("resnet18", {"num_classes": 5})],
                         ids=["lenet_bn", "resnet18"])
def test_taylor_importance_is_the_squared_gate_derivative_per_site(name, kwargs):
    from hf_netmerge.experiments.strategies import TaylorMask
    from hf_netmerge.gates import GateSite

    torch.manual_seed(0)
    wide = hm.add_gates(hm.concatenate(timm.create_model(name, **kwargs), timm.create_model(name, **kwargs)), make_gate=TaylorMask).train()
    closed = wide.gates[wide.spec.groups[0].name]
    closed.mask[:3] = 0.0
    outputs: dict[str, torch.Tensor] = {}
    for site_name, site in wide.model.named_modules():
        if isinstance(site, GateSite):
            site.register_forward_hook(lambda m, i, o, key=site_name: outputs.__setitem__(key, o))
            site.register_forward_hook(lambda m, i, o: o.retain_grad())
    wide(torch.randn(6, 3, *getattr(wide.model, "img_size", (32, 32)))).square().sum().backward()
    for group in wide.spec.groups:
        expected = sum((outputs[s].grad * outputs[s]).sum([d for d in range(outputs[s].dim()) if d != 1]) ** 2 for s in group.gate_sites)
        torch.testing.assert_close(wide.gates[group.name].importance, expected, rtol=1e-4, atol=1e-12)
    assert torch.all(closed.importance[:3] == 0)


def test_a_stage_checkpoint_that_does_not_fit_the_model_is_a_checkpoint_mismatch(tmp_path):
    data = sine_splits(0)[0]
    loader = make_loader(data, 256, shuffle=True)
    accelerator = make_accelerator("no")
    checkpoint = StageCheckpoint(tmp_path / "stage")
    train_stage(hm.models.MLP(hidden_sizes=(8,)), loader, StageConfig(epochs=1), task="regression", accelerator=accelerator,
                name="a", checkpoint=checkpoint, progress=False)
    with pytest.raises(hm.CheckpointMismatchError, match="does not fit"):
        train_stage(hm.models.MLP(hidden_sizes=(16,)), loader, StageConfig(epochs=2), task="regression", accelerator=accelerator,
                    name="b", checkpoint=checkpoint, progress=False)


def test_the_card_is_rendered_from_the_saved_record(tmp_path):
    recipe = _tiny("baselines=[]", "teacher.epochs=1", "teacher.milestones=[]")
    merged = run_seed(recipe, 4, progress=False).trained["student"].merge
    out = merged.save_pretrained(tmp_path / "student")
    record = json.loads((out / "netmerge_config.json").read_text())
    assert render_card(record) == (out / "README.md").read_text() == merged.model_card()
    assert record["datasets"] == [] and record["merge_config"]["seed"] == 4


def test_scaling_a_recipe_scales_every_stage():
    recipe = load_recipe("resnet20-fashion-mnist-given")
    scaled = scale_recipe(recipe, 10)
    assert (scaled.teacher.epochs, scaled.teacher.milestones) == (80, [50, 70])
    assert (scaled.extra.epochs, scaled.extra.lr_schedule) == (80, "cosine")
    assert (scaled.merge.gate_epochs, scaled.merge.finetune_epochs, scaled.merge.lambda_final) == (20, 60, recipe.merge.lambda_final)
    paper = scale_recipe(load_recipe("resnet20-cifar100"), 0.5)  # λ per epoch: its growth rescaled to end where it would
    assert (paper.merge.gate_epochs, paper.merge.lambda_growth) == (50, 0.1)


@pytest.mark.parametrize("grid", [[[4, 0.9, 1]], [[0, 0.5]], [[2, 1.5]]])
def test_a_bad_distillation_grid_is_a_config_error(grid):
    with pytest.raises(hm.ConfigError, match="distill"):
        load_recipe("resnet20-fashion-mnist-given", [f"distill.grid={grid}"])


def test_the_printer_lists_test_scores_only(capsys):
    from types import SimpleNamespace

    from hf_netmerge.experiments import Printer

    ctx = SimpleNamespace(seed=2, recipe=SimpleNamespace(metric="accuracy"), accelerator=SimpleNamespace(is_main_process=True))
    row = {"seed": 2, "student": 0.9, "weight_matching_validation_before_finetune": 0.5, "weight_matching": 0.8}
    Printer().on_seed_end(ctx, row, {"student": 0.9, "weight_matching": 0.8})
    assert capsys.readouterr().out == "seed 2: test accuracy student 0.9000, weight matching 0.8000\n"
