"""Writing shapes: binary PLY points and meshes, GLB and OBJ meshes that trimesh (and so three.js
and Blender) read back, the provenance record embedded and beside each file, atomic writes,
closed surfaces from sampled fields and from bare point clouds, and headless preview PNGs."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image

from polydiff.shape.export import (
    COMMENT_LINE_BYTES,
    MESH_ONLY_SUFFIXES,
    SHAPE_OUTPUT_SUFFIXES,
    Shape,
    field_to_mesh,
    points_to_mesh,
    read_provenance,
    render_preview,
    save_shapes,
)

RECORD = {
    "format": "polydiff-provenance/1",
    "modality": "shape",
    "prompt": "a chair with  four legs, ein Stuhl – 椅子",
    "negative_prompt": None,
    "seed": 3,
    "polydiff_version": "0.1.0",
    "created": "2025-01-31T12:00:00Z",
    "points": 2048,
}
BOUND = 1.1


def _grid(resolution: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(-BOUND, BOUND, resolution)
    return np.meshgrid(axis, axis, axis, indexing="ij")


def _sphere_field(radius: float = 0.8, resolution: int = 64) -> np.ndarray:
    x, y, z = _grid(resolution)
    return radius - np.sqrt(x**2 + y**2 + z**2)  # signed distance, positive inside


def _torus_field(major: float = 0.6, minor: float = 0.25) -> np.ndarray:
    x, y, z = _grid()
    return minor - np.sqrt((np.sqrt(x**2 + z**2) - major) ** 2 + y**2)  # ring around Y


def _surface_points(mesh: trimesh.Trimesh, count: int = 2048, seed: int = 0) -> np.ndarray:
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return points.astype(np.float32)


def _mesh_shape() -> Shape:
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.9)
    return Shape(points=_surface_points(mesh, 256), mesh=mesh)


def _point_shape() -> Shape:
    return Shape(points=_surface_points(trimesh.creation.box((1.2, 1.6, 0.8)), 512))


def _header(path) -> bytes:
    data = path.read_bytes()
    return data[: data.index(b"end_header\n")]


# --- files ------------------------------------------------------------------------------


def test_a_point_cloud_is_a_binary_little_endian_vertex_only_ply(tmp_path):
    shape = _point_shape()
    [path] = save_shapes([shape], [tmp_path / "cloud.ply"])
    header = _header(path)
    assert header.startswith(b"ply\nformat binary_little_endian 1.0\n")
    assert b"element vertex 512\n" in header and b"element face" not in header
    back = trimesh.load(path)
    assert isinstance(back, trimesh.PointCloud)
    np.testing.assert_array_equal(np.asarray(back.vertices, dtype=np.float32), shape.points)


def test_a_shape_with_a_mesh_writes_the_mesh_to_ply(tmp_path):
    shape = _mesh_shape()
    [path] = save_shapes([shape], [tmp_path / "ball.ply"])
    assert b"element face 320\n" in _header(path)
    back = trimesh.load(path)
    assert isinstance(back, trimesh.Trimesh)
    assert (len(back.vertices), len(back.faces)) == (162, 320)
    np.testing.assert_allclose(back.vertices, shape.mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.faces, shape.mesh.faces)


@pytest.mark.parametrize("suffix", MESH_ONLY_SUFFIXES)
def test_glb_and_obj_reload_as_the_same_mesh(tmp_path, suffix):
    shape = _mesh_shape()
    [path] = save_shapes([shape], [tmp_path / f"ball{suffix}"])
    back = trimesh.load(path, force="mesh")
    assert (len(back.vertices), len(back.faces)) == (162, 320)
    # Same vertices in the same frame: nothing rescaled, no axis swapped.
    np.testing.assert_allclose(
        np.sort(back.vertices, axis=0), np.sort(shape.mesh.vertices, axis=0), atol=1e-6
    )
    assert back.is_watertight and back.volume > 0


def test_a_glb_is_one_valid_gltf_2_file_with_normals_and_a_matte_material(tmp_path):
    [path] = save_shapes([_mesh_shape()], [tmp_path / "ball.glb"])
    data = path.read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert (magic, version, length) == (b"glTF", 2, len(data))
    chunk_length, chunk_type = struct.unpack("<II", data[12:20])
    assert chunk_type == 0x4E4F534A  # "JSON"
    tree = json.loads(data[20 : 20 + chunk_length])
    assert tree["asset"]["version"] == "2.0"
    [primitive] = tree["meshes"][0]["primitives"]
    assert {"POSITION", "NORMAL"} <= set(primitive["attributes"])
    material = tree["materials"][primitive["material"]]
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    assert "extras" not in tree["asset"]  # no record given: no provenance
    assert struct.unpack("<I", data[24 + chunk_length : 28 + chunk_length]) == (0x004E4942,)  # BIN


def test_obj_has_vertex_normals_for_smooth_shading(tmp_path):
    [path] = save_shapes([_mesh_shape()], [tmp_path / "ball.obj"])
    lines = path.read_text(encoding="ascii").splitlines()
    assert sum(line.startswith("vn ") for line in lines) == 162
    assert all("//" in line for line in lines if line.startswith("f "))


@pytest.mark.parametrize("suffix", SHAPE_OUTPUT_SUFFIXES)
def test_the_record_is_embedded_in_every_format_and_written_beside(tmp_path, suffix):
    path = tmp_path / f"chair{suffix}"
    save_shapes([_mesh_shape()], [path], [RECORD])
    assert read_provenance(path) == RECORD
    assert json.loads((tmp_path / f"chair{suffix}.json").read_text(encoding="utf-8")) == RECORD
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"chair{suffix}", f"chair{suffix}.json"]
    assert trimesh.load(path, force="mesh").faces.shape == (320, 3)  # still a valid file


def test_a_point_ply_carries_its_record_in_header_comments(tmp_path):
    path = tmp_path / "cloud.ply"
    save_shapes([_point_shape()], [path], [RECORD])
    comments = [line for line in _header(path).split(b"\n") if line.startswith(b"comment ")]
    assert any(line.startswith(b"comment polydiff-provenance {") for line in comments)
    assert read_provenance(path) == RECORD
    assert len(trimesh.load(path).vertices) == 512


@pytest.mark.parametrize("suffix", [".ply", ".obj"])
def test_a_long_record_is_split_into_comment_lines_short_enough_for_every_reader(tmp_path, suffix):
    record = {**RECORD, "prompt": "a tall wooden chair with a curved back – 椅子 " * 80}
    path = tmp_path / f"long{suffix}"
    save_shapes([_mesh_shape()], [path], [record])
    text = path.read_bytes()
    head = text[: text.index(b"end_header\n")] if suffix == ".ply" else text[:20_000]
    tagged = [line for line in head.split(b"\n") if b"polydiff-provenance " in line]
    assert len(tagged) > 3
    assert all(len(line) + 1 <= COMMENT_LINE_BYTES for line in tagged)
    head.decode("ascii")  # non-ASCII characters are escaped: a PLY header is ASCII
    assert read_provenance(path) == record


def test_the_glb_record_is_in_asset_and_scene_extras(tmp_path):
    path = tmp_path / "chair.glb"
    save_shapes([_mesh_shape()], [path], [RECORD])
    data = path.read_bytes()
    (chunk_length,) = struct.unpack("<I", data[12:16])
    tree = json.loads(data[20 : 20 + chunk_length])
    assert tree["asset"]["extras"] == RECORD
    assert tree["scenes"][tree["scene"]]["extras"] == RECORD


def test_empty_records_mean_no_provenance_and_no_sidecar(tmp_path):
    paths = [tmp_path / "a.ply", tmp_path / "b.glb", tmp_path / "c.obj"]
    save_shapes([_mesh_shape()] * 3, paths, [{}, {}, {}])
    assert [read_provenance(p) for p in paths] == [None, None, None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ply", "b.glb", "c.obj"]


def test_missing_folders_are_created(tmp_path):
    [path] = save_shapes([_point_shape()], [tmp_path / "new" / "deeper" / "cloud.ply"], [RECORD])
    assert path.is_file() and read_provenance(path) == RECORD
    assert sorted(p.name for p in path.parent.iterdir()) == ["cloud.ply", "cloud.ply.json"]


def test_one_out_file_expands_to_numbered_files(tmp_path):
    written = save_shapes([_point_shape(), _point_shape()], tmp_path / "shape")
    assert written == [tmp_path / "shape_0.ply", tmp_path / "shape_1.ply"]
    assert all(p.is_file() for p in written)


@pytest.mark.parametrize("suffix", MESH_ONLY_SUFFIXES)
def test_a_mesh_file_for_a_shape_without_mesh_is_refused_before_anything_is_written(
    tmp_path, suffix
):
    with pytest.raises(ValueError, match=rf"b{suffix}: a \{suffix} file holds a mesh"):
        save_shapes(
            [_mesh_shape(), _point_shape()],
            [tmp_path / "a.ply", tmp_path / f"b{suffix}"],
            [RECORD, RECORD],
        )
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"cannot write '\.stl' shapes"):
        save_shapes([_mesh_shape()], [tmp_path / "a.stl"])
    with pytest.raises(ValueError, match="got 2 paths for 1 shapes"):
        save_shapes([_mesh_shape()], [tmp_path / "a.ply", tmp_path / "b.ply"])
    with pytest.raises(ValueError, match="not JSON"):
        save_shapes([_mesh_shape()], [tmp_path / "a.ply"], [{"guidance": math.nan}])
    with pytest.raises(ValueError, match="no shapes"):
        save_shapes([], [])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_partial_file_and_the_old_target_as_it_was(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OSError):
        save_shapes([_mesh_shape()], [blocker / "ball.glb"], [RECORD])
    taken = tmp_path / "taken.ply"
    taken.mkdir()  # replacing a folder with the finished file fails at the very end
    with pytest.raises(OSError):
        save_shapes([_mesh_shape()], [taken], [RECORD])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder", "taken.ply"]
    assert taken.is_dir() and list(taken.iterdir()) == []
    assert blocker.read_text() == "x"


def test_a_shape_checks_its_points():
    assert Shape(points=np.zeros((5, 3), dtype=np.float64)).points.dtype == np.float32
    with pytest.raises(ValueError, match=r"must be \(N, 3\)"):
        Shape(points=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        Shape(points=np.full((5, 3), np.nan))


# --- surfaces from fields ---------------------------------------------------------------


def test_a_sphere_field_gives_a_closed_sphere_of_the_right_volume_facing_out():
    mesh = field_to_mesh(_sphere_field(0.8), bound=BOUND)
    assert mesh.is_watertight and mesh.euler_number == 2
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.8**3, rel=0.02)
    outward = np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices)
    assert (outward > 0).all()
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), 0.8, atol=0.01)


def test_a_torus_field_keeps_its_hole():
    mesh = field_to_mesh(_torus_field(0.6, 0.25), bound=BOUND)
    assert mesh.is_watertight and mesh.euler_number == 0  # genus 1
    assert mesh.volume == pytest.approx(2 * math.pi**2 * 0.6 * 0.25**2, rel=0.03)


def test_field_axes_are_x_y_z_in_index_order():
    x, y, z = _grid()
    ellipsoid = 1.0 - np.sqrt((x / 0.9) ** 2 + (y / 0.5) ** 2 + (z / 0.3) ** 2)
    mesh = field_to_mesh(ellipsoid, bound=BOUND)
    np.testing.assert_allclose(mesh.extents, [1.8, 1.0, 0.6], atol=0.04)


def test_only_the_largest_piece_of_a_field_is_kept():
    x, y, z = _grid()
    big = 0.5 - np.sqrt((x + 0.4) ** 2 + y**2 + z**2)
    speck = 0.15 - np.sqrt((x - 0.75) ** 2 + y**2 + z**2)
    mesh = field_to_mesh(np.maximum(big, speck), bound=BOUND)
    assert mesh.is_watertight and mesh.bounds[1, 0] == pytest.approx(0.1, abs=0.02)


def test_a_shape_reaching_the_grid_edge_is_capped_closed():
    mesh = field_to_mesh(_sphere_field(1.5, 32), bound=BOUND)
    assert mesh.is_watertight
    np.testing.assert_allclose(mesh.bounds, [[-BOUND] * 3, [BOUND] * 3], atol=1e-6)


def test_an_occupancy_level_and_a_field_without_surface():
    occupancy = (_sphere_field(0.7, 48) > 0).astype(np.float32)
    mesh = field_to_mesh(occupancy, bound=BOUND, level=0.5)
    assert mesh.is_watertight and mesh.volume == pytest.approx(4 / 3 * math.pi * 0.7**3, rel=0.06)
    with pytest.raises(ValueError, match=r"no surface at level 0: the field lies in \[0.2, 0.2\]"):
        field_to_mesh(np.full((16, 16, 16), 0.2))
    with pytest.raises(ValueError, match="no surface at level 2"):
        field_to_mesh(_sphere_field(0.5, 16), level=2.0)
    with pytest.raises(ValueError, match=r"expected an \(R, R, R\) field"):
        field_to_mesh(np.zeros((8, 8, 4)))


# --- surfaces from points ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mesh",
    [trimesh.creation.icosphere(subdivisions=4, radius=1.0), trimesh.creation.box((1.6, 1.0, 0.6))],
    ids=["sphere", "box"],
)
def test_points_on_a_closed_surface_give_a_watertight_mesh_of_its_volume(mesh):
    surface = points_to_mesh(_surface_points(mesh, 2048), resolution=64)
    assert surface.is_watertight and surface.euler_number == 2
    assert surface.volume == pytest.approx(mesh.volume, rel=0.10)
    np.testing.assert_allclose(surface.bounds, mesh.bounds, atol=0.08)


def test_points_on_a_torus_give_a_surface_that_keeps_the_hole():
    torus = trimesh.creation.torus(major_radius=0.65, minor_radius=0.3)
    surface = points_to_mesh(_surface_points(torus, 2048, seed=1), resolution=64)
    assert surface.is_watertight and surface.euler_number == 0
    assert surface.volume == pytest.approx(torus.volume, rel=0.10)


def test_point_reconstruction_bounds_its_grid_and_checks_its_points():
    points = _surface_points(trimesh.creation.icosphere(), 256)
    with pytest.raises(ValueError, match=r"resolution must be an integer in 8 \.\. 256"):
        points_to_mesh(points, resolution=257)
    with pytest.raises(ValueError, match="at least 4 points"):
        points_to_mesh(points[:3])
    with pytest.raises(ValueError, match="all at one place"):
        points_to_mesh(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 4 distinct points, got 3"):
        points_to_mesh(np.repeat(points[:3], 5, axis=0))


# Clouds as the point model makes them: unevenly dense, with sparse thin parts and strays.


def _cone_with_a_dense_base(count: int = 2048) -> tuple[trimesh.Trimesh, np.ndarray]:
    """A closed upright cone (radius 0.6, height 1.2), 80 % of its points on the base disc
    and 20 % on its side: the side's balls must be much bigger than the base's."""
    cone = trimesh.creation.cone(radius=0.6, height=1.2, sections=64)
    cone.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    down = cone.face_normals[:, 1] < -0.99
    base = cone.submesh([np.nonzero(down)[0]], append=True)
    side = cone.submesh([np.nonzero(~down)[0]], append=True)
    on_base = int(0.8 * count)
    points = [_surface_points(base, on_base), _surface_points(side, count - on_base, seed=1)]
    return cone, np.concatenate(points)


def _table_with_sparse_legs(count: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(all points, the legs' points) of a synthetic table (normalised like training data),
    8 % of the points on its four legs: about 40 each, a sparse line."""
    from polydiff.shape import data, synthetic

    table = synthetic.render("a table", np.random.default_rng(0))
    top, *legs = sorted(
        data.normalize_mesh(table, "sphere").split(only_watertight=False), key=lambda p: -p.area
    )
    per_leg = int(0.08 * count / len(legs))
    leg_points = np.concatenate(
        [_surface_points(leg, per_leg, seed=1 + i) for i, leg in enumerate(legs)]
    )
    return np.concatenate([_surface_points(top, count - len(leg_points)), leg_points]), leg_points


