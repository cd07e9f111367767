"""Fixtures the provenance and export tests share: a checkpoint-like folder, a umask of 022
and records as the generation path makes them (import them into a test module)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from polydiff.core.provenance import provenance

__all__ = ["checkpoint", "records", "umask_022"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def checkpoint(tmp_path_factory) -> Path:
    """A folder with ``model.safetensors`` bytes (enough for a checkpoint id) and a config."""
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 20)
    (folder / "config.json").write_text("{}")
    return folder


def records(checkpoint: Path, n: int, **fields: Any) -> list[dict[str, Any]]:
    """``n`` provenance records (index 0 .. n-1) of an image by default; ``fields`` override
    or add (``modality="video", frames=6``)."""
    base = {
        "modality": "image",
        "prompt": "a handwritten digit 7",
        "seed": 0,
        "sampler": "unipc",
        "steps": 30,
        "guidance": 3.0,
        "checkpoint": checkpoint,
        **fields,
    }
    return [provenance(index=i, **base) for i in range(n)]
