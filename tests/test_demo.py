"""The sine demo end to end at a tiny budget, through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from hf_netmerge.cli import main
from hf_netmerge.data import sine_data, sine_splits
from hf_netmerge.experiments.demo import DemoConfig
from hf_netmerge.experiments.report import summarize


def test_demo_writes_results_plot_and_student(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--seeds", "2", "--first-seed", "5", "--epochs-scale", "0.01", "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [5, 6]
    for run in results["runs"]:
        for strategy in ("student", "bo3", "one_model"):
            assert isinstance(run[strategy], float) and run[strategy] > 0
        assert len(run["bo3_validation"]) == 3
    assert results["protocol"]["epochs_per_strategy"] == 9
    assert results["stacked"] and results["recipe"]["batch_size"] == 32 and results["cpu_seconds"] > 0
    assert (out / "learned_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True)
    assert student(torch.rand(3, 1)).shape == (3, 1)
    printed = capsys.readouterr().out
    assert "student better than bo3 in" in printed and "median" in printed
    sequential = tmp_path / "sequential"
    assert main(["demo", "--seeds", "2", "--first-seed", "5", "--epochs-scale", "0.01", "--output-dir", str(sequential), "--no-progress",
                 "--sequential"]) == 0
    alone = json.loads((sequential / "results.json").read_text())
    assert not alone["stacked"]
    for a, b in zip(alone["runs"], results["runs"]):  # stacked = each seed alone, to float rounding
        assert [b[s] for s in ("student", "bo3", "one_model")] == pytest.approx([a[s] for s in ("student", "bo3", "one_model")], rel=1e-5)


def test_demo_refuses_bad_flags_with_exit_code_2(tmp_path, capsys):
    assert main(["demo", "--seeds", "0", "--output-dir", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_without_matplotlib_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert main(["demo", "--seeds", "1", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "hf_netmerge[plots]" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_python_dash_m_is_the_same_program():
    done = subprocess.run([sys.executable, "-m", "hf_netmerge", "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--epochs-scale" in done.stdout and "--first-seed" in done.stdout


def test_protocol_shares_training_data_and_fixes_the_test_set():
    train, val, test = sine_splits(3)
    train2, _, test2 = sine_splits(3)
    assert torch.equal(train.inputs, train2.inputs) and torch.equal(test.targets, test2.targets)
    assert not torch.equal(train.inputs[:100], val.inputs[:100])
    assert (len(train), len(val), len(test)) == (10_000, 2_000, 10_000)


def test_sine_data_follows_the_paper():
    data = sine_data(50_000, torch.Generator().manual_seed(0))
    x, y = data.inputs, data.targets
    assert x.min() >= 0 and x.max() <= 1
    residual = y - torch.sin(10 * torch.pi * x)
    assert abs(residual.std().item() - 0.2) < 0.005


def test_budget_split_matches_the_paper():
    recipe = DemoConfig(epochs_scale=1.0).recipe()
    assert (recipe.teacher.epochs, recipe.merge.gate_epochs, recipe.merge.finetune_epochs, recipe.one_model.epochs) == (300, 150, 150, 900)
    assert (recipe.teacher.milestones, recipe.merge.finetune_milestones, recipe.one_model.milestones) == ([250], [100], [800])
    scaled = DemoConfig(epochs_scale=0.3).recipe()
    assert (scaled.teacher.epochs, scaled.teacher.milestones, scaled.merge.gate_epochs, scaled.one_model.epochs) == (90, [75], 45, 270)
    assert scaled.merge.lambda_growth == 0.05 / 0.3  # λ ends where the paper's 150 gate epochs take it


def test_summary_counts_wins():
    runs = [{"seed": i, "student": s, "bo3": b, "one_model": o, "teacher_a": 1.0, "teacher_b": 1.0}
            for i, (s, b, o) in enumerate([(0.1, 0.2, 0.05), (0.1, 0.3, 0.4), (0.5, 0.2, 0.6)])]
    summary = summarize(runs, ["student", "bo3", "one_model"], higher_is_better=False, baselines=["bo3", "one_model"])
    assert summary["student_wins"] == {"bo3": {"wins": 2, "seeds": 3}, "one_model": {"wins": 2, "seeds": 3}}
    assert summary["student"]["median"] == 0.1 and summary["student"]["max"] == 0.5
