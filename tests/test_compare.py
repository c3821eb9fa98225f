"""``compare_models`` / ``hf-netmerge compare``: every alternative at the same budget, the winner chosen on validation and
saved with the whole table; bad inputs refused before anything trains."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from timm.models._hub import save_for_hf

import hf_netmerge as hm
from hf_netmerge.cli import main
from hf_netmerge.data import TensorBatchDataset

from conftest import make_teacher

CONFIG = hm.MergeConfig(batch_size=32, lr=0.02, gate_lr=0.2)
LENET = {"num_classes": 4, "in_chans": 1}


def _images(n: int, seed: int) -> TensorBatchDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return TensorBatchDataset(torch.randn(n, 1, 28, 28, generator=gen) + labels.view(-1, 1, 1, 1).float(), labels)


def test_compare_trains_every_alternative_and_saves_the_validation_winner(tmp_path):
    a, b = make_teacher("netmerge_lenet_bn", LENET, 0), make_teacher("netmerge_lenet_bn", LENET, 1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    test = _images(64, 1)
    result = hm.compare_models(a, b, _images(160, 0), test, epochs=2, config=CONFIG, output=tmp_path / "winner", progress=False)
    rows = {r.strategy: r for r in result.rows}
    assert list(rows) == ["keep", "continue", "distill", "weight_matching", "student", "student_paper", "ensemble"]
    assert result.winner == max((r for r in result.rows if r.eligible), key=lambda r: r.validation).strategy
    assert not rows["ensemble"].eligible and rows["ensemble"].networks == 2
    # the same N epochs each; distillation trains one network per (T, α) of its grid; keep spends nothing
    assert {name: r.epochs for name, r in rows.items()} == {"keep": 0, "continue": 2, "distill": 4, "weight_matching": 2, "student": 2,
                                                             "student_paper": 2, "ensemble": 0}
    assert rows["student"].training_macs > rows["continue"].training_macs  # the gate epoch trains the double-width network
    assert all(0 <= r.test <= 1 for r in result.rows)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'winner'}", pretrained=True).eval()
    torch.testing.assert_close(loaded(test.inputs[:8]), result.model.eval()(test.inputs[:8]))
    record = json.loads((tmp_path / "winner" / "netmerge_compare.json").read_text())
    assert record["winner"] == result.winner and [r["strategy"] for r in record["rows"]] == list(rows)
    card = ModelCard.load(tmp_path / "winner" / "README.md").text
    assert f"| {result.winner} **(chosen)** |" in card and "| student_paper" in card and "| keep" in card
    assert "**recommended** schedule" in card
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_subset_of_strategies_runs_only_those_and_keep(tmp_path):
    a, b = make_teacher("netmerge_lenet_bn", LENET, 0), make_teacher("netmerge_lenet_bn", LENET, 1)
    result = hm.compare_models(a, b, _images(160, 0), _images(64, 1), epochs=2, config=CONFIG, strategies=["student", "continue"],
                               progress=False)
    assert [r.strategy for r in result.rows] == ["keep", "continue", "student"]
    assert result.winner in ("keep", "continue", "student") and "student_validation" in result.details


@pytest.mark.parametrize("kwargs,error", [({"epochs": 1}, hm.ConfigError), ({"epochs": 2, "val_fraction": 1.0}, hm.ConfigError),
                                          ({"epochs": 2, "strategies": ["merge"]}, hm.ConfigError),
                                          ({"epochs": 2, "strategies": ["keep"]}, hm.ConfigError)])
def test_bad_budgets_are_refused_before_anything_is_written(tmp_path, kwargs, error):
    a, b = make_teacher("netmerge_lenet_bn", LENET, 0), make_teacher("netmerge_lenet_bn", LENET, 1)
    with pytest.raises(error):
        hm.compare_models(a, b, _images(160, 0), config=CONFIG, output=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_teachers_of_two_architectures_are_refused():
    a, b = make_teacher("netmerge_lenet_bn", LENET, 0), make_teacher("netmerge_lenet", LENET, 1)
    with pytest.raises(hm.TeacherMismatchError):
        hm.compare_models(a, b, _images(160, 0), epochs=2, config=CONFIG, progress=False)


def test_cli_compare_prints_the_table_and_saves_the_winner_of_a_regression(tmp_path, capsys):
    for i in range(2):
        save_for_hf(make_teacher("netmerge_sine_mlp", {}, i), tmp_path / f"t{i}", safe_serialization=True)
    args = ["compare", str(tmp_path / "t0"), str(tmp_path / "t1"), "--dataset", "sine", "--epochs", "2", "--max-train-samples", "320",
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "netmerge_compare.json").read_text())
    assert record["metric"] == "mse" and f"saved {record['winner']} to" in out and "<- chosen" in out
    best = min((r for r in record["rows"] if r["eligible"]), key=lambda r: r["validation"])  # MSE: lower wins
    assert best["strategy"] == record["winner"]
    assert main(args) == 2  # the output exists now: refused, not overwritten