def _distance_to(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """(N,) distance from each point to the nearest mesh vertex (about a grid cell apart)."""
    from scipy.spatial import cKDTree

    return cKDTree(mesh.vertices).query(points)[0]


def test_a_cone_sampled_densely_on_its_base_comes_back_whole():
    cone, points = _cone_with_a_dense_base()
    surface = points_to_mesh(points, resolution=64)
    assert surface.is_watertight and len(surface.split(only_watertight=False)) == 1
    # One radius for all points (from their median spacing) left only the base's ring.
    assert surface.extents[1] == pytest.approx(np.ptp(points[:, 1]), rel=0.15)
    assert surface.volume == pytest.approx(cone.volume, rel=0.15)


def test_a_table_keeps_its_sparse_legs_in_one_piece():
    points, leg_points = _table_with_sparse_legs()
    surface = points_to_mesh(points, resolution=64)
    assert surface.is_watertight and len(surface.split(only_watertight=False)) == 1
    assert surface.extents[1] == pytest.approx(np.ptp(points[:, 1]), rel=0.15)
    assert _distance_to(surface, leg_points).max() < 0.1  # every leg is there, to the floor


def test_stray_points_off_the_surface_leave_no_bumps():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    rng = np.random.default_rng(5)
    directions = rng.normal(size=(12, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    strays = directions * rng.uniform(1.15, 1.5, (12, 1))  # 0.15 - 0.5 off the surface
    surface = points_to_mesh(np.concatenate([_surface_points(sphere, 2048), strays]))
    assert surface.is_watertight and len(surface.split(only_watertight=False)) == 1
    assert np.linalg.norm(surface.vertices, axis=1).max() < 1.08
    assert surface.volume == pytest.approx(sphere.volume, rel=0.05)


def test_separate_parts_are_all_kept():
    big = trimesh.creation.icosphere(subdivisions=4, radius=0.7)
    big.apply_translation([-0.5, 0.0, 0.0])
    small = trimesh.creation.icosphere(subdivisions=4, radius=0.3)
    small.apply_translation([0.9, 0.0, 0.0])
    surface = points_to_mesh(_surface_points(trimesh.util.concatenate([big, small]), 2048))
    parts = sorted(surface.split(only_watertight=False), key=lambda part: part.volume)
    assert [part.is_watertight for part in parts] == [True, True]
    assert [part.volume for part in parts] == [
        pytest.approx(small.volume, rel=0.10),
        pytest.approx(big.volume, rel=0.10),
    ]


@pytest.mark.parametrize("kind", ["sheet", "line"])
def test_a_sheet_or_a_line_of_points_becomes_a_thin_closed_solid(kind):
    rng = np.random.default_rng(0)
    if kind == "sheet":  # 1.6 x 1.6 in X and Z
        points = rng.uniform(-0.8, 0.8, (2048, 3)) * [1.0, 0.0, 1.0]
    else:  # 1.6 long along Y
        points = np.linspace(-0.8, 0.8, 300)[:, None] * [0.0, 1.0, 0.0]
    surface = points_to_mesh(points, resolution=64)
    assert surface.is_watertight and len(surface.split(only_watertight=False)) == 1
    long_sides = surface.extents > 1.0
    assert long_sides.tolist() == (np.ptp(points, axis=0) > 1.0).tolist()
    np.testing.assert_array_less(surface.extents[~long_sides], 0.2)  # thin, but not flat
    np.testing.assert_array_less(0.02, surface.extents[~long_sides])
    assert _distance_to(surface, points).max() < 0.1


# --- previews ---------------------------------------------------------------------------


def _cells(path, rows: int, views: int, size: int) -> list[np.ndarray]:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return [
        pixels[r * size : (r + 1) * size, c * size : (c + 1) * size]
        for r in range(rows)
        for c in range(views)
    ]


def test_a_preview_has_one_row_per_shape_and_draws_something_in_every_view(tmp_path):
    shapes = [
        _point_shape(),
        _mesh_shape(),
        Shape(points=np.zeros((0, 3)), mesh=field_to_mesh(_torus_field())),
    ]
    path = render_preview(shapes, tmp_path / "preview.png", views=3, size=96)
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (3 * 96, 3 * 96))
    for cell in _cells(path, 3, 3, 96):
        assert cell.std() > 10 and (cell < 200).mean() > 0.05  # not blank: a drawn shape
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_a_preview_shows_y_as_up(tmp_path):
    pillar = trimesh.creation.box((0.2, 1.6, 0.2))  # tall along Y
    shapes = [
        Shape(points=_surface_points(pillar, 1024), mesh=pillar),
        Shape(points=_surface_points(pillar, 1024)),
    ]
    path = render_preview(shapes, tmp_path / "pillar.png", views=4, size=64)
    for cell in _cells(path, 2, 4, 64):
        rows, columns = np.nonzero(cell < 200)
        assert np.ptp(rows) > 2.5 * np.ptp(columns)


def test_a_preview_is_bounded(tmp_path):
    shape = _point_shape()
    with pytest.raises(ValueError, match="1 .. 16 shapes"):
        render_preview([shape] * 17, tmp_path / "p.png")
    with pytest.raises(ValueError, match="views must be 1 .. 8"):
        render_preview([shape], tmp_path / "p.png", views=9)
    with pytest.raises(ValueError, match=r"\.png file"):
        render_preview([shape], tmp_path / "p.jpg")
    assert list(tmp_path.iterdir()) == []
