"""Loading what ``polydiff train`` wrote: a ``final/`` folder, checked to be the right modality.

A trained checkpoint is ``model.safetensors`` + ``config.json`` with ``{"class", "config",
"modality", "model": <the validated model config>}``; the model config carries the schedule,
prediction type, text encoder and sampling defaults that generation needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..pretrained import CONFIG_NAME, CheckpointError, from_pretrained
from .recipe import ConfigError, Recipe

__all__ = ["bundled", "load_trained"]


def load_trained(
    folder: str | Path, recipe: Recipe, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained model of ``recipe``'s modality and its validated model config.

    Raises:
        CheckpointError: missing folder, corrupt or mismatched files, another modality's
            model, or no usable ``model`` section in ``config.json``.
    """
    folder = Path(folder)
    model = from_pretrained(folder, map_location=device)  # checks folder, JSON and weights
    record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    modality = record.get("modality", recipe.name)
    if modality != recipe.name:
        article = "an" if recipe.name[:1] in "aeiou" else "a"
        raise CheckpointError(
            f"{folder} holds a {modality!r} model, not {article} {recipe.name} model"
        )
    if not isinstance(record.get("model"), Mapping):
        raise CheckpointError(
            f"{folder / CONFIG_NAME} has no 'model' section (the model config the trainer "
            "records); is this a `polydiff train` final/ folder?"
        )
    try:
        model_cfg = recipe.validate(record["model"])
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: invalid model config: {e}") from e
    return model, model_cfg


def bundled(folder: Path, modality: str, config: str) -> Path:
    """``folder``, a checkpoint that ships inside a modality package, if it is there.

    Raises:
        FileNotFoundError: the package was installed without it; the message says how to
            train it (``polydiff train --config <config>``) or to pass ``--checkpoint``.
    """
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the bundled {modality} checkpoint is missing ({folder}); pass --checkpoint DIR "
            f"or train it with `polydiff train --config {config}`"
        )
    return folder
