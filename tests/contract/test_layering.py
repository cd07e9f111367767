"""Layering a reader can see: inference never loads the trainer or DeepSpeed, a modality's
pipeline does not import its recipe, and the core never imports a modality."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    [
        "polydiff.core.modality",
        "polydiff.image.pipeline",
        "polydiff.image.recipe",
        "polydiff.video.pipeline",
        "polydiff.video.recipe",
        "polydiff.audio.pipeline",
        "polydiff.audio.recipe",
        "polydiff.shape.pipeline",
        "polydiff.shape.recipe",
        "polydiff.motion.pipeline",
        "polydiff.motion.recipe",
        "polydiff.cli.main",
    ],
)
def test_inference_and_modalities_load_neither_the_trainer_nor_deepspeed(module):
    loaded = _loaded_after(module)
    assert "deepspeed" not in loaded
    assert not {m for m in loaded if m.startswith("polydiff.core.train")}


@pytest.mark.parametrize("modality", ["image", "video", "audio", "shape", "motion"])
def test_a_pipeline_does_not_import_its_recipe(modality):
    assert f"polydiff.{modality}.recipe" not in _loaded_after(f"polydiff.{modality}.pipeline")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_core_never_imports_a_modality():
    core = ROOT / "packages" / "core" / "src" / "polydiff" / "core"
    for path in core.rglob("*.py"):
        bad = {
            name for name in _imports(path)
            if name.startswith("polydiff.") and not name.startswith("polydiff.core")
        }  # fmt: skip
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
