"""transformers' layout: ``save_pretrained``'s ``config.json`` (with a ``model_type``) + ``model.safetensors``, and the
image processor's ``preprocessor_config.json``.

A teacher is built with ``AutoModelForImageClassification.from_config`` and loaded strictly; its image processor (read
with ``AutoImageProcessor``) travels with the module as ``netmerge_image_processor`` and says how images become its
inputs. A student is written so that ``AutoModelForImageClassification.from_pretrained`` and
``pipeline("image-classification")`` load it: the teachers' config (widths unchanged), the class names of the data it
was trained on, and the image processor describing the preprocessing it was trained with.
"""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from .. import files
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .base import CheckpointFormat
from .preprocessing import Preprocessing

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROCESSOR_NAME = "preprocessor_config.json"
PREFIX = "transformers:"  # architecture names: transformers:<model_type>
PROCESSOR_ATTRIBUTE = "netmerge_image_processor"
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_DEFAULT_SIZE, _DEFAULT_CROP_PCT = 224, 0.875  # timm's defaults, for a module given without an image processor
_NOT_ARGS = ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError("this checkpoint is in transformers' format: pip install 'hf_netmerge[transformers]'") from e
    return transformers


class TransformersFormat(CheckpointFormat):
    """transformers' ``save_pretrained`` layout of an ``AutoModelForImageClassification`` model."""

    name = "transformers"
    library = "transformers"
    extra_files = (PROCESSOR_NAME,)

    def claims(self, config: dict[str, Any]) -> bool:
        return isinstance(config.get("model_type"), str) and "architecture" not in config

    def owns(self, model: nn.Module) -> bool:
        module = sys.modules.get("transformers")
        return module is not None and isinstance(model, module.PreTrainedModel)

    def build(self, directory: Path, reference: str) -> nn.Module:
        transformers = _transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(directory)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"{reference}: transformers cannot read {CONFIG_NAME}: {str(e).splitlines()[0]}") from e
        model = _classifier(config, reference)
        if (directory / PROCESSOR_NAME).is_file():
            try:
                processor = transformers.AutoImageProcessor.from_pretrained(directory)
            except (ValueError, KeyError, OSError) as e:
                raise CheckpointError(f"{reference}: transformers cannot read {PROCESSOR_NAME}: {str(e).splitlines()[0]}") from e
            setattr(model, PROCESSOR_ATTRIBUTE, processor)
        return model

    def save(self, model: nn.Module, folder: Path, *, label_names: list[str] | None, preprocessing: Preprocessing | None,
             license: str | None) -> None:
        """``config.json`` (the model's config; ``id2label`` from ``label_names`` when given), ``model.safetensors``
        and ``preprocessor_config.json``: the teachers' image processor when it describes ``preprocessing``, else one
        built from ``preprocessing``; every file fsynced. (transformers' configs have no license field: the card
        holds it.)"""
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
        files.write_file(folder / CONFIG_NAME, config.to_json_string(use_diff=True))
        files.write_file(folder / WEIGHTS_NAME, safetensors.torch.save(files.contiguous_state(model), metadata={"format": "pt"}))
        processor = getattr(model, PROCESSOR_ATTRIBUTE, None)
        if preprocessing is not None and (processor is None or self.preprocessing(model, None) != preprocessing):
            processor = image_processor_for(preprocessing)
        if processor is not None:
            files.write_file(folder / PROCESSOR_NAME, processor.to_json_string())

    def preprocessing(self, model: nn.Module, image_size: int | None) -> Preprocessing:
        """The image processor's resize, center crop, normalization and resampling as a :class:`Preprocessing` (the
        same transform timm builds, at ``image_size`` when given); without a processor, timm's defaults at the
        config's ``image_size``."""
        channels = self.input_channels(model)
        processor = getattr(model, PROCESSOR_ATTRIBUTE, None)
        if processor is None:
            size = getattr(model.config, "image_size", None)
            side = size if isinstance(size, int) else _DEFAULT_SIZE
            height, width, crop_pct, mean, std, interpolation = side, side, _DEFAULT_CROP_PCT, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear"
        else:
            settings = processor.to_dict()
            height, width, crop_pct = _processor_geometry(settings)
            normalize = settings.get("do_normalize", True)
            mean = tuple(settings.get("image_mean") or _IMAGENET_MEAN) if normalize else (0.0,) * channels
            std = tuple(settings.get("image_std") or _IMAGENET_STD) if normalize else (1.0,) * channels
            interpolation = _RESAMPLE.get(_resample_code(settings.get("resample")), "bilinear")
        if image_size:
            height = width = image_size
        return Preprocessing.fitted((channels, height, width), mean, std, interpolation, crop_pct, "center")

    def architecture(self, model: nn.Module) -> str:
        return f"{PREFIX}{model.config.model_type}"

    def input_channels(self, model: nn.Module) -> int:
        return int(getattr(model.config, "num_channels", 3))

    def num_classes(self, model: nn.Module) -> int:
        return int(model.config.num_labels)

    def handles(self, architecture: str) -> bool:
        return architecture.startswith(PREFIX)

    def create(self, architecture: str, model_args: dict[str, Any]) -> nn.Module:
        """``AutoModelForImageClassification`` of the config ``AutoConfig.for_model(model_type, **model_args)``; timm's
        ``num_classes`` is accepted for ``num_labels``, so a recipe names the classes one way for both formats."""
        transformers = _transformers()
        model_type = architecture.removeprefix(PREFIX)
        args = dict(model_args)
        if "num_classes" in args:
            args["num_labels"] = args.pop("num_classes")
        try:
            config = transformers.AutoConfig.for_model(model_type, **args)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{architecture}: {str(e).splitlines()[0]}") from e
        return _classifier(config, architecture)

    def model_args(self, model: nn.Module) -> dict[str, Any]:
        return {k: v for k, v in model.config.to_diff_dict().items() if k not in _NOT_ARGS}

    def logits(self, output: Any) -> Any:
        return getattr(output, "logits", output)


