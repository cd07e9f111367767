"""Shapes in and out of shards: a user's folder as shard samples; shard samples as surface
points and occupancy queries.

Shards keep a mesh as binary PLY (``ply`` field: vertices and triangles only) and a point
cloud as ``np.save`` bytes of float32 (P, 3) (``npy`` field), with ``json``: ``{"caption",
"label" (class name, when known), "source", ...}``. A folder may hold meshes (OBJ, PLY, STL,
OFF, GLB; a scene of several meshes becomes one) and point clouds (PLY without faces, NPY of
shape (P, 3), XYZ text with x y z in the first three columns). Captions come from a sidecar
``.txt``, ``captions.csv`` or ``captions.jsonl`` (see :func:`polydiff.core.data.captioned_files`),
and else from ShapeNet / ModelNet-style class folders: ``chair/x.off`` is "a chair",
``night_stand/train/x.off`` "a night stand".

A file is skipped, and counted by reason, when it cannot be read (``"unreadable mesh
(<why>)"``, ``"unreadable point cloud (<why>)"``), holds nothing (``"empty mesh"``, ``"empty
point cloud"``), has NaN or infinite coordinates (``"non-finite vertices"``, ``"non-finite
points"``), is flat to a point or a line (``"degenerate mesh (zero surface area)"``,
``"degenerate point cloud (all on a point or a line)"``), has fewer than
:data:`MIN_POINTS` points (``"too few points (< 32)"``) or has no caption (``"no caption"``).

Normalisation (one definition for data, export and metrics): the centre is the axis-aligned
bounding box's centre; ``"sphere"`` scales the farthest vertex / point to radius 1, ``"box"``
the largest bounding-box extent to 2 (the shape fits [-1, 1]^3), proportions kept.

Decoding (in the loader workers) normalises the shape and draws fresh surface points each
time; for a mesh it also draws occupancy queries, half uniform in [-1.1, 1.1]^3 and half
near the surface, labelled inside / outside by the generalised winding number, so meshes made
of overlapping closed parts (a table: top and legs) are the union of their parts and small
holes do not flip the answer.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from polydiff.core.data.captions import captioned_files, metadata_field, text_field
from polydiff.core.data.shards import Skip

__all__ = [
    "MESH_SUFFIXES",
    "MIN_POINTS",
    "NEAR_SIGMA",
    "NORMALIZATIONS",
    "POINT_SUFFIXES",
    "QUERY_BOUND",
    "SHAPENET_SYNSETS",
    "SHAPE_FIELDS",
    "check_mesh",
    "check_points",
    "class_caption",
    "class_name",
    "decode",
    "encode_mesh",
    "encode_points",
    "folder_source",
    "mesh_sample",
    "normalize_mesh",
    "normalize_points",
    "occupancy",
    "points_sample",
    "read_shape",
    "sample_label",
    "sample_surface",
    "winding_number",
]

NORMALIZATIONS = ("sphere", "box")
MESH_SUFFIXES = (".obj", ".ply", ".stl", ".off", ".glb")
#: Point-cloud files (a ``.ply`` without faces is one too).
POINT_SUFFIXES = (".npy", ".xyz")
#: Shard fields that hold a shape, in the order a sample's payload is looked up.
SHAPE_FIELDS = ("ply", "npy")
#: Point clouds with fewer points are skipped: they hardly describe a surface, and drawing
#: 2048 training points from them would repeat every point dozens of times.
MIN_POINTS = 32
#: Uniform occupancy queries lie in [-QUERY_BOUND, QUERY_BOUND]^3 (normalised units).
QUERY_BOUND = 1.1
#: Standard deviation of the offsets of near-surface queries (normalised units).
NEAR_SIGMA = 0.05
# Folders that split a class into subsets (ModelNet: chair/train/chair_0001.off).
_SPLIT_FOLDERS = {"train", "test", "val", "validation"}
_HEX_ID = re.compile(r"[0-9a-f]{16,64}")
#: ShapeNetCore's synset folders of its 13 most used classes (the rest give no class).
SHAPENET_SYNSETS: dict[str, str] = {
    "02691156": "airplane", "02828884": "bench", "02933112": "cabinet", "02958343": "car",
    "03001627": "chair", "03211117": "display", "03636649": "lamp", "03691459": "loudspeaker",
    "04090263": "rifle", "04256520": "sofa", "04379243": "table", "04401088": "telephone",
    "04530566": "watercraft",
}  # fmt: skip
# Elements of one (faces, queries) temporary of the winding number: 256 KiB of float64, so
# the dozen alive at once stay in the CPU caches (2x faster than 4 MiB ones), and memory
# stays bounded whatever the mesh size.
_CHUNK_ELEMENTS = 1 << 15
# A surface smaller than this fraction of its bounding box's squared size has no area.
_FLAT_AREA = 1e-10
_REASON_CHARS = 80  # long parser messages are cut: a skip reason is a short phrase


# --------------------------------------------------------------------------- normalisation


def _frame(points: np.ndarray, mode: str) -> tuple[np.ndarray, float]:
    """The (3,) centre and the scale that :func:`normalize_points` divides by."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"cannot normalise points of shape {points.shape}; expected (P, 3)")
    low, high = points.min(axis=0), points.max(axis=0)
    centre = (low + high) / 2
    if mode == "sphere":
        scale = float(np.sqrt(((points - centre) ** 2).sum(axis=1).max()))
    else:
        scale = float((high - low).max()) / 2
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError("cannot normalise: the points coincide or are not finite")
    return centre, scale


