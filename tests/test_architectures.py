"""ResNets, VGGs and discovered timm CNNs: declared == discovered groups, gate layouts, typed refusals, a few-step merge.

The invariants over every architecture are in tests/test_invariants.py."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import hf_netmerge as hm
from hf_netmerge.adapters import declared_spec, resolve_spec
from hf_netmerge.cli import main
from hf_netmerge.gates import GateSite

from conftest import CORE, DECLARED, QUIET, arch_ids, image_dataset, make_teacher


def _teachers(name, kwargs):
    return make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1), kwargs


# Discovery traces with the architecture's default input size, so models built for other inputs are left out.
TRACEABLE = [(name, kw) for name, kw in DECLARED + CORE if "in_chans" not in kw] + [("netmerge_mlp_bn", {"num_classes": 3})]


@pytest.mark.parametrize("name,kwargs", TRACEABLE, ids=arch_ids(TRACEABLE))
def test_discovery_finds_exactly_the_declared_groups(name, kwargs):
    model = timm.create_model(name, **kwargs)

    def canonical(spec):
        groups = {
            (g.size, frozenset(g.producers), frozenset(g.norms), frozenset(g.consumers), frozenset(g.gate_sites))
            for g in spec.groups
        }
        return spec.input_layer, spec.output_layer, groups

    declared = declared_spec(model)
    discovered = resolve_spec(model, discover=True)
    assert declared is not None and all(g.source == "discovered" for g in discovered.groups)
    assert canonical(discovered) == canonical(declared)


def test_resnet18_gate_layout_matches_the_paper():
    model = timm.create_model("resnet18")
    spec = resolve_spec(model)
    streams = [g for g in spec.groups if g.name.startswith("stream")]
    inner = [g for g in spec.groups if not g.name.startswith("stream")]
    assert len(streams) == 4 and len(inner) == 8
    assert streams[0].gate_sites == ("act1", "layer1.0.act2", "layer1.1.act2")  # the stem joins the first stream
    assert streams[1].producers == ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2")
    assert "fc" in {c.module for c in streams[3].consumers}
    gated = hm.add_gates(hm.concatenate(timm.create_model("resnet18"), timm.create_model("resnet18")))
    sites = [gated.model.get_submodule(s) for s in streams[1].gate_sites]
    assert all(isinstance(s, GateSite) and s.gate is gated.gates["stream1"] for s in sites)
    assert len(gated.gates) == 12


def test_resnet50_has_a_stem_stream_and_two_inner_groups_per_block():
    spec = resolve_spec(timm.create_model("resnet50"))
    assert sum(g.name.startswith("stream") for g in spec.groups) == 5
    assert sum("inner" in g.name for g in spec.groups) == 32


class LayerScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU()
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.act(self.conv(x)) * self.gamma)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: timm.create_model("convnext_atto"), r"'stem.1' \(LayerNorm2d\)"),
        (lambda: timm.create_model("mobilenetv2_050"), r"'blocks.0.0.conv_dw' is a grouped or depthwise"),
        (lambda: timm.create_model("regnetx_002"), r"grouped or depthwise convolution"),
        (lambda: timm.create_model("nf_resnet26"), r"ScaledStdConv2d"),
        (lambda: timm.create_model("seresnet18"), r"module 'layer1.0.se' \(SEModule\)"),
        (lambda: timm.create_model("densenet121"), r"op 'cat' in module 'features.denseblock1.denselayer1' \(DenseLayer\)"),
        (lambda: LayerScaled(), r"<root LayerScaled>"),
    ],
    ids=["layernorm", "depthwise", "grouped", "weight-standardized", "squeeze-excitation", "concatenation", "layer-scale"],
)
def test_unmergeable_models_get_a_typed_error_naming_the_module(make, match):
    model = make()
    with pytest.raises(hm.UnsupportedModelError, match=match):
        resolve_spec(model) if not isinstance(model, LayerScaled) else resolve_spec_with_example(model)


def resolve_spec_with_example(model):
    from hf_netmerge.adapters.traced import discover_spec

    return discover_spec(model, "layer_scaled", example=torch.randn(2, 3, 8, 8))


def test_channel_mixing_attention_is_refused_when_traced():
    with pytest.raises(hm.UnsupportedModelError, match=r"'layer1.0.se' \(EcaModule\)"):
        resolve_spec(timm.create_model("ecaresnet26t"), discover=True)


@pytest.mark.parametrize("name,kwargs", [("netmerge_resnet20", {"num_classes": 5}), ("netmerge_vgg11_cifar", {"num_classes": 5}),
                                         ("resnetv2_18", {"num_classes": 5})])
def test_merge_models_trains_gates_and_compresses(name, kwargs):
    a, b, kwargs = _teachers(name, kwargs)
    data = image_dataset(32, 5, size=32, seed=0)
    config = hm.MergeConfig(
        gate_epochs=2, finetune_epochs=1, batch_size=16, gate_lr=0.2, lambda_init=1.0, lambda_growth=1.0, image_size=32
    )
    result = hm.merge_models(a, b, data, data, config, run=QUIET)
    history = result.stages[0].history
    assert history[-1]["lambda"] > history[0]["lambda"]
    assert any(abs(h - 0.93) > 0.01 for k, h in history[-1].items() if k.startswith("p_open/"))  # gates moved
    fresh = timm.create_model(name, **kwargs)
    fresh.load_state_dict(result.student.state_dict(), strict=True)
    assert len(result.gate_stats) == len(resolve_spec(a).groups)


def test_inspect_prints_groups(capsys):
    assert main(["inspect", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: 12 channel groups" in out and "stream0  size 64  [declared]" in out
    assert main(["inspect", "darknet17"]) == 0
    assert "[discovered]" in capsys.readouterr().out
    assert main(["inspect", "convnext_atto"]) == 2
    assert "LayerNorm2d" in capsys.readouterr().err
