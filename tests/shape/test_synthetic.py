"""The synthetic primitives: every caption a closed, outward-facing mesh of few faces, Y up,
with the proportions its words promise (measured without knowing the random rotation),
and a shard set that cycles the captions and repeats exactly for a seed."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import trimesh

from polydiff.shape.data import normalize_mesh, occupancy
from polydiff.shape.synthetic import CAPTIONS, DEFAULT_COUNT, label, primitives, render

SEEDS = range(8)
PARTS = {"a table": 5, "a chair": 6, "a mug": 3}


def _height(mesh: trimesh.Trimesh) -> float:
    return float(mesh.extents[1])


def _radius(mesh: trimesh.Trimesh) -> float:
    """The largest distance of a vertex from the vertical axis through the bounding box's
    centre (the axis of an upright round shape: its polygons have an even number of sides,
    so the rotation about Y keeps that centre on the axis)."""
    centre = mesh.bounds.mean(axis=0)
    offsets = mesh.vertices[:, [0, 2]] - centre[[0, 2]]
    return float(np.sqrt((offsets**2).sum(axis=1)).max())


def _footprint(mesh: trimesh.Trimesh) -> np.ndarray:
    """The sorted edges (2,) of the smallest rectangle around the shape seen from above:
    width and depth whatever the rotation about Y."""
    _, extents = trimesh.bounds.oriented_bounds_2D(mesh.vertices[:, [0, 2]])
    return np.sort(extents)


def _ratio_ok(value: float, low: float, high: float) -> bool:
    return low - 1e-6 <= value <= high + 1e-6


@pytest.mark.parametrize("caption", CAPTIONS)
def test_every_caption_renders_closed_outward_facing_parts_of_few_faces(caption):
    for seed in SEEDS:
        mesh = render(caption, np.random.default_rng(seed))
        assert np.isfinite(mesh.vertices).all()
        assert 12 <= len(mesh.faces) <= 1500
        parts = mesh.split(only_watertight=False)
        assert len(parts) == PARTS.get(caption, 1)
        for part in parts:  # watertight, consistently wound, positive volume: a solid
            assert part.is_watertight and part.is_winding_consistent and part.volume > 0
        # Not normalised: a width of 0.5-1.5 units, the tallest 3.5 widths tall.
        assert 0.5 * 0.9 <= mesh.extents.max() <= 1.5 * 3.5


def test_each_word_keeps_its_proportions_whatever_the_rotation():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        shapes = {caption: render(caption, rng) for caption in CAPTIONS}

        sphere = shapes["a sphere"]
        distances = np.linalg.norm(sphere.vertices - sphere.bounds.mean(axis=0), axis=1)
        assert np.ptp(distances) < 1e-6 * distances.max()

        box = shapes["a box"]
        edges = np.append(_footprint(box), _height(box))
        assert edges.max() / edges.min() <= 1.3

        flat = shapes["a flat box"]
        for edge in _footprint(flat):
            assert _ratio_ok(_height(flat) / edge, 0.1, 0.3)

        for caption, (low, high) in {
            "a cylinder": (0.8, 1.3),
            "a tall cylinder": (2.2, 3.5),
        }.items():
            mesh = shapes[caption]
            assert _ratio_ok(_height(mesh) / (2 * _radius(mesh)), low, high)

        cone = shapes["a cone"]
        assert _ratio_ok(_height(cone) / (2 * _radius(cone)), 0.8, 1.5)
        top = cone.vertices[cone.vertices[:, 1].argmax()]
        centre = cone.bounds.mean(axis=0)
        assert np.hypot(*(top - centre)[[0, 2]]) < 1e-9  # the apex points up, on the axis

        torus = shapes["a torus"]
        tube = _height(torus) / 2  # lying flat: its height is the tube's diameter
        assert _ratio_ok(tube / (_radius(torus) - tube), 0.2, 0.4)

        capsule = shapes["a capsule"]
        assert _ratio_ok(_height(capsule) / (2 * _radius(capsule)), 1.6, 2.2)

        table = shapes["a table"]
        depth, width = _footprint(table)
        assert _ratio_ok(depth / width, 0.5, 0.9)
        assert _ratio_ok(_height(table) / width, 0.59, 0.92)

        chair = shapes["a chair"]  # height 1.66-2.4 widths, the depth 0.9-1.1 widths
        assert _ratio_ok(_height(chair) / _footprint(chair).max(), 1.66 / 1.1, 2.4)


def test_compound_shapes_are_hollow_where_their_words_say():
    rng = np.random.default_rng(0)
    table = normalize_mesh(render("a table", rng), "box")
    chair = normalize_mesh(render("a chair", rng), "box")
    mug = normalize_mesh(render("a mug", rng), "box")
    (x_low, y_low, z_low), (x_high, y_high, z_high) = table.bounds
    centre_x, centre_z = (x_low + x_high) / 2, (z_low + z_high) / 2
    below_top = [centre_x, y_low + 0.3 * (y_high - y_low), centre_z]  # between the legs
    in_top = [centre_x, y_high - 0.01, centre_z]
    assert occupancy(np.array([below_top, in_top]), table).tolist() == [False, True]
    # The top 30 % of a chair is only its back: a thin plate along one edge.
    low, high = chair.bounds[:, 1]
    upper = trimesh.PointCloud(chair.vertices[chair.vertices[:, 1] > low + 0.7 * (high - low)])
    thickness, width = _footprint(upper)
    assert thickness < 0.15 and width > 0.6
    # A mug: empty on its axis above the bottom, solid in its wall.
    wall = max(mug.split(only_watertight=False), key=_height)
    axis = wall.bounds.mean(axis=0)
    radius = _radius(wall)
    direction = (wall.vertices[0] - axis)[[0, 2]] / np.hypot(*(wall.vertices[0] - axis)[[0, 2]])
    in_wall = axis + 0.97 * radius * np.array([direction[0], 0.0, direction[1]])
    assert occupancy(np.array([axis, in_wall]), mug).tolist() == [False, True]
    assert _ratio_ok(_height(wall) / (2 * radius), 0.9, 1.3)
    # Nothing enters the cup above the bottom disc, the handle least of all: it only
    # reaches into the wall.
    offsets = wall.vertices[:, [0, 2]] - axis[[0, 2]]
    inner = np.sqrt((offsets**2).sum(axis=1)).min()
    low, high = wall.bounds[:, 1]
    grid = np.random.default_rng(1).uniform(size=(400, 3))
    angle, r = 2 * np.pi * grid[:, 0], 0.97 * inner * np.sqrt(grid[:, 1])
    y = low + 1.5 * (radius - inner) + grid[:, 2] * (high - low - 1.6 * (radius - inner))
    cup = np.stack([axis[0] + r * np.cos(angle), y, axis[2] + r * np.sin(angle)], axis=1)
    handle_centre = max(
        (part.bounds.mean(axis=0) for part in mug.split(only_watertight=False)),
        key=lambda centre: np.hypot(*(centre - axis)[[0, 2]]),
    )
    towards = (handle_centre - axis) * [1, 0, 1]
    towards /= np.linalg.norm(towards)
    ray = axis + np.linspace(0, 0.97 * inner, 50)[:, None] * towards
    ray[:, 1] = handle_centre[1]
    assert not occupancy(np.concatenate([cup, ray]), mug).any()


def test_an_unknown_caption_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown shape 'a teapot'.*a sphere, a box"):
        render("a teapot", np.random.default_rng(0))


def test_primitives_cycle_through_the_captions_and_repeat_for_a_seed():
    samples = list(primitives(22, seed=3))
    assert [s["__key__"] for s in samples[:3]] == ["000000", "000001", "000002"]
    assert Counter(s["json"]["caption"] for s in samples) == {caption: 2 for caption in CAPTIONS}
    assert samples[2]["json"] == {
        "caption": "a flat box", "label": "flat box", "source": "synthetic:primitives"
    }  # fmt: skip
    again = list(primitives(22, seed=3))
    assert [s["ply"] for s in again] == [s["ply"] for s in samples]
    other = list(primitives(22, seed=4))
    assert all(a["ply"] != b["ply"] for a, b in zip(samples, other, strict=True))
    # The PLY bytes hold exactly the rendered mesh of generator (seed, index).
    stored = trimesh.load(io.BytesIO(samples[9]["ply"]), file_type="ply", process=False)
    expected = render(CAPTIONS[9], np.random.default_rng([3, 9]))
    assert (
        np.allclose(stored.vertices, expected.vertices) and (stored.faces == expected.faces).all()
    )


def test_primitives_default_to_equal_numbers_of_each_kind_and_refuse_no_count():
    assert DEFAULT_COUNT % len(CAPTIONS) == 0 and DEFAULT_COUNT == 2200
    with pytest.raises(ValueError, match="count must be >= 1"):
        primitives(0)
    assert label("an apple") == "apple" and label("a tall cylinder") == "tall cylinder"
