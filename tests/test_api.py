"""merge_models end to end on tiny data: stages, metrics, timm-layout output, and refusal of bad inputs."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from timm.models._hub import save_for_hf

import hf_netmerge as hm
from hf_netmerge import api

from conftest import image_dataset, make_teacher

FAST = dict(gate_epochs=2, finetune_epochs=1, batch_size=16, lr=0.02, gate_lr=0.2, lambda_init=0.5, lambda_growth=0.5)


@pytest.fixture(scope="module")
def data():
    return image_dataset(64, 4, seed=0), image_dataset(32, 4, seed=1)


@pytest.fixture
def teachers():
    return make_teacher("netmerge_lenet", {"num_classes": 4}, 0), make_teacher("netmerge_lenet", {"num_classes": 4}, 1)


def test_merge_models_runs_every_stage_and_measures(teachers, data):
    a, b = teachers
    before = {k: v.clone() for k, v in a.state_dict().items()}
    result = hm.merge_models(a, b, data[0], data[1], hm.MergeConfig(**FAST), progress=False)
    assert type(result.student) is type(a)
    assert [s.stage for s in result.stages] == ["gates", "finetune"]
    assert result.stages[0].steps == 2 * 4 and result.stages[1].steps == 4
    history = result.stages[0].history
    assert history[1]["lambda"] > history[0]["lambda"] == FAST["lambda_init"]
    assert set(result.metrics) == {
        "teacher_a", "teacher_b", "ensemble", "big_student", "gated_big_student", "student_before_finetune", "student"
    }
    assert result.metrics["big_student"]["loss"] == pytest.approx(result.metrics["ensemble"]["loss"], rel=1e-5)
    assert [s.group for s in result.gate_stats] == ["conv1", "conv2", "fc1", "fc2"]
    for s in result.gate_stats:
        assert s.kept == s.size // 2 == s.kept_from_a + s.kept_from_b
    assert set(result.function_gap) == {"max_abs", "mean_abs"}
    assert result.label_names == ["class_0", "class_1", "class_2", "class_3"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_save_pretrained_loads_back_with_timm(teachers, data, tmp_path):
    result = hm.merge_models(*teachers, data[0], data[1], hm.MergeConfig(**FAST), progress=False)
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
    result = hm.merge_models(tmp_path / "a", tmp_path / "b", data[0], None, hm.MergeConfig(**FAST), progress=False)
    info = result.teachers[0]
    assert info.source == "local-dir" and len(info.sha256) == 64
    assert result.metrics == {}  # no eval data: nothing to measure


def test_pickle_teacher_directory_is_refused(teachers, data, tmp_path):
    save_for_hf(teachers[0], tmp_path / "a", safe_serialization=False)
    with pytest.raises(hm.CheckpointError, match="safetensors"):
        hm.merge_models(tmp_path / "a", teachers[1], data[0], config=hm.MergeConfig(**FAST), progress=False)


def test_bf16_merge_completes(teachers, data):
    result = hm.merge_models(*teachers, data[0], data[1], hm.MergeConfig(**FAST, mixed_precision="bf16"), progress=False)
    assert all(p.dtype == torch.float32 for p in result.student.parameters())
    assert result.metrics["student"]["accuracy"] >= 0


def _nan(model):
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    return model


def _lenets(b_kwargs: dict | None = None, transform_b=lambda m: m):
    def make():
        a = make_teacher("netmerge_lenet", {"num_classes": 4}, 0)
        b = make_teacher("netmerge_lenet", {"num_classes": 4, **(b_kwargs or {})}, 1)
        return a, transform_b(b)

    return make


def _vits():
    return timm.create_model("test_vit", num_classes=4), timm.create_model("test_vit", num_classes=4)


def _arch_pair():
    return make_teacher("netmerge_lenet", {"num_classes": 4}, 0), make_teacher("netmerge_lenet_bn", {"num_classes": 4}, 1)


BAD_INPUTS = {
    "different architecture": (_arch_pair, None, hm.TeacherMismatchError),
    "different num_classes": (_lenets({"num_classes": 5}), None, hm.TeacherMismatchError),
    "shape mismatch": (_lenets({"hidden_sizes": (100, 80)}), None, hm.TeacherMismatchError),
    "dtype mismatch": (_lenets(transform_b=lambda m: m.double()), None, hm.TeacherMismatchError),
    "non-finite weights": (_lenets(transform_b=_nan), None, hm.NonFiniteWeightsError),
    "unsupported model": (_vits, None, hm.UnsupportedModelError),
    "empty dataset": (None, lambda: image_dataset(64, 4).select([]), hm.DatasetError),
    "smaller than one batch": (None, lambda: image_dataset(8, 4), hm.DatasetError),
    "labels out of range": (None, lambda: image_dataset(32, 6), hm.DatasetError),
    "missing column": (None, lambda: image_dataset(32, 4).rename_column("image", "img"), hm.DatasetError),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_are_refused_before_training_and_write_nothing(case, teachers, data, tmp_path, monkeypatch):
    make_teachers, make_data, error = BAD_INPUTS[case]

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(api, "train_stage", no_training)
    a, b = make_teachers() if make_teachers else teachers
    train = make_data() if make_data else data[0]
    out = tmp_path / "out"
    with pytest.raises(error):
        hm.merge_models(a, b, train, config=hm.MergeConfig(**FAST), output_dir=out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_dir_is_refused_before_training(teachers, data, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "train_stage", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(hm.OutputExistsError):
        hm.merge_models(*teachers, data[0], output_dir=tmp_path / "out", config=hm.MergeConfig(**FAST), progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_errors_share_one_base_class():
    for error in (hm.TeacherMismatchError, hm.NonFiniteWeightsError, hm.UnsupportedModelError, hm.DatasetError,
                  hm.ConfigError, hm.CheckpointError, hm.OutputExistsError, hm.NonFiniteLossError):
        assert issubclass(error, hm.NetMergeError)


def test_saved_weights_are_safetensors_only(teachers, data, tmp_path):
    result = hm.merge_models(*teachers, data[0], config=hm.MergeConfig(**FAST), output_dir=tmp_path / "s", progress=False)
    state = safetensors.torch.load_file(str(tmp_path / "s" / "model.safetensors"))
    assert set(state) == set(result.student.state_dict())
    assert not list((tmp_path / "s").glob("*.bin")) and not list((tmp_path / "s").glob("*.pth"))
