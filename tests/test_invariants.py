"""The method's invariants over the one table of architectures (conftest.ARCHITECTURES): core models, declared timm
families and discovered ones, each with random BatchNorm affine parameters and real running statistics. Also the
invariants of channel permutations, which weight matching (the align-and-average baseline) rests on."""

from __future__ import annotations

import math
from operator import attrgetter

import pytest
import timm
import torch
from conftest import ARCHITECTURES, NORM_GAP, arch_ids, input_shape, make_teacher

import hf_netmerge as hm
from hf_netmerge.adapters import resolve_spec
from hf_netmerge.formats import create_model, logits
from hf_netmerge.gates import BETA, GAMMA, ZETA
from hf_netmerge.matching import match_weights, permute
from hf_netmerge.spec import gate_owner
from hf_netmerge.surgery import expand_index


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float tolerance relative to the output's scale (random BN statistics can make it large or tiny)."""
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=1e-4, atol=1e-5)


def _force_half_open(gated: hm.GatedModel, seed: int) -> None:
    """Set every gate exactly open (eval value 1) or closed (0), half of each group, at random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gated.gates.values():
            gate.log_alpha.copy_(torch.where(torch.randperm(gate.size, generator=gen) < gate.size // 2, 8.0, -8.0))


@pytest.mark.parametrize("name,kwargs", ARCHITECTURES, ids=arch_ids(ARCHITECTURES))
def test_big_student_equals_teacher_mean(name, kwargs):
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    x = torch.randn(input_shape(a, 4))
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert (ya - yb).abs().max() > 1e-2 * ya.abs().max()  # the teachers really differ
        big = hm.concatenate(a, b).eval()
        _assert_same(big(x), (ya + yb) / 2)
    for name, role in big.netmerge_spec.layer_roles().items():  # each producer: twice the groups it writes
        if role.outputs:
            assert big.get_submodule(name).weight.shape[0] == 2 * sum(g.size for g, _ in role.outputs)
    for g in big.netmerge_spec.groups:
        for c in g.channelwise:  # a grouped conv: the teachers' conv groups side by side
            assert big.get_submodule(c).groups == 2 * a.get_submodule(c).groups


@pytest.mark.parametrize("name,kwargs", ARCHITECTURES, ids=arch_ids(ARCHITECTURES))
def test_compressed_student_equals_masked_big_student_and_loads_strictly(name, kwargs):
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    gated = hm.add_gates(hm.concatenate(a, b))
    _force_half_open(gated, 3)
    gated.eval()
    for gate in gated.gates.values():
        assert set(gate.eval_value().unique().tolist()) == {0.0, 1.0}
    x = torch.randn(input_shape(a, 4))
    with torch.no_grad():
        student = hm.compress(gated).eval()
        _assert_same(student(x), gated(x))
    fresh = timm.create_model(name, **kwargs)
    fresh_sd, student_sd = fresh.state_dict(), student.state_dict()
    assert list(student_sd) == list(fresh_sd)
    assert {k: v.shape for k, v in student_sd.items()} == {k: v.shape for k, v in fresh_sd.items()}
    fresh.load_state_dict(student_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), student(x))
    assert type(student) is type(a) and not hasattr(student, "netmerge_spec")


@pytest.mark.parametrize("name,kwargs", NORM_GAP, ids=arch_ids(NORM_GAP))
def test_layer_normed_models_merge_exactly_and_report_their_compression_gap(name, kwargs):
    """A big student of LayerNormed teachers is their exact mean (each teacher's part normalized alone); compressed to
    one teacher's channels of every group it equals the gated model and loads strictly into the teachers' class (for a
    ViT: whole heads kept, the same head count); keeping channels of both under one LayerNorm is inexact, and the
    statistics say which groups."""
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    x = torch.randn(input_shape(a, 4))
    big = hm.concatenate(a, b).eval()
    with torch.no_grad():
        _assert_same(logits(big(x)), (logits(a(x)) + logits(b(x))) / 2)
    gated = hm.add_gates(big)
    with torch.no_grad():
        for gate in gated.gates.values():  # teacher A's part of every group open, B's closed
            gate.log_alpha.copy_(torch.where(torch.arange(gate.size) < gate.size // 2, 8.0, -8.0))
        gated.eval()
        student = hm.compress(gated).eval()
        _assert_same(logits(student(x)), logits(gated(x)))
        assert all(s.exact_compression for s in gated.statistics())
        _force_half_open(gated, 4)
        inexact = {s.group for s in gated.statistics() if not s.exact_compression}
        assert inexact and inexact <= gated.mixed_norm_groups
        assert float((logits(hm.compress(gated).eval()(x)) - logits(gated(x))).abs().max()) > 1e-4
    fresh = create_model(name, kwargs)
    fresh.load_state_dict(student.state_dict(), strict=True)
    for width in big.netmerge_spec.widths:  # num_heads and the like: the teachers' again
        assert attrgetter(width.path)(student) == attrgetter(width.path)(fresh) == width.value
    permuted = permute(a, _random_perms(a, 1)).eval()
    with torch.no_grad():
        _assert_same(logits(permuted(x)), logits(a(x)))


def _random_perms(model, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation of every group's units (conv groups, norm groups), as channel indices; tied groups follow
    their owner's."""
    gen, spec = torch.Generator().manual_seed(seed), resolve_spec(model)
    units: dict[str, torch.Tensor] = {}  # a tied group keeps its owner's conv groups: the same permutation of units
    return {g.name: expand_index(units.setdefault(gate_owner(spec, g), torch.randperm(g.size // g.unit, generator=gen)), g.unit)
            for g in spec.groups}


@pytest.mark.parametrize("name,kwargs", ARCHITECTURES, ids=arch_ids(ARCHITECTURES))
def test_permuting_channels_group_by_group_keeps_the_function(name, kwargs):
    model = make_teacher(name, kwargs, 0)
    permuted = permute(model, _random_perms(model, 1)).eval()
    x = torch.randn(input_shape(model, 4))
    with torch.no_grad():
        _assert_same(permuted(x), model(x))
        assert not all(torch.equal(p, q) for p, q in zip(permuted.state_dict().values(), model.state_dict().values()))


MATCHED = [case for case in ARCHITECTURES if not {"norm_layer", "block_args"} & set(case[1]) and case[0] in {
    "netmerge_sine_mlp", "netmerge_lenet_bn", "netmerge_mlp_bn", "netmerge_resnet20", "netmerge_vgg11_cifar", "resnet18", "resnetv2_18",
    "mobilenetv2_050", "seresnet18"}]


@pytest.mark.parametrize("name,kwargs", MATCHED, ids=arch_ids(MATCHED))
def test_weight_matching_recovers_a_planted_permutation(name, kwargs):
    a = make_teacher(name, kwargs, 0)
    b = permute(a, _random_perms(a, 2))
    aligned = permute(b, match_weights(a, b))
    for (key, va), vb in zip(a.state_dict().items(), aligned.state_dict().values()):
        assert torch.equal(va, vb), key


THREE = [case for case in ARCHITECTURES if case[0] in {"netmerge_sine_mlp", "netmerge_lenet", "netmerge_resnet20", "regnety_002"}]


@pytest.mark.parametrize("name,kwargs", THREE, ids=arch_ids(THREE))
def test_three_teachers_big_student_is_their_mean_and_compresses_to_a_third(name, kwargs):
    """k = 3: a three-wide big student computes the mean of three teachers; with a third of every group's units open it
    compresses to exactly the gated model, in the teachers' architecture."""
    teachers = [make_teacher(name, kwargs, seed) for seed in range(3)]
    x = torch.randn(input_shape(teachers[0], 4))
    big = hm.concatenate(*teachers).eval()
    with torch.no_grad():
        _assert_same(big(x), sum(t(x) for t in teachers) / 3)
    gated = hm.add_gates(big)
    assert gated.teachers == 3
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for g in gated.spec.groups:
            gate = gated.gates[g.name]
            assert gate.size == 3 * g.size // g.unit
            gate.log_alpha.copy_(torch.where(torch.randperm(gate.size, generator=gen) < gate.size // 3, 8.0, -8.0))
    gated.eval()
    with torch.no_grad():
        student = hm.compress(gated).eval()
        _assert_same(student(x), gated(x))
    timm.create_model(name, **kwargs).load_state_dict(student.state_dict(), strict=True)
    stats = gated.statistics()
    assert all(len(s.kept_per_teacher) == 3 and sum(s.kept_per_teacher) == s.kept == s.size // 3 for s in stats)
    with torch.no_grad():  # every gate open with probability 1/3: the k-teacher penalty (1/k − mean P)² is zero
        for gate in gated.gates.values():
            gate.log_alpha.fill_(math.log(1 / 3 / (1 - 1 / 3)) + BETA * math.log(-GAMMA / ZETA))
        assert float(gated.half_penalty()) < 1e-10


def test_weight_matching_refuses_groups_tied_in_units():
    """Grouped convolutions tie channels in conv groups; matching permutes single channels, so it refuses by group."""
    a = make_teacher("regnety_002", {"num_classes": 5}, 0)
    with pytest.raises(hm.UnsupportedModelError, match=r"group '.*' ties its channels in units of"):
        match_weights(a, a)
