"""Channel groups of :class:`hf_netmerge.models.MLP`: one group per hidden layer, gated after its ReLU."""

from __future__ import annotations

from torch import nn

from ..formats import architecture_name
from ..models.mlp import MLP
from ..spec import ChainLink, MergeSpec, chain_spec
from . import register_adapter


@register_adapter(MLP)
def mlp_spec(model: MLP) -> MergeSpec:
    links = [
        ChainLink(
            group=f"hidden{i}",
            producer=f"blocks.{i}.fc",
            norm=f"blocks.{i}.norm" if isinstance(block.norm, nn.BatchNorm1d) else None,
            gate_site=f"blocks.{i}.act",
            size=block.fc.out_features,
        )
        for i, block in enumerate(model.blocks)
    ]
    return chain_spec(architecture_name(model), links, head="head")
