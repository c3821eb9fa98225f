"""Stacked training: S networks trained as one stacked model equal S runs of train_stage, to float rounding."""

from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch

import hf_netmerge as hm
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader, sine_splits
from hf_netmerge.errors import NonFiniteLossError
from hf_netmerge.experiments import ValidationScores, load_recipe, run_recipe, run_seeds
from hf_netmerge.gates import GateRegularizer, LambdaSchedule
from hf_netmerge.training import StackingTrainer, StageJob, make_accelerator, train_sequentially, train_stacked
from hf_netmerge.training.checkpoint import StageCheckpoint
from hf_netmerge.training.stacked import stack_key, unstackable

RTOL = 1e-5
# Different learning rates, drops, epochs and weight decay per network: each must follow its own schedule.
STAGES = [
    StageConfig(epochs=3, lr=0.01, milestones=[2]),
    StageConfig(epochs=2, lr=0.03),
    StageConfig(epochs=3, lr=0.01, milestones=[1], lr_gamma=0.5, warmup_epochs=1),
]


def _sine(seed: int, size: int = 256) -> TensorBatchDataset:
    train = sine_splits(seed)[0]
    return TensorBatchDataset(train.inputs[:size], train.targets[:size])


def _images(seed: int, size: int = 96) -> TensorBatchDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorBatchDataset(torch.randn(size, 3, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))


ARCHITECTURES = {  # architecture → (create_model kwargs, data, task)
    "netmerge_sine_mlp": ({}, _sine, "regression"),
    "netmerge_lenet": ({"num_classes": 10}, _images, "classification"),
}


def _jobs(models, data, stages, task, regularizers=None, batch=32):
    accelerator = make_accelerator("no")
    return [StageJob(model, make_loader(d, batch, shuffle=True, seed=100 + k), stage, task, accelerator, f"net{k}",
                     regularizer=regularizers[k] if regularizers else None, progress=False)
            for k, (model, d, stage) in enumerate(zip(models, data, stages))]


def _relative(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-12)) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


