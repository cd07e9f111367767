"""Shared fixtures of the image tests: offline text encoder, tiny model configs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from polydiff.image.recipe import ImageRecipe
from tests.modality_fixtures import offline, one_thread  # noqa: F401 (autouse)

# Tiny configs: every model kind builds and runs in milliseconds on 8x8 images.
TINY: dict[str, dict[str, Any]] = {
    "unet": {
        "kind": "unet",
        "image_size": 8,
        "text_max_length": 8,
        "sample_steps": 3,
        "unet": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "heads": 2},
    },
    "dit": {
        "kind": "dit",
        "image_size": 8,
        "text_max_length": 8,
        "sample_steps": 3,
        "dit": {"patch": 2, "dim": 16, "depth": 1, "heads": 2},
    },
    "autoencoder": {
        "kind": "autoencoder",
        "image_size": 8,
        "autoencoder": {"latent_channels": 2, "base_channels": 8, "channel_mult": [1, 2]},
    },
    "latent_dit": {
        "kind": "latent_dit",
        "image_size": 8,
        "text_max_length": 8,
        "sample_steps": 3,
        "autoencoder": None,  # a saved autoencoder folder, filled in by the fixture
        "dit": {"dim": 16, "depth": 1, "heads": 2},
    },
}


@pytest.fixture(scope="session")
def recipe() -> type[ImageRecipe]:
    """The modality class: ``recipe.validate(raw)``, ``recipe(cfg).build_model()``."""
    return ImageRecipe


@pytest.fixture(scope="session")
def autoencoder_folder(tmp_path_factory, recipe) -> str:
    """A saved (untrained) tiny KL autoencoder, as a `kind: autoencoder` run leaves it."""
    from polydiff.core.pretrained import save_pretrained

    cfg = recipe.validate(TINY["autoencoder"])
    folder = tmp_path_factory.mktemp("ae") / "final"
    save_pretrained(recipe(cfg).build_model(), folder)
    return str(folder)


@pytest.fixture
def tiny(recipe, autoencoder_folder) -> Callable[..., dict[str, Any]]:
    """``tiny(kind, **overrides)`` -> a validated tiny model config."""

    def make(kind: str, **overrides: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(TINY[kind])
        if kind == "latent_dit":
            cfg["autoencoder"] = autoencoder_folder
        cfg.update(overrides)
        return recipe.validate(cfg)

    return make
