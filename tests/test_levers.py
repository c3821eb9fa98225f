"""What recovers the half-width student (MergeSchedule's levers), the presets, and the polarization report: each lever
is checked where it acts, so a lever that is not wired in fails its test."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import hf_netmerge as hm
from hf_netmerge.config import MergeSchedule
from hf_netmerge.data import TensorBatchDataset
from hf_netmerge.gates import CLOSED_LOG_ALPHA, ClosingSchedule, GateRegularizer, LambdaSchedule
from hf_netmerge.experiments import load_recipe
from hf_netmerge.training import DistillationLoss, train_sequentially

from conftest import make_teacher

FAST = dict(gate_epochs=1, finetune_epochs=0, batch_size=64, lr=0.02, gate_lr=0.2)


def _images(n: int, seed: int) -> TensorBatchDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return TensorBatchDataset(torch.randn(n, 1, 28, 28, generator=gen) + labels.view(-1, 1, 1, 1).float(), labels)


@pytest.fixture
def teachers():
    kwargs = {"num_classes": 4, "in_chans": 1}
    return make_teacher("netmerge_lenet_bn", kwargs, 0), make_teacher("netmerge_lenet_bn", kwargs, 1)


def _norms(model: torch.nn.Module) -> dict[str, torch.nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("recalibrate", [True, False])
def test_recalibration_gives_the_student_its_own_batchnorm_statistics(teachers, recalibrate):
    """After compression the kept channels carry statistics of the big student; recalibration replaces them by the
    student's own on the training data (here one batch of all of it: the batch's mean and unbiased variance)."""
    train = _images(64, 0)
    config = hm.MergeConfig(**FAST, recalibrate_norms=recalibrate)
    result = hm.merge_models(*teachers, train, _images(32, 1), config, run=hm.RunOptions(progress=False))
    reference = copy.deepcopy(result.student).train()
    for m in _norms(reference).values():
        m.momentum = 1.0  # the running statistics become this one batch's
    with torch.no_grad():
        reference(train.inputs)
    for name, norm in _norms(result.student).items():
        expected = _norms(reference)[name]
        close = torch.allclose(norm.running_mean, expected.running_mean, atol=1e-5) and torch.allclose(
            norm.running_var, expected.running_var, rtol=1e-4, atol=1e-5)
        assert close == recalibrate, name
    assert ("student_recalibrated" in result.metrics) == recalibrate


def test_recalibration_reads_at_most_recalibration_samples(teachers, monkeypatch):
    seen = []
    monkeypatch.setattr(hm.api, "recalibrate_norms", lambda model, loader, accelerator: seen.append(len(loader.dataset)))
    hm.merge_models(*teachers, _images(64, 0), None, hm.MergeConfig(**FAST, recalibration_samples=40), run=hm.RunOptions(progress=False))
    assert seen == [40]


@pytest.mark.parametrize("gate_alpha,finetune_alpha", [(0.0, 0.0), (0.7, 0.3)])
def test_ensemble_distillation_reaches_the_stages_it_is_set_for(teachers, gate_alpha, finetune_alpha):
    """``gate_distill_alpha`` puts the teachers' ensemble into the gate stage's loss, ``distill_alpha`` into fine-tuning's."""
    jobs = []

    def recording(stage_jobs):
        jobs.extend(stage_jobs)
        return train_sequentially(stage_jobs)

    config = hm.MergeConfig(**{**FAST, "finetune_epochs": 1}, gate_distill_alpha=gate_alpha, distill_alpha=finetune_alpha,
                            distill_temperature=3.0)
    hm.merge_models(*teachers, _images(64, 0), None, config, run=hm.RunOptions(progress=False, trainer=recording))
    assert [job.name for job in jobs] == ["gates", "finetune"]
    x = _images(8, 2).inputs
    with torch.no_grad():
        mean = (teachers[0].eval()(x) + teachers[1].eval()(x)) / 2
    for job, alpha in zip(jobs, (gate_alpha, finetune_alpha)):
        if alpha == 0:
            assert job.distillation is None
            continue
        assert isinstance(job.distillation, DistillationLoss)
        assert (job.distillation.alpha, job.distillation.temperature) == (alpha, 3.0)
        with torch.no_grad():
            torch.testing.assert_close(job.distillation.teacher(x), mean)


