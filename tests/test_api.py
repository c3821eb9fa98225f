"""merge_models end to end on tiny data: stages, metrics, timm-layout output (refusals: tests/test_reliability.py)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from timm.models._hub import save_for_hf

import hf_netmerge as hm

from conftest import QUIET, image_dataset, make_teacher, record_output_dtypes

FAST = dict(gate_epochs=2, finetune_epochs=1, batch_size=16, lr=0.02, gate_lr=0.2, lambda_init=0.5, lambda_final=4.0)


@pytest.fixture(scope="module")
def data():
    return image_dataset(64, 4, seed=0), image_dataset(32, 4, seed=1)


@pytest.fixture
def teachers():
    return make_teacher("netmerge_lenet", {"num_classes": 4}, 0), make_teacher("netmerge_lenet", {"num_classes": 4}, 1)


def test_merge_models_runs_every_stage_and_measures(teachers, data):
    a, b = teachers
    before = {k: v.clone() for k, v in a.state_dict().items()}
    result = hm.merge_models(a, b, data[0], data[1], hm.MergeConfig(**FAST), run=QUIET)
    assert type(result.student) is type(a)
    assert [s.stage for s in result.stages] == ["gates", "finetune"]
    assert result.stages[0].steps == 2 * 4 and result.stages[1].steps == 4
    history = result.stages[0].history
    # λ moves per step, quadratically, to lambda_final at the end of the stage (4 steps per epoch: the last step is at 7/8)
    quadratic = lambda t: (0.5**0.5 + (4.0**0.5 - 0.5**0.5) * t) ** 2  # noqa: E731
    assert [h["lambda"] for h in history] == pytest.approx([quadratic(3 / 8), quadratic(7 / 8)])
    assert result.final_lambda == history[-1]["lambda"]
    assert set(result.metrics) == {
        "teacher_a", "teacher_b", "ensemble", "big_student", "gated_big_student", "student_before_finetune", "student_recalibrated",
        "student",
    }
    assert result.metrics["big_student"]["loss"] == pytest.approx(result.metrics["ensemble"]["loss"], rel=1e-5)
    assert [s.group for s in result.gate_stats] == ["conv1", "conv2", "fc1", "fc2"]
    for s in result.gate_stats:
        assert s.kept == s.size // 2 == s.kept_from_a + s.kept_from_b
    assert set(result.function_gap) == {"max_abs", "mean_abs"}
    assert result.label_names == ["class_0", "class_1", "class_2", "class_3"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_three_teachers_merge_into_one_student_whose_card_lists_them_all(teachers, data, tmp_path):
    """k = 3 through merge_models: a three-wide big student (the mean of three), gates keeping a third of every group,
    metrics for every teacher, and a record and card naming all three."""
    third = make_teacher("netmerge_lenet", {"num_classes": 4}, 2)
    result = hm.merge_models(*teachers, data[0], data[1], hm.MergeConfig(**FAST), more_teachers=[third], run=QUIET)
    assert {"teacher_a", "teacher_b", "teacher_c"} <= set(result.metrics)
    assert result.metrics["big_student"]["loss"] == pytest.approx(result.metrics["ensemble"]["loss"], rel=1e-5)
    for s in result.gate_stats:
        assert s.size == 3 * s.kept and len(s.kept_per_teacher) == 3 and sum(s.kept_per_teacher) == s.kept
    timm.create_model("netmerge_lenet", num_classes=4).load_state_dict(result.student.state_dict(), strict=True)
    out = result.save_pretrained(tmp_path / "student")
    record = json.loads((out / "netmerge_config.json").read_text())
    assert len(record["teachers"]) == 3 and all(len(g["kept_per_teacher"]) == 3 for g in record["gate_stats"])
    card = ModelCard.load(out / "README.md").text
    assert "merging 3 teachers" in card and "1/3 of every channel group" in card and "- Teacher C:" in card
    assert "| from A | from B | from C |" in card


def test_save_pretrained_loads_back_with_timm(teachers, data, tmp_path):
    result = hm.merge_models(*teachers, data[0], data[1], hm.MergeConfig(**FAST), run=QUIET)
    out = result.save_pretrained(tmp_path / "student")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "netmerge_config.json"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(loaded(x), result.student.eval()(x))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "netmerge_lenet" and config["num_classes"] == 4
    assert "num_classes" not in config.get("model_args", {})
    assert config["label_names"] == result.label_names
    record = json.loads((out / "netmerge_config.json").read_text())
    assert record["merge_config"] == hm.MergeConfig(**FAST).to_dict()
    assert [g["group"] for g in record["gate_stats"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert record["environment"]["torch"] == torch.__version__
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and "hf_netmerge" in card.data.tags and "model-merging" in card.data.tags
    assert "| conv2 | 32 | 16 |" in card.text and "student_before_finetune" in card.text
    assert ModelCard(card.content).content == card.content
    with pytest.raises(hm.OutputExistsError):
        result.save_pretrained(out)
    result.save_pretrained(out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_teachers_from_local_dirs_record_their_weights(teachers, data, tmp_path):
    for name, model in zip("ab", teachers):
        save_for_hf(model, tmp_path / name, safe_serialization=True)
    result = hm.merge_models(tmp_path / "a", tmp_path / "b", data[0], None, hm.MergeConfig(**FAST), run=QUIET)
    info = result.teachers[0]
    assert info.source == "local-dir" and len(info.sha256) == 64
    assert result.metrics == {}  # no eval data: nothing to measure


def test_pickle_teacher_directory_is_refused(teachers, data, tmp_path):
    save_for_hf(teachers[0], tmp_path / "a", safe_serialization=False)
    with pytest.raises(hm.CheckpointError, match="safetensors"):
        hm.merge_models(tmp_path / "a", teachers[1], data[0], config=hm.MergeConfig(**FAST), run=QUIET)


def test_bf16_merge_trains_in_bf16_and_keeps_fp32_weights(teachers, data, monkeypatch):
    dtypes = record_output_dtypes(monkeypatch, torch.nn.Conv2d)
    result = hm.merge_models(*teachers, data[0], data[1], hm.MergeConfig(**FAST, mixed_precision="bf16"), run=QUIET)
    assert torch.bfloat16 in dtypes  # autocast was on: the convs computed in bf16
    assert all(p.dtype == torch.float32 for p in result.student.parameters())
    assert 0 <= result.metrics["student"]["accuracy"] <= 1 and result.metrics["student"]["loss"] > 0


def test_errors_share_one_base_class():
    for error in (hm.TeacherMismatchError, hm.NonFiniteWeightsError, hm.UnsupportedModelError, hm.DatasetError,
                  hm.ConfigError, hm.CheckpointError, hm.OutputExistsError, hm.NonFiniteLossError):
        assert issubclass(error, hm.NetMergeError)


def test_saved_weights_are_safetensors_only(teachers, data, tmp_path):
    result = hm.merge_models(*teachers, data[0], config=hm.MergeConfig(**FAST), output=tmp_path / "s", run=QUIET)
    state = safetensors.torch.load_file(str(tmp_path / "s" / "model.safetensors"))
    assert set(state) == set(result.student.state_dict())
    assert not list((tmp_path / "s").glob("*.bin")) and not list((tmp_path / "s").glob("*.pth"))


@pytest.mark.parametrize("name,kwargs,shape", [("netmerge_lenet", {"num_classes": 4, "in_chans": 1}, (2, 1, 28, 28)),
                                               ("netmerge_lenet_bn", {"num_classes": 7, "in_chans": 1, "img_size": 32}, (2, 1, 32, 32)),
                                               ("resnet18", {"num_classes": 5, "in_chans": 1}, (2, 1, 32, 32))],
                         ids=["lenet", "lenet_bn_32px", "resnet18"])
def test_saved_networks_reload_with_their_input_channels_and_size(tmp_path, name, kwargs, shape):
    """timm before 1.0.31 left in_chans and img_size out of config.json (a 1-channel model came back with 3)."""
    from hf_netmerge.formats import save_network

    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    save_network(model, tmp_path / "saved")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True).eval()
    x = torch.randn(shape)
    torch.testing.assert_close(loaded(x), model(x))


def test_every_network_is_evaluated_once_on_at_most_eval_max_samples(teachers, data, monkeypatch):
    """Each teacher runs over the evaluation examples once (the ensemble is scored from their outputs, not a second
    pass), on the first ``eval_max_samples`` only, and the numbers are evaluate()'s on those examples."""
    from hf_netmerge.data import make_loader, prepare_dataset
    from hf_netmerge.training import MeanEnsemble, evaluate, make_accelerator

    a, b = teachers
    seen = {"eval": 0}
    original = type(a).forward

    def counting(self, x):
        if self is a and not self.training:
            seen["eval"] += len(x)
        return original(self, x)

    monkeypatch.setattr(type(a), "forward", counting)
    config = hm.MergeConfig(**{**FAST, "distill_alpha": 0.0}, gate_head_start=0.0, eval_max_samples=12)  # no ranking pass on training examples
    result = hm.merge_models(a, b, data[0], data[1], config, run=QUIET)
    assert seen["eval"] == 2 + 12  # the data check's two examples, then one pass over the 12
    assert result.record()["eval_examples"] == 12 and "On 12 evaluation examples." in result.model_card()
    first = prepare_dataset(data[1].select(range(12)), model=a, task="classification", num_classes=4, image_column="image",
                            label_column="label", image_size=None, min_size=1, label="eval")
    expected = evaluate(MeanEnsemble(a, b), make_loader(first, 4 * 16, shuffle=False), task="classification",
                        accelerator=make_accelerator("no"))
    assert result.metrics["ensemble"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("license_id", [None, "mit"])
def test_config_record_and_card_agree_on_license_datasets_preprocessing_and_augmentation(tmp_path, license_id):
    """timm's test_resnet inherits ``license: apache-2.0`` and a tag from timm's weights: the student's config.json
    keeps neither, and says what the record and card say; at 32 px the card lists only the pad-crop and flip that ran."""
    a, b = make_teacher("test_resnet", {"num_classes": 4}, 0), make_teacher("test_resnet", {"num_classes": 4}, 1)
    assert a.pretrained_cfg["license"] == "apache-2.0"
    out = tmp_path / "student"
    hm.merge_models(a, b, image_dataset(32, 4), image_dataset(8, 4, seed=1), hm.MergeConfig(**FAST, image_size=32),
                    output=hm.OutputOptions(out, license=license_id, datasets=["org/images"]), run=QUIET)
    config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    record = json.loads((out / "netmerge_config.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert config.get("license") == record["license"] == card.data.license == license_id
    assert record["datasets"] == card.data.datasets == ["org/images"]
    assert {k: config[k] for k in record["preprocessing"]} == record["preprocessing"]
    assert record["preprocessing"]["input_size"] == [3, 32, 32] and "tag" not in config and "test_input_size" not in config
    assert record["augmentation"] == {"transform": "pad-crop", "pad": 4, "hflip": 0.5}
    line = card.text.split("Training stages read augmented inputs: ")[1].splitlines()[0]
    assert "pad 4" in line and "hflip 0.5" in line and "scale" not in line and "color_jitter" not in line


def test_saved_folders_take_the_umask(tmp_path):
    import os

    from hf_netmerge.formats import save_network
    from hf_netmerge.training.checkpoint import StageCheckpoint

    teacher = make_teacher("netmerge_lenet", {"num_classes": 4}, 0)
    for umask, mode in ((0o022, 0o755), (0o077, 0o700)):
        old = os.umask(umask)
        try:
            save_network(teacher, tmp_path / f"s{umask:o}")
            StageCheckpoint(tmp_path / f"c{umask:o}").save(1, {"x": torch.zeros(1)})
        finally:
            os.umask(old)
        assert (tmp_path / f"s{umask:o}").stat().st_mode & 0o777 == mode
        assert (tmp_path / f"c{umask:o}" / "epoch-00001").stat().st_mode & 0o777 == mode


def test_teachers_with_more_classes_than_the_data_reaches_are_a_warning(data, caplog, tmp_path):
    import logging

    from hf_netmerge.data import Preprocessing
    from hf_netmerge.formats import save_network

    a, b = make_teacher("netmerge_lenet", {"num_classes": 10}, 0), make_teacher("netmerge_lenet", {"num_classes": 10}, 1)
    with caplog.at_level(logging.WARNING):
        hm.merge_models(a, b, data[0], config=hm.MergeConfig(**{**FAST, "gate_epochs": 1, "finetune_epochs": 0}), run=QUIET)
    assert "the teachers predict 10 classes but the training labels reach only 4" in caplog.text
    caplog.clear()
    gray = timm.create_model("resnet10t", num_classes=4, in_chans=1)
    with caplog.at_level(logging.WARNING):  # timm's averaged-RGB notice: the preprocessing averages them itself
        assert len(Preprocessing.for_model(gray).mean) == 1
        save_network(gray, tmp_path / "gray", preprocessing=Preprocessing.for_model(gray))
    assert "does not match" not in caplog.text


def test_evaluating_never_changes_what_trains(teachers, data):
    """A pass over a DataLoader draws its base seed from the global RNG; evaluation restores it, so the student is the
    same with or without evaluation data (and whatever number of networks is evaluated)."""
    config = hm.MergeConfig(**FAST)
    with_eval = hm.merge_models(*teachers, data[0], data[1], config, run=QUIET).student.state_dict()
    without = hm.merge_models(*teachers, data[0], None, config, run=QUIET).student.state_dict()
    assert all(torch.equal(with_eval[k], without[k]) for k in without)
