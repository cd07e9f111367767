"""Shared fixtures of the shape tests: offline text encoder, one thread, and tiny untrained
checkpoints written exactly as `polydiff train` writes final/: a point denoiser, a point
autoencoder and a latent denoiser carrying it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polydiff.shape.recipe import ShapeRecipe
from tests.modality_fixtures import jitter, offline, one_thread  # noqa: F401 (autouse)

# 64 points per shape, a one-block DiT.
TINY: dict[str, Any] = {
    "points": 64,
    "text_max_length": 8,
    "sample_steps": 2,
    "mesh_resolution": 16,
    "dit": {"dim": 32, "depth": 1, "heads": 2},
}
TINY_AUTOENCODER: dict[str, Any] = {
    "kind": "autoencoder",
    "points": 64,
    "queries": 64,
    "mesh_resolution": 16,
    "autoencoder": {"latents": 4, "latent_channels": 4, "dim": 16, "heads": 2,
                    "encoder_depth": 1, "decoder_depth": 1, "frequencies": 2},
}  # fmt: skip


def _write(config: dict[str, Any], folder: Path) -> Path:
    from polydiff.core.train.trainer import write_final

    recipe = ShapeRecipe.from_config(copy.deepcopy(config))
    torch.manual_seed(0)
    model = recipe.build_model()
    jitter(model)
    write_final(model, folder, "shape", recipe.config)
    return folder


@pytest.fixture(scope="session")
def points_checkpoint(tmp_path_factory) -> Path:
    return _write(TINY, tmp_path_factory.mktemp("points") / "final")


@pytest.fixture(scope="session")
def autoencoder_checkpoint(tmp_path_factory) -> Path:
    return _write(TINY_AUTOENCODER, tmp_path_factory.mktemp("autoencoder") / "final")


@pytest.fixture(scope="session")
def latent_checkpoint(tmp_path_factory, autoencoder_checkpoint) -> Path:
    config = {**TINY, "kind": "latent", "codec": str(autoencoder_checkpoint)}
    return _write(config, tmp_path_factory.mktemp("latent") / "final")
