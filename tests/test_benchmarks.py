"""The benchmarks' own arithmetic: multiply-add counting and schedule stretching (the benchmarks themselves run on demand)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

import hf_netmerge as hm
from hf_netmerge.config import StageConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import forward_macs, moved, stretched  # noqa: E402


def test_forward_macs_counts_linear_and_conv_layers():
    mlp = timm.create_model("netmerge_sine_mlp")
    assert forward_macs(mlp, torch.zeros(1, 1)) == 100 + 100
    assert forward_macs(hm.concatenate(mlp, timm.create_model("netmerge_sine_mlp")), torch.zeros(1, 1)) == 200 + 200
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, groups=2))
    assert forward_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 100 * 3 * 9 + 8 * 64 * 4 * 9


@pytest.mark.parametrize(("milestones", "epochs", "new", "expected"), [([250], 300, 350, [292]), ([2, 3], 4, 2, [1]), ([100], 150, 1, [])])
def test_moved_milestones_stay_inside_the_new_schedule(milestones, epochs, new, expected):
    assert moved(milestones, epochs, new) == expected
    assert stretched(StageConfig(epochs=epochs, milestones=milestones), new).milestones == expected
