"""Teachers in transformers' format: ``AutoModelForImageClassification`` models, ``save_pretrained`` directories and Hub
repos, merged exactly, and the student saved so that transformers loads it strictly and runs it in a pipeline. Tiny
random configs made here: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard

import hf_netmerge as hm
from hf_netmerge.cli import main
from hf_netmerge.data import Preprocessing
from hf_netmerge.formats import create_model, logits, model_args
from hf_netmerge.hub import load_teacher, push_folder

from conftest import QUIET, image_dataset, input_shape, make_teacher

transformers = pytest.importorskip("transformers")

RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic", "num_labels": 4}
# (architecture, config kwargs): the CNN image classifiers of transformers this project merges, tiny.
TINY = [
    ("transformers:resnet", RESNET),
    ("transformers:resnet", {**RESNET, "layer_type": "bottleneck", "hidden_sizes": [16, 32], "num_channels": 1}),
    ("transformers:convnext", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "num_labels": 4}),
    ("transformers:convnextv2", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "num_labels": 4}),
    ("transformers:regnet", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "groups_width": 4, "layer_type": "y",
                             "num_labels": 4}),
    ("transformers:mobilenet_v2", {"depth_multiplier": 0.25, "image_size": 32, "num_labels": 4}),
    ("transformers:efficientnet", {"width_coefficient": 0.1, "depth_coefficient": 0.1, "hidden_dim": 128, "image_size": 32,
                                   "num_labels": 4}),
    ("transformers:vit", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                          "image_size": 32, "patch_size": 8, "num_labels": 4}),  # declared: heads gated on v
]
IDS = ["resnet", "resnet-bottleneck-gray", "convnext", "convnextv2", "regnet", "mobilenet_v2", "efficientnet", "vit"]
# their stream's LayerNorms (and V2's global response norms) make compression inexact (the gap is measured)
LAYER_NORMED = {"transformers:convnext", "transformers:convnextv2", "transformers:vit"}
FAST = hm.MergeConfig(gate_epochs=1, finetune_epochs=1, batch_size=16)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-4, atol=1e-5)


def _save_teacher(model: torch.nn.Module, folder: Path, processor=None) -> str:
    model.save_pretrained(folder)
    (processor or transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name,kwargs", TINY, ids=IDS)
def test_big_student_equals_teacher_mean(name, kwargs):
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    x = torch.randn(input_shape(a, 4))
    with torch.no_grad():
        ya, yb = logits(a(x)), logits(b(x))
        assert (ya - yb).abs().max() > 1e-2 * ya.abs().max()
        big = hm.concatenate(a, b).eval()
        _assert_same(logits(big(x)), (ya + yb) / 2)


@pytest.mark.parametrize("name,kwargs", TINY, ids=IDS)
def test_compressed_student_loads_strictly_into_a_fresh_model_of_the_teachers_class(name, kwargs):
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    gated = hm.add_gates(hm.concatenate(a, b))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in gated.gates.values():  # half of every group exactly open, half exactly closed
            gate.log_alpha.copy_(torch.where(torch.randperm(gate.size, generator=gen) < gate.size // 2, 8.0, -8.0))
    gated.eval()
    x = torch.randn(input_shape(a, 4))
    with torch.no_grad():
        student = hm.compress(gated).eval()
        if name in LAYER_NORMED:
            assert any(not s.exact_compression for s in gated.statistics())
        else:
            _assert_same(logits(student(x)), logits(gated(x)))
        fresh = transformers.AutoModelForImageClassification.from_config(a.config)
        fresh.load_state_dict(student.state_dict(), strict=True)
        torch.testing.assert_close(logits(fresh.eval()(x)), logits(student(x)))
    assert type(student) is type(a)


def test_a_save_pretrained_directory_loads_as_a_transformers_teacher_with_its_image_processor(tmp_path):
    a = make_teacher("transformers:resnet", RESNET, 0)
    model, info = load_teacher(_save_teacher(a, tmp_path / "a"))
    assert type(model) is type(a) and info.architecture == "transformers:resnet" and info.source == "local-dir"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(model.eval()(x)), logits(a(x)))
    assert model.netmerge_image_processor.crop_pct == 0.875


@pytest.mark.parametrize("processor,expected", [
    (dict(kind="ConvNextImageProcessor", size={"shortest_edge": 32}, crop_pct=0.875), ((3, 32, 32), 0.875, "bicubic")),
    (dict(kind="ViTImageProcessor", size={"height": 48, "width": 40}, resample=3), ((3, 48, 40), 1.0, "bicubic")),
    (dict(kind="BitImageProcessor", size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}), ((3, 32, 32), 0.8, "bicubic")),
], ids=["convnext-crop-pct", "vit-exact-size", "bit-center-crop"])
def test_preprocessing_comes_from_the_teachers_image_processor(tmp_path, processor, expected):
    settings = dict(processor)
    cls = getattr(transformers, settings.pop("kind"))
    teacher = _save_teacher(make_teacher("transformers:resnet", RESNET, 0), tmp_path / "a", cls(image_mean=[0.1, 0.2, 0.3], **settings))
    model, _ = load_teacher(teacher)
    prep = Preprocessing.for_model(model)
    assert (prep.input_size, prep.crop_pct, prep.interpolation) == expected and prep.mean == (0.1, 0.2, 0.3)
    assert Preprocessing.for_model(model, image_size=24).input_size == (3, 24, 24)


def test_cli_merge_saves_a_student_that_transformers_loads_strictly_and_runs_in_a_pipeline(tmp_path):
    teachers = [_save_teacher(make_teacher("transformers:resnet", RESNET, i), tmp_path / f"t{i}") for i in range(2)]
    image_dataset(48, 4, size=40).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "student"
    assert main(["merge", *teachers, "--dataset", str(tmp_path / "data"), "--output-dir", str(out), "--set", "gate_epochs=1",
                 "--set", "finetune_epochs=1", "--set", "batch_size=16", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "netmerge_config.json",
                                                     "preprocessor_config.json"]
    student, info = transformers.AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert all(not keys for keys in info.values()), info  # no missing, unexpected or mismatched keys
    ours, _ = load_teacher(str(out))  # our strict loader reads the same tensors transformers did
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(student.eval()(x)), logits(ours.eval()(x)))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "resnet" and config["hidden_sizes"] == RESNET["hidden_sizes"]
    assert student.config.id2label == {i: f"class_{i}" for i in range(4)}
    carried, given = (json.loads((folder / "preprocessor_config.json").read_text()) for folder in (out, tmp_path / "t0"))
    assert carried == given
    predictions = transformers.pipeline("image-classification", model=str(out))(image_dataset(1, 4, size=40, seed=5)[0]["image"])
    assert {p["label"] for p in predictions} <= {f"class_{i}" for i in range(4)}
    record = json.loads((out / "netmerge_config.json").read_text())
    assert record["format"] == "transformers" and record["architecture"] == "transformers:resnet"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "AutoModelForImageClassification.from_pretrained" in card.text


def test_a_merge_of_teachers_without_an_image_processor_writes_one_for_the_preprocessing_it_used(tmp_path):
    a, b = (make_teacher("transformers:resnet", RESNET, i) for i in range(2))
    result = hm.merge_models(a, b, image_dataset(32, 4, size=40), config=FAST, run=QUIET)
    folder = result.save_pretrained(tmp_path / "student")
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(folder)
    setattr(reloaded, "netmerge_image_processor", processor)
    assert Preprocessing.for_model(reloaded) == result.preprocessing


def test_hub_round_trip_of_transformers_teachers_and_student(hub, tmp_path):
    ids = []
    for i in range(2):
        folder = Path(_save_teacher(make_teacher("transformers:resnet", RESNET, i), tmp_path / f"t{i}"))
        push_folder(folder, f"user/hf-resnet-{i}")
        ids.append(f"user/hf-resnet-{i}")
    result = hm.merge_models(*ids, image_dataset(32, 4, size=40), config=FAST, run=QUIET)
    assert [t.source for t in result.teachers] == ["hf-hub", "hf-hub"]
    assert result.student.netmerge_image_processor.crop_pct == 0.875  # fetched beside the weights
    result.push_to_hub("user/hf-resnet-merged")
    loaded = transformers.AutoModelForImageClassification.from_pretrained("user/hf-resnet-merged").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(loaded(x)), logits(result.student.eval()(x)))
    card = ModelCard.load("user/hf-resnet-merged")
    assert card.data.base_model == ids and card.data.base_model_relation == "merge"


def test_compare_saves_its_winner_in_the_teachers_format(tmp_path):
    a, b = (make_teacher("transformers:resnet", RESNET, i) for i in range(2))
    comparison = hm.compare_models(a, b, image_dataset(64, 4, size=40), epochs=2, config=FAST, strategies=["continue"],
                                   output=tmp_path / "winner", progress=False)
    assert {r.strategy for r in comparison.rows} == {"keep", "continue"}
    transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "winner")
    assert json.loads((tmp_path / "winner" / "netmerge_compare.json").read_text())["format"] == "transformers"


def test_a_recipe_architecture_names_a_transformers_model_type():
    model = create_model("transformers:resnet", {**RESNET, "num_labels": 3})
    assert model.config.num_labels == 3 and create_model("transformers:resnet", {"num_classes": 7}).config.num_labels == 7
    again = create_model("transformers:resnet", model_args(model))
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(hm.ConfigError, match="transformers:no_such_type"):
        create_model("transformers:no_such_type", {})


def test_a_vit_laid_out_otherwise_is_left_to_tracing_which_refuses_it():
    """The ViT adapter knows transformers 5.24's layout; a ViT without it (here: no q projection) is traced, and refused
    with a typed error rather than an AttributeError."""
    from hf_netmerge.adapters.vit import transformers_vit_spec

    vit = create_model("transformers:vit", TINY[IDS.index("vit")][1])
    assert transformers_vit_spec(vit) is not None
    del vit.vit.layers[0].attention.q_proj
    assert transformers_vit_spec(vit) is None
    with pytest.raises(hm.UnsupportedModelError, match="^transformers:vit: "):
        hm.concatenate(vit, vit)


def test_refusals_name_the_model_type_and_the_module(tmp_path):
    swin = create_model("transformers:swin", {"embed_dim": 8, "depths": [1], "num_heads": [2], "image_size": 32, "patch_size": 4,
                                              "window_size": 4, "num_labels": 3})
    with pytest.raises(hm.UnsupportedModelError,
                       match=r"^transformers:swin: op 'flatten' in module 'swin.embeddings.patch_embeddings' \(SwinPatchEmbeddings\)"):
        hm.concatenate(swin, swin)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(hm.UnsupportedModelError, match="transformers model type 'bert' has no image classification model"):
        load_teacher(tmp_path / "bert")


def test_a_directory_in_neither_layout_or_with_sharded_weights_is_refused_up_front(tmp_path):
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(hm.CheckpointError, match="neither timm's 'architecture' nor transformers' 'model_type'"):
        load_teacher(tmp_path / "neither")
    sharded = tmp_path / "sharded"
    make_teacher("transformers:resnet", RESNET, 0).save_pretrained(sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(hm.CheckpointError, match="sharded"):
        load_teacher(sharded)


def test_a_model_type_with_several_classifiers_is_built_once_the_config_names_one():
    deit = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "image_size": 32,
            "patch_size": 8}
    with pytest.raises(hm.UnsupportedModelError, match="name one in the config's architectures"):
        create_model("transformers:deit", deit)
    chosen = create_model("transformers:deit", {**deit, "architectures": ["DeiTForImageClassification"]})
    assert type(chosen).__name__ == "DeiTForImageClassification"


def test_a_recipe_trains_and_merges_transformers_teachers_and_exports_them_in_their_format(tmp_path):
    from hf_netmerge.experiments import RecipeConfig, run_recipe

    datasets.DatasetDict({"train": image_dataset(64, 4, size=40), "test": image_dataset(16, 4, size=40, seed=1)}).save_to_disk(
        str(tmp_path / "data"))
    recipe = RecipeConfig.from_dict({
        "name": "tiny-hf-resnet", "architecture": "transformers:resnet", "model_args": {**RESNET, "num_classes": 4},
        "batch_size": 16, "data": {"dataset": str(tmp_path / "data")}, "teacher": {"epochs": 1},
        "merge": {"gate_epochs": 1, "finetune_epochs": 1}, "baselines": [],
    })
    row = run_recipe(recipe, tmp_path / "run", progress=False)["runs"][0]
    assert 0 <= row["student"] <= 1
    student = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "seed0" / "student")
    assert type(student).__name__ == "ResNetForImageClassification" and student.config.num_labels == 4


def test_an_image_classifier_that_does_not_read_pixel_values_or_return_logits_is_refused():
    with pytest.raises(hm.UnsupportedModelError, match="transformers:imagegpt: ImageGPTForImageClassification reads input_ids"):
        create_model("transformers:imagegpt", {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16})
    lcnet = create_model("transformers:pp_lcnet", {})  # its classifier's output holds no logits field
    with pytest.raises(hm.UnsupportedModelError, match="transformers:pp_lcnet: the forward returns BaseModelOutputWithNoAttention"):
        hm.concatenate(lcnet, lcnet)
