"""Typed configs: strict keys and types, version field, JSON/YAML round trips."""

from __future__ import annotations

import pytest

from hf_netmerge import ConfigError, MergeConfig, StageConfig


def test_defaults_are_valid_and_round_trip_json_and_yaml(tmp_path):
    cfg = MergeConfig(gate_epochs=3, finetune_schedule="step", finetune_milestones=[1], mixed_precision="bf16", task="regression")
    assert MergeConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "merge.yaml"
    path.write_text(cfg.to_yaml())
    assert MergeConfig.from_yaml(path) == cfg
    assert '"version": 1' in cfg.to_json()


@pytest.mark.parametrize(
    "data,match",
    [
        ({"gate_epoch": 3}, "unknown key"),
        ({"gate_epochs": "3"}, "expected an integer"),
        ({"gate_epochs": True}, "expected an integer"),
        ({"lr": "fast"}, "expected a number"),
        ({"mixed_precision": "fp8"}, "not one of"),
        ({"task": "segmentation"}, "not one of"),
        ({"finetune_milestones": 5}, "expected a list"),
        ({"finetune_lr": "x"}, "expected a number"),
        ({"version": 2}, "version"),
        ({"batch_size": 0}, "batch_size"),
        ({"gate_epochs": 0}, "gate_epochs"),
        ({"lambda_init": -1.0}, "lambda_init"),
        ({"finetune_schedule": "step", "finetune_milestones": [3, 1]}, "milestones must increase"),
        ({"finetune_milestones": [2]}, "need finetune_schedule: step"),
        ({"lambda_schedule": "cubic"}, "not one of"),
        ({"lambda_final": 0}, "lambda_final"),
        ({"gate_distill_alpha": 1.5}, "gate_distill_alpha"),
        ({"recalibration_samples": 0}, "recalibration_samples"),
    ],
)
def test_bad_values_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        MergeConfig.from_dict(data)


def test_numbers_coerce_and_stages_derive():
    cfg = MergeConfig.from_dict({"lr": 1, "finetune_lr": 0.005, "finetune_epochs": 4, "finetune_schedule": "step", "finetune_milestones": [2]})
    assert isinstance(cfg.lr, float)
    assert cfg.finetune_stage() == StageConfig(epochs=4, lr=0.005, momentum=0.9, milestones=[2])
    assert MergeConfig(finetune_epochs=4).finetune_stage().lr_schedule == "cosine"
    assert cfg.gate_stage().lr == 1.0 and cfg.gate_stage().milestones == []


def test_unreadable_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("gate_epochs: [1, 2\n")
    with pytest.raises(ConfigError):
        MergeConfig.from_yaml(path)
    with pytest.raises(ConfigError):
        MergeConfig.from_yaml(tmp_path / "missing.yaml")
