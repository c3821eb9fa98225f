"""Channel groups of vision transformers: timm's ``VisionTransformer`` (DeiT's distilled one included) and transformers'
``ViTForImageClassification``.

The big student keeps each teacher's tokens in its own half of the embedding: the patch embedding's rows stacked, the
class (and distillation, register) tokens and position embeddings side by side along the embedding, each teacher's
heads side by side (2h heads of the same head size; q, k, v and the output projection block-diagonal), the MLP
block-diagonal, and every LayerNorm a :class:`~hf_netmerge.models.split_norm.SplitNorm` normalizing each teacher's part
alone. Groups:

* the **residual stream** (the embedding), written by the patch embedding and every block's output projections, read
  by q/k/v, the MLPs and the heads, gated after every LayerNorm (what the linear layers read);
* per block, the **heads** (a unit of head-size channels: a head is kept or dropped whole, so the student keeps the
  teachers' ``num_heads``), written by q, k and v (timm's fused ``qkv`` writes the group three times) and gated on the
  attention's output per head (timm) or on v (transformers: ``attn @ (v·g) = (attn @ v)·g``);
* per block, the **MLP neurons**, gated after the activation.

The stream's LayerNorms make compression inexact unless one teacher's whole stream is kept: the gap is measured and
reported, as for ConvNeXt. Variants whose extra layers couple heads or channels otherwise (q/k norms, a norm inside
the attention or the MLP, gated attention, attention pooling, a normalized patch embedding, GLU MLPs) are refused by
module.
"""

from __future__ import annotations

from timm.layers import Attention, Mlp, PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import UnsupportedModelError
from ..formats import architecture_name
from ..models.split_norm import layer_norm_layout
from ..spec import ChannelGroup, Consumer, MergeSpec, Width
from . import register_adapter


def _identity(model: nn.Module, name: str, what: str) -> None:
    """Refuse a variant whose module ``name`` is not an Identity: ``what`` it would do that cannot merge."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Identity):
        raise UnsupportedModelError(
            f"{architecture_name(model)}: module {name!r} ({type(module).__name__}) {what}, which the merge cannot split per "
            "teacher"
        )


def _layer_norm(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a LayerNorm over the embedding (True) or an Identity (False); anything else is refused."""
    module = model.get_submodule(name)
    if isinstance(module, nn.Identity):
        return False
    if layer_norm_layout(module) != "last" or len(module.normalized_shape) != 1:
        raise UnsupportedModelError(f"{architecture_name(model)}: module {name!r} ({type(module).__name__}) is not a LayerNorm "
                                    "over the embedding")
    return True


class _Stream:
    """The residual stream's roles, collected layer by layer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.producers: list[str] = []
        self.norms: list[str] = []
        self.consumers: list[str] = []
        self.scales: list[str] = []

    def norm(self, name: str) -> None:
        """A LayerNorm over the stream: a norm of the group and, since linear layers read its output, a gate site."""
        self.norms.append(name)

    def group(self) -> ChannelGroup:
        return ChannelGroup(
            name="stream",
            size=self.size,
            producers=tuple(self.producers),
            consumers=tuple(Consumer(c) for c in self.consumers),
            gate_sites=tuple(self.norms),
            norms=tuple(self.norms),
            scales=tuple(self.scales),
            channels_last_sites=tuple(self.norms),
        )


def _holds(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _mlp(model: nn.Module, prefix: str, fc1: str, act: str, fc2: str, stream: _Stream, group: str) -> ChannelGroup:
    """An MLP's neurons: written by ``fc1``, gated after ``act``, read by ``fc2`` (which writes the stream)."""
    stream.producers.append(f"{prefix}.{fc2}")
    stream.consumers.append(f"{prefix}.{fc1}")
    return ChannelGroup(
        name=group,
        size=model.get_submodule(f"{prefix}.{fc1}").out_features,
        producers=(f"{prefix}.{fc1}",),
        consumers=(Consumer(f"{prefix}.{fc2}"),),
        gate_sites=(f"{prefix}.{act}",),
        channels_last_sites=(f"{prefix}.{act}",),
    )


