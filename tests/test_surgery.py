"""Surgery details: BN statistics and zero cross terms, top-half selection, flatten blocks, statistics, spec checks.

The invariants over every architecture are in tests/test_invariants.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_netmerge as hm
from hf_netmerge.adapters import resolve_spec
from hf_netmerge.adapters.traced import discover_spec
from hf_netmerge.models.split_norm import SplitNorm
from hf_netmerge.spec import ChannelGroup, Consumer, MergeSpec, validate_spec
from hf_netmerge.surgery import expand_index, widen_model

from conftest import make_teacher


def test_concatenate_keeps_bn_running_stats_and_zero_cross_terms():
    a, b = make_teacher("netmerge_lenet_bn", {}, 0), make_teacher("netmerge_lenet_bn", {}, 1)
    big = hm.concatenate(a, b)
    torch.testing.assert_close(big.bn2.running_mean, torch.cat([a.bn2.running_mean, b.bn2.running_mean]))
    torch.testing.assert_close(big.bn2.running_var, torch.cat([a.bn2.running_var, b.bn2.running_var]))
    w = big.conv2.weight
    assert torch.count_nonzero(w[:16, 6:]) == 0 and torch.count_nonzero(w[16:, :6]) == 0
    torch.testing.assert_close(big.conv1.weight, torch.cat([a.conv1.weight, b.conv1.weight]))  # shared input
    torch.testing.assert_close(big.head.weight, torch.cat([a.head.weight, b.head.weight], 1) / 2)
    # fc1 reads a flatten: A's 16×5×5 features first, then B's.
    torch.testing.assert_close(big.fc1.weight[:120, :400], a.fc1.weight)
    assert torch.count_nonzero(big.fc1.weight[:120, 400:]) == 0


def test_concatenate_leaves_teachers_untouched():
    a, b = make_teacher("netmerge_lenet", {}, 0), make_teacher("netmerge_lenet", {}, 1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    hm.concatenate(a, b)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_compress_keeps_top_half_with_stable_ties_in_original_order():
    a, b = make_teacher("netmerge_sine_mlp", {}, 0), make_teacher("netmerge_sine_mlp", {}, 1)
    gated = hm.add_gates(hm.concatenate(a, b))
    gate = gated.gates["hidden0"]
    with torch.no_grad():
        gate.log_alpha.fill_(0.0)
        gate.log_alpha[[150, 7, 120]] = 5.0
    keep = gated.keep_indices()["hidden0"]
    # three clear winners, then ties broken by the lowest index; returned in original order
    expected = sorted([7, 120, 150] + [i for i in range(200) if i not in (7, 120, 150)][:97])
    assert keep.tolist() == expected
    student = hm.compress(gated)
    big = gated.model
    torch.testing.assert_close(student.blocks[0].fc.weight, big.blocks[0].fc.weight[keep])
    torch.testing.assert_close(student.head.weight, big.head.weight[:, keep])
    torch.testing.assert_close(student.head.bias, big.head.bias)


def test_compress_selects_flattened_feature_blocks():
    assert expand_index(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_gate_statistics_count_channels_per_teacher():
    a, b = make_teacher("netmerge_lenet", {}, 0), make_teacher("netmerge_lenet", {}, 1)
    gated = hm.add_gates(hm.concatenate(a, b))
    with torch.no_grad():
        for gate in gated.gates.values():
            gate.log_alpha.copy_(torch.linspace(1, -1, gate.size))  # teacher A's channels rank first
    stats = {s.group: s for s in gated.statistics()}
    assert stats["conv2"].kept == 16 and stats["conv2"].kept_from_a == 16 and stats["conv2"].kept_from_b == 0
    assert stats["fc1"].size == 240


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.extra = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.extra(self.act(self.fc(x))))


def _spec(**override) -> MergeSpec:
    group = ChannelGroup("h", 8, ("fc",), (Consumer("head"),), ("act",))
    return MergeSpec("unknown", "fc", "head", (override.get("group", group),))


def test_spec_validation_names_the_uncovered_module():
    with pytest.raises(hm.UnsupportedModelError, match="'extra'"):
        validate_spec(Unknown(), _spec())


def test_spec_validation_refuses_wrong_sizes_and_missing_modules():
    model = Unknown()
    del model.extra
    model.forward = lambda x: model.head(model.act(model.fc(x)))
    validate_spec(model, _spec())
    with pytest.raises(hm.UnsupportedModelError, match="give 6, or leave gaps"):
        validate_spec(model, _spec(group=ChannelGroup("h", 6, ("fc",), (Consumer("head"),), ("act",))))
    with pytest.raises(hm.UnsupportedModelError, match="missing module 'nope'"):
        validate_spec(model, _spec(group=ChannelGroup("h", 8, ("fc",), (Consumer("nope"),), ("act",))))


def test_a_layer_norm_over_flat_features_normalizes_each_teacher_alone():
    torch.manual_seed(0)
    a, b = Unknown().eval(), Unknown().eval()
    x = torch.randn(5, 4)
    big = widen_model([a, b], discover_spec(a, "unknown", example=x)).eval()
    assert isinstance(big.extra, SplitNorm)
    torch.testing.assert_close(big(x), (a(x) + b(x)) / 2)


def test_undiscoverable_model_is_refused_with_the_module_named():
    with pytest.raises(hm.UnsupportedModelError, match="forward pass"):
        resolve_spec(Unknown())  # no adapter, and no input size to trace with
    spec = discover_spec(Unknown(), "unknown", example=torch.randn(2, 4))  # a LayerNorm over flat features' channels
    assert spec.groups[0].norms == ("extra",)
    mixing = Unknown()
    mixing.extra = nn.Softmax(dim=1)
    with pytest.raises(hm.UnsupportedModelError, match="'extra' \\(Softmax\\)"):
        discover_spec(mixing, "unknown", example=torch.randn(2, 4))
