"""Loading what ``polydiff train`` wrote: a ``final/`` folder, checked to be the right modality.

A trained checkpoint is ``model.safetensors`` + ``config.json`` with ``{"class", "config",
"modality", "model": <the validated model config>}``; the model config carries the schedule,
prediction type, conditioning and sampling defaults that generation needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..pretrained import CONFIG_NAME, CheckpointError, from_pretrained
from .contract import ConfigError, Modality

__all__ = ["bundled_checkpoint", "load_trained"]


def load_trained(
    folder: str | Path,
    modality: type[Modality],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Modality]:
    """Load a trained model of ``modality`` and the modality bound to its recorded config.

    The model is in eval mode on ``device`` (cast to ``dtype`` when given).

    Raises:
        CheckpointError: missing folder, corrupt or mismatched files, another modality's
            model, or no usable ``model`` section in ``config.json``.
    """
    folder = Path(folder)
    model = from_pretrained(folder, map_location=device)  # checks folder, JSON and weights
    record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    recorded = record.get("modality", modality.name)
    if recorded != modality.name:
        article = "an" if modality.name[:1] in "aeiou" else "a"
        raise CheckpointError(
            f"{folder} holds a {recorded!r} model, not {article} {modality.name} model"
        )
    if not isinstance(record.get("model"), Mapping):
        raise CheckpointError(
            f"{folder / CONFIG_NAME} has no 'model' section (the model config the trainer "
            "records); is this a `polydiff train` final/ folder?"
        )
    try:
        bound = modality.from_config(record["model"])
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: invalid model config: {e}") from e
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval(), bound


def bundled_checkpoint(modality: type[Modality]) -> Path:
    """The checkpoint that ships inside ``modality``'s package (``Modality.bundled``).

    Raises:
        FileNotFoundError: none ships, or the package was installed without it; the message
            says how to train it (``polydiff train --config <config>``) or to pass
            ``--checkpoint``.
    """
    if modality.bundled is None:
        raise FileNotFoundError(
            f"the {modality.name} modality ships no model; pass --checkpoint DIR"
        )
    folder, config = modality.bundled
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the bundled {modality.name} checkpoint is missing ({folder}); pass --checkpoint "
            f"DIR or train it with `polydiff train --config {config}`"
        )
    return folder