@register_adapter(VisionTransformer, VisionTransformerDistilled)
def vision_transformer_spec(model: VisionTransformer) -> MergeSpec:
    """timm's ViT and DeiT: see the module docstring."""
    arch = architecture_name(model)
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{arch}: module 'attn_pool' (attention pooling) mixes the embedding per head of its own")
    if type(model.patch_embed) is not PatchEmbed:
        raise UnsupportedModelError(f"{arch}: module 'patch_embed' ({type(model.patch_embed).__name__}) is not timm's PatchEmbed "
                                    "(a convolution per patch)")
    _identity(model, "patch_embed.norm", "normalizes the patch embedding")
    if type(model.patch_embed.proj) is not nn.Conv2d:
        raise UnsupportedModelError(f"{arch}: module 'patch_embed.proj' ({type(model.patch_embed.proj).__name__}) is not a Conv2d")
    stream = _Stream(model.embed_dim)
    stream.producers.append("patch_embed.proj")
    stream.scales += [n for n in ("cls_token", "reg_token", "dist_token", "pos_embed") if getattr(model, n, None) is not None]
    if _layer_norm(model, "norm_pre"):
        stream.norm("norm_pre")
    groups, widths = [], []
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}"
        attn = block.attn
        if type(block) is not Block or type(attn) is not Attention or type(block.mlp) is not Mlp:
            raise UnsupportedModelError(
                f"{arch}: module {prefix!r} ({type(block).__name__}, attention {type(attn).__name__}, MLP "
                f"{type(block.mlp).__name__}) is not timm's plain Block, Attention and Mlp"
            )
        for part, what in (("attn.q_norm", "normalizes q per head"), ("attn.k_norm", "normalizes k per head"),
                           ("attn.norm", "normalizes the heads together"), ("mlp.norm", "normalizes the MLP's neurons")):
            _identity(model, f"{prefix}.{part}", what)
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{arch}: module '{prefix}.attn.gate' gates the heads from the embedding")
        for norm in ("norm1", "norm2"):
            if not _layer_norm(model, f"{prefix}.{norm}"):
                raise UnsupportedModelError(f"{arch}: module '{prefix}.{norm}' is not a LayerNorm")
            stream.norm(f"{prefix}.{norm}")
        stream.scales += [f"{prefix}.{ls}.gamma" for ls in ("ls1", "ls2") if not isinstance(block.get_submodule(ls), nn.Identity)]
        width = attn.num_heads * attn.head_dim
        stream.consumers.append(f"{prefix}.attn.qkv")
        stream.producers.append(f"{prefix}.attn.proj")
        site = f"{prefix}.attn.norm"  # an Identity on the heads' output, before the projection
        groups.append(
            ChannelGroup(
                name=f"{prefix.replace('.', '_')}_heads",
                size=width,
                producers=(f"{prefix}.attn.qkv",),
                consumers=(Consumer(f"{prefix}.attn.proj"),),
                gate_sites=(site,),
                unit=attn.head_dim,
                channels_last_sites=(site,),
                offsets=((f"{prefix}.attn.qkv", 0), (f"{prefix}.attn.qkv", width), (f"{prefix}.attn.qkv", 2 * width)),
            )
        )
        widths.append(Width(f"{prefix}.attn.num_heads", attn.num_heads))
        if hasattr(attn, "attn_dim"):  # recent timm reshapes the heads' output to it; 1.0.22 to the input's width
            widths.append(Width(f"{prefix}.attn.attn_dim", width))
        groups.append(_mlp(model, prefix, "mlp.fc1", "mlp.act", "mlp.fc2", stream, f"{prefix.replace('.', '_')}_mlp"))
    for norm in ("norm", "fc_norm"):
        if _layer_norm(model, norm):
            stream.norm(norm)
    heads = ["head", "head_dist"] if isinstance(model, VisionTransformerDistilled) else ["head"]
    for head in heads:
        if not isinstance(model.get_submodule(head), nn.Linear):
            raise UnsupportedModelError(f"{arch}: module {head!r} ({type(model.get_submodule(head)).__name__}) is not a linear head")
    stream.consumers += heads
    return MergeSpec(arch, "patch_embed.proj", "head", (stream.group(), *groups), tuple(widths))


@register_adapter("transformers.models.vit.modeling_vit.ViTForImageClassification")
def transformers_vit_spec(model: nn.Module) -> MergeSpec | None:
    """transformers' ``ViTForImageClassification``: see the module docstring (heads gated on v). None (left to tracing,
    which refuses it by op) for a layout other than the one of transformers 5.24: ``vit.layers``, q/k/v/o projections."""
    arch = architecture_name(model)
    parts = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.activation_fn",
             "mlp.fc2", "layernorm_before", "layernorm_after")
    layers = getattr(model.vit, "layers", None)
    if layers is None or not all(_holds(layer, part) for layer in layers for part in parts):
        return None
    embeddings = model.vit.embeddings
    if model.vit.pooler is not None or type(embeddings.patch_embeddings.projection) is not nn.Conv2d:
        raise UnsupportedModelError(f"{arch}: module 'vit.pooler' or 'vit.embeddings.patch_embeddings.projection' is not "
                                    "what a plain ViT classifier holds")
    stream = _Stream(model.config.hidden_size)
    stream.producers.append("vit.embeddings.patch_embeddings.projection")
    stream.scales += [f"vit.embeddings.{n}" for n in ("cls_token", "mask_token", "position_embeddings")
                      if getattr(embeddings, n, None) is not None]
    groups, widths = [], []
    for i, layer in enumerate(model.vit.layers):
        prefix = f"vit.layers.{i}"
        attention = layer.attention
        for norm in ("layernorm_before", "layernorm_after"):
            if not _layer_norm(model, f"{prefix}.{norm}"):
                raise UnsupportedModelError(f"{arch}: module '{prefix}.{norm}' is not a LayerNorm")
            stream.norm(f"{prefix}.{norm}")
        projections = [f"{prefix}.attention.{p}_proj" for p in "qkv"]
        stream.consumers += projections
        stream.producers.append(f"{prefix}.attention.o_proj")
        site = f"{prefix}.attention.v_proj"  # attn @ (v·g) = (attn @ v)·g: a head's gate on its values
        groups.append(
            ChannelGroup(
                name=f"layers_{i}_heads",
                size=attention.num_attention_heads * attention.head_dim,
                producers=tuple(projections),
                consumers=(Consumer(f"{prefix}.attention.o_proj"),),
                gate_sites=(site,),
                unit=attention.head_dim,
                channels_last_sites=(site,),
            )
        )
        widths.append(Width(f"{prefix}.attention.num_attention_heads", attention.num_attention_heads))
        groups.append(_mlp(model, prefix, "mlp.fc1", "mlp.activation_fn", "mlp.fc2", stream, f"layers_{i}_mlp"))
    if _layer_norm(model, "vit.layernorm"):
        stream.norm("vit.layernorm")
    stream.consumers.append("classifier")
    return MergeSpec(arch, "vit.embeddings.patch_embeddings.projection", "classifier", (stream.group(), *groups), tuple(widths))