def test_the_gate_stage_warns_when_gates_stay_undecided_and_the_record_and_card_say_so(teachers, caplog, tmp_path):
    """λ that never grows leaves the gates where they started (P ≈ 0.93 → most end undecided after a few steps)."""
    config = hm.MergeConfig(**FAST, gate_init_mean=-1.6, lambda_init=1e-6, lambda_final=1e-6)  # P[g>0] = 0.5 at the start
    with caplog.at_level(logging.WARNING, logger="hf_netmerge"):
        result = hm.merge_models(*teachers, _images(64, 0), _images(32, 1), config, run=hm.RunOptions(progress=False))
    assert result.undecided_gates > 0.05
    assert any("undecided" in r.getMessage() for r in caplog.records)
    out = result.save_pretrained(tmp_path / "s")
    record = json.loads((out / "netmerge_config.json").read_text())
    assert record["undecided_gates"] == result.undecided_gates and record["preset"] == "recommended"
    assert all(0 <= g["undecided_fraction"] <= 1 for g in record["gate_stats"])
    card = ModelCard.load(out / "README.md").text
    assert "**recommended** preset" in card and f"{100 * result.undecided_gates:.1f}% of the gates undecided" in card
    assert "λ moved step by step (quadratic) from 1e-06 to 1e-06" in card


def test_polarized_gates_do_not_warn(teachers, caplog):
    config = hm.MergeConfig(**FAST, gate_init_mean=8.0)  # every gate open for sure: P[g>0] ≈ 1
    with caplog.at_level(logging.WARNING, logger="hf_netmerge"):
        result = hm.merge_models(*teachers, _images(64, 0), None, config, run=hm.RunOptions(progress=False))
    assert result.undecided_gates == 0.0 and not caplog.records


def test_presets_paper_and_recommended():
    paper = hm.MergeConfig.paper(gate_epochs=3)
    assert (paper.lambda_schedule, paper.lambda_init, paper.lambda_growth) == ("per_epoch", 0.01, 0.05)
    assert not paper.recalibrate_norms and paper.distill_alpha == paper.gate_distill_alpha == 0 and paper.finetune_schedule == "step"
    assert paper.gate_epochs == 3 and paper.preset_name() == "paper"
    assert hm.MergeConfig().preset_name() == "recommended" and hm.MergeConfig(gate_epochs=9, lr=0.3).preset_name() == "recommended"
    assert hm.MergeConfig(distill_alpha=0.0).preset_name() == "custom"
    assert MergeSchedule.from_dict({"preset": "paper", "gate_epochs": 5, "lambda_growth": 2.0}) == MergeSchedule.paper(
        gate_epochs=5, lambda_growth=2.0)
    with pytest.raises(hm.ConfigError, match="preset: 'fast' is not one of"):
        MergeSchedule.from_dict({"preset": "fast"})


def test_the_papers_recipes_run_the_papers_schedule_and_the_given_teachers_recipe_the_recommended_one():
    for name in ("sine", "lenet-imagewoof", "resnet18-imagewoof", "resnet20-cifar100", "vgg11-cifar10", "resnet18-imagenet"):
        assert load_recipe(name).merge.preset_name() == "paper", name
    assert load_recipe("lenet-bn-fashion-mnist-given").merge.preset_name() == "recommended"
    saved = yaml.safe_load(MergeSchedule.paper().to_yaml())
    assert MergeSchedule.from_dict(saved) == MergeSchedule.paper()  # a saved preset reloads as itself


