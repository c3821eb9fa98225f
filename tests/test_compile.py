"""Speed options of the runner: torch.compile (one graph, same training as eager) and the channels_last format."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.models._hub import save_for_hf

import hf_netmerge as hm
from hf_netmerge.cli import build_parser, main
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader
from hf_netmerge.experiments import load_recipe
from hf_netmerge.training import make_accelerator, train_stage

from conftest import input_shape, make_teacher


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _sine_data(n: int) -> TensorBatchDataset:
    x = torch.linspace(-3, 3, n).unsqueeze(1)
    return TensorBatchDataset(x, torch.sin(x).squeeze(1))


def _stage(model: torch.nn.Module, data: TensorBatchDataset, **speed) -> hm.training.StageReport:
    return train_stage(model, make_loader(data, 64, shuffle=True, seed=3), StageConfig(epochs=2, lr=0.05), task="regression",
                       accelerator=make_accelerator("no"), name="stage", progress=False, **speed)


def test_a_compiled_stage_trains_like_eager_and_reports_its_compile_time_apart():
    torch._dynamo.reset()
    data = _sine_data(256)  # whole batches: compiled and eager see the same ones
    eager, compiled = timm.create_model("netmerge_sine_mlp"), timm.create_model("netmerge_sine_mlp")
    compiled.load_state_dict(eager.state_dict())
    eager_report = _stage(eager, data)
    compiled_report = _stage(compiled, data, compile_mode="default")
    assert eager_report.compile_seconds == 0 and compiled_report.compile_seconds > 0
    assert compiled_report.samples == eager_report.samples == 512
    torch.testing.assert_close(_flat(compiled), _flat(eager), rtol=1e-4, atol=1e-5)
    losses = [[h["loss"] for h in r.history] for r in (compiled_report, eager_report)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert not any(hasattr(m, "_orig_mod") for m in compiled.modules())  # the caller's model is not the compiled wrapper


def test_a_compiled_stage_skips_the_last_incomplete_batch_of_each_epoch():
    torch._dynamo.reset()
    report = _stage(timm.create_model("netmerge_sine_mlp"), _sine_data(300), compile_mode="default")
    assert report.samples == 2 * 256 and report.steps == 2 * 4


@pytest.mark.parametrize("name,kwargs", [("netmerge_lenet_bn", {"num_classes": 4}), ("netmerge_resnet20", {"num_classes": 5}),
                                         ("resnet18", {"num_classes": 5})], ids=["lenet_bn", "resnet20", "resnet18"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_gated_big_student_compiles_to_one_graph(name, kwargs, precision):
    torch._dynamo.reset()
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    gated = hm.add_gates(hm.concatenate(a, b)).train()
    prepared = make_accelerator(precision).prepare(gated)  # under bf16, Accelerate's autocast wrapper is traced too
    x = torch.randn(4, 3, *getattr(a, "img_size", (32, 32)))
    explanation = torch._dynamo.explain(prepared)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [r.reason for r in explanation.break_reasons]
    assert all(gate._sample is None for gate in gated.gates.values())  # nothing of the traced pass is left behind


def test_a_compiled_gated_pass_samples_the_eager_pass_s_gates_and_both_keep_one_pass_count():
    """The traced noise, sample and gated ReLU are the eager fast paths' formulas: equal passes, equal gates."""
    torch._dynamo.reset()
    a, b = make_teacher("netmerge_mlp_bn", {}, 0), make_teacher("netmerge_mlp_bn", {}, 1)
    gated = hm.add_gates(hm.concatenate(a, b)).train()
    x = torch.randn(input_shape(a, 64))
    compiled = torch.compile(gated, dynamic=False)
    traced = [compiled(x) for _ in range(2)]  # passes 0 and 1
    gated.noise.passes.zero_()
    eager = [gated(x) for _ in range(3)]  # passes 0, 1 and 2, from one block
    for t, e in zip(traced, eager):
        torch.testing.assert_close(t, e, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eager[0], eager[1])  # a new pass, new gates
    gated.noise.passes.fill_(2)
    torch.testing.assert_close(compiled(x), eager[2], rtol=1e-4, atol=1e-5)
    assert int(gated.noise.passes) == 3


def test_channels_last_trains_like_the_default_format_and_hands_the_model_back_contiguous(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = TensorBatchDataset(torch.randn(128, 3, 28, 28, generator=gen), torch.randint(0, 4, (128,), generator=gen))
    plain, fast = make_teacher("netmerge_lenet_bn", {"num_classes": 4}, 0), make_teacher("netmerge_lenet_bn", {"num_classes": 4}, 0)
    formats = []
    fast.conv2.register_forward_hook(lambda m, i, o: formats.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    for model, channels_last in ((plain, False), (fast, True)):
        train_stage(model, make_loader(data, 32, shuffle=True, seed=1), StageConfig(epochs=2, lr=0.05), task="classification",
                    accelerator=make_accelerator("no"), name="stage", channels_last=channels_last, progress=False)
    torch.testing.assert_close(_flat(fast), _flat(plain), rtol=1e-4, atol=1e-5)
    assert formats and all(formats)  # the convs saw channels_last activations
    assert all(t.is_contiguous() for t in fast.state_dict().values())
    safetensors.torch.save_file(fast.state_dict(), tmp_path / "fast.safetensors")  # refuses non-contiguous tensors


def test_the_cli_passes_compile_and_channels_last_to_merges_and_recipes():
    from hf_netmerge.cli import _merge_config, _recipe

    parser = build_parser()
    merge = ["merge", "a", "b", "--dataset", "sine", "--output-dir", "out"]
    assert _merge_config(parser.parse_args(merge), "regression").compile == "no"
    config = _merge_config(parser.parse_args([*merge, "--compile", "--channels-last"]), "regression")
    assert (config.compile, config.channels_last) == ("default", True)
    assert _merge_config(parser.parse_args([*merge, "--compile", "max-autotune", "--set", "compile=no"]), "regression").compile == "no"
    recipe = _recipe(parser.parse_args(["run", "sine", "--compile", "reduce-overhead", "--channels-last"]))
    assert (recipe.compile, recipe.channels_last) == ("reduce-overhead", True)
    assert recipe.merge_config(0).compile == "reduce-overhead"
    assert load_recipe("sine").compile == "no"
    with pytest.raises(SystemExit):
        parser.parse_args([*merge, "--compile", "fastest"])
    with pytest.raises(hm.ConfigError, match="not one of"):
        load_recipe("sine", ["compile=fastest"])


def test_a_compiled_merge_from_the_cli_records_its_compile_time(tmp_path):
    torch._dynamo.reset()
    for i in range(2):
        save_for_hf(make_teacher("netmerge_sine_mlp", {}, i), tmp_path / f"t{i}", safe_serialization=True)
    args = ["merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "--dataset", "sine", "--output-dir", str(tmp_path / "out"), "--compile",
            "--set", "gate_epochs=1", "--set", "finetune_epochs=1", "--set", "batch_size=256", "--no-progress"]
    assert main(args) == 0
    record = json.loads((tmp_path / "out" / "netmerge_config.json").read_text())
    assert record["merge_config"]["compile"] == "default"
    assert [s["compile_seconds"] > 0 for s in record["stages"]] == [True, True]
    assert all(s["samples"] % 256 == 0 for s in record["stages"])  # only whole batches
