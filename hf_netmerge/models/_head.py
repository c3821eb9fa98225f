"""The classifier head and timm's head interface, shared by hf_netmerge's own architectures."""

from __future__ import annotations

import torch
from torch import nn


class LinearHeadMixin:
    """A dropout + linear ``head`` on ``num_features`` features, with timm's classifier methods.

    Subclasses define ``forward_features`` and call :meth:`_init_head` at the end of ``__init__``.
    """

    num_classes: int
    num_features: int
    head: nn.Module
    drop: nn.Module

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]
