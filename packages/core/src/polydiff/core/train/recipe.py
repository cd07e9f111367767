"""The trainer's names for the modality contract (``polydiff.core.modality.contract``): a
recipe is a :class:`~polydiff.core.modality.Modality` class."""

from __future__ import annotations

from ..modality.contract import (
    ENTRY_POINT_GROUP,
    ConfigError,
    available_modalities,
)
from ..modality.contract import Modality as Recipe
from ..modality.contract import load_modality as load_recipe

__all__ = ["ENTRY_POINT_GROUP", "ConfigError", "Recipe", "available_modalities", "load_recipe"]
