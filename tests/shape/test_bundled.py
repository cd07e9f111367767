"""The bundled shape models: asked for each word of the synthetic vocabulary, the point model
makes that shape (the bundled evaluator names it), the latent model carries its autoencoder,
and both write meshes other tools open."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from polydiff.core.modality import GenerationRequest, generate_files
from polydiff.shape.metrics import prompt_adherence
from polydiff.shape.pipeline import generate
from polydiff.shape.recipe import ShapeRecipe
from polydiff.shape.synthetic import CAPTIONS

BUNDLED = ShapeRecipe.bundled[0].parent


def test_the_bundled_point_model_makes_every_word_of_the_vocabulary():
    # 512 points and 15 steps keep this quick; the benchmark measures the defaults.
    shapes = generate(list(CAPTIONS), seed=0, steps=15, points=512)
    clouds = torch.from_numpy(np.stack([s.points for s in shapes]))
    adherence = prompt_adherence(clouds, list(CAPTIONS))
    named = [c for c in CAPTIONS if adherence[c] == 1.0]
    assert len(named) >= 10, f"named with their prompt: {named}"


def test_the_bundled_point_model_meshes_a_torus_as_one_closed_ring(tmp_path):
    request = GenerationRequest.of(["a torus"], steps=15, seed=0, points=512)
    (path,) = generate_files("shape", request, tmp_path / "torus.obj")
    mesh = trimesh.load(path, force="mesh")
    assert mesh.is_watertight and mesh.euler_number == 0  # closed, with its hole (genus 1)
    extent = mesh.bounding_box.extents
    assert extent[1] < 0.5 * min(extent[0], extent[2])  # lying flat, Y up


def test_the_bundled_latent_model_makes_a_flat_torus_mesh(tmp_path):
    request = GenerationRequest.of(
        ["a torus"], checkpoint=BUNDLED / "latent", steps=15, seed=0, points=512
    )
    (path,) = generate_files("shape", request, tmp_path / "torus.glb")
    mesh = trimesh.load(path, force="mesh")
    assert len(mesh.faces) > 100
    extent = mesh.bounding_box.extents
    assert extent[1] < 0.8 * min(extent[0], extent[2])  # a ring lying flat, Y up


@pytest.mark.parametrize("folder", ["points", "latent"])
def test_bundled_checkpoints_are_small(folder):
    size = sum(p.stat().st_size for p in (BUNDLED / folder).rglob("*") if p.is_file())
    assert size < 12 * 2**20
