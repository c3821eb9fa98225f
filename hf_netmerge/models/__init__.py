"""Architectures of the paper that timm lacks, registered with timm's model registry on import."""

from .cifar import CifarResNet, CifarVGG
from .lenet import LeNet
from .mlp import MLP

__all__ = ["CifarResNet", "CifarVGG", "LeNet", "MLP"]
