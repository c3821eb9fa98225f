"""Hard-concrete gates: distribution, eval determinism, the half loss, the λ schedule, shared gates."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import hf_netmerge as hm
from hf_netmerge import gates
from hf_netmerge.gates import (
    BETA,
    GAMMA,
    ZETA,
    GatedModel,
    GateNoise,
    GateRegularizer,
    GateSite,
    HardConcreteGate,
    LambdaSchedule,
    ReusedGateSite,
    gated_relu,
)
from hf_netmerge.spec import ChannelGroup, Consumer, MergeSpec

from conftest import ARCHITECTURES, arch_ids, input_shape, make_teacher


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


def test_gate_noise_is_uniform_fresh_every_pass_and_the_same_rows_for_any_process_count():
    logistic = GateNoise(seed=3).next_table(4096, 64)
    assert logistic.dtype == torch.float32 and logistic.isfinite().all()
    table = torch.sigmoid(logistic)
    assert abs(table.mean().item() - 0.5) < 0.005 and abs(table.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(table, bins=16, min=0, max=1) / table.numel()
    assert (histogram - 1 / 16).abs().max() < 0.003
    assert abs(torch.corrcoef(torch.stack([table[:, 0], table[:, 1]]))[0, 1].item()) < 0.05  # channels independent
    one, two = GateNoise(seed=3), GateNoise(seed=3)
    assert not torch.equal(one.next_table(8, 5), one.next_table(8, 5)) and int(one.passes) == 2  # a new pass, new noise
    assert not torch.equal(two.next_table(8, 5), GateNoise(seed=4).next_table(8, 5))  # another seed, other noise
    whole = GateNoise(seed=7).next_table(16, 5)  # one process holding the global batch of 16
    halves = [GateNoise(seed=7, rank=r, world=2).next_table(8, 5) for r in range(2)]  # two processes holding 8 each
    assert torch.equal(torch.cat(halves), whole)


def test_eager_noise_blocks_are_the_per_pass_formula_across_block_ends_batch_changes_and_resumes():
    noise = GateNoise(seed=5, rank=1, world=2)
    batch, channels = 8, 300  # 27 passes per block of GateNoise.BLOCK values

    def formula(p: int, b: int = batch) -> torch.Tensor:
        return GateNoise(seed=5, rank=1, world=2).logistic(torch.tensor(p), b, channels)

    for p in range(60):  # two block ends
        assert torch.equal(noise.next_table(batch, channels), formula(p))
    assert torch.equal(noise.next_table(5, channels), formula(60, 5))  # an epoch's smaller last batch
    resumed = GateNoise(seed=5, rank=1, world=2)
    resumed.next_table(batch, channels)  # a block cached from pass 0
    resumed.load_state_dict(noise.state_dict())  # a resumed stage: pass 61 next
    assert torch.equal(resumed.next_table(batch, channels), formula(61))
    noise.passes.fill_(3)
    assert torch.equal(noise.next_table(batch, channels), formula(3)) and int(noise.passes) == 4


def _mix32_reference(word: int) -> int:
    """The finalizer on a Python int: 32-bit two's-complement words, arithmetic right shifts, products mod 2³²."""

    def signed(v: int) -> int:
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v >= 1 << 31 else v

    h = signed(word)
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = signed(signed(h ^ (h >> shift)) * factor)
    return signed(h ^ (h >> 16))


def test_the_noise_hash_wraps_32_bit_products_as_the_reference_does_eager_and_compiled():
    words = [0, 1, -1, 2**31 - 1, -(2**31), 0x12345678, -0x0F0F0F0F] + torch.randint(-(2**31), 2**31, (200,)).tolist()
    expected = torch.tensor([_mix32_reference(w) for w in words], dtype=torch.int32)
    assert torch.equal(gates._mix32(torch.tensor(words, dtype=torch.int32)), expected)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: gates._mix32(h.clone()), dynamic=False)
    assert torch.equal(compiled(torch.tensor(words, dtype=torch.int32)), expected)