def normalize_points(points: np.ndarray, mode: str) -> np.ndarray:
    """Points centred on their axis-aligned bounding box's centre and scaled, proportions kept:
    ``"sphere"``: the farthest point at radius 1; ``"box"``: the largest extent 2 (in
    [-1, 1]^3).

    Args:
        points: (P, 3) coordinates.
        mode: one of :data:`NORMALIZATIONS`.

    Returns:
        (P, 3) normalised coordinates (float32 input stays float32, else float64).

    Raises:
        ValueError: an unknown mode, no points, or points that all coincide.
    """
    array = np.asarray(points)
    dtype = np.result_type(array.dtype, np.float32)
    array = array.astype(np.float64)
    centre, scale = _frame(array, mode)
    return ((array - centre) / scale).astype(dtype)


def normalize_mesh(mesh: trimesh.Trimesh, mode: str) -> trimesh.Trimesh:
    """A copy of ``mesh`` with its vertices normalised like :func:`normalize_points` (the
    farthest vertex at radius 1, or the largest extent 2); the mesh itself is unchanged.

    Raises:
        ValueError: an unknown mode, no vertices, or vertices that all coincide.
    """
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    centre, scale = _frame(vertices, mode)
    copy = mesh.copy()
    copy.vertices = (vertices - centre) / scale
    return copy


# --------------------------------------------------------------------------- reading


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _read_npy(payload: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"not an NPY array: {_short(e)}") from e
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"expected a (P, 3) array, got shape {getattr(array, 'shape', '?')}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"expected real numbers, got dtype {array.dtype}")
    return array.astype(np.float64)


def _read_xyz(payload: bytes) -> np.ndarray:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("not UTF-8 text") from e
    try:
        table = np.loadtxt(io.StringIO(text.replace(",", " ")), ndmin=2, comments="#")
    except ValueError as e:
        raise ValueError(f"not a table of numbers: {_short(e)}") from e
    if table.size and table.shape[1] < 3:
        raise ValueError(f"expected x y z columns, got {table.shape[1]} columns")
    return table[:, :3] if table.size else np.zeros((0, 3))


