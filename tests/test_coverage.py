"""Beyond the supported families: a timm model is merged exactly or refused with an UnsupportedModelError that names the
module at fault, never another exception (timm's tiny ``test_*`` models, one per kind, and models that used to crash).
The full table, one model per timm family, is ``benchmarks/coverage.py``."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import hf_netmerge as hm
from hf_netmerge.adapters import resolve_spec
from hf_netmerge.errors import UnsupportedModelError

NAMED = re.compile(r"module '[^']+'")


def _inputs(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_a_timm_model_merges_exactly_or_is_refused_naming_the_module(name):
    torch.manual_seed(0)
    a = timm.create_model(name).eval()
    try:
        resolve_spec(a)
    except UnsupportedModelError as e:
        assert NAMED.search(str(e)), f"the refusal names no module: {e}"
        return
    torch.manual_seed(1)
    b = timm.create_model(name).eval()
    x = _inputs(a)
    with torch.no_grad():
        expected = (a(x) + b(x)) / 2
        torch.testing.assert_close(hm.concatenate(a, b).eval()(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(("name", "module"), [("resnet50_gn", "bn1"), ("seresnet18", "layer1.0.se"), ("ecaresnet26t", "layer1.0.se")])
def test_resnet_variants_the_adapter_cannot_split_are_refused_by_module(name, module):
    with pytest.raises(UnsupportedModelError, match=re.escape(f"module '{module}'")):
        resolve_spec(timm.create_model(name))
