"""Beyond the supported families: a timm model is merged exactly or refused with an UnsupportedModelError that names the
module at fault, never another exception: timm's tiny ``test_*`` models, and one model per timm family (the smallest
variant, as ``benchmarks/coverage.py`` lists it in its committed table; that benchmark also checks compression)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch

import hf_netmerge as hm
from hf_netmerge.adapters import resolve_spec
from hf_netmerge.errors import UnsupportedModelError

NAMED = re.compile(r"module '[^']+'")


# One representative per timm family (its smallest variant), as the committed coverage table lists them, up to 30M
# parameters (the suite's time: the benchmark runs the rest).
COVERAGE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "coverage.json"
FAMILIES = [(r["family"], r["model"]) for r in json.loads(COVERAGE.read_text())["rows"]
            if r["outcome"] != "skipped" and r["params"] <= 30e6 and timm.is_model(r["model"])]


def _inputs(model: torch.nn.Module) -> torch.Tensor:
    """Two inputs of the model's size, at most 96 px (an Inception needs 75) unless the model fixes its input size."""
    cfg = model.pretrained_cfg
    channels, *size = cfg["input_size"]
    size = size if cfg.get("fixed_input_size", False) else [min(s, 96) for s in size]
    return torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_a_timm_model_merges_exactly_or_is_refused_naming_the_module(name):
    _merges_exactly_or_is_refused_by_name(name)


@pytest.mark.parametrize("family,name", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_every_timm_family_merges_exactly_or_is_refused_naming_the_module(family, name):
    """No timm family makes the merge raise anything but a NetMergeError naming the module or op at fault."""
    _merges_exactly_or_is_refused_by_name(name)


def _merges_exactly_or_is_refused_by_name(name: str) -> None:
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


def test_resnet_variants_with_channel_mixing_attention_are_refused_by_module():
    """ECA mixes neighbouring channels (a Conv1d over the channel axis): refused, naming the module."""
    with pytest.raises(UnsupportedModelError, match=re.escape("in module 'layer1.0.se' (EcaModule)")):
        resolve_spec(timm.create_model("ecaresnet26t"))
