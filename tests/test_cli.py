"""Command-line habits: thread count, a training subset, progress output that suits a log file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.models._hub import save_for_hf

import hf_netmerge as hm
from hf_netmerge.cli import _recipe, build_parser, main
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader
from hf_netmerge.training import make_accelerator, train_stage

from conftest import make_teacher


def test_merge_takes_threads_and_the_first_n_training_examples(tmp_path, monkeypatch):
    for i in range(2):
        save_for_hf(make_teacher("netmerge_sine_mlp", {}, i), tmp_path / f"t{i}", safe_serialization=True)
    args = ["merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "--dataset", "sine", "--output-dir", str(tmp_path / "out"),
            "--threads", "2", "--max-train-samples", "300", "--set", "gate_epochs=1", "--set", "finetune_epochs=1", "--no-progress"]
    calls: list[int] = []  # recorded, not applied: a pool of 2 threads here would hang the forked workers of later tests
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(args) == 0
    assert calls == [2]
    record = json.loads((tmp_path / "out" / "netmerge_config.json").read_text())
    assert [stage["samples"] for stage in record["stages"]] == [300, 300]  # one epoch each over the first 300 examples


def test_merge_takes_any_number_of_teachers_but_at_least_two(tmp_path):
    for i in range(3):
        save_for_hf(make_teacher("netmerge_sine_mlp", {}, i), tmp_path / f"t{i}", safe_serialization=True)
    teachers = [str(tmp_path / f"t{i}") for i in range(3)]
    common = ["--dataset", "sine", "--max-train-samples", "256", "--set", "gate_epochs=1", "--set", "finetune_epochs=1", "--no-progress"]
    assert main(["merge", *teachers, "--output-dir", str(tmp_path / "out"), *common]) == 0
    record = json.loads((tmp_path / "out" / "netmerge_config.json").read_text())
    assert [t["reference"] for t in record["teachers"]] == teachers
    assert main(["merge", teachers[0], "--output-dir", str(tmp_path / "one"), *common]) == 2
    assert not (tmp_path / "one").exists()


def test_merge_logs_every_stage_to_tensorboard_beside_the_output(tmp_path):
    for i in range(2):
        save_for_hf(make_teacher("netmerge_sine_mlp", {}, i), tmp_path / f"t{i}", safe_serialization=True)
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "--dataset", "sine", "--output-dir", str(out), "--log-with",
                 "tensorboard", "--max-train-samples", "256", "--set", "gate_epochs=2", "--set", "finetune_epochs=1", "--no-progress"]) == 0
    events = b"".join(p.read_bytes() for p in Path(f"{out}.logs").rglob("events.out.tfevents*"))
    assert b"gates/loss" in events and b"gates/lambda" in events and b"finetune/loss" in events
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "netmerge_config.json"]


def test_run_takes_threads_and_bad_counts_are_refused():
    parser = build_parser()
    assert _recipe(parser.parse_args(["run", "sine", "--threads", "3"])).threads == 3
    assert _recipe(parser.parse_args(["run", "sine", "threads=2", "--threads", "3"])).threads == 2  # overrides win over flags
    for bad in (["run", "sine", "--threads", "0"], ["merge", "a", "b", "--dataset", "sine", "--output-dir", "o", "--max-train-samples", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_log_file_gets_plain_lines_instead_of_bars(capsys):
    data = TensorBatchDataset(torch.randn(64, 1), torch.randn(64, 1))
    train_stage(hm.models.MLP(hidden_sizes=(4,)), make_loader(data, 16, shuffle=True), StageConfig(epochs=2), task="regression",
                accelerator=make_accelerator("no"), name="stage", progress=True)
    err = capsys.readouterr().err  # stderr is captured, not a terminal
    assert "\r" not in err and [line.split(",")[0] for line in err.splitlines()] == ["stage: epoch 1/2", "stage: epoch 2/2"]
    train_stage(hm.models.MLP(hidden_sizes=(4,)), make_loader(data, 16, shuffle=True), StageConfig(epochs=25), task="regression",
                accelerator=make_accelerator("no"), name="long", progress=True)
    assert len(capsys.readouterr().err.splitlines()) == 9  # every third epoch and the last: about ten lines a stage
    train_stage(hm.models.MLP(hidden_sizes=(4,)), make_loader(data, 16, shuffle=True), StageConfig(epochs=2), task="regression",
                accelerator=make_accelerator("no"), name="quiet", progress=False)
    assert capsys.readouterr().err == ""
