"""Generation from trained shape checkpoints (point model and latent model): clouds of the
asked size, files other tools open (PLY, GLB, OBJ) with how they were made, meshes for both
models, previews, same seed same shape, and one-line refusals before any sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from polydiff.core.modality import GenerationRequest, RequestError, generate_files
from polydiff.core.pretrained import CheckpointError
from polydiff.shape.export import read_provenance
from polydiff.shape.pipeline import MAX_TOTAL_POINTS, generate
from polydiff.shape.recipe import ShapeRecipe
from tests.shape.conftest import TINY, _write


def _make(checkpoint, prompts="a torus", **options):
    return generate(prompts, checkpoint=checkpoint, steps=2, **options)


@pytest.fixture(params=["points", "latent"])
def checkpoint(request, points_checkpoint, latent_checkpoint):
    return {"points": points_checkpoint, "latent": latent_checkpoint}[request.param]


def test_a_shape_has_the_points_asked_or_the_trained_count(checkpoint):
    (trained,) = _make(checkpoint)
    (more,) = _make(checkpoint, points=300)
    assert trained.points.shape == (64, 3) and more.points.shape == (300, 3)
    assert trained.points.dtype == np.float32 and np.isfinite(more.points).all()
    assert trained.mesh is None  # meshes are made only when asked for


def test_same_seed_same_shape_and_another_seed_another(checkpoint):
    (a,), (b,) = _make(checkpoint, seed=3), _make(checkpoint, seed=3)
    (c,) = _make(checkpoint, seed=4)
    assert np.array_equal(a.points, b.points) and not np.array_equal(a.points, c.points)


def test_outputs_do_not_depend_on_the_batch_size(checkpoint):
    prompts = ["a torus", "a box", "a cone"]
    one = _make(checkpoint, prompts, seed=5, batch_size=1)
    all_ = _make(checkpoint, prompts, seed=5, batch_size=3)
    for x, y in zip(one, all_, strict=True):
        np.testing.assert_allclose(x.points, y.points, rtol=1e-4, atol=1e-5)


def test_both_models_make_meshes_that_trimesh_reloads(checkpoint, tmp_path):
    request = GenerationRequest.of(["a sphere"], checkpoint=checkpoint, steps=2, seed=1)
    for suffix in (".glb", ".obj"):
        (path,) = generate_files("shape", request, tmp_path / f"sphere{suffix}")
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
        record = read_provenance(path)
        assert record["prompt"] == "a sphere" and record["seed"] == 1
        assert record["checkpoint"] == str(checkpoint)


def test_ply_holds_the_cloud_or_with_mesh_the_mesh(points_checkpoint, tmp_path):
    request = GenerationRequest.of(["a box", "a cone"], checkpoint=points_checkpoint, steps=2,
                                   points=200)  # fmt: skip
    written = generate_files("shape", request, tmp_path / "cloud.ply")
    assert [p.name for p in written] == ["cloud_0.ply", "cloud_1.ply"]
    cloud = trimesh.load(tmp_path / "cloud_1.ply")
    assert isinstance(cloud, trimesh.PointCloud) and len(cloud.vertices) == 200
    record = json.loads((tmp_path / "cloud_1.ply.json").read_text())
    assert record["prompt"] == "a cone" and record["points"] == 200
    assert record["normalize"] == "sphere" and record["up_axis"] == "Y"

    meshed = GenerationRequest.of(["a box"], checkpoint=points_checkpoint, steps=2, mesh=True)
    (path,) = generate_files("shape", meshed, tmp_path / "mesh.ply")
    assert isinstance(trimesh.load(path), trimesh.Trimesh)
    assert read_provenance(path)["mesh"] is True


def test_preview_renders_every_output_in_one_png(latent_checkpoint, tmp_path):
    preview = tmp_path / "views.png"
    request = GenerationRequest.of(["a torus", "a mug"], checkpoint=latent_checkpoint, steps=2,
                                   preview=preview)  # fmt: skip
    written = generate_files("shape", request, tmp_path / "s.ply")
    assert preview in written and Image.open(preview).format == "PNG"
    assert np.asarray(Image.open(preview).convert("L")).std() > 1  # not blank


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"points": 8}, "points"),
        ({"points": 10**9}, "points"),
        ({"points": 2.5}, "points"),
        ({"mesh": "yes"}, "mesh"),
        ({"preview": "x.jpg"}, "preview"),
        ({"preview": "/no/such/folder/x.png"}, "preview"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_sampling(points_checkpoint, options, option):
    request = GenerationRequest.of(["a box"], checkpoint=points_checkpoint, **options)
    with pytest.raises(RequestError) as caught:
        generate_files("shape", request, "/tmp/never-written.ply")
    assert caught.value.option == option and "\n" not in str(caught.value)


def test_one_call_is_bounded_in_points(points_checkpoint):
    num = MAX_TOTAL_POINTS // 16_384 + 1
    with pytest.raises(RequestError, match="split the request"):
        _make(points_checkpoint, num=num, points=16_384)


def test_a_preview_is_bounded_in_shapes(points_checkpoint, tmp_path):
    with pytest.raises(RequestError, match="at most 16 shapes"):
        _make(points_checkpoint, num=17, preview=tmp_path / "p.png")


def test_an_autoencoder_is_not_a_generator(autoencoder_checkpoint):
    with pytest.raises(CheckpointError, match="autoencoder"):
        _make(autoencoder_checkpoint)


def test_class_conditioned_checkpoints_take_their_class_names_only(tmp_path):
    config = {**TINY, "conditioning": "label", "classes": ["a box", "a torus"]}
    folder = _write(config, tmp_path / "labels")
    (shape,) = _make(folder, "a torus")
    assert shape.points.shape == (64, 3)
    with pytest.raises(RequestError, match="class-conditioned"):
        _make(folder, "a chair")


def test_class_conditioned_training_reads_the_label_of_a_sample():
    recipe = ShapeRecipe.from_config({**TINY, "conditioning": "label", "classes": ["a box"]})
    model = recipe.build_model()
    batch = {"points": torch.randn(2, 64, 3), "label": ["a box", "a box"],
             "caption": ["", ""]}  # fmt: skip
    loss = recipe.loss(model, batch, torch.Generator().manual_seed(0), "model")
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_training_previews_render_at_most_one_preview_of_shapes(tmp_path):
    classes = [f"class {i}" for i in range(20)]  # more classes than a preview renders
    recipe = ShapeRecipe.from_config({**TINY, "conditioning": "label", "classes": classes})
    (path,) = recipe.preview(recipe.build_model().eval(), tmp_path, step=0)
    assert path.name == "previews.png" and Image.open(path).size == (3 * 256, 16 * 256)
