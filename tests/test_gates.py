"""Hard-concrete gates: distribution, eval determinism, the half loss, the λ schedule, shared gates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hf_netmerge as hm
from hf_netmerge.gates import BETA, GAMMA, ZETA, GatedModel, GateRegularizer, HardConcreteGate, LambdaSchedule
from hf_netmerge.spec import ChannelGroup, Consumer, MergeSpec

from conftest import make_teacher


def test_constants_are_louizos():
    assert (BETA, GAMMA, ZETA) == (2 / 3, -0.1, 1.1)


def test_prob_open_matches_hand_computation():
    gate = HardConcreteGate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.0]))
    expected = [1 / (1 + math.exp(-(la - BETA * math.log(-GAMMA / ZETA)))) for la in (-2.0, 0.0, 1.0)]
    torch.testing.assert_close(gate.prob_open(), torch.tensor(expected))
    # the reference init N(1, 0.01) opens ~93% of the time
    assert abs(HardConcreteGate(10_000).prob_open().mean().item() - 0.93) < 0.01


def test_sample_frequency_of_zero_matches_prob_open():
    torch.manual_seed(0)
    gate = HardConcreteGate(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    draws = gate.sample(200_000)
    assert draws.min() >= 0 and draws.max() <= 1
    torch.testing.assert_close((draws > 0).float().mean(0), gate.prob_open().detach(), atol=5e-3, rtol=0)


def test_eval_is_deterministic_and_matches_formula():
    gate = HardConcreteGate(5).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0]))
    x = torch.ones(2, 5)
    out1, out2 = gate(x), gate(x)
    assert torch.equal(out1, out2)
    expected = torch.clamp(torch.sigmoid(gate.log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1).detach()
    torch.testing.assert_close(out1[0], expected)
    assert out1[0, 0] == 0 and out1[0, -1] == 1


def test_training_samples_per_example_and_channel_and_gradients_reach_log_alpha():
    torch.manual_seed(0)
    gate = HardConcreteGate(6).train()
    x = torch.ones(4, 6, 3, 3)
    y = gate(x)
    assert not torch.equal(y[0], y[1])  # one draw per example
    assert torch.equal(y[0, 0], y[0, 0, 0, 0].expand(3, 3))  # one draw per channel, broadcast over space
    y.sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def test_gate_parameters_stay_fp32_under_bf16_inputs():
    gate = HardConcreteGate(4).train()
    out = gate(torch.ones(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and gate.log_alpha.dtype == torch.float32


def test_half_penalty_matches_hand_computation():
    a, b = make_teacher("netmerge_mlp_bn", {}, 0), make_teacher("netmerge_mlp_bn", {}, 1)
    gated = hm.add_gates(hm.concatenate(a, b))
    with torch.no_grad():
        gated.gates["hidden0"].log_alpha.fill_(0.0)
        gated.gates["hidden1"].log_alpha.fill_(3.0)
    p0 = 1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA)))
    p1 = 1 / (1 + math.exp(-(3.0 - BETA * math.log(-GAMMA / ZETA))))
    expected = (0.5 - p0) ** 2 + (0.5 - p1) ** 2
    assert gated.half_penalty().item() == pytest.approx(expected, rel=1e-5)
    reg = GateRegularizer(gated, lambda_init=0.3, lambda_growth=0.05)
    weighted, penalty = reg.loss()
    assert weighted.item() == pytest.approx(0.3 * expected, rel=1e-5) and penalty.item() == pytest.approx(expected, rel=1e-5)


def test_lambda_grows_quadratically():
    schedule = LambdaSchedule(0.01, 0.05)
    values = [schedule.value] + [schedule.step() for _ in range(3)]
    expected = [0.01]
    for _ in range(3):
        expected.append(expected[-1] + 0.05 * math.sqrt(expected[-1]))
    assert values == pytest.approx(expected)
    for _ in range(146):
        schedule.step()
    assert 12 < schedule.value < 16  # √λ grows ~c/2 per epoch: (0.1 + 0.025·150)² ≈ 14.8
    with pytest.raises(ValueError):
        LambdaSchedule(0.0, 0.05)


class TwoSites(nn.Module):
    """Two activations of one residual-like stream: they must share one gate and one sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.act1 = nn.ReLU()
        self.inner = nn.Linear(8, 8)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.act1(self.fc(x))
        return self.head(self.act2(h + self.inner(h)))


def test_shared_gate_uses_one_parameter_set_and_one_sample_per_forward():
    spec = MergeSpec(
        "two_sites",
        "fc",
        "head",
        (ChannelGroup("stream", 4, ("fc", "inner"), (Consumer("inner"), Consumer("head")), ("act1", "act2")),),
    )
    model = TwoSites()
    with torch.no_grad():  # positive weights and inputs: a zero after a site can only come from its gate
        for layer in (model.fc, model.inner):
            layer.weight.uniform_(0.1, 1.0)
            layer.bias.fill_(0.1)
    gated = GatedModel(model, spec).train()
    assert len(list(gated.parameters())) == len(list(TwoSites().parameters())) + 1
    seen = []
    for site in ("act1", "act2"):
        gated.model.get_submodule(site).register_forward_hook(lambda m, i, o: seen.append(o.detach() == 0))
    x = torch.rand(16, 3)
    gated(x)
    assert seen[0].any() and not seen[0].all()
    assert torch.equal(seen[0], seen[1])  # one sample shared by both sites
    gated(x)
    assert not torch.equal(seen[0], seen[2])  # a new forward draws a new sample
