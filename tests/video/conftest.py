"""Shared fixtures of the video tests: offline text encoder, real moving-shapes clips, a tiny
video DiT saved as a `polydiff train` final/ folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polydiff.video.recipe import VideoRecipe
from polydiff.video.synthetic import moving_shapes
from tests.modality_fixtures import offline, one_thread  # noqa: F401 (autouse)

# A tiny model: 8 frames of 32x32, 2x4x4 tubelets = 256 tokens, one block. (32, not 16:
# decord 0.6 cannot return frames 16, 24 or 48 pixels wide.)
TINY: dict[str, Any] = {
    "frames": 8,
    "height": 32,
    "width": 32,
    "fps": 8,
    "text_max_length": 12,
    "sample_steps": 3,
    "dit": {"patch": [2, 4, 4], "dim": 24, "depth": 1, "heads": 4},
}


@pytest.fixture(scope="session")
def recipe() -> type[VideoRecipe]:
    """The modality class: ``recipe.validate(raw)``, ``recipe(cfg).build_model()``."""
    return VideoRecipe


@pytest.fixture
def tiny(recipe):
    """``tiny(**overrides)`` -> a validated tiny video model config (``dit`` merged)."""

    def make(**overrides: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(TINY)
        cfg["dit"].update(overrides.pop("dit", {}))
        cfg.update(overrides)
        return recipe.validate(cfg)

    return make


@pytest.fixture(scope="session")
def clips() -> list[dict[str, Any]]:
    """21 real moving-shapes shard samples (H.264 MP4 bytes, caption, metadata)."""
    return list(moving_shapes(21, seed=7))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, recipe) -> Path:
    """An untrained tiny video DiT written exactly as the trainer writes final/."""
    from polydiff.core.train.trainer import write_final

    cfg = recipe.validate(copy.deepcopy(TINY))
    torch.manual_seed(0)
    model = recipe(cfg).build_model()
    # Nonzero adaLN/final layers, so the untrained model's output depends on its inputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("video") / "final"
    write_final(model, folder, "video", cfg)
    return folder
