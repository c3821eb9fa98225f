"""The interface every checkpoint format implements: recognize, load, save, preprocess, and the model facts it knows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .preprocessing import Preprocessing


class CheckpointFormat(ABC):
    """One way of laying a network out on disk (a ``config.json`` plus ``model.safetensors``, and what else it needs).

    A format recognizes its directories by their ``config.json`` and its modules by their class; it builds a network
    from a config, writes one back, says how its inputs are preprocessed, and builds fresh networks of an architecture
    name for recipes. ``library`` is the model card's ``library_name``; ``extra_files`` are optional files read beside
    the config and weights (fetched from the Hub when there).
    """

    name: ClassVar[str]
    library: ClassVar[str]
    extra_files: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def claims(self, config: dict[str, Any]) -> bool:
        """Whether a directory whose ``config.json`` holds ``config`` is in this format."""

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` is a network of this format."""

    @abstractmethod
    def build(self, directory: Path, reference: str) -> nn.Module:
        """A randomly initialized network from ``directory``'s config (its weights are loaded afterwards)."""

    @abstractmethod
    def save(self, model: nn.Module, folder: Path, *, label_names: list[str] | None, preprocessing: Preprocessing | None,
             license: str | None) -> None:
        """Write ``model``'s config, weights and format-specific files into the empty ``folder``."""

    @abstractmethod
    def preprocessing(self, model: nn.Module, image_size: int | None) -> Preprocessing:
        """How images become ``model``'s inputs (at ``image_size`` when given)."""

    @abstractmethod
    def architecture(self, model: nn.Module) -> str:
        """The architecture's name: what :meth:`create` builds again, and what records and messages show."""

    @abstractmethod
    def input_channels(self, model: nn.Module) -> int:
        """The channels ``model`` reads."""

    @abstractmethod
    def num_classes(self, model: nn.Module) -> int:
        """The outputs of ``model``'s head (0 when it has none)."""

    @abstractmethod
    def handles(self, architecture: str) -> bool:
        """Whether :meth:`create` can build ``architecture``."""

    @abstractmethod
    def create(self, architecture: str, model_args: dict[str, Any]) -> nn.Module:
        """A fresh, randomly initialized network of ``architecture`` (a recipe's) built with ``model_args``."""

    @abstractmethod
    def model_args(self, model: nn.Module) -> dict[str, Any]:
        """The ``model_args`` with which :meth:`create` builds ``model``'s architecture again."""

    def logits(self, output: Any) -> Any:
        """The tensor of predictions in a forward's ``output`` when this format wraps it, else ``output`` unchanged."""
        return output
