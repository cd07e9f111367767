"""Shared fixtures of the motion tests: offline text encoder, one thread, and a tiny untrained
checkpoint written exactly as `polydiff train` writes final/."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polydiff.motion.recipe import MotionRecipe
from tests.modality_fixtures import jitter, offline, one_thread  # noqa: F401 (autouse)

# Two short buckets, a one-block transformer, two sampling steps.
TINY: dict[str, Any] = {
    "length_buckets": [40, 64],
    "sample_seconds": 2.0,
    "text_max_length": 8,
    "sample_steps": 2,
    "dit": {"dim": 32, "depth": 1, "heads": 2},
}


@pytest.fixture(scope="session")
def motion_checkpoint(tmp_path_factory) -> Path:
    from polydiff.core.train.trainer import write_final

    recipe = MotionRecipe.from_config(copy.deepcopy(TINY))
    torch.manual_seed(0)
    model = recipe.build_model()
    jitter(model)
    folder = tmp_path_factory.mktemp("motion") / "final"
    write_final(model, folder, "motion", recipe.config)
    return folder
