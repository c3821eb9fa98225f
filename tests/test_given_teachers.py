"""What a holder of two teachers could do instead of merging: keep training, distill, align-and-average — and the
merge with distillation. Each strategy against a reference built by hand, on a tiny LeNet-BN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_netmerge.data import TensorBatchDataset, make_loader, training_view
from hf_netmerge.experiments import Budgets, ModelCost, SeedData, load_recipe, run_seed
from hf_netmerge.experiments.protocol import derive_seed
from hf_netmerge.training import DistillationLoss, evaluate, make_accelerator, recalibrate_norms, train_stage

RECIPE = [
    "architecture=netmerge_lenet_bn", "model_args={num_classes: 4, in_chans: 1}", "task=classification", "batch_size=16",
    "teacher.epochs=1", "teacher.milestones=[]", "merge.gate_epochs=1", "merge.finetune_epochs=1", "merge.finetune_milestones=[]",
    "merge.lambda_init=0.5", "merge.lambda_growth=1.0", "extra.epochs=1", "extra.lr=0.02", "distill.grid=[[2, 0.5], [4, 0.9]]",
    "baselines=[continue, distill, weight_matching, student_distill, ensemble]", "data.eval_batch_size=64",
]


def _images(n: int, seed: int) -> TensorBatchDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return TensorBatchDataset(torch.randn(n, 1, 28, 28, generator=gen) + labels.view(-1, 1, 1, 1).float(), labels)


@pytest.fixture(scope="module")
def given():
    recipe = load_recipe("sine", RECIPE)
    data = SeedData(train=_images(96, 0), val=_images(48, 1), test=_images(64, 2), name="blobs")
    return recipe, data, run_seed(recipe, 3, data=data, observers=[Budgets()], progress=False)


def test_every_alternative_is_scored_with_its_budget(given):
    _, _, result = given
    row = result.row
    names = ["student", "continue", "distill", "weight_matching", "student_distill", "ensemble"]
    assert all(0 <= row[n] <= 1 for n in names) and set(row["macs"]) == set(names)
    cost = ModelCost.measure(given[0], given[1])
    one_epoch = 3 * 96 * cost.network_macs  # training multiply-adds of one single-width epoch over the 96 examples
    teachers = row["macs"]["ensemble"]
    assert teachers == 2 * one_epoch  # two teachers, one epoch each; the ensemble trains nothing more
    assert row["macs"]["continue"] - teachers == one_epoch
    assert row["macs"]["distill"] - teachers == 2 * one_epoch + 2 * 2 * 96 * cost.network_macs  # two settings + the ensemble's passes
    assert row["macs"]["weight_matching"] - teachers == one_epoch + 96 * cost.network_macs  # + the statistics pass
    assert row["distill_setting"] in ([2.0, 0.5], [4.0, 0.9]) and len(row["distill_validation"]) == 2
    assert "weight_matching_validation_before_finetune" in row and row["continue_from"] in ("a", "b")


def test_continue_is_the_better_teacher_trained_on(given):
    recipe, data, result = given
    accelerator = make_accelerator("no")
    teachers = result.teachers
    val = make_loader(data.val, 1024, shuffle=False)
    scores = [evaluate(t, val, task="classification", accelerator=accelerator)["accuracy"] for t in teachers]
    model = copy.deepcopy(teachers[scores.index(max(scores))])
    seed = derive_seed(3, 40)
    train_stage(model, make_loader(training_view(data.train, recipe.augment, seed), 16, shuffle=True, seed=seed), recipe.extra,
                task="classification", accelerator=accelerator, name="reference", progress=False)
    test = make_loader(data.test, 64, shuffle=False)
    assert result.row["continue"] == evaluate(model, test, task="classification", accelerator=accelerator)["accuracy"]


def test_student_distill_shares_the_students_gate_stage(given):
    student, distilled = given[2].trained["student"].merge, given[2].trained["student_distill"].merge
    assert [s.to_dict() for s in student.gate_stats] == [s.to_dict() for s in distilled.gate_stats]
    assert distilled.config.distill_alpha in (0.5, 0.9) and student.config.distill_alpha == 0


def test_distillation_loss_by_hand():
    teacher = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    out = torch.randn(5, 4)
    assert torch.allclose(DistillationLoss(teacher, "classification", 2.0, 0.0)(out, x, y), F.cross_entropy(out, y))
    p, q = F.softmax(teacher(x) / 3.0, -1), F.softmax(out / 3.0, -1)
    expected = 9.0 * (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(DistillationLoss(teacher, "classification", 3.0, 1.0)(out, x, y), expected, atol=1e-6)
    assert teacher.weight.requires_grad  # the teacher is left trainable: other strategies train copies of it


def test_recalibrated_batch_norm_holds_the_plain_statistics_of_one_pass():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    data = TensorBatchDataset(torch.randn(40, 3) * 3 + 1, torch.zeros(40))
    recalibrate_norms(model, make_loader(data, 40, shuffle=False), make_accelerator("no"))
    with torch.no_grad():
        hidden = model[0](data.inputs)
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0))
    torch.testing.assert_close(model[1].running_var, hidden.var(0))
    assert model[1].momentum == 0.1 and model.training