def test_closing_schedule_is_cubic_from_its_start_and_complete_at_the_end():
    schedule = ClosingSchedule(start=0.25, epochs=4)
    assert schedule.at(0.0) == schedule.at(1.0) == 0.0 and schedule.at(4.0) == 1.0
    assert schedule.at(2.5) == pytest.approx(1 - 0.5**3)  # halfway through the closing
    values = [schedule.at(e / 10) for e in range(41)]
    assert values == sorted(values)


def test_a_closed_gate_is_zero_in_training_and_eval_and_gets_no_gradient(teachers):
    gated = hm.add_gates(hm.concatenate(*teachers))
    gated.close(1.0)
    gated.train()
    out = gated(_images(16, 0).inputs)
    out.square().mean().backward()
    for gate in gated.gates.values():
        closed = gate.log_alpha <= CLOSED_LOG_ALPHA
        assert int(closed.sum()) == gate.size // 2  # all the units compression removes, no more
        assert (gate.eval_value()[closed] == 0).all() and (gate.prob_open()[closed] < 1e-20).all()
        assert (gate.log_alpha.grad[closed] == 0).all() and gate.log_alpha.grad[~closed].abs().sum() > 0


@pytest.mark.parametrize("closing", ["cubic", "none"])
def test_closing_makes_compression_remove_only_closed_gates(teachers, closing):
    """Gates that start wide open stay open without closing, and compression then cuts channels the big student uses;
    with closing every group ends with exactly the kept half open and the student computes what the gated big student did."""
    config = hm.MergeConfig(**FAST, gate_init_mean=8.0, gate_closing=closing)
    result = hm.merge_models(*teachers, _images(64, 0), _images(32, 1), config, run=hm.RunOptions(progress=False))
    halves = [s.open_fraction == 0.5 for s in result.gate_stats]
    assert all(halves) == (closing == "cubic")
    assert (result.function_gap["max_abs"] < 1e-4) == (closing == "cubic")


def _labelled_by(teacher: torch.nn.Module) -> TensorBatchDataset:
    """Inputs like those the teachers' statistics came from, labelled by ``teacher``'s own predictions."""
    inputs = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    with torch.no_grad():
        return TensorBatchDataset(inputs, teacher(inputs).argmax(1))


@pytest.mark.parametrize("better", [0, 1])
def test_head_start_keeps_the_better_teachers_channels(teachers, better, tmp_path):
    """Labels are one teacher's own predictions, so it has the lower loss; a large head start for its gates makes
    closing remove the other teacher's channels first, in every group (without it, the groups keep channels of both)."""
    data = _labelled_by(teachers[better])
    for head_start in (20.0, 0.0):
        config = hm.MergeConfig(**FAST, gate_closing="cubic", gate_head_start=head_start)
        result = hm.merge_models(*teachers, data, data, config, run=hm.RunOptions(progress=False))
        from_better = [s.kept_per_teacher[better] == s.kept for s in result.gate_stats]
        assert all(from_better) == (head_start > 0)
        assert result.head_start_teacher == (better if head_start > 0 else None)
    record = json.loads((result.save_pretrained(tmp_path / "s") / "netmerge_config.json").read_text())
    assert record["head_start_teacher"] is None and record["merge_config"]["gate_head_start"] == 0.0


def test_head_start_without_evaluation_data_ranks_the_teachers_on_training_examples(teachers):
    config = hm.MergeConfig(**FAST, gate_closing="cubic", gate_head_start=20.0)
    result = hm.merge_models(*teachers, _labelled_by(teachers[1]), None, config, run=hm.RunOptions(progress=False))
    assert result.head_start_teacher == 1
    assert all(s.kept_per_teacher == (0, s.kept) for s in result.gate_stats)


def test_closing_gates_cannot_join_a_stack(teachers):
    gated = hm.add_gates(hm.concatenate(*teachers))
    regularizers = [GateRegularizer(gated, LambdaSchedule(), closing=closing) for closing in (None, ClosingSchedule())]
    assert [r.prepares_model for r in regularizers] == [False, True]