def _assert_same_training(stacked, alone, stacked_reports, alone_reports):
    for a, b, ra, rb in zip(stacked, alone, stacked_reports, alone_reports):
        assert _relative(a, b) < RTOL
        assert (ra.steps, ra.samples, ra.epochs) == (rb.steps, rb.samples, rb.epochs)
        assert [h["lr"] for h in ra.history] == [h["lr"] for h in rb.history]
        assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rb.history], rel=RTOL)
        for key in rb.history[-1].keys() - {"samples_per_second", "loss"}:
            assert ra.history[-1][key] == pytest.approx(rb.history[-1][key], rel=RTOL, abs=1e-9), key


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_stacked_networks_train_as_each_alone(architecture):
    kwargs, make_data, task = ARCHITECTURES[architecture]
    models = []
    for k in range(3):
        torch.manual_seed(k)
        models.append(timm.create_model(architecture, **kwargs))
    alone = copy.deepcopy(models)
    data = [make_data(k) for k in range(3)]  # each network its own data and shuffle
    decayed = [StageConfig(epochs=2, lr=0.01, weight_decay=1e-3), StageConfig(epochs=1, lr=0.02, weight_decay=1e-3)] * 2
    stages = STAGES if task == "regression" else decayed
    expected = train_sequentially(_jobs(alone, data, stages, task))
    reports = train_stacked(_jobs(models, data, stages, task))
    _assert_same_training(models, alone, reports, expected)
    for model in models:  # every network owns its tensors again (none is a view of the stack)
        assert all(p._base is None and p.data.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


def _gated(seed: int) -> hm.GatedModel:
    torch.manual_seed(seed)
    a, b = timm.create_model("netmerge_sine_mlp"), timm.create_model("netmerge_sine_mlp")
    return hm.add_gates(hm.concatenate(a, b), noise_seed=seed)


def test_stacked_gate_stage_equals_each_gate_stage_alone():
    """Each gated big student keeps its own noise stream, λ schedule (per epoch or per step) and Adam state in the stack."""
    models = [_gated(k) for k in range(3)]
    alone = copy.deepcopy(models)
    stage = [StageConfig(epochs=3, lr=0.01)] * 3
    data = [_sine(k) for k in range(3)]
    growth = [0.05, 0.5, 2.0]
    schedules = [LambdaSchedule("per_epoch", 0.01, growth=g, epochs=3) for g in growth[:2]] + [LambdaSchedule("quadratic", 0.01, 5.0, epochs=3)]
    expected = train_sequentially(_jobs(alone, data, stage, "regression", [GateRegularizer(m, s) for m, s in zip(alone, schedules)]))
    reports = train_stacked(_jobs(models, data, stage, "regression", [GateRegularizer(m, s) for m, s in zip(models, schedules)]))
    _assert_same_training(models, alone, reports, expected)
    assert [m.noise.passes.item() for m in models] == [m.noise.passes.item() for m in alone] == [24] * 3
    assert len({r.history[-1]["lambda"] for r in reports}) == 3


def test_a_diverging_network_leaves_the_stack_and_the_others_go_on():
    models = [timm.create_model("netmerge_sine_mlp") for _ in range(3)]
    alone = copy.deepcopy(models)
    stages = [StageConfig(epochs=2, lr=0.01), StageConfig(epochs=2, lr=1e6), StageConfig(epochs=2, lr=0.02)]
    data = [_sine(k) for k in range(3)]
    results = train_stacked(_jobs(models, data, stages, "regression"))
    assert isinstance(results[1], NonFiniteLossError) and "epoch 1" in str(results[1])
    keep = [0, 2]
    expected = train_sequentially([job for k, job in enumerate(_jobs(alone, data, stages, "regression")) if k in keep])
    _assert_same_training([models[k] for k in keep], [alone[k] for k in keep], [results[k] for k in keep], expected)
    with pytest.raises(NonFiniteLossError):
        StackingTrainer()(_jobs(copy.deepcopy(alone), data, stages, "regression"))


def test_what_cannot_stack_trains_alone(tmp_path):
    models = [timm.create_model("netmerge_sine_mlp") for _ in range(3)] + [timm.create_model("netmerge_mlp_bn", in_chans=1, num_classes=1)]
    alone = copy.deepcopy(models)
    stages = [StageConfig(epochs=2, lr=0.01)] * 4
    data = [_sine(k) for k in range(4)]
    jobs = _jobs(models, data, stages, "regression")
    jobs[2].checkpoint = StageCheckpoint(tmp_path / "ckpt")
    assert [unstackable(j) for j in jobs] == [None, None, "it checkpoints", "its model has BatchNorm"]
    assert stack_key(jobs[0]) == stack_key(jobs[1]) != stack_key(jobs[3])
    reports = StackingTrainer()(jobs)
    expected = train_sequentially(_jobs(alone, data, stages, "regression"))
    _assert_same_training(models, alone, reports, expected)
    assert (tmp_path / "ckpt").is_dir()
    with pytest.raises(ValueError, match="cannot share a stack"):
        train_stacked(jobs)


def _tiny(*overrides: str):
    return load_recipe("sine", ["seeds=[0,1,2]", "teacher.epochs=2", "teacher.milestones=[1]", "merge.gate_epochs=2", "merge.finetune_epochs=2",
                                "merge.finetune_milestones=[1]", "one_model.epochs=3", "one_model.milestones=[2]", "batch_size=32",
                                "data.max_train_samples=512", *overrides])


def test_stacked_seeds_give_the_sequential_results():
    """Every seed's teachers, gate stage, fine-tuning, bo3 members and one model, stacked across seeds, give the rows of
    the seeds run one by one (test and validation scores, gate statistics)."""
    recipe = _tiny()
    sequential = run_seeds(recipe, recipe.seeds, observers=[ValidationScores()], progress=False)
    stacked = run_seeds(recipe, recipe.seeds, stacked=True, observers=[ValidationScores()], progress=False)
    for a, b in zip(sequential, stacked):
        assert a.row.keys() == b.row.keys() and a.row["seed"] == b.row["seed"]
        for key in ("student", "bo3", "one_model", "teacher_a", "teacher_b", "ensemble"):
            assert b.row[key] == pytest.approx(a.row[key], rel=RTOL), key
        assert b.row["validation"] == pytest.approx(a.row["validation"], rel=RTOL)
        assert [g["kept_per_teacher"] for g in b.row["gate_stats"]] == [g["kept_per_teacher"] for g in a.row["gate_stats"]]
        assert [r.history[-1]["loss"] for r in b.trained["student"].reports] == pytest.approx(
            [r.history[-1]["loss"] for r in a.trained["student"].reports], rel=RTOL)


def test_stacked_trainer_raises_a_seeds_error_after_the_others_finish():
    recipe = _tiny()
    finished = []

    def work(seed: int) -> int:
        model = timm.create_model("netmerge_sine_mlp")
        stage = StageConfig(epochs=1, lr=1e6 if seed == 1 else 0.01)
        trainer([_jobs([model], [_sine(seed)], [stage], "regression")[0]])
        finished.append(threading.current_thread().name)
        return seed

    trainer = StackingTrainer()
    with pytest.raises(NonFiniteLossError):
        trainer.map(work, recipe.seeds)
    assert len(finished) == 2
    assert trainer.map(lambda seed: seed * 2, [1, 2]) == [2, 4]


def test_a_stacked_recipe_runs_without_checkpoints_and_records_its_time(tmp_path):
    results = run_recipe(_tiny("stacked=true", "seeds=[0,1]"), tmp_path / "run", progress=False)
    assert results["time"]["stacked"] and results["time"]["cpu_seconds"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "seed1" / "student" / "model.safetensors").is_file()
    with pytest.raises(hm.ConfigError, match="stacked: true trains fp32"):
        _tiny("stacked=true", "mixed_precision=bf16")
