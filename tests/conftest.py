"""Shared fixtures: tiny models with real BatchNorm statistics, tiny image datasets, a clean Accelerate state."""

from __future__ import annotations

import os
import socket
import tempfile

# The Hub client reads its endpoint when first imported: point it at the loopback test server
# (started by the `hub` fixture on this port) and isolate its cache, before anything imports it.
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    HUB_PORT = _s.getsockname()[1]
HUB_TOKEN = "hf_sentinel_" + "x9Qz" * 6
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{HUB_PORT}",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HOME=tempfile.mkdtemp(prefix="netmerge-hf-home-"),
    HF_TOKEN=HUB_TOKEN,
)

import numpy as np
import pytest
import timm
import torch
from accelerate.state import AcceleratorState, PartialState

import hf_netmerge  # noqa: F401  (registers the architectures)
from hf_netmerge.formats import create_model, input_channels
from hf_netmerge.models.split_norm import response_norm_layout
from hf_netmerge.models import MLP

QUIET = hf_netmerge.RunOptions(progress=False)  # merge_models without progress bars

torch.set_num_threads(1)

SMALL_VGG = {"mlp_ratio": 1 / 64}  # timm's ConvMlp hidden layer 4096 → 64 keeps the tests fast
# The one table of architectures every invariant runs over: (architecture, create_model kwargs).
CORE = [
    ("netmerge_sine_mlp", {}),
    ("netmerge_mlp_bn", {"in_chans": 5, "num_classes": 3}),
    ("netmerge_lenet", {"num_classes": 10}),
    ("netmerge_lenet_bn", {"num_classes": 4}),
    ("netmerge_lenet_bn", {"num_classes": 7, "in_chans": 1, "img_size": 32}),
]
DECLARED = [  # timm families with an adapter (and the CIFAR models)
    ("resnet18", {"num_classes": 5}),
    ("resnet34", {"num_classes": 5}),
    ("resnet50", {"num_classes": 5}),
    ("resnet18d", {"num_classes": 5}),
    ("resnet10t", {"num_classes": 5}),
    ("netmerge_resnet20", {"num_classes": 5}),
    ("vgg11_bn", {"num_classes": 5, **SMALL_VGG}),
    ("vgg16", {"num_classes": 5, **SMALL_VGG}),
    ("netmerge_vgg11_cifar", {"num_classes": 5}),
]
DISCOVERED = [("resnetv2_18", {"num_classes": 5}), ("resnetv2_50", {"num_classes": 5}), ("darknet17", {"num_classes": 5}),
              ("repvgg_a0", {"num_classes": 5}),
              ("resnet18", {"num_classes": 5, "norm_layer": "groupnorm"}),  # GroupNorm: gates keep whole norm groups
              ("seresnet18", {"num_classes": 5}),  # squeeze-excitation reading a norm's output: gated there
              ("resnet18", {"num_classes": 5, "block_args": {"attn_layer": "ese"}}),  # effective SE (one fc, hard sigmoid)
              ("mobilenetv2_050", {"num_classes": 5}),  # depthwise convs; a residual stream without activation
              ("mobilenetv3_small_050", {"num_classes": 5}),  # hard-swish, hard-sigmoid SE, a conv head after pooling
              ("efficientnet_b0", {"num_classes": 5}),
              ("regnety_002", {"num_classes": 5}),  # grouped convs (gates keep whole conv groups) and SE
              ("legacy_seresnet18", {"num_classes": 5}),  # one ReLU module used three times per block: a gate per call
              ("hrnet_w18_small", {"num_classes": 5}),  # parallel resolutions fused by upsampling and adds
              ("repvit_m1", {"num_classes": 5}),  # a distilled model: two heads averaged into the output
              ("densenet121", {"num_classes": 5}),  # concatenations read by BatchNorm, ReLU and convs: groups at offsets
              ("ese_vovnet19b_slim_dw", {"num_classes": 5}),  # one-shot aggregation (a concatenation) and effective SE
              ("dla46x_c", {"num_classes": 5}),  # tree aggregation: concatenations and a ReLU module used twice
              ("cs3darknet_focus_s", {"num_classes": 5}),  # a split into two halves (CSP), concatenated again
              ("fasternet_t0", {"num_classes": 5}),  # a split into unequal parts: a partial convolution
              ("res2next50", {"num_classes": 5}),  # Res2Net: a split, grouped convs on the slices, adds across slices
              ("ghostnet_050", {"num_classes": 5}),  # a slice of a concatenation holding one group twice
              ("rexnet_100", {"num_classes": 5}),  # a residual add on a slice of the channels
              ("dpn48b", {"num_classes": 5}),  # dual paths: slices of one output added to one stream, concatenated to another
              ("cspnext_tiny", {"num_classes": 5}),  # an effective SE multiplying a concatenation
              ("fastvit_t8", {"num_classes": 5})]  # width-changing depthwise convs: each output group tied to its input's