def _classifier(config: Any, reference: str) -> nn.Module:
    """``AutoModelForImageClassification.from_config(config)``, or a refusal naming the model type: one without an image
    classifier, one whose classifier needs a package that is not installed, or one transformers cannot build from
    this config (DeiT's two classifiers need the config's ``architectures`` to choose)."""
    transformers = _transformers()
    try:
        model = transformers.AutoModelForImageClassification.from_config(config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"{reference}: transformers model type {config.model_type!r} has no image classification model "
            "(AutoModelForImageClassification); only image classifiers can be merged"
        ) from e
    except ImportError as e:
        raise UnsupportedModelError(
            f"{reference}: transformers' image classifier of model type {config.model_type!r} needs a package that is not "
            f"installed ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from e
    except TypeError as e:
        raise UnsupportedModelError(
            f"{reference}: transformers cannot choose among the image classifiers of model type {config.model_type!r} "
            f"({e}); name one in the config's architectures (model_args: architectures: [ClassName])"
        ) from e
    reads = next(iter(inspect.signature(model.forward).parameters), None)
    if reads != "pixel_values":
        raise UnsupportedModelError(
            f"{reference}: {type(model).__name__} reads {reads}, not pixel_values: only classifiers of images merge"
        )
    return model


def _resample_code(resample: Any) -> int | None:
    """A PIL resampling code from a processor's ``resample`` (an int, or an enum with a value)."""
    value = getattr(resample, "value", resample)
    return value if isinstance(value, int) else None


def _processor_geometry(settings: dict[str, Any]) -> tuple[int, int, float]:
    """(height, width, crop_pct) of the images an image processor makes: a resize to ``size`` (exact, or its shortest
    edge), then a center crop to ``crop_size`` when it crops (or ConvNeXt's ``crop_pct`` below 384 px)."""
    size = settings.get("size") or {}
    shortest = size.get("shortest_edge")
    height, width = (size["height"], size["width"]) if "height" in size else (shortest, shortest)
    if height is None:
        raise UnsupportedModelError(f"image processor size {size!r} names neither height/width nor shortest_edge")
    crop = settings.get("crop_size") if settings.get("do_center_crop") else None
    if crop:
        return crop["height"], crop["width"], crop["height"] / min(height, width)
    if settings.get("crop_pct") is not None and shortest is not None and shortest < 384:
        return shortest, shortest, float(settings["crop_pct"])
    return height, width, 1.0


def image_processor_for(preprocessing: Preprocessing) -> Any:
    """An image processor doing what ``preprocessing`` does: a resize to the input size (ViT's), or, with a crop, a
    resize of the shortest edge to ``size / crop_pct`` and a center crop (BiT's)."""
    transformers = _transformers()
    _, height, width = preprocessing.input_size
    resample = {name: code for code, name in _RESAMPLE.items()}.get(preprocessing.interpolation, 2)
    common = dict(image_mean=list(preprocessing.mean), image_std=list(preprocessing.std), resample=resample)
    if preprocessing.crop_pct >= 1.0:
        return transformers.ViTImageProcessor(size={"height": height, "width": width}, **common)
    short = int(min(height, width) / preprocessing.crop_pct)
    return transformers.BitImageProcessor(size={"shortest_edge": short}, crop_size={"height": height, "width": width},
                                          do_center_crop=True, do_convert_rgb=preprocessing.input_size[0] == 3, **common)