def _read_trimesh(payload: bytes, file_type: str) -> trimesh.Trimesh | np.ndarray:
    try:
        # process=False: keep the file as written, so NaN vertices are seen (and refused)
        # rather than silently dropped with their faces.
        loaded = trimesh.load(io.BytesIO(payload), file_type=file_type, process=False)
    except Exception as e:  # trimesh's parsers raise anything from IndexError to KeyError
        raise ValueError(_short(e)) from e
    geometries = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    meshes = [g for g in geometries if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if meshes:
        if len(meshes) == 1:
            return meshes[0]
        return trimesh.util.concatenate(meshes)
    clouds = [np.asarray(g.vertices) for g in geometries if isinstance(g, trimesh.PointCloud)]
    if clouds:
        return np.concatenate(clouds).astype(np.float64)
    return trimesh.Trimesh()  # nothing in it: an empty mesh


def read_shape(
    source: bytes | str | os.PathLike[str], file_type: str | None = None
) -> trimesh.Trimesh | np.ndarray:
    """Read a mesh (OBJ, PLY, STL, OFF, GLB; a scene's meshes concatenated, in world
    coordinates) or a point cloud (PLY without faces, NPY, XYZ) from a file or its bytes.

    Args:
        source: a path, or the file's bytes.
        file_type: the format (``"obj"``, ``".ply"``...); taken from the path's suffix when
            None. Needed with bytes.

    Returns:
        A ``trimesh.Trimesh`` (as written: not cleaned, maybe empty) or (P, 3) float64 points.
        Check them with :func:`check_mesh` / :func:`check_points`.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: unreadable bytes or an unknown format (the message says why).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        payload = bytes(source)
        if file_type is None:
            raise ValueError("read_shape needs a file_type with bytes")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"shape file not found: {path}")
        payload = path.read_bytes()
        file_type = file_type or path.suffix
    kind = file_type.lower().lstrip(".")
    if kind == "npy":
        return _read_npy(payload)
    if kind == "xyz":
        return _read_xyz(payload)
    if f".{kind}" not in MESH_SUFFIXES:
        valid = ", ".join(s.lstrip(".") for s in MESH_SUFFIXES + POINT_SUFFIXES)
        raise ValueError(f"unknown shape format {file_type!r}; valid: {valid}")
    return _read_trimesh(payload, kind)


def check_mesh(mesh: trimesh.Trimesh) -> str | None:
    """Why a mesh cannot be used (``"empty mesh"``, ``"non-finite vertices"``, ``"broken
    faces (vertex index out of range)"``, ``"degenerate mesh (zero surface area)"``), or
    None when it can: it has triangles of finite vertices with a surface of some area."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces)
    if len(vertices) == 0 or len(faces) == 0:
        return "empty mesh"
    if not np.isfinite(vertices).all():
        return "non-finite vertices"
    if faces.min() < 0 or faces.max() >= len(vertices):
        return "broken faces (vertex index out of range)"
    corners = vertices[faces]
    size = float(np.ptp(corners.reshape(-1, 3), axis=0).max())
    area = (
        0.5
        * np.linalg.norm(
            np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1
        ).sum()
    )
    if size == 0 or area <= _FLAT_AREA * size**2:
        return "degenerate mesh (zero surface area)"
    return None


def check_points(points: np.ndarray) -> str | None:
    """Why a point cloud cannot be used (``"empty point cloud"``, ``"non-finite points"``,
    ``"too few points (< 32)"``, ``"degenerate point cloud (all on a point or a line)"``), or
    None when it can."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0:
        return "empty point cloud"
    if not np.isfinite(points).all():
        return "non-finite points"
    if len(points) < MIN_POINTS:
        return f"too few points (< {MIN_POINTS})"
    centred = points - points.mean(axis=0)
    spread = np.linalg.eigvalsh(centred.T @ centred)  # ascending variances along the axes
    if spread[-1] <= 0 or spread[-2] <= 1e-12 * spread[-1]:
        return "degenerate point cloud (all on a point or a line)"
    return None


# --------------------------------------------------------------------------- folders


def class_name(relative: str | os.PathLike[str]) -> str | None:
    """The class of a file from its folder, ShapeNet / ModelNet style: ``chair/x.off`` ->
    ``"chair"``, ``night_stand/train/x.off`` -> ``"night stand"`` (a ``train`` / ``test`` /
    ``val`` folder names the subset, its parent the class; underscores become spaces;
    ShapeNetCore's ``03001627/<id>/models/model_normalized.obj`` -> ``"chair"`` for the
    classes of :data:`SHAPENET_SYNSETS`).
    None for a file at the top of the folder or a folder name without letters."""
    parents = Path(relative).parts[:-1]
    if parents and parents[-1].lower() in _SPLIT_FOLDERS:
        parents = parents[:-1]
    # ShapeNetCore v2: <synset>/<model id>/models/model_normalized.obj
    if len(parents) >= 3 and parents[-1] == "models" and _HEX_ID.fullmatch(parents[-2]):
        parents = parents[:-2]
    if parents and parents[-1] in SHAPENET_SYNSETS:
        return SHAPENET_SYNSETS[parents[-1]]
    if not parents:
        return None
    name = " ".join(parents[-1].replace("_", " ").split())
    return name if any(char.isalpha() for char in name) else None


def class_caption(name: str) -> str:
    """``"chair"`` -> ``"a chair"``, ``"airplane"`` -> ``"an airplane"`` (by first letter)."""
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def encode_mesh(mesh: trimesh.Trimesh) -> bytes:
    """A mesh's vertices and triangles as binary PLY bytes (the ``ply`` shard field; no
    normals, colours or UVs)."""
    plain = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False)
    buffer = io.BytesIO()
    plain.export(buffer, file_type="ply", encoding="binary")
    return buffer.getvalue()


def encode_points(points: np.ndarray) -> bytes:
    """(P, 3) points as ``np.save`` bytes of float32 (the ``npy`` shard field)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(np.asarray(points).reshape(-1, 3), dtype=np.float32))
    return buffer.getvalue()