# (the lower-bound timm of `make test-lower-bounds` lacks the newest models, cspnext_tiny: left out there)
ARCHITECTURES = [case for case in CORE + DECLARED + DISCOVERED if timm.is_model(case[0])]
# Merged exactly, but a LayerNorm over channels of both teachers makes compression inexact unless one teacher's part of
# every group is kept (the gap is measured and reported): vision transformers, and a split feeding a ConvNeXt block.
NORM_GAP = [("test_vit", {"img_size": 32, "patch_size": 8, "num_classes": 5}),
            ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 5, "depth": 2}),
            ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 5, "depth": 2, "global_pool": "avg",
                                      "fc_norm": True, "init_values": 0.1, "reg_tokens": 2}),
            ("transformers:vit", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                                  "image_size": 32, "patch_size": 8, "num_labels": 5}),
            ("inception_next_atto", {"num_classes": 5})]


def arch_ids(cases: list[tuple[str, dict]]) -> list[str]:
    """Readable test ids: the name, then the kwargs that are not the tables' defaults."""
    shown = [{k: v for k, v in kw.items() if k != "mlp_ratio"} for _, kw in cases]
    return [f"{name}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'default'}" for (name, _), kw in zip(cases, shown)]


def input_shape(model: torch.nn.Module, batch: int = 8) -> tuple[int, ...]:
    """A batch shape the model accepts: its own image size, 32×32 for other CNNs, flat features for MLPs."""
    if isinstance(model, MLP):
        return (batch, model.in_chans)
    return (batch, input_channels(model), *getattr(model, "img_size", (32, 32)))


def record_output_dtypes(monkeypatch: pytest.MonkeyPatch, layer: type[torch.nn.Module]) -> set[torch.dtype]:
    """The dtypes every ``layer`` (e.g. ``nn.Conv2d``) computes in from now on: shows whether autocast was on."""
    dtypes: set[torch.dtype] = set()
    forward = layer.forward

    def recording(self, x):
        out = forward(self, x)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(layer, "forward", recording)
    return dtypes


def make_teacher(name: str, kwargs: dict, seed: int) -> torch.nn.Module:
    """A teacher (a timm name, or ``transformers:<model_type>`` with its config's kwargs) with random norm affine
    parameters and BN running statistics gathered on data (not the library's defaults)."""
    torch.manual_seed(seed)
    model = create_model(name, kwargs)
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, std=0.5)
        elif response_norm_layout(m) is not None:  # ConvNeXt V2's GRN starts as the identity (zero weight and bias)
            torch.nn.init.normal_(m.weight, std=0.5)
            torch.nn.init.normal_(m.bias, std=0.5)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(input_shape(model, 16)) * 2 + 0.5)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _loopback_only():
    """Tests may open sockets to loopback addresses only: anything else fails loudly."""
    import ipaddress

    original = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise ConnectionRefusedError(f"tests may only connect to loopback addresses, not {host}")
        return original(self, address)

    socket.socket.connect = connect
    yield
    socket.socket.connect = original


@pytest.fixture(scope="session")
def hub():
    """A Hub-protocol server on 127.0.0.1 that requires the sentinel token for writes."""
    from hub_server import HubServer

    with HubServer(HUB_PORT, token=HUB_TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test may pick its own mixed precision: Accelerate keeps one per process otherwise."""
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def image_dataset(n: int, num_classes: int, size: int = 28, seed: int = 0, channels: int = 3):
    """A ``datasets.Dataset`` of ``n`` PIL images whose class decides the mean brightness (learnable)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = []
    for y in labels:
        base = 40 + 180 * y / max(num_classes - 1, 1)
        pixels = np.clip(rng.normal(base, 25, (size, size, channels)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{i}" for i in range(num_classes)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
