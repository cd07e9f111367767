"""How a modality plugs into the shared trainer and CLI: a small recipe, found by entry point.

A modality package registers ``<name> = <module>:<RecipeClass>`` in the entry-point group
``polydiff.modalities``; the trainer and the CLI never import a modality by name.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["ENTRY_POINT_GROUP", "ConfigError", "Recipe", "available_modalities", "load_recipe"]

ENTRY_POINT_GROUP = "polydiff.modalities"


class ConfigError(ValueError):
    """A config is missing a key, has an unknown key, or a value out of range (names it)."""


@runtime_checkable
class Recipe(Protocol):
    """What a modality provides to train and sample.

    ``model_cfg`` is the ``model:`` section of the YAML config; ``sample`` is one raw WebDataset
    sample (a dict of ``__key__``, ``__url__`` and encoded payload fields such as ``png`` bytes,
    ``txt`` caption, ``json`` metadata).
    """

    name: str

    def validate(self, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Return the model config with defaults filled in; raise ConfigError naming a bad key."""
        ...

    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        """The denoiser to train (a ``Configurable`` module, so ``save_pretrained`` works)."""
        ...

    def decode(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Encoded sample -> tensors (runs in loader workers). Raise on a corrupt sample."""
        ...

    def bucket(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> Hashable | None:
        """Bucket key of a raw (still encoded) sample, e.g. (frames, h, w) from its metadata;
        None for fixed-size samples. Raise for a sample that fits no bucket (it is counted as
        bad and skipped)."""
        ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Decoded samples of one bucket -> a batch."""
        ...

    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        generator: torch.Generator,
        model_cfg: Mapping[str, Any],
    ) -> Tensor:
        """The scalar training loss of one micro-batch (use ``polydiff.core.objectives``)."""
        ...

    def preview(
        self, model: nn.Module, out_dir: Path, step: int, model_cfg: Mapping[str, Any]
    ) -> list[Path]:
        """Write a few samples from ``model`` (EMA weights) into ``out_dir``; return the files."""
        ...

    def synthetic(self, name: str, count: int | None) -> Iterator[dict[str, Any]]:
        """Samples of a built-in procedural set (``synthetic:NAME[:COUNT]``) as shard dicts."""
        ...

    def source(self, folder: Path) -> Iterator[dict[str, Any]]:
        """Samples read from a user's folder as shard dicts; unreadable inputs are yielded as
        ``polydiff.core.data.Skip`` records so they are counted, never silently dropped."""
        ...


def available_modalities() -> list[str]:
    """Names of the installed modalities (entry points in ``polydiff.modalities``)."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_recipe(name: str) -> Recipe:
    """Instantiate the recipe registered as ``name`` (or given as ``module:Class``, for a
    user's own recipe that is not installed as a package); ValueError lists the installed ones.
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        target = f"{module}:{attr}"
        factory = getattr(import_module(module), attr)
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            names = ", ".join(available_modalities()) or "none installed"
            raise ValueError(f"unknown modality {name!r}; installed: {names}")
        target, factory = found[0].value, found[0].load()
    recipe = factory()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"{target} does not implement polydiff.core.train.Recipe")
    return recipe
