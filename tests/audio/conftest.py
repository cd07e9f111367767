"""Shared fixtures of the audio tests: offline text encoder, one thread, a tiny mel DiT (with
a tiny neural vocoder) saved as a `polydiff train` final/ folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polydiff.audio.recipe import AudioRecipe
from tests.modality_fixtures import jitter, offline, one_thread  # noqa: F401 (autouse)

# Half-second sounds: 32 frames, 8 tokens of 4 frames, one block.
TINY: dict[str, Any] = {
    "seconds": 0.5,
    "text_max_length": 8,
    "sample_steps": 2,
    "dit": {"patch": 4, "dim": 32, "depth": 1, "heads": 2},
}
TINY_VOCODER: dict[str, Any] = {
    "kind": "vocoder",
    "gan": {"segment_seconds": 0.1, "dim": 16, "intermediate": 32, "layers": 1,
            "periods": [2, 3], "discriminator_channels": 4},
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_vocoder_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny neural vocoder written exactly as the trainer writes final/."""
    from polydiff.core.train.trainer import write_final

    recipe = AudioRecipe.from_config(copy.deepcopy(TINY_VOCODER))
    torch.manual_seed(0)
    gan = recipe.build_model()
    folder = tmp_path_factory.mktemp("vocoder") / "final"
    write_final(gan.generator, folder, "audio", recipe.config)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_vocoder_checkpoint) -> Path:
    """An untrained tiny mel DiT carrying the tiny vocoder, as the trainer writes final/."""
    from polydiff.core.train.trainer import write_final

    recipe = AudioRecipe.from_config(
        {**copy.deepcopy(TINY), "vocoder": str(tiny_vocoder_checkpoint)}
    )
    torch.manual_seed(0)
    model = recipe.build_model()
    jitter(model)
    folder = tmp_path_factory.mktemp("audio") / "final"
    write_final(model, folder, "audio", recipe.config)
    return folder