def test_the_sample_function_matches_the_plain_formula_in_value_and_gradient():
    noise = GateNoise(seed=1).logistic(torch.tensor(0), 64, 40)
    ours, plain = (nn.Parameter(torch.linspace(-5, 5, 40)) for _ in range(2))
    sample = gates._HardConcrete.apply(ours, noise)
    reference = gates.hard_concrete(plain, noise)
    assert torch.equal(sample, reference)
    assert (sample == 0).any() and (sample == 1).any() and ((sample > 0) & (sample < 1)).any()
    upstream = torch.randn(64, 40)
    (sample * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-5, atol=1e-6)


def test_sampling_from_gate_noise_opens_each_channel_with_prob_open():
    gate = HardConcreteGate(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    uniform = GateNoise(seed=0).next_table(200_000, 1).expand(-1, 4)
    draws = gate.sample(200_000, uniform)
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
    reg = GateRegularizer(gated, LambdaSchedule("per_epoch", 0.3, growth=0.05, epochs=4))
    assert reg.weight(0.5) == 0.3 and reg.penalty().item() == pytest.approx(expected, rel=1e-5)


def test_per_epoch_lambda_grows_quadratically_once_per_epoch():
    """The paper's rule: λ ← λ + c·√λ after each whole epoch, constant within an epoch."""
    schedule = LambdaSchedule("per_epoch", 0.01, growth=0.05, epochs=150)
    expected = [0.01]
    for _ in range(3):
        expected.append(expected[-1] + 0.05 * math.sqrt(expected[-1]))
    assert [schedule.at(e) for e in range(4)] == pytest.approx(expected)
    assert schedule.at(2.99) == schedule.at(2)
    assert 12 < schedule.at(150) < 16  # √λ grows ~c/2 per epoch: (0.1 + 0.025·150)² ≈ 14.8
    with pytest.raises(ValueError):
        LambdaSchedule("per_epoch", 0.0, growth=0.05)


@pytest.mark.parametrize("shape", ["quadratic", "linear", "exponential"])
@pytest.mark.parametrize("epochs", [1, 3, 40])
def test_per_step_lambda_reaches_its_final_value_at_the_end_of_any_stage(shape, epochs):
    """λ moves every step from lambda_init to lambda_final whatever the stage's length (the per-epoch rule leaves a
    2-epoch stage at λ ≈ 0.015 from 0.01)."""
    schedule = LambdaSchedule(shape, 0.05, 20.0, epochs=epochs)
    points = [schedule.at(epochs * k / 100) for k in range(101)]
    assert points[0] == pytest.approx(0.05) and points[-1] == pytest.approx(20.0)
    assert all(later > earlier for earlier, later in zip(points, points[1:]))
    middle = {"quadratic": ((0.05**0.5 + 20**0.5) / 2) ** 2, "linear": (0.05 + 20) / 2, "exponential": (0.05 * 20) ** 0.5}[shape]
    assert schedule.at(epochs / 2) == pytest.approx(middle)
    assert schedule.at(epochs + 5) == pytest.approx(20.0)


def test_statistics_count_undecided_gates():
    """A gate is undecided while P[g>0] lies in (0.1, 0.9); the share is reported per group and over all gates."""
    a, b = make_teacher("netmerge_mlp_bn", {}, 0), make_teacher("netmerge_mlp_bn", {}, 1)
    gated = hm.add_gates(hm.concatenate(a, b))
    with torch.no_grad():
        for gate in gated.gates.values():
            gate.log_alpha.fill_(6.0)  # P ≈ 1: decided
        first = gated.gates["hidden0"].log_alpha
        first[: first.numel() // 4] = 0.0  # P ≈ 0.17: undecided
    stats = {s.group: s for s in gated.statistics()}
    assert stats["hidden0"].undecided_fraction == pytest.approx(0.25, abs=1 / first.numel())
    assert stats["hidden1"].undecided_fraction == 0.0
    total = sum(g.log_alpha.numel() for g in gated.gates.values())
    assert gated.undecided_fraction() == pytest.approx((first.numel() // 4) / total)


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


def test_each_gate_gets_its_slice_of_the_pass_s_noise_in_one_draw():
    """The model draws every gate at once: gate k's sample is the formula on its log α and its columns of the pass's
    noise table, pass after pass."""
    a, b = make_teacher("netmerge_lenet_bn", {"num_classes": 4}, 0), make_teacher("netmerge_lenet_bn", {"num_classes": 4}, 1)
    gated = hm.add_gates(hm.concatenate(a, b), noise_seed=9).train()
    with torch.no_grad():
        for k, gate in enumerate(gated.gates.values()):
            gate.log_alpha.copy_(torch.linspace(-3, 3, gate.size) + k)
    assert len({gate.size for gate in gated.gates.values()}) > 1
    seen: dict[int, torch.Tensor] = {}
    for site in gated.model.modules():
        if isinstance(site, GateSite):  # the pass's sample, read at the site that used it
            site.register_forward_hook(lambda m, i, o: seen.__setitem__(id(m.gate), m.gate.value(0).detach().clone()))
    sizes = [gate.size for gate in gated.gates.values()]
    x = torch.randn(input_shape(a, 6))
    for p in range(3):
        seen.clear()
        gated(x)
        noise = GateNoise(seed=9).logistic(torch.tensor(p), 6, sum(sizes)).split(sizes, dim=1)
        for gate, table in zip(gated.gates.values(), noise):
            torch.testing.assert_close(seen[id(gate)], gates.hard_concrete(gate.log_alpha.detach(), table), rtol=0, atol=1e-6)


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


def _gate_with_saturated_channels(size: int, batch: int) -> tuple[HardConcreteGate, torch.Tensor]:
    """A training gate whose log_alpha spans closed to open, and its sample for ``batch`` (exact 0s and 1s included)."""
    gate = HardConcreteGate(size).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-4, 4, size))
    sample = gate.value(batch)
    assert (sample == 0).any() and (sample == 1).any() and ((sample > 0) & (sample < 1)).any()
    return gate, sample


@pytest.fixture
def custom_relu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every gated ReLU through the custom autograd function (the tests' activations are below SMALL_ACTIVATION)."""
    monkeypatch.setattr(gates, "SMALL_ACTIVATION", 0)


@pytest.mark.parametrize("path", ["custom", "small"])
@pytest.mark.parametrize("shape", [(64, 12), (16, 12, 5, 4)], ids=["features", "images"])
def test_gated_relu_matches_relu_then_multiply_in_value_and_gradients(shape, path, monkeypatch):
    if path == "custom":
        monkeypatch.setattr(gates, "SMALL_ACTIVATION", 0)
    torch.manual_seed(0)
    gate, sample = _gate_with_saturated_channels(shape[1], shape[0])
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(shape)
    ours = gated_relu(x, sample)
    (ours * upstream).sum().backward(retain_graph=True)  # the sample's graph serves the plain multiply too
    grads = x.grad.clone(), gate.log_alpha.grad.clone()
    x.grad, gate.log_alpha.grad = None, None
    plain = torch.relu(x) * sample.view(*sample.shape, *([1] * (len(shape) - 2)))
    (plain * upstream).sum().backward()
    assert torch.equal(ours, plain)
    torch.testing.assert_close(grads[0], x.grad, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], gate.log_alpha.grad, rtol=1e-5, atol=1e-6)  # exact 0s of the sample included


@pytest.mark.parametrize("shape", [(64, 12), (16, 12, 5, 4)], ids=["features", "images"])
def test_gated_relu_in_bf16_is_as_accurate_as_the_plain_multiply(shape, custom_relu):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    g = torch.rand(shape[:2]).clamp_min(0.05).requires_grad_(True)
    upstream = torch.randn(shape, dtype=torch.bfloat16)
    view = [*shape[:2], *([1] * (len(shape) - 2))]
    exact = (upstream.double() * torch.relu(x.detach().double())).sum_to_size(view).view(shape[:2])
    (gated_relu(x, g) * upstream).sum().backward()
    ours, g.grad = g.grad.clone(), None
    (torch.relu(x) * g.to(torch.bfloat16).view(view) * upstream).sum().backward()
    error = {name: float((grad.detach().double() - exact).norm() / exact.norm()) for name, grad in (("ours", ours), ("plain", g.grad))}
    assert error["ours"] < 1e-2 and error["ours"] <= 1.5 * error["plain"], error


def test_gated_relu_passes_gradcheck_where_the_gate_is_open(custom_relu):
    torch.manual_seed(1)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, 0.5, x).requires_grad_(True)  # away from the ReLU's kink
    g = torch.rand(3, 4, dtype=torch.float64).clamp_min(0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(gated_relu, (x, g))


_TRITON_CHECK = """
import torch
from hf_netmerge import gates, kernels

torch.manual_seed(0)
for shape in ((3, 5, 7, 9), (2, 4, 40, 40)):
    samples = torch.rand(shape[0], shape[1] + 3)
    samples[0, 1] = 0.0  # a closed gate
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(shape)
    grads = []
    for fn in (kernels.GatedReLU.apply, gates._GatedReLU.apply):
        g = samples.clone().requires_grad_(True)
        x.grad = None
        y = fn(x, g[:, :shape[1], None, None])  # a view with the batched sample's strides
        (y * upstream).sum().backward()
        grads.append((y.detach(), x.grad.clone(), g.grad.clone()))
    (y_k, dx_k, dg_k), (y_t, dx_t, dg_t) = grads
    assert torch.equal(y_k, y_t) and torch.equal(dx_k, dx_t), shape
    torch.testing.assert_close(dg_k, dg_t, rtol=1e-5, atol=1e-6)
    assert dg_k[0, 1] == 0
print("kernels agree")
"""


def test_the_cuda_kernels_of_the_gated_relu_match_its_pytorch_operations():
    """hf_netmerge.kernels run by Triton's interpreter on the CPU against the PyTorch gated ReLU."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kernels agree" in done.stdout, done.stderr[-3000:]


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during ``model(x)``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("name,kwargs", ARCHITECTURES, ids=arch_ids(ARCHITECTURES))
def test_gates_keep_no_extra_activation_at_relu_sites(name, kwargs, custom_relu):
    a, b = make_teacher(name, kwargs, 0), make_teacher(name, kwargs, 1)
    big = hm.concatenate(a, b).train()
    x = torch.randn(input_shape(a, 4))
    plain = _saved_activation_bytes(big, x)
    gated = hm.add_gates(big).train()
    outputs: dict[str, int] = {}
    for site_name, site in gated.model.named_modules():
        if isinstance(site, GateSite) and type(site.base) is not nn.ReLU:
            site.register_forward_hook(lambda m, i, o, key=site_name: outputs.__setitem__(key, o.numel() * o.element_size()))
    # Each gate's fp32 (batch, channels) sample keeps itself (its gradient is computed from it alone);
    # a ReLU site adds nothing else, another site may keep its base's output besides the gated one; where one gate
    # covers a unit of several channels, or a site gates a concatenation of groups, each site also keeps the (batch,
    # channels) gate it builds from its gates' samples.
    samples = sum(4 * x.shape[0] * gate.size for gate in gated.gates.values())
    sites = [s for m in gated.model.modules() if isinstance(m, (GateSite, ReusedGateSite))
             for s in (m.calls.values() if isinstance(m, ReusedGateSite) else [m])]
    samples += sum(4 * x.shape[0] * sum(g.size * unit for g, unit in ((s.gate, s.unit), *s.more))
                   for s in sites if s.unit > 1 or s.more)
    assert _saved_activation_bytes(gated, x) - plain <= samples + sum(outputs.values())
