"""Fixtures the core training tests share (none autouse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polydiff.core.data import write_shards
from tests.core.train_fixtures import TinyRecipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """70 vectors of the tiny recipe's Gaussian mixture in shards of 20, 20, 20, 10 (uneven)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(TinyRecipe.synthetic("gauss", 70), out, maxcount=20)
    return out
