"""ResNets, VGGs and discovered timm CNNs: declared == discovered groups, gate layouts, typed refusals, a few-step merge.

The invariants over every architecture are in tests/test_invariants.py."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import hf_netmerge as hm
from hf_netmerge.adapters import declared_spec, resolve_spec
from hf_netmerge.surgery import widen_model
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


class Tiny(nn.Module):
    """conv → ``middle`` → pool → linear: one op or layer under test between a conv and the head."""

    def __init__(self, middle: nn.Module | None = None, gamma: torch.Tensor | None = None, sigmoid: bool = False,
                 permute: tuple[int, ...] | None = None, index: tuple | None = None) -> None:
        super().__init__()
        self.permute = permute
        self.index = index
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU()
        self.middle = middle or nn.Identity()
        if gamma is not None:
            self.gamma = nn.Parameter(gamma)
        self.sigmoid = sigmoid
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.middle.out_channels if isinstance(self.middle, nn.Conv2d) else 8, 2)

    def forward(self, x):
        x = self.middle(self.act(self.conv(x)))
        if self.index is not None:
            x = x[self.index]
        if hasattr(self, "gamma"):
            x = x * self.gamma
        if self.sigmoid:
            x = torch.sigmoid(x)
        if self.permute:
            x = x.permute(*self.permute)
        return self.fc(self.flatten(self.pool(x)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Tiny(permute=(0, 1, 3, 2)), r"op 'permute' in module '<root>' \(Tiny\) reorders dimensions \(0, 1, 3, 2\)"),
        (lambda: Tiny(permute=(0, 2, 3, 1)), r"module 'pool' \(AdaptiveAvgPool2d\) reads a channels-last tensor"),
        (lambda: timm.create_model("nf_resnet26"), r"ScaledStdConv2d"),
        (lambda: Tiny(index=(slice(None), slice(None, None, 2))), r"op '__getitem__' in module '<root>' \(Tiny\) takes every 2th"),
        (lambda: Tiny(index=(slice(None), slice(0, 5))),
         r"op '__getitem__' in module '<root>' \(Tiny\) splits channels at \[5\], which no attribute of the module holds"),
        (lambda: Tiny(gamma=torch.ones(8, 1, 1)),  # a 3-d layer scale held by the root: refused at the op using it
         r"op 'mul' in module '<root>' \(Tiny\) uses a parameter of its module other than as a \(1, C, 1, 1\) per-channel view"),
        (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)),
         r"module '0' is a grouped convolution \(groups=3\) from 3 to 6 channels on the network input"),
        (lambda: Tiny(sigmoid=True), r"module 'fc' reads channels that passed no activation where a gate can sit \(a sigmoid"),
    ],
    ids=["permute", "pool-channels-last", "weight-standardized", "strided-slice", "unheld-slice", "layer-scale-3d", "grouped-widening-input", "sigmoid-read"],
)
def test_unmergeable_models_get_a_typed_error_naming_the_module(make, match):
    model = make()
    with pytest.raises(hm.UnsupportedModelError, match=match):
        resolve_spec(model) if not isinstance(model, Tiny) else resolve_spec_with_example(model)


def resolve_spec_with_example(model):
    from hf_netmerge.adapters.traced import discover_spec

    return discover_spec(model, "tiny", example=torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("scale", ["timm.layers", "fastvit"])
def test_layer_scales_widen_as_per_channel_parameters(scale):
    """A layer scale's ``gamma`` ((C,) viewed as (1, C, 1, 1), or (C, 1, 1) as FastViT's) is concatenated like a norm's
    weight and indexed like one: the big student is the teachers' mean, the student the gated model."""
    from timm.layers import LayerScale2d
    from timm.models import fastvit

    from hf_netmerge.adapters.traced import discover_spec
    from hf_netmerge.surgery import widen_model

    def tiny(seed):
        torch.manual_seed(seed)
        model = Tiny(LayerScale2d(8) if scale == "timm.layers" else fastvit.LayerScale2d(8)).eval()
        nn.init.uniform_(model.middle.gamma, 0.5, 1.5)
        return model

    a, b = tiny(0), tiny(1)
    x = torch.randn(2, 3, 8, 8)
    spec = discover_spec(a, "tiny", example=x)
    assert spec.groups[0].scales == ("middle.gamma",)
    big = widen_model([a, b], spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(big(x), (a(x) + b(x)) / 2)
    assert big.middle.gamma.shape[0] == 16 and torch.equal(big.middle.gamma[8:], b.middle.gamma)


def test_squeeze_excitation_reads_gated_channels():
    """seresnet18's SE pools the block's last norm output, which no activation follows: that norm becomes a gate site
    of the block's stream, so the SE reads the channels as gated as everything else does."""
    spec = resolve_spec(timm.create_model("seresnet18"))
    stream = next(g for g in spec.groups if "layer1.0.se.fc1" in {c.module for c in g.consumers})
    assert {"layer1.0.bn2", "layer1.1.bn2"} <= set(stream.gate_sites) and "layer1.0.se.fc2" in stream.producers
    hidden = next(g for g in spec.groups if g.producers == ("layer1.0.se.fc1",))
    assert hidden.consumers[0].module == "layer1.0.se.fc2"


def test_an_activation_module_used_several_times_gates_each_call_with_its_group():
    """legacy_seresnet18's blocks call one ReLU module three times (inner layer, SE-gated stream, after the add): each
    call is a gate site of its own group (``relu#i``), and the count restarts with every forward pass."""
    from hf_netmerge.gates import ReusedGateSite

    spec = resolve_spec(timm.create_model("legacy_seresnet18"))
    owner = {site: g.name for g in spec.groups for site in g.gate_sites}
    assert {"layer1.0.relu#0", "layer1.0.relu#1"} <= set(owner) and owner["layer1.0.relu#0"] != owner["layer1.0.relu#1"]
    a, b = make_teacher("legacy_seresnet18", {"num_classes": 5}, 0), make_teacher("legacy_seresnet18", {"num_classes": 5}, 1)
    gated = hm.add_gates(hm.concatenate(a, b)).train()
    site = gated.model.get_submodule("layer1.0.relu")
    assert isinstance(site, ReusedGateSite) and sorted(site.calls) == [0, 1, 2]
    assert site.calls[0].gate is gated.gates[owner["layer1.0.relu#0"]]
    gated(torch.randn(2, 3, 32, 32)).sum().backward()
    assert site.made == 0 and all(g.log_alpha.grad is not None for g in gated.gates.values())


def test_a_concatenation_is_read_group_by_group_at_its_offsets():
    """DenseNet: each layer's BatchNorm + ReLU and 1×1 conv read the concatenation of every earlier output, so each of
    those groups lists them with the channel it starts at; the big student lays the concatenation out part by part,
    each part k teachers wide, and its norm holds the teachers' statistics in that order."""
    a, b = make_teacher("densenet121", {"num_classes": 5}, 0), make_teacher("densenet121", {"num_classes": 5}, 1)
    spec = resolve_spec(a)
    norm, conv = "features.denseblock1.denselayer2.norm1", "features.denseblock1.denselayer2.conv1"
    stem, first = (next(g for g in spec.groups if p in g.producers) for p in ("features.conv0", "features.denseblock1.denselayer1.conv2"))
    assert (stem.offsets_of(norm), first.offsets_of(norm)) == ((0,), (64,)) and norm in first.gate_sites
    assert {(c.module, c.offset) for c in first.consumers} >= {(conv, 64)}
    big = hm.concatenate(a, b)
    parts = [a.get_submodule(norm).running_mean[:64], b.get_submodule(norm).running_mean[:64],
             a.get_submodule(norm).running_mean[64:], b.get_submodule(norm).running_mean[64:]]
    torch.testing.assert_close(big.get_submodule(norm).running_mean, torch.cat(parts))


def test_distilled_heads_are_both_averaged_over_the_teachers():
    """repvit_m1 averages a classifier and a distillation head: both become heads of the big student."""
    spec = resolve_spec(timm.create_model("repvit_m1"))
    heads = [name for name, role in spec.layer_roles().items() if not role.outputs]
    assert sorted(heads) == ["head.head.l", "head.head_dist.l"] and spec.output_layer in heads


def test_grouped_convolutions_make_gates_cover_whole_conv_groups():
    """regnetx_002's grouped 3×3 conv (groups of 8 channels) joins its input and output into one group of unit 8;
    the big student has twice the conv groups, and compression keeps whole conv groups."""
    a, b = make_teacher("regnetx_002", {"num_classes": 5}, 0), make_teacher("regnetx_002", {"num_classes": 5}, 1)
    spec = resolve_spec(a)
    group = next(g for g in spec.groups if "s1.b1.conv2.conv" in g.channelwise)
    assert group.unit == a.get_submodule("s1.b1.conv2.conv").in_channels // a.get_submodule("s1.b1.conv2.conv").groups > 1
    gated = hm.add_gates(hm.concatenate(a, b))
    assert gated.gates[group.name].size == 2 * group.size // group.unit
    keep = gated.keep_indices()[group.name]
    assert torch.equal(keep.view(-1, group.unit), keep.view(-1, group.unit)[:, :1] + torch.arange(group.unit))
    student = hm.compress(gated)
    assert student.get_submodule("s1.b1.conv2.conv").groups == a.get_submodule("s1.b1.conv2.conv").groups


@pytest.mark.parametrize("conv_mlp", [True, False], ids=["LayerNorm2d", "channels-last"])
def test_layernorm_over_channels_is_split_in_the_big_student_and_its_gap_reported(conv_mlp):
    """convnext_atto: each teacher's LayerNorm over channels (LayerNorm2d, or with ``conv_mlp=False`` a LayerNorm and
    linear layers on channels-last tensors between two permutes) normalizes its own part of the big student (exact mean
    of the teachers); a student keeping channels of both teachers under one LayerNorm is not exact, and the statistics
    say where; kept from one teacher only, it is exact."""
    from hf_netmerge.models.split_norm import SplitNorm

    kwargs = {"num_classes": 5, "conv_mlp": conv_mlp}
    a, b = make_teacher("convnext_atto", kwargs, 0), make_teacher("convnext_atto", kwargs, 1)
    x = torch.randn(2, 3, 32, 32)
    big = hm.concatenate(a, b).eval()
    assert isinstance(big.stem[1], SplitNorm)
    with torch.no_grad():
        expected = (a(x) + b(x)) / 2
        torch.testing.assert_close(big(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    gated = hm.add_gates(big)
    assert gated.mixed_norm_groups
    with torch.no_grad():
        for name, gate in gated.gates.items():  # teacher A's part of every group open, B's closed
            gate.log_alpha.copy_(torch.where(torch.arange(gate.size) < gate.size // 2, 8.0, -8.0))
        gated.eval()
        student = hm.compress(gated).eval()
        reference = gated(x)
        torch.testing.assert_close(student(x), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
        assert all(s.exact_compression for s in gated.statistics())
        for gate in gated.gates.values():  # alternate channels: both teachers under each LayerNorm
            gate.log_alpha.copy_(torch.where(torch.arange(gate.size) % 2 == 0, 8.0, -8.0))
        mixed = {s.group for s in gated.statistics() if not s.exact_compression}
        assert mixed == gated.mixed_norm_groups
        assert (hm.compress(gated).eval()(x) - gated(x)).abs().max() > 1e-3
    timm.create_model("convnext_atto", **kwargs).load_state_dict(student.state_dict(), strict=True)


def test_channel_mixing_attention_is_refused_when_traced():
    with pytest.raises(hm.UnsupportedModelError, match=r"'layer1.0.se' \(EcaModule\)"):
        resolve_spec(timm.create_model("ecaresnet26t"), discover=True)


@pytest.mark.parametrize("name,kwargs", [("netmerge_resnet20", {"num_classes": 5}), ("netmerge_vgg11_cifar", {"num_classes": 5}),
                                         ("resnetv2_18", {"num_classes": 5})])
def test_merge_models_trains_gates_and_compresses(name, kwargs):
    a, b, kwargs = _teachers(name, kwargs)
    data = image_dataset(32, 5, size=32, seed=0)
    config = hm.MergeConfig(
        gate_epochs=2, finetune_epochs=1, batch_size=16, gate_lr=0.2, lambda_init=1.0, lambda_final=4.0, image_size=32
    )
    result = hm.merge_models(a, b, data, data, config, run=QUIET)
    history = result.stages[0].history
    assert history[-1]["lambda"] > history[0]["lambda"]
    assert any(abs(h - 0.93) > 0.01 for k, h in history[-1].items() if k.startswith("p_open/"))  # gates moved
    fresh = timm.create_model(name, **kwargs)
    fresh.load_state_dict(result.student.state_dict(), strict=True)
    assert len(result.gate_stats) == len(resolve_spec(a).groups)


class SplitByAttribute(nn.Module):
    """conv → split at ``self.half`` → an inner conv on the first half → concatenated again, divided by ``self.scale``."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.conv, self.act, self.half = nn.Conv2d(3, 8, 3), nn.ReLU(), 4
        self.inner, self.inner_act = nn.Conv2d(4, 4, 1), nn.ReLU()
        self.scale = scale
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)

    def forward(self, x):
        left, right = self.act(self.conv(x)).split(self.half, dim=1)
        y = torch.cat([self.inner_act(self.inner(left)), right], 1) / self.scale
        return self.fc(self.flatten(self.pool(y)))


def test_a_width_changing_grouped_convolution_ties_its_output_group_to_its_input_group():
    """Conv 3→8, then a grouped conv 8→16 in 4 conv groups: its output group is tied to its input group (one gate, unit
    2 in, 4 out), the big student has 8 conv groups and is the teachers' mean, and compression keeps the same conv groups
    on both sides: the student equals the gated model and loads strictly."""
    model = lambda: Tiny(nn.Conv2d(8, 16, 3, groups=4, bias=False))  # noqa: E731
    torch.manual_seed(0)
    a = model().eval()
    torch.manual_seed(1)
    b = model().eval()
    spec = resolve_spec_with_example(a)
    (first, second) = spec.groups
    assert (first.unit, second.unit, second.tied, second.channelwise) == (2, 4, first.name, ("middle",))
    x = torch.randn(2, 3, 8, 8)
    big = widen_model([a, b], spec).eval()
    big.netmerge_spec, big.netmerge_teachers = spec, 2
    assert big.middle.groups == 8
    with torch.no_grad():
        torch.testing.assert_close(big(x), (a(x) + b(x)) / 2)
    gated = hm.add_gates(big)
    assert list(gated.gates) == [first.name] and gated.gate_of(second) is gated.gates[first.name]
    with torch.no_grad():
        gated.gates[first.name].log_alpha.copy_(torch.tensor([8.0, -8.0, -8.0, 8.0, 8.0, -8.0, 8.0, -8.0]))
    gated.eval()
    student = hm.compress(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), gated(x))
    model().load_state_dict(student.state_dict(), strict=True)
    assert student.middle.groups == 4


def test_a_split_becomes_two_groups_and_its_size_attribute_doubles_in_the_big_student():
    """The split's halves are two groups written by one conv at offsets 0 and 4; ``half`` holds the size the forward
    splits by, so the big student holds 8 there (each half then gets both teachers' part) and the student 4 again."""
    torch.manual_seed(0)
    a = SplitByAttribute(scale=3)
    torch.manual_seed(1)
    b = SplitByAttribute(scale=3)
    big = hm.concatenate(a, b).eval()
    spec = big.netmerge_spec
    assert [w.path for w in spec.widths] == ["half"] and big.half == 8
    assert sorted(g.offsets_of("conv") for g in spec.groups if "conv" in g.producers) == [(0,), (4,)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(big(x), (a(x) + b(x)) / 2)
    assert hm.compress(hm.add_gates(big)).half == 4


def test_a_big_student_off_the_teachers_mean_is_refused_when_an_attribute_only_matched_by_value():
    """``scale`` holds the split size by coincidence (a divisor): doubled with ``half``, the big student would not be the
    teachers' mean, and concatenate refuses it, naming the attributes."""
    with pytest.raises(hm.UnsupportedModelError, match=r"off the teachers' mean .* attributes \['half', 'scale'\]"):
        hm.concatenate(SplitByAttribute(scale=4), SplitByAttribute(scale=4))


def test_a_small_vit_merges_end_to_end_and_reloads_with_timm(tmp_path):
    """Two small ViTs merged through merge_models: gates per head, MLP neuron and stream channel; whole heads kept; the
    student, saved in timm's layout, reloads with ``timm.create_model("local-dir:...")`` as the same network (its
    ``embed_dim``, depth and ``num_heads`` recorded), and the record flags the stream as inexactly compressed."""
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 5, "embed_dim": 32, "depth": 2, "num_heads": 4}
    a, b, kwargs = _teachers("vit_tiny_patch16_224", kwargs)
    data = image_dataset(32, 5, size=32, seed=0)
    config = hm.MergeConfig(gate_epochs=1, finetune_epochs=1, batch_size=16, image_size=32)
    result = hm.merge_models(a, b, data, data, config, run=QUIET)
    stats = {s.group: s for s in result.gate_stats}
    assert stats["blocks_0_heads"].unit == 8 and stats["blocks_0_heads"].kept == 32
    assert stats["blocks_0_heads"].exact_compression and "stream" in {g for g, s in stats.items() if s.unit == 1}
    out = result.save_pretrained(tmp_path / "student")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert [blk.attn.num_heads for blk in loaded.blocks] == [4, 4] and loaded.embed_dim == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.student.eval()(x))
    record = json.loads((out / "netmerge_config.json").read_text())
    stream = next(g for g in record["gate_stats"] if g["group"] == "stream")
    assert stream["exact_compression"] == (max(stream["kept_per_teacher"]) == 32)


def test_inspect_prints_groups(capsys):
    assert main(["inspect", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: 12 channel groups" in out and "stream0  size 64  [declared]" in out
    assert main(["inspect", "darknet17"]) == 0
    assert "[discovered]" in capsys.readouterr().out
    assert main(["inspect", "regnetx_002"]) == 0
    out = capsys.readouterr().out
    assert "unit 8" in out and "grouped    s1.b1.conv2.conv" in out
    assert main(["inspect", "fasternet_t0"]) == 0
    out = capsys.readouterr().out
    assert "producers  patch_embed.proj @10, stages.0.blocks.0.mlp.3 @10" in out
    assert "width stages.0.blocks.0.spatial_mixing.dim_conv3 = 10" in out
    assert main(["inspect", "skresnet18"]) == 2
    assert "op 'stack'" in capsys.readouterr().err