def mesh_sample(mesh: trimesh.Trimesh, caption: str = "", **meta: Any) -> dict[str, Any]:
    """The fields of a mesh's shard sample: ``{"ply": bytes, "json": {"caption", **meta}}``
    (add ``"__key__"`` to write it)."""
    return {"ply": encode_mesh(mesh), "json": {"caption": caption, **meta}}


def points_sample(points: np.ndarray, caption: str = "", **meta: Any) -> dict[str, Any]:
    """The fields of a point cloud's shard sample: ``{"npy": bytes, "json": {"caption",
    **meta}}`` (add ``"__key__"`` to write it)."""
    return {"npy": encode_points(points), "json": {"caption": caption, **meta}}


def sample_label(sample: Mapping[str, Any]) -> str | None:
    """A shard sample's class name (``json["label"]``), or None when it has none."""
    label = metadata_field(sample).get("label")
    return str(label) if label not in (None, "") else None


def _clean(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A checked mesh with duplicate and unused vertices removed (an STL's triangle soup
    becomes an indexed mesh a sixth of its size)."""
    clean = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=True)
    clean.remove_unreferenced_vertices()
    return clean


def folder_source(folder: str | os.PathLike[str]) -> Iterator[dict[str, Any] | Skip]:
    """Shard samples of the shapes in ``folder`` (recursively, sorted by path).

    Captions come from a sidecar ``.txt``, ``captions.csv`` or ``captions.jsonl`` (see
    :func:`polydiff.core.data.captioned_files`), else from the class folder
    (:func:`class_name`, :func:`class_caption`); the class, when there is one, is the label.

    Yields:
        ``{"__key__", "ply": binary PLY, "json": {"caption", "label"?, "source": "folder",
        "file", "vertices", "faces"}}`` per usable mesh, ``{"__key__", "npy": float32 (P, 3)
        NPY bytes, "json": {"caption", "label"?, "source", "file", "points"}}`` per usable
        point cloud, and ``Skip(key, reason)`` for the others (reasons in the module doc).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: a malformed captions file.
    """
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"shape source folder not found: {folder}")
    return _folder_samples(Path(folder))


def _folder_samples(folder: Path) -> Iterator[dict[str, Any] | Skip]:
    for entry in captioned_files(folder, MESH_SUFFIXES + POINT_SUFFIXES):
        if entry.problem is not None:
            yield Skip(entry.key, entry.problem)
            continue
        what = "point cloud" if entry.path.suffix.lower() in POINT_SUFFIXES else "mesh"
        try:
            shape = read_shape(entry.path)
        except ValueError as e:
            yield Skip(entry.key, f"unreadable {what} ({e})")
            continue
        is_mesh = isinstance(shape, trimesh.Trimesh)
        reason = check_mesh(shape) if is_mesh else check_points(shape)
        if reason is not None:
            yield Skip(entry.key, reason)
            continue
        label = class_name(entry.relative)
        caption = entry.caption or (class_caption(label) if label else "")
        if not caption:
            yield Skip(entry.key, "no caption")
            continue
        meta: dict[str, Any] = {"caption": caption}
        if label:
            meta["label"] = label
        meta |= {"source": "folder", "file": entry.relative.as_posix()}
        if is_mesh:
            mesh = _clean(shape)
            meta |= {"vertices": len(mesh.vertices), "faces": len(mesh.faces)}
            yield {"__key__": entry.key, "ply": encode_mesh(mesh), "json": meta}
        else:
            meta["points"] = len(shape)
            yield {"__key__": entry.key, "npy": encode_points(shape), "json": meta}


# --------------------------------------------------------------------------- occupancy


def winding_number(queries: np.ndarray, mesh: trimesh.Trimesh) -> np.ndarray:
    """The generalised winding number of ``mesh`` at each query point: the sum over its
    triangles of their signed solid angles (Van Oosterom and Strackee's formula) over 4 pi.

    1 inside a closed mesh with outward-facing triangles, 0 outside, n where n parts
    overlap, and a smooth value in between near holes. Computed in chunks of queries so
    the temporaries stay small whatever the mesh size; O(queries x faces) time (some 15-30 ns
    per query and face on one CPU core).

    Args:
        queries: (Q, 3) points, in the mesh's coordinates.

    Returns:
        (Q,) float64.
    """
    points = np.asarray(queries, dtype=np.float64).reshape(-1, 3)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    winding = np.zeros(len(points))
    if len(points) == 0 or len(faces) == 0:
        return winding
    # Work around the origin at unit size: the expansions below lose precision otherwise.
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    centre, scale = (low + high) / 2, float((high - low).max()) or 1.0
    vertices = (vertices - centre) / scale
    points = (points - centre) / scale
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    # With A = a - q etc., every term is a per-face constant plus products with q, so a
    # chunk is a few matrix products and row gathers instead of (F, n, 3) arrays:
    # det[A, B, C] = det[a, b, c] - ((b - a) x (c - a)) . q;  A . B = a . b - (a + b) . q + q . q.
    # Arrays are (faces or vertices, queries): gathering rows is fast, columns are not.
    triple = np.einsum("ij,ij->i", a, np.cross(b, c))[:, None]
    normal = np.cross(b - a, c - a)
    ab, bc, ca = (np.einsum("ij,ij->i", x, y)[:, None] for x, y in ((a, b), (b, c), (c, a)))
    squared = (vertices**2).sum(axis=1, keepdims=True)
    rows = max(1, _CHUNK_ELEMENTS // max(len(faces), len(vertices)))
    for start in range(0, len(points), rows):
        q = points[start : start + rows]
        qq = (q**2).sum(axis=1)
        vq = vertices @ q.T  # (V, n)
        distance = np.sqrt(np.maximum(squared - 2 * vq + qq, 0.0))
        la, lb, lc = (distance[faces[:, k]] for k in range(3))  # (F, n) each
        qa, qb, qc = (vq[faces[:, k]] for k in range(3))
        numerator = triple - normal @ q.T
        # |A| |B| |C| + (A . B) |C| + (B . C) |A| + (C . A) |B|
        denominator = la * lb * lc
        denominator += (ab - qa - qb + qq) * lc
        denominator += (bc - qb - qc + qq) * la
        denominator += (ca - qc - qa + qq) * lb
        # Each triangle subtends 2 atan2(num, den); the sum over 4 pi is the winding number.
        angles = np.arctan2(numerator, denominator, out=numerator)
        winding[start : start + rows] = angles.sum(axis=0) / (2 * np.pi)
    return winding


def occupancy(queries: np.ndarray, mesh: trimesh.Trimesh) -> np.ndarray:
    """(Q,) bool: whether each (Q, 3) query is inside ``mesh`` (winding number > 0.5)."""
    return winding_number(queries, mesh) > 0.5


# --------------------------------------------------------------------------- decoding


def sample_surface(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 3) float64 points drawn uniformly on the surface (faces picked by area, then a
    uniform point in each), from ``rng``."""
    if count == 0:
        return np.zeros((0, 3))
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=rng)
    return np.asarray(points, dtype=np.float64)


def _sample_shape(sample: Mapping[str, Any]) -> trimesh.Trimesh | np.ndarray:
    """A shard sample's checked mesh or point cloud; ValueError naming the key and why."""
    key = sample.get("__key__", "?")
    field = next((f for f in SHAPE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"sample {key!r} has no shape field (expected one of {SHAPE_FIELDS})")
    try:
        shape = read_shape(bytes(sample[field]), field)
    except ValueError as e:
        raise ValueError(f"sample {key!r}: unreadable shape ({e})") from e
    reason = check_mesh(shape) if isinstance(shape, trimesh.Trimesh) else check_points(shape)
    if reason is not None:
        raise ValueError(f"sample {key!r}: {reason}")
    return shape


def decode(
    sample: Mapping[str, Any],
    *,
    points: int,
    queries: int,
    normalize: str,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One shard sample -> normalised surface points and occupancy queries.

    A mesh is normalised (``normalize``: one of :data:`NORMALIZATIONS`), ``points`` fresh
    surface points are drawn from ``rng`` (area-weighted, new ones on every call), and
    ``queries`` query points: the first ``queries // 2`` uniform in [-1.1, 1.1]^3, the rest
    surface points plus Gaussian noise (sigma :data:`NEAR_SIGMA`), labelled by
    :func:`occupancy`. A point cloud is normalised and ``points`` of its points are drawn
    (with replacement only when it has fewer); it has no field, so its queries and
    occupancy are zeros.

    Returns:
        ``{"points": (points, 3) float32, "queries": (queries, 3) float32, "occupancy":
        (queries,) float32 in {0, 1}, "has_field": () bool tensor, "caption": str}``.

    Raises:
        ValueError: bad sizes or mode, no ``ply`` / ``npy`` field, or an unreadable or
            unusable shape (the message names the key).
    """
    if points < 1 or queries < 0:
        raise ValueError(f"need points >= 1 and queries >= 0, got {points} and {queries}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    shape = _sample_shape(sample)
    meta = metadata_field(sample)
    caption = str(meta["caption"]) if "caption" in meta else text_field(sample.get("txt", ""))
    if isinstance(shape, trimesh.Trimesh):
        mesh = normalize_mesh(shape, normalize)
        surface = sample_surface(mesh, points, rng)
        uniform = rng.uniform(-QUERY_BOUND, QUERY_BOUND, size=(queries // 2, 3))
        near_count = queries - len(uniform)
        near = sample_surface(mesh, near_count, rng) + rng.normal(0, NEAR_SIGMA, (near_count, 3))
        query_points = np.concatenate([uniform, near])
        inside = occupancy(query_points, mesh).astype(np.float32)
        has_field = True
    else:
        cloud = normalize_points(shape, normalize)
        chosen = rng.choice(len(cloud), size=points, replace=len(cloud) < points)
        surface = cloud[chosen]
        query_points = np.zeros((queries, 3))
        inside = np.zeros(queries, dtype=np.float32)
        has_field = False
    return {
        "points": torch.from_numpy(surface.astype(np.float32)),
        "queries": torch.from_numpy(query_points.astype(np.float32)),
        "occupancy": torch.from_numpy(inside),
        "has_field": torch.tensor(has_field),
        "caption": caption,
    }
