"""Architectures of the paper that timm lacks, registered with timm's model registry on import."""

from .lenet import LeNet
from .mlp import MLP

__all__ = ["LeNet", "MLP"]
