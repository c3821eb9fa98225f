"""timm's layout: ``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) + ``model.safetensors``.

Any module that is not another format's is read as timm's: its facts come from timm's attributes (``pretrained_cfg``,
``in_chans``, ``num_classes``), falling back to the class name, 3 channels and no head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
from torch import nn

from .. import files
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .base import CheckpointFormat
from .preprocessing import Preprocessing, channel_stats_notice_silenced

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# pretrained_cfg keys that describe the weights timm ships for an architecture, not a network saved from it
_INHERITED_WEIGHTS_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "description", "hf_hub_id",
                           "hf_hub_filename", "url", "file", "source", "test_input_size", "test_crop_pct")


class TimmFormat(CheckpointFormat):
    """timm's ``save_for_hf`` layout, loaded by ``timm.create_model("local-dir:…" | "hf-hub:…", pretrained=True)``."""

    name = "timm"
    library = "timm"

    def claims(self, config: dict[str, Any]) -> bool:
        return isinstance(config.get("architecture"), str)

    def owns(self, model: nn.Module) -> bool:
        return True  # the fallback: asked last

    def build(self, directory: Path, reference: str) -> nn.Module:
        try:
            return timm.create_model(f"local-dir:{directory}", pretrained=False)
        except (RuntimeError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{reference}: cannot build the timm model from {CONFIG_NAME}: {e}") from e

    def save(self, model: nn.Module, folder: Path, *, label_names: list[str] | None, preprocessing: Preprocessing | None,
             license: str | None) -> None:
        """``config.json`` and ``model.safetensors`` through timm's public ``save_for_hf``; the config then keeps
        ``num_classes`` out of ``model_args``, records in ``pretrained_cfg`` the ``preprocessing`` its inputs went
        through (so ``timm.data.resolve_data_config({}, model=reloaded)`` gives it) and this network's ``license``
        (none when None), and drops what ``pretrained_cfg`` inherits about timm's own pretrained weights (their tag,
        license, origin, papers, test size); the weights are rewritten as contiguous tensors with safetensors'
        ``format: pt`` metadata; both files are fsynced.

        (transformers' timm wrapper passes ``num_classes`` itself and fails when ``model_args`` repeats it.)
        """
        from timm.models import save_for_hf

        architecture = self.architecture(model)
        if not timm.is_model(architecture):
            raise UnsupportedModelError(
                f"{architecture!r} is not a timm architecture nor a transformers model; create the teachers with "
                "timm.create_model or AutoModelForImageClassification so the student can be saved"
            )
        with channel_stats_notice_silenced():
            save_for_hf(model, folder, model_config={"label_names": label_names} if label_names else None, safe_serialization=True)
        config = json.loads((folder / CONFIG_NAME).read_text())
        config["model_args"] = {**input_args(model), **config.get("model_args", {})}  # timm's own values win
        config["model_args"].pop("num_classes", None)
        if not config.get("model_args"):
            config.pop("model_args", None)
        pretrained = {k: v for k, v in config.get("pretrained_cfg", {}).items() if k not in _INHERITED_WEIGHTS_KEYS}
        config["pretrained_cfg"] = {**pretrained, **(preprocessing.to_dict() if preprocessing is not None else {}),
                                    **({"license": license} if license else {})}
        files.write_file(folder / CONFIG_NAME, json.dumps(config, indent=2))
        files.write_file(folder / WEIGHTS_NAME, safetensors.torch.save(files.contiguous_state(model), metadata={"format": "pt"}))

    def preprocessing(self, model: nn.Module, image_size: int | None) -> Preprocessing:
        """timm's resolved data config for ``model`` (from its ``pretrained_cfg``)."""
        from timm.data import resolve_data_config

        with channel_stats_notice_silenced():
            cfg = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {}, model=model)
        return Preprocessing.fitted((self.input_channels(model), *cfg["input_size"][1:]), tuple(cfg["mean"]), tuple(cfg["std"]),
                                    cfg["interpolation"], float(cfg["crop_pct"]), cfg.get("crop_mode", "center"))

    def architecture(self, model: nn.Module) -> str:
        """The timm architecture name recorded on the model, else its class name."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return cfg.get("architecture") or type(model).__name__

    def input_channels(self, model: nn.Module) -> int:
        """``in_chans``, else the ``in_channels`` of the first conv the ``pretrained_cfg`` names (timm before 1.0.31
        does not set ``in_chans`` on every model), else 3."""
        channels = getattr(model, "in_chans", None)
        if isinstance(channels, int):
            return channels
        first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
        try:
            conv = model.get_submodule(first_conv) if isinstance(first_conv, str) else None
        except AttributeError:
            conv = None
        channels = getattr(conv, "in_channels", None)
        return channels if isinstance(channels, int) else 3

    def num_classes(self, model: nn.Module) -> int:
        return int(getattr(model, "num_classes", 0) or 0)

    def handles(self, architecture: str) -> bool:
        return timm.is_model(architecture)

    def create(self, architecture: str, model_args: dict[str, Any]) -> nn.Module:
        if not timm.is_model(architecture):
            raise ConfigError(f"architecture {architecture!r} is not a timm model (nor transformers:<model_type>)")
        try:
            return timm.create_model(architecture, **model_args)
        except TypeError as e:
            raise ConfigError(f"model_args do not fit {architecture}: {e}") from e

    def model_args(self, model: nn.Module) -> dict[str, Any]:
        # timm's factory records the keyword arguments a model was made with (``_model_args``, from timm 1.0.31 on: a
        # ViT's ``embed_dim``, ``depth``, ...); drop rates are training settings, not the architecture
        made = {k: v for k, v in (getattr(model, "_model_args", None) or {}).items()
                if not k.endswith("drop_rate") and not k.startswith("drop_") and _serializable(v)}
        return {**made, "num_classes": self.num_classes(model), **input_args(model)}


def _serializable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def input_args(model: nn.Module) -> dict[str, Any]:
    """The input channels and fixed image size ``model`` was built with, as ``create_model`` arguments. timm writes
    them into ``model_args`` itself only from 1.0.31 on; before, a 1-channel model's config rebuilt a 3-channel one."""
    args: dict[str, Any] = {}
    in_chans = TimmFormat().input_channels(model)
    if in_chans != 3:
        args["in_chans"] = in_chans
    img_size = getattr(model, "img_size", None)
    if isinstance(img_size, (int, tuple, list)):
        args["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else img_size
    return args
