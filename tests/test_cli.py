"""Command-line habits: thread count, a training subset, progress output that suits a log file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from timm.models._hub import save_for_hf

import hf_netmerge as hm
from hf_netmerge.cli import _merge_config, _recipe, build_parser, main
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader
from hf_netmerge.training import make_accelerator, predict_with_targets, train_stage

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
    predict_with_targets(hm.models.MLP(hidden_sizes=(4,)), make_loader(data, 16, shuffle=False), make_accelerator("no"), progress="student")
    assert re.fullmatch(r"eval student: 64 examples in \d+\.\d s\n", capsys.readouterr().err)


def test_a_log_file_gets_a_line_within_a_long_epoch(capsys, monkeypatch):
    import hf_netmerge.training.runner as runner

    monkeypatch.setattr(runner, "LOG_EVERY_SECONDS", 0)  # every batch is "30 s later"
    data = TensorBatchDataset(torch.randn(64, 1), torch.randn(64, 1))
    train_stage(hm.models.MLP(hidden_sizes=(4,)), make_loader(data, 16, shuffle=True), StageConfig(epochs=1), task="regression",
                accelerator=make_accelerator("no"), name="stage", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:4] == [f"stage: epoch 1/1, batch {i}/4" for i in range(1, 5)] and lines[4].startswith("stage: epoch 1/1, loss")


def test_version_keys_recipes_and_builtin_datasets_are_discoverable(capsys):
    from hf_netmerge.experiments.recipe import available_recipes

    for argv in (["--version"], ["merge", "--list-keys"], ["run", "--list"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hf-netmerge {hm.__version__}\n")
    keys = [line.split()[0] for line in out.splitlines()[1:] if line.split()[0] not in available_recipes()]
    assert {"gate_epochs", "lambda_final", "eval_max_samples", "augment.hflip"} <= set(keys)
    config = hm.MergeConfig.from_dict(json.loads(json.dumps(hm.MergeConfig().to_dict())))
    for key in keys:  # every listed key is one --set takes
        assert _merge_config(build_parser().parse_args(["merge", "a", "b", "--dataset", "sine", "--output-dir", "o", "--set",
                                                        f"{key}={json.dumps(_get(config.to_dict(), key))}"]), "classification")
    assert out.splitlines()[-len(available_recipes()):] == available_recipes()
    help_text = build_parser()._subparsers._group_actions[0].choices["merge"].format_help()
    assert "fashion_mnist" in help_text and "mnist" in help_text and "--list-keys" in help_text


def _get(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values[part]
    return values


def _sine_teachers(tmp_path: Path) -> list[str]:
    for i in range(2):
        save_for_hf(make_teacher("netmerge_sine_mlp", {}, i), tmp_path / f"t{i}", safe_serialization=True)
    return [str(tmp_path / "t0"), str(tmp_path / "t1")]


def test_max_eval_samples_caps_the_evaluation(tmp_path):
    args = ["merge", *_sine_teachers(tmp_path), "--dataset", "sine", "--output-dir", str(tmp_path / "out"), "--max-train-samples",
            "256", "--max-eval-samples", "40", "--set", "gate_epochs=1", "--set", "finetune_epochs=1", "--no-progress"]
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "netmerge_config.json").read_text())["eval_examples"] == 40


INTERRUPTED_MERGE = """
import os, signal, sys
import hf_netmerge.training.runner as runner
from hf_netmerge.cli import main

calls, set_epoch = [0], runner._set_epoch

def interrupting(loader, epoch):
    calls[0] += 1
    if calls[0] == {at}:  # Ctrl-C at the start of this epoch (counted over both stages)
        os.kill(os.getpid(), signal.SIGINT)
    set_epoch(loader, epoch)

runner._set_epoch = interrupting
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("at, stage, epoch", [(2, "gates", 2), (3, "finetune", 1)])
def test_ctrl_c_is_one_line_and_a_rerun_resumes_to_the_uninterrupted_student(tmp_path, at, stage, epoch):
    import subprocess
    import sys

    import safetensors.torch

    common = [*_sine_teachers(tmp_path), "--dataset", "sine", "--max-train-samples", "256", "--set", "gate_epochs=2",
              "--set", "finetune_epochs=2", "--no-progress"]
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    argv = ["merge", *common, "--output-dir", str(out), "--checkpoint-dir", str(checkpoints)]
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_MERGE.format(at=at, argv=argv)], capture_output=True, text=True)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    kept = (f"the checkpoint {checkpoints / 'gates' / 'epoch-00001'} is kept" if stage == "gates"
            else f"the checkpoints of the finished stages in {checkpoints} are kept")
    assert done.stderr.splitlines()[-1] == (
        f"hf-netmerge: interrupted: merge, stage {stage!r} in epoch {epoch} of 2; {kept}: rerun the same command to resume; "
        f"nothing was written to {out}")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "t0", "t1"]
    other = ["merge", *common, "--set", "lr=0.5", "--output-dir", str(out), "--checkpoint-dir", str(checkpoints)]
    assert main(other) == 2 and not out.exists()  # another configuration: refused, nothing trained
    assert main(argv) == 0  # the same command resumes
    assert main(["merge", *common, "--output-dir", str(tmp_path / "reference")]) == 0  # one run, never interrupted
    resumed = safetensors.torch.load_file(str(out / "model.safetensors"))
    reference = safetensors.torch.load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_ctrl_c_without_checkpoints_says_how_to_make_a_merge_resumable(tmp_path):
    import subprocess
    import sys

    argv = ["merge", *_sine_teachers(tmp_path), "--dataset", "sine", "--max-train-samples", "256", "--set", "gate_epochs=2",
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_MERGE.format(at=2, argv=argv)], capture_output=True, text=True)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "hf-netmerge: interrupted: merge, stage 'gates' in epoch 2 of 2; no checkpoint (pass --checkpoint-dir to make a merge "
        f"resumable); nothing was written to {tmp_path / 'out'}")
