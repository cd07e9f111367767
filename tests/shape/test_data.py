"""Shapes into shards and back: the winding number against analytic insides, both
normalisations, decoding to fresh surface points and labelled occupancy queries, and a
folder of real mesh and point-cloud files (OBJ, STL, OFF, GLB, PLY, NPY, XYZ) with captions
from sidecars, captions files and class folders, unusable files skipped by reason."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import trimesh

from polydiff.core.data import Skip, iter_shard, write_shards
from polydiff.shape import data
from polydiff.shape.synthetic import CAPTIONS, primitives, render


def _box(extents, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents).apply_translation(centre)


def _joined(*parts: trimesh.Trimesh) -> trimesh.Trimesh:
    """Parts as one mesh without merging their vertices (overlapping solids)."""
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    return trimesh.Trimesh(
        vertices=np.concatenate([p.vertices for p in parts]),
        faces=np.concatenate([p.faces + o for p, o in zip(parts, offsets, strict=True)]),
        process=False,
    )


def _sphere_sample(caption: str = "a ball") -> dict:
    sphere = trimesh.creation.icosphere(3, radius=3.0).apply_translation((1.0, 2.0, 3.0))
    return {"__key__": "ball", **data.mesh_sample(sphere, caption)}


# --------------------------------------------------------------------------- winding number


def test_winding_number_is_one_inside_and_zero_outside_a_box_off_the_origin():
    centre, half = np.array([10.0, -3.0, 5.0]), np.array([1.0, 0.5, 0.25])
    box = _box(2 * half, centre)
    queries = np.random.default_rng(0).uniform(centre - 1.5 * half, centre + 1.5 * half, (3000, 3))
    inside = (np.abs(queries - centre) < half).all(axis=1)
    assert 0.2 < inside.mean() < 0.5  # both cases are well represented
    assert np.allclose(data.winding_number(queries, box), inside, atol=1e-9)
    assert np.array_equal(data.occupancy(queries, box), inside)


def test_winding_number_matches_the_unit_sphere_away_from_its_facets():
    sphere = trimesh.creation.icosphere(3)  # facets within 0.005 of the unit sphere
    queries = np.random.default_rng(1).uniform(-1.3, 1.3, (2000, 3))
    radius = np.linalg.norm(queries, axis=1)
    clear = np.abs(radius - 1) > 0.02
    winding = data.winding_number(queries[clear], sphere)
    assert np.allclose(winding, radius[clear] < 1, atol=1e-9)
    assert np.array_equal(data.occupancy(queries[clear], sphere), radius[clear] < 1)


def test_overlapping_parts_count_twice_and_occupancy_is_their_union():
    pair = _joined(_box((2, 2, 2)), _box((2, 2, 2), (1.0, 0.0, 0.0)))  # overlap: 0 < x < 1
    queries = np.array([[-0.5, 0, 0], [0.5, 0, 0], [1.5, 0, 0], [3.0, 0, 0], [0.5, 1.5, 0]])
    assert np.allclose(data.winding_number(queries, pair), [1, 2, 1, 0, 0], atol=1e-9)
    assert data.occupancy(queries, pair).tolist() == [True, True, True, False, False]


def test_a_missing_side_lowers_the_winding_number_without_flipping_the_inside():
    cube = _box((2, 2, 2))
    open_cube = trimesh.Trimesh(
        cube.vertices, cube.faces[cube.face_normals[:, 2] < 0.5], process=False
    )  # the top side (2 of 12 triangles) removed
    queries = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -0.5], [0.0, 0.0, 3.0]])
    winding = data.winding_number(queries, open_cube)
    assert winding[0] == pytest.approx(5 / 6, abs=1e-9)  # a side subtends 1/6 of the sphere
    assert data.occupancy(queries, open_cube).tolist() == [True, True, False]


def test_each_querys_winding_number_does_not_depend_on_the_others():
    table = render("a table", np.random.default_rng(0))  # 60 faces: 546 queries per chunk
    queries = np.random.default_rng(2).uniform(-1, 1, (1500, 3))
    together = data.winding_number(queries, table)
    one_by_one = [data.winding_number(q[None], table)[0] for q in queries[::97]]
    assert np.allclose(together[::97], one_by_one, atol=1e-12)
    assert data.winding_number(np.zeros((0, 3)), table).shape == (0,)


# --------------------------------------------------------------------------- normalisation


def test_sphere_normalisation_centres_the_box_and_puts_the_farthest_point_on_the_unit_sphere():
    rng = np.random.default_rng(3)
    points = (rng.exponential(size=(500, 3)) * (3.0, 1.0, 0.5) + (7.0, -2.0, 4.0)).astype(
        np.float32
    )  # skewed: the bounding box's centre is not the mean
    out = data.normalize_points(points, "sphere")
    assert out.dtype == np.float32 and out.shape == points.shape
    assert np.allclose(out.min(axis=0) + out.max(axis=0), 0, atol=1e-6)
    assert np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    assert np.abs(out.mean(axis=0)).max() > 0.05  # the mean is not what was centred
    scale = np.ptp(points, axis=0) / np.ptp(out, axis=0)
    assert np.allclose(scale, scale[0], rtol=1e-5)  # one scale for all axes: proportions kept


def test_box_normalisation_fits_the_largest_extent_to_two():
    rng = np.random.default_rng(4)
    points = rng.uniform((-5.0, 0.0, 2.0), (1.0, 1.0, 3.5), (400, 3))  # float64
    out = data.normalize_points(points, "box")
    assert out.dtype == np.float64
    assert np.ptp(out, axis=0).max() == pytest.approx(2.0)
    assert out.min(axis=0)[0] == pytest.approx(-1.0) and out.max(axis=0)[0] == pytest.approx(1.0)
    assert np.allclose(out.min(axis=0) + out.max(axis=0), 0, atol=1e-12)
    assert np.allclose(np.ptp(out, axis=0), 2 * np.ptp(points, axis=0) / np.ptp(points[:, 0]))


def test_normalize_mesh_returns_a_normalised_copy_and_leaves_the_mesh_alone():
    table = render("a table", np.random.default_rng(5))
    before = table.vertices.copy()
    boxed = data.normalize_mesh(table, "box")
    sphered = data.normalize_mesh(table, "sphere")
    assert np.array_equal(table.vertices, before)
    assert np.array_equal(boxed.faces, table.faces)
    assert np.ptp(boxed.vertices, axis=0).max() == pytest.approx(2.0)
    assert np.linalg.norm(sphered.vertices, axis=1).max() == pytest.approx(1.0)
    for mesh in (boxed, sphered):
        assert np.allclose(mesh.bounds.sum(axis=0), 0, atol=1e-12)


def test_unknown_modes_and_coincident_points_cannot_be_normalised():
    with pytest.raises(ValueError, match="unknown normalization 'cube'; valid: sphere, box"):
        data.normalize_points(np.eye(3), "cube")
    with pytest.raises(ValueError, match="the points coincide"):
        data.normalize_points(np.ones((5, 3)), "sphere")
    with pytest.raises(ValueError, match="expected \\(P, 3\\)"):
        data.normalize_points(np.zeros((0, 3)), "box")


# --------------------------------------------------------------------------- decoding


def test_decoding_a_mesh_draws_fresh_surface_points_and_labelled_queries():
    sample = _sphere_sample()
    rng = np.random.default_rng(0)
    out = data.decode(sample, points=512, queries=600, normalize="sphere", rng=rng)
    assert set(out) == {"points", "queries", "occupancy", "has_field", "caption"}
    assert out["points"].shape == (512, 3) and out["points"].dtype == torch.float32
    assert out["queries"].shape == (600, 3) and out["queries"].dtype == torch.float32
    assert out["occupancy"].shape == (600,) and out["occupancy"].dtype == torch.float32
    assert (
        out["has_field"].dtype == torch.bool and out["has_field"].shape == () and out["has_field"]
    )
    assert out["caption"] == "a ball"
    radius = out["points"].norm(dim=1)
    assert radius.min() > 0.99 and radius.max() < 1 + 1e-5  # on the normalised facets

    queries = out["queries"].numpy().astype(np.float64)
    uniform, near = queries[:300], queries[300:]
    assert np.abs(uniform).max() <= data.QUERY_BOUND and np.abs(uniform).max() > 1.0
    offset = np.abs(np.linalg.norm(near, axis=1) - 1)
    assert 0.02 < offset.mean() < 0.06  # Gaussian offsets of sigma 0.05 from the surface
    labels = out["occupancy"].numpy()
    assert set(np.unique(labels)) == {0.0, 1.0} and 0.3 < labels[300:].mean() < 0.7
    clear = np.abs(np.linalg.norm(queries, axis=1) - 1) > 0.01
    analytic = np.linalg.norm(queries, axis=1) < 1
    assert np.array_equal(labels[clear] == 1, analytic[clear])

    again = data.decode(sample, points=512, queries=600, normalize="sphere", rng=rng)
    assert not torch.equal(again["points"], out["points"])  # a new epoch, new points
    assert not torch.equal(again["queries"], out["queries"])
    replay = data.decode(
        sample, points=512, queries=600, normalize="sphere", rng=np.random.default_rng(0)
    )
    assert torch.equal(replay["points"], out["points"])  # the same generator, the same draw


def test_box_normalised_decoding_fits_the_unit_cube():
    sample = {"__key__": "t", **data.mesh_sample(render("a table", np.random.default_rng(6)))}
    out = data.decode(sample, points=2048, queries=5, normalize="box", rng=np.random.default_rng(1))
    points = out["points"].numpy()
    assert np.abs(points).max() <= 1 + 1e-6 and np.ptp(points, axis=0).max() > 1.9
    assert out["queries"].shape == (5, 3) and out["caption"] == ""  # 2 uniform, 3 near


def test_decoding_a_point_cloud_draws_its_points_and_has_no_field():
    stored = np.random.default_rng(7).normal(size=(100, 3)).astype(np.float32) + 5
    sample = {"__key__": "c", **data.points_sample(stored, "a cloud")}
    normalised = data.normalize_points(stored, "sphere")

    def rows_of_stored(points: torch.Tensor) -> np.ndarray:
        gaps = np.abs(points.numpy()[:, None] - normalised[None]).max(axis=2)
        return gaps.argmin(axis=1)[gaps.min(axis=1) < 1e-6]

    few = data.decode(
        sample, points=50, queries=8, normalize="sphere", rng=np.random.default_rng(0)
    )
    assert len(set(rows_of_stored(few["points"]))) == 50  # 50 different stored points
    many = data.decode(
        sample, points=300, queries=8, normalize="sphere", rng=np.random.default_rng(0)
    )
    assert len(rows_of_stored(many["points"])) == 300  # all stored points, repeated
    assert len(set(rows_of_stored(many["points"]))) < 100
    for out in (few, many):
        assert not out["has_field"] and out["caption"] == "a cloud"
        assert torch.equal(out["queries"], torch.zeros(8, 3))
        assert torch.equal(out["occupancy"], torch.zeros(8))


def test_decoding_refuses_samples_without_a_usable_shape():
    options = {"points": 8, "queries": 8, "normalize": "sphere", "rng": np.random.default_rng(0)}
    with pytest.raises(ValueError, match="sample 'x' has no shape field"):
        data.decode({"__key__": "x", "txt": "a chair"}, **options)
    with pytest.raises(ValueError, match="sample 'x': unreadable shape"):
        data.decode({"__key__": "x", "ply": b"ply\nformat nonsense\n"}, **options)
    broken = np.ones((40, 3))
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="sample 'x': non-finite points"):
        data.decode({"__key__": "x", **data.points_sample(broken)}, **options)
    with pytest.raises(ValueError, match="unknown normalization"):
        data.decode(_sphere_sample(), **{**options, "normalize": "unit"})
    with pytest.raises(ValueError, match="points >= 1"):
        data.decode(_sphere_sample(), **{**options, "points": 0})


# --------------------------------------------------------------------------- folders


def _write_folder(root) -> None:
    """Good files of every format, captioned every way, and one bad file of each kind."""
    box = _box((1.0, 2.0, 3.0))
    (root / "chair").mkdir()
    box.export(root / "chair" / "a.obj")
    box.export(root / "chair" / "z.obj")
    (root / "chair" / "z.txt").write_text("a red chair\n")  # a sidecar beats the folder
    (root / "airplane").mkdir()
    box.export(root / "airplane" / "b.stl")
    (root / "night_stand" / "train").mkdir(parents=True)
    box.export(root / "night_stand" / "train" / "c.off")
    scene = trimesh.Scene()
    scene.add_geometry(_box((1, 1, 1)))
    scene.add_geometry(
        _box((1, 1, 1)), transform=trimesh.transformations.translation_matrix([4, 0, 0])
    )
    scene.export(root / "d.glb")
    (root / "d.txt").write_text("two boxes")
    box.export(root / "e.ply")
    rng = np.random.default_rng(8)
    trimesh.PointCloud(rng.normal(size=(64, 3))).export(root / "f.ply")
    np.save(root / "g.npy", rng.normal(size=(80, 3)).astype(np.float32))
    np.savetxt(root / "h.xyz", rng.normal(size=(50, 6)))  # x y z nx ny nz
    (root / "broken_mesh.glb").write_bytes(b"glTF" + b"\x00garbage" * 10)
    (root / "broken_points.npy").write_bytes(b"not an array")
    (root / "empty.obj").write_text("# no vertices, no faces\n")
    nan_box = _box((1, 1, 1))
    nan_box.vertices[3, 1] = np.nan
    nan_box.export(root / "nan.ply")
    line = np.outer(np.arange(4.0), [1.0, 1.0, 1.0])  # every vertex on one line
    trimesh.Trimesh(line, [[0, 1, 2], [1, 2, 3]], process=False).export(root / "flat.obj")
    np.save(root / "few.npy", rng.normal(size=(5, 3)))
    np.savetxt(root / "line.xyz", np.outer(np.linspace(0, 1, 40), [1.0, 2.0, 3.0]))
    nan_points = rng.normal(size=(40, 3))
    nan_points[7, 0] = np.inf
    np.save(root / "inf.npy", nan_points)
    box.export(root / "lonely.stl")  # at the top, no caption anywhere
    named = ["e.ply", "f.ply", "h.xyz", "broken_mesh.glb", "broken_points.npy"]
    named += ["empty.obj", "nan.ply", "flat.obj", "few.npy", "line.xyz", "inf.npy"]
    (root / "captions.csv").write_text(
        "file,caption\n" + "".join(f"{name},the {name}\n" for name in named)
    )
    (root / "captions.jsonl").write_text(
        json.dumps({"file": "g.npy", "caption": "g points"}) + "\n"
    )


def test_a_folder_of_meshes_and_point_clouds_becomes_captioned_samples(tmp_path):
    _write_folder(tmp_path)
    items = list(data.folder_source(tmp_path))
    good = {s["__key__"]: s for s in items if not isinstance(s, Skip)}
    assert {key: s["json"]["caption"] for key, s in good.items()} == {
        "airplane/b": "an airplane",
        "chair/a": "a chair",
        "chair/z": "a red chair",
        "d": "two boxes",
        "e": "the e.ply",
        "f": "the f.ply",
        "g": "g points",
        "h": "the h.xyz",
        "night_stand/train/c": "a night stand",
    }
    labels = {key: s["json"].get("label") for key, s in good.items()}
    assert labels["chair/z"] == "chair" and labels["night_stand/train/c"] == "night stand"
    assert labels["airplane/b"] == "airplane" and labels["e"] is None
    assert {key for key, s in good.items() if "npy" in s} == {"f", "g", "h"}
    for sample in good.values():
        assert sample["json"]["source"] == "folder" and ("ply" in sample) != ("npy" in sample)
        if "ply" in sample:  # re-encoded as binary PLY, read back as the same solid
            mesh = data.read_shape(sample["ply"], "ply")
            assert sample["ply"].startswith(b"ply\nformat binary_little_endian")
            assert data.check_mesh(mesh) is None
    stl = data.read_shape(good["airplane/b"]["ply"], "ply")
    assert len(stl.vertices) == 8 and stl.is_watertight  # the STL's triangle soup merged
    assert np.allclose(stl.extents, (1, 2, 3))
    scene = data.read_shape(good["d"]["ply"], "ply")
    assert len(scene.faces) == 24 and np.allclose(scene.bounds, [[-0.5] * 3, [4.5, 0.5, 0.5]])
    xyz = np.load(io.BytesIO(good["h"]["npy"]))
    assert xyz.dtype == np.float32 and xyz.shape == (50, 3)
    assert np.allclose(xyz, np.loadtxt(tmp_path / "h.xyz")[:, :3], atol=1e-6)
    assert good["f"]["json"]["points"] == 64 and good["e"]["json"]["faces"] == 12


def test_unusable_shape_files_are_skipped_and_counted_by_reason(tmp_path):
    _write_folder(tmp_path)
    items = list(data.folder_source(tmp_path))
    skips = {s.key: s.reason for s in items if isinstance(s, Skip)}
    assert skips.pop("broken_mesh").startswith("unreadable mesh (")
    assert skips.pop("broken_points").startswith("unreadable point cloud (")
    assert skips == {
        "empty": "empty mesh",
        "nan": "non-finite vertices",
        "flat": "degenerate mesh (zero surface area)",
        "few": "too few points (< 32)",
        "line": "degenerate point cloud (all on a point or a line)",
        "inf": "non-finite points",
        "lonely": "no caption",
    }
    summary = write_shards(iter(items), tmp_path / "shards")
    assert summary.written == 9 and sum(summary.skipped.values()) == 9
    assert summary.skipped["no caption"] == 1 and summary.skipped["empty mesh"] == 1


def test_class_folders_name_shapenet_and_modelnet_classes():
    assert data.class_name("chair/x.off") == "chair"
    assert data.class_name("ModelNet10/night_stand/test/x.off") == "night stand"
    assert data.class_name("x.off") is None and data.class_name("train/x.off") is None
    assert data.class_name("03001627/x.obj") == "chair"  # a known ShapeNet synset
    assert data.class_name("12345678/x.obj") is None  # an unknown id is not a name
    assert data.class_caption("airplane") == "an airplane"
    assert (
        data.class_caption("ottoman") == "an ottoman" and data.class_caption("chair") == "a chair"
    )


def test_reading_needs_a_known_format_and_an_existing_file(tmp_path):
    with pytest.raises(ValueError, match="needs a file_type"):
        data.read_shape(b"solid")
    with pytest.raises(ValueError, match="unknown shape format 'fbx'"):
        data.read_shape(b"x", "fbx")
    with pytest.raises(FileNotFoundError, match="shape file not found"):
        data.read_shape(tmp_path / "missing.obj")
    with pytest.raises(FileNotFoundError, match="shape source folder not found"):
        data.folder_source(tmp_path / "missing")


# --------------------------------------------------------------------------- shards


def test_shards_round_trip_ply_and_npy_bytes_to_decoded_shapes(tmp_path):
    folder = tmp_path / "folder"
    (folder / "mug").mkdir(parents=True)
    render("a mug", np.random.default_rng(9)).export(folder / "mug" / "m.obj")
    np.save(folder / "mug" / "p.npy", np.random.default_rng(9).normal(size=(200, 3)))
    written = list(primitives(11, seed=1)) + list(data.folder_source(folder))
    summary = write_shards(iter(written), tmp_path / "shards", maxcount=8)
    assert summary.written == 13 and summary.counts == [8, 5]
    stored = [s for path in summary.shards for s in iter_shard(path)]
    assert [s.get("ply", s.get("npy")) for s in stored] == [
        s.get("ply", s.get("npy")) for s in written
    ]  # encoded bytes, not decoded
    rng = np.random.default_rng(0)
    for raw, sample in zip(written, stored, strict=True):
        out = data.decode(sample, points=256, queries=256, normalize="sphere", rng=rng)
        assert out["caption"] == raw["json"]["caption"]
        assert data.sample_label(sample) == raw["json"].get("label")
        assert bool(out["has_field"]) == ("ply" in raw)
        if "ply" in raw:  # a closed, outward-facing solid: some near queries fall inside
            assert 0.05 < out["occupancy"][128:].mean() < 0.9
    captions = Counter(s["json"]["caption"] for s in written[:11])
    assert set(captions) == set(CAPTIONS)
    assert [written[-2]["json"]["caption"], written[-1]["json"]["caption"]] == ["a mug", "a mug"]


def test_shapenet_core_folders_name_their_class():
    model = "03001627/1a6f615e8b1b5ae4dbbc9440457e303e/models/model_normalized.obj"
    assert data.class_name(model) == "chair"
    assert data.class_name("04379243/abcdef0123456789abcdef0123456789/models/m.obj") == "table"
    assert data.class_name("99999999/abcdef0123456789abcdef0123456789/models/m.obj") is None
