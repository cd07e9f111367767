"""Writing shapes: binary PLY (points or mesh), GLB and OBJ meshes; surfaces from fields and
from bare point clouds; preview PNGs.

A generated :class:`Shape` lives in the training normalisation (``"sphere"``: inside the unit
sphere), Y up, and is written in it as it is: no rescaling, no axis swap. glTF's own frame is
right-handed with +Y up and +Z toward the viewer, so a GLB opens upright in three.js, Blender
and the browsers' model viewers; PLY and OBJ have no convention and get the same numbers.

Formats:

* ``.ply``, binary little-endian: the only common format that holds a bare point cloud (what
  the point model makes), and 12 bytes per point or vertex, exactly the float32 values;
  Open3D, MeshLab, CloudCompare and Blender read it, and little-endian is the byte order of
  every machine that does. A Shape with a mesh is written as that mesh (vertices and faces).
* ``.glb``, binary glTF 2.0: one self-contained file (the JSON and the binary buffer in one)
  that is dragged into a browser or Blender as it is, where ``.gltf`` + ``.bin`` is two files
  that break when one is copied without the other. Vertex normals are included, and a matte
  grey material, because glTF's default material is fully metallic and renders dark without
  an environment map.
* ``.obj``, Wavefront text with vertex normals (``f a//a``) and no material file: what every
  modelling tool imports.

Given a provenance record (:mod:`polydiff.core.provenance`), a file carries it where its format
allows, and gets the sidecar ``<name>.ply.json`` / ``.glb.json`` / ``.obj.json``:

* PLY: ``comment polydiff-provenance <JSON>`` lines in the header, OBJ: ``# polydiff-provenance
  <JSON>`` lines at the top. The JSON is the record on one line with non-ASCII characters
  escaped (a PLY header is ASCII), cut into lines of at most :data:`COMMENT_LINE_BYTES` bytes,
  between two non-spaces where the text has them (a reader may strip a comment's ends):
  RPly, Open3D's PLY reader, refuses header lines over about 1 KB, and C readers with
  fixed line buffers would take the rest of a longer OBJ comment for data. Joined in order,
  the pieces are the JSON again.
* GLB: the record as the JSON object ``asset.extras`` and the scene's ``extras``; three.js
  puts scene extras into ``scene.userData`` and Blender's importer into the scene's custom
  properties.

:func:`read_provenance` reads any of them back. Every file is written beside its target and
renamed into place (:func:`polydiff.core.provenance.atomic_output`), with the user's normal
permissions.

Surfaces (``--mesh``): :func:`field_to_mesh` runs marching cubes on a sampled field (the latent
model's occupancy); :func:`points_to_mesh` reconstructs a closed surface from a bare point
cloud (the point model) by closing its union of balls, then meshes that the same way.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from polydiff.core.files import output_paths as core_output_paths
from polydiff.core.provenance import atomic_output, output_targets, record_json, write_sidecar

__all__ = [
    "COMMENT_LINE_BYTES",
    "MAX_PREVIEW_SHAPES",
    "MAX_PREVIEW_VIEWS",
    "MAX_RECONSTRUCTION_RESOLUTION",
    "MESH_ONLY_SUFFIXES",
    "SHAPE_OUTPUT_SUFFIXES",
    "Shape",
    "field_to_mesh",
    "output_paths",
    "points_to_mesh",
    "read_provenance",
    "render_preview",
    "save_shapes",
]

SHAPE_OUTPUT_SUFFIXES = (".ply", ".glb", ".obj")
#: Suffixes whose files always hold a mesh (a point-only Shape must be reconstructed first).
MESH_ONLY_SUFFIXES = (".glb", ".obj")
#: The longest PLY header / OBJ comment line written for provenance, in bytes (with ``\n``).
COMMENT_LINE_BYTES = 1000
#: The finest grid :func:`points_to_mesh` builds (samples along the longest side).
MAX_RECONSTRUCTION_RESOLUTION = 256
MAX_PREVIEW_SHAPES = 16
MAX_PREVIEW_VIEWS = 8

_PLY_TAG = b"comment polydiff-provenance "
_OBJ_TAG = "# polydiff-provenance "
_GLB_MAGIC = b"glTF"
_GLB_JSON = 0x4E4F534A  # chunk type "JSON"
_MIN_POINTS = 4
_MIN_RESOLUTION = 8
# Reconstruction from points (see points_to_mesh). A point's ball must cover the largest gap
# around it, or the outside leaks in. N random points on a surface leave gaps of about
# sqrt((ln N + ln ln N) / k) times the distance to the k-th nearest neighbour (the largest
# empty disc of a Poisson process against its local density: 1.1 at N = 2048, k = 8); this
# margin over that covers the measured worst cases.
_BALL_MARGIN = 1.2
_NEIGHBOURS = 8  # k: a point's local spacing is the distance to its k-th nearest neighbour
# A point whose k-th neighbour is this many times as far as its neighbours' are is a stray
# (as is one further off its neighbours' plane than their k-th neighbour distance).
_OUTLIER_RATIO = 3.0
# Radii are kept within [floor x median, cap x 90th percentile] of all radii: the floor
# closes the gaps between tight clumps of generated points, the cap stops the noise that is
# left from bridging far.
_RADIUS_FLOOR = 0.6
_RADIUS_CAP = 2.0
_THIN_CAP = 0.05  # thin parts are thickened by at most this share of the longest extent
_KEEP_FRACTION = 0.05  # pieces with at least this share of the largest's triangles stay
_SMOOTHING_STEPS = 10  # Taubin steps (5 shrink-inflate pairs) over the reconstructed mesh
_MAX_CLOUD = 1 << 16  # points used at most (a fixed subset of a larger cloud)
_SPLAT_CHUNK = 1 << 21  # (ball, voxel) pairs written at once (bounds the memory)
_RADIUS_CODES = (1 << 20) - 1  # radius steps packed with a ball's value (see _splat_balls)


@dataclass
class Shape:
    """One generated shape, in the training normalisation's units (``"sphere"``: inside the
    unit sphere), Y up.

    Attributes:
        points: (N, 3) float32 surface points (x, y, z); made a contiguous float32 array.
        mesh: its surface as a triangle mesh, in the same frame, or ``None`` (not made).
        reconstruct: how to make the mesh when it is asked for (:meth:`with_mesh`): the
            generating model's field, or :func:`points_to_mesh` of the points; ``None``:
            from the points.

    Raises:
        ValueError: points of another shape, NaN / infinite points, or a mesh that is not a
            ``trimesh.Trimesh``.
    """

    points: np.ndarray
    mesh: trimesh.Trimesh | None = None
    reconstruct: Callable[[], trimesh.Trimesh] | None = field(default=None, repr=False)

    def with_mesh(self) -> Shape:
        """This shape with its mesh (made now, through ``reconstruct``, if it has none)."""
        if self.mesh is not None:
            return self
        mesh = self.reconstruct() if self.reconstruct is not None else points_to_mesh(self.points)
        return replace(self, mesh=mesh)

    def __post_init__(self) -> None:
        points = np.ascontiguousarray(np.asarray(self.points, dtype=np.float32))
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"shape points must be (N, 3), got shape {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError("shape points have NaN or infinite values")
        if self.mesh is not None and not isinstance(self.mesh, trimesh.Trimesh):
            raise ValueError(f"a shape's mesh must be a trimesh.Trimesh, got {type(self.mesh)}")
        self.points = points


# --- surfaces ---------------------------------------------------------------------------


def field_to_mesh(values: np.ndarray, bound: float = 1.1, level: float = 0.0) -> trimesh.Trimesh:
    """The surface where a sampled field crosses ``level``, as a clean closed triangle mesh.

    Marching cubes, vertices mapped back to coordinates, then duplicate vertices merged and
    degenerate triangles dropped, only the largest connected piece kept (stray specks of a
    learned field), and the triangles wound consistently with normals pointing outward.
    A shape that reaches the grid's edge is closed there by a flat cap on the grid's face.

    Args:
        values: (R, R, R) field samples, positive inside; ``values[i, j, k]`` is the field at
            ``(x_i, y_j, z_k)`` with ``x = y = z = linspace(-bound, bound, R)`` (R >= 2).
        bound: half the side of the sampled cube, in shape units (1.1: the query range).
        level: the iso-value that is the surface (0 for a signed distance; 0.5 for
            occupancy probabilities; the logit 0 for occupancy logits).

    Returns:
        The mesh in shape units; watertight whenever the level set is closed.

    Raises:
        ValueError: values of another shape, NaN / infinite values, bound <= 0, or
            ``no surface at level ...`` when the field never crosses the level.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 3 or len(set(values.shape)) != 1 or values.shape[0] < 2:
        raise ValueError(f"expected an (R, R, R) field with R >= 2, got shape {values.shape}")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive number, got {bound}")
    spacing = 2.0 * bound / (values.shape[0] - 1)
    return _surface(values, np.full(3, -bound), spacing, float(level))


def _surface(
    values: np.ndarray,
    origin: np.ndarray,
    spacing: float,
    level: float,
    keep: float | None = None,
) -> trimesh.Trimesh:
    """:func:`field_to_mesh` on a grid ``origin + spacing * index`` of any (X, Y, Z) size;
    ``keep``: which pieces stay (see :func:`_clean`)."""
    from skimage.measure import marching_cubes  # lazy: scikit-image takes a while to import

    if not np.isfinite(values).all():
        raise ValueError("the field has NaN or infinite values")
    if not math.isfinite(level):
        raise ValueError(f"level must be finite, got {level}")
    low, high = float(values.min()), float(values.max())
    if not low < level < high:
        raise ValueError(
            f"no surface at level {level:g}: the field lies in [{low:.4g}, {high:.4g}]"
        )
    # One layer of "far outside" around the grid closes shapes that touch its edge; it is so
    # far below the level that the cap's vertices land on the grid's face (then clipped).
    below = level - 1e3 * max(high - level, level - low)
    padded = np.pad(values, 1, constant_values=below)
    vertices, faces, _, _ = marching_cubes(padded, level=level, allow_degenerate=False)
    vertices = origin + spacing * (vertices.astype(np.float64) - 1.0)
    top = origin + spacing * (np.array(values.shape) - 1)
    vertices = np.clip(vertices, origin, top)
    return _clean(trimesh.Trimesh(vertices, faces, process=True), keep)


def _clean(mesh: trimesh.Trimesh, keep: float | None = None) -> trimesh.Trimesh:
    """Degenerate triangles dropped, the largest edge-connected piece kept (with ``keep``:
    every piece with at least that share of the largest's triangles), outward normals."""
    mesh.update_faces(mesh.nondegenerate_faces())
    labels = trimesh.graph.connected_component_labels(
        mesh.face_adjacency, node_count=len(mesh.faces)
    )
    sizes = np.bincount(labels)
    if keep is None:
        mesh.update_faces(labels == sizes.argmax())
    else:
        mesh.update_faces(sizes[labels] >= keep * sizes.max())
    mesh.remove_unreferenced_vertices()
    # Consistent winding, then flipped to a positive volume (each piece, when several stay).
    trimesh.repair.fix_normals(mesh, multibody=keep is not None)
    return mesh


def points_to_mesh(points: np.ndarray, resolution: int = 64) -> trimesh.Trimesh:
    """A closed surface through a bare point cloud (``--mesh`` for the point model).

    The points are taken to sample a closed surface, possibly unevenly (a generated cone: a
    dense base, a sparse side), with parts too thin to enclose anything (a table's legs:
    lines of sparse points) and a few stray points. In steps:

    1. Stray points are dropped: those whose 8th-nearest neighbour is more than 3 times as
       far as is typical around them (the median of their neighbours' 8th-neighbour
       distances), or that lie further than that typical distance off the plane through
       their 8 neighbours (noise floating just off a surface, which would raise a bump). The
       end of a line of points, or a point where a dense part meets a sparse one, is neither.
    2. Every point gets a ball of its own radius: the distance to its 8th-nearest neighbour
       times the largest gap that many random points leave (1.2 x sqrt((ln N + ln ln N) / 8):
       1.3 for 2048 points), so sparse parts get bigger balls. Radii are kept within
       [0.6 x the median, 2 x the 90th percentile] (tight clumps still close up, what noise
       is left does not bridge far) and at least 1.5 grid cells. Each ball is written into the
       grid exactly, as ``max over points of (radius - distance)``: a big ball behind dense
       small ones still counts (the nearest few points would miss it, and the side of a cone
       with a dense base leaked in just above the base).
    3. The outside is what the grid's border reaches around the balls (flood fill); the rest
       is solid (the shell and what it encloses). Shrinking the solid again undoes the balls'
       thickening: at each place on its boundary by the radius of the ball that boundary
       belongs to, but never by more than the distance to the nearest point (an empty ball
       rolled around the outside), so a big ball that bridged a gap is taken back to the
       points beside it and no point of a dense part is cut away. This is a morphological
       closing with a radius that follows the points' spacing: gaps and notches narrower
       than about twice the local radius are filled, wider holes stay open (a torus keeps
       its hole, a mug its opening). In numbers: the signed distance to the solid's boundary
       (from the balls outside, a distance transform inside), less the shrink, blurred by
       half a cell.
    4. Thin parts: a point with less than a cell of solid within 2 cells of it samples
       something thinner than the closing keeps (a line of points, a sheet). Where at least
       4 such points lie within 2 median radii of each other (a lone one is noise), the
       surface is pushed out by ``t`` (half the median radius, at least a cell, at most 5 %
       of the longest extent) near them: a line of points becomes a tube, a sheet a slab
       ``2 t`` thick.
    5. Marching cubes (:func:`field_to_mesh`'s steps); every piece that has at least 5 % of
       the largest's triangles is kept (a leg that comes apart stays), then 10 Taubin
       smoothing steps, which hardly change the volume, iron out the noise of generated
       points.

    Measured at resolution 64: 2048 uniform samples of a sphere, a box or a torus come back
    watertight within 2 % of their volume (the torus with its hole; 512 samples within 3 %).
    Clouds of all 11 kinds from the bundled point model come back as one watertight piece
    spanning at least the middle 98 % of the cloud along every axis: the cone whole where one
    radius for all points (from their median spacing) left only its base's ring, the table
    and the chair with their legs. At resolutions 8 - 10 most clouds enclose nothing.

    Args:
        points: (N, 3) surface points (at least 4 distinct), any units, in any order (repeated
            points count once); a cloud of more than 65536 points is reconstructed from a
            fixed subset of that many.
        resolution: grid samples along the longest side of the points' padded bounding box,
            8 .. :data:`MAX_RECONSTRUCTION_RESOLUTION` (the grid's memory grows with its cube:
            64 takes 0.1 - 0.2 s for 2048 points, 256 five to ten seconds and some 600 MB).

    Returns:
        A mesh in the points' units, every piece watertight (one piece for one connected
        shape).

    Raises:
        ValueError: points of another shape, fewer than 4 (distinct), NaN / infinite, all at
            one place, a resolution outside 8 .. 256, or points that enclose nothing at this
            resolution.
    """
    from scipy import ndimage

    cloud = np.asarray(points, dtype=np.float64)
    if cloud.ndim != 2 or cloud.shape[1] != 3:
        raise ValueError(f"expected (N, 3) points, got shape {cloud.shape}")
    if len(cloud) < _MIN_POINTS:
        raise ValueError(f"a surface needs at least {_MIN_POINTS} points, got {len(cloud)}")
    if not np.isfinite(cloud).all():
        raise ValueError("the points have NaN or infinite values")
    if isinstance(resolution, bool) or not _MIN_RESOLUTION <= resolution <= (
        MAX_RECONSTRUCTION_RESOLUTION
    ):
        raise ValueError(
            f"resolution must be an integer in {_MIN_RESOLUTION} .. "
            f"{MAX_RECONSTRUCTION_RESOLUTION}, got {resolution!r}"
        )
    resolution = int(resolution)
    if not float(np.ptp(cloud, axis=0).max()) > 0:
        raise ValueError("the points are all at one place")
    cloud = np.unique(cloud, axis=0)  # a repeated point would shrink its neighbours' spacing
    if len(cloud) < _MIN_POINTS:
        raise ValueError(
            f"a surface needs at least {_MIN_POINTS} distinct points, got {len(cloud)}"
        )

    if len(cloud) > _MAX_CLOUD:  # a fixed subset: the same cloud gives the same mesh
        picks = np.random.default_rng(0).choice(len(cloud), _MAX_CLOUD, replace=False)
        cloud = cloud[np.sort(picks)]
    cloud = _without_outliers(cloud)
    radii = _ball_radii(cloud)
    lowest, highest = cloud.min(axis=0), cloud.max(axis=0)
    extent = float((highest - lowest).max())
    # The grid spans the points plus the largest ball and 3 cells on every side: 7 cells
    # besides the points.
    cells = resolution - 7
    radii = np.maximum(radii, 1.5 * extent / cells)
    largest = float(radii.max())
    cell = (extent + 2.0 * largest) / cells
    origin = lowest - (largest + 3.0 * cell)
    shape = np.ceil((highest - origin + largest + 3.0 * cell) / cell).astype(int) + 1
    grid = _Grid(origin, cell, tuple(int(s) for s in np.minimum(shape, resolution)))

    field = _closed_field(cloud, radii, grid)
    # Half a cell of blur irons out the distance transform's cell-sized kinks, which would
    # otherwise leave pinhole handles along sharp edges; it moves the surface far less.
    field = ndimage.gaussian_filter(field, sigma=0.5, mode="nearest")
    field = _with_thin_parts(field, cloud, radii, grid)
    if not field.max() > 0:
        raise ValueError(
            f"the points enclose no solid at resolution {resolution} (a grid too coarse for them)"
        )
    # A sample exactly on the level can leave a hole in marching cubes' surface.
    tiny = np.float32(1e-4 * cell)
    field[(field >= 0) & (field < tiny)] = tiny
    field[(field < 0) & (field > -tiny)] = -tiny
    mesh = _surface(field, origin, cell, 0.0, keep=_KEEP_FRACTION)
    # lamb 0.5, nu 0.52: Taubin's pass band 1/lamb - 1/nu = 0.08 (< 0.1), no shrinking.
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.52, iterations=_SMOOTHING_STEPS)
    return mesh


@dataclass(frozen=True, eq=False)
class _Grid:
    """A sampling grid: voxel ``(i, j, k)`` is at ``origin + cell * (i, j, k)``."""

    origin: np.ndarray
    cell: float
    shape: tuple[int, int, int]


def _without_outliers(cloud: np.ndarray) -> np.ndarray:
    """The cloud less its stray points (:func:`points_to_mesh`, step 1); all of it when
    fewer than 4 points would be left."""
    from scipy.spatial import cKDTree

    k = min(_NEIGHBOURS, len(cloud) - 1)
    distances, neighbours = cKDTree(cloud).query(cloud, k=k + 1)
    own = distances[:, k]
    # At least half the cloud's median: duplicated points have no spacing to compare with.
    typical = np.maximum(np.median(own[neighbours[:, 1:]], axis=1), 0.5 * np.median(own))
    around = cloud[neighbours[:, 1:]]  # (N, k, 3)
    centre = around.mean(axis=1)
    spread = around - centre[:, None]
    _, axes = np.linalg.eigh(np.einsum("nki,nkj->nij", spread, spread))
    off_plane = np.abs(np.einsum("ni,ni->n", cloud - centre, axes[:, :, 0]))  # least axis
    kept = (own <= _OUTLIER_RATIO * typical) & (off_plane <= typical)
    return cloud[kept] if kept.sum() >= _MIN_POINTS else cloud


def _ball_radii(cloud: np.ndarray) -> np.ndarray:
    """(N,) each point's ball radius (:func:`points_to_mesh`, step 2, before the floor of
    1.5 grid cells)."""
    from scipy.spatial import cKDTree

    k = min(_NEIGHBOURS, len(cloud) - 1)
    count = max(len(cloud), 16)
    gap = _BALL_MARGIN * math.sqrt((math.log(count) + math.log(math.log(count))) / k)
    radii = gap * cKDTree(cloud).query(cloud, k=k + 1)[0][:, k]
    return np.clip(radii, _RADIUS_FLOOR * np.median(radii), _RADIUS_CAP * np.quantile(radii, 0.9))


def _closed_field(cloud: np.ndarray, radii: np.ndarray, grid: _Grid) -> np.ndarray:
    """(X, Y, Z) float32: the balls' union closed again (:func:`points_to_mesh`, step 3),
    positive inside, about the signed distance to its surface."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    cell = grid.cell
    balls, owner = _splat_balls(cloud, radii, grid)
    labels, _ = ndimage.label(balls < 0)
    rim = np.concatenate(
        [labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]
    )
    outside = np.isin(labels, rim[rim > 0])
    del labels

    # The shrink where the boundary passes near an outside sample: the owning ball's radius,
    # at most the distance from the boundary (balls < 0 short of the sample) to the nearest
    # point.
    shrink = owner.copy()
    near = np.nonzero(outside & (balls > -2.0 * cell))
    nearest = cKDTree(cloud).query(grid.origin + cell * np.stack(near, axis=1))[0]
    shrink[near] = np.minimum(owner[near], nearest + balls[near])
    del near, nearest

    # Inside: the distance to the nearest outside sample, less how far that sample lies
    # beyond the balls (-balls: the boundary is between them), less the shrink there.
    feature = ndimage.distance_transform_edt(~outside, return_distances=False, return_indices=True)
    squared = np.zeros(grid.shape, dtype=np.float32)
    for a in range(3):
        index = np.arange(grid.shape[a], dtype=np.int32)
        index = index.reshape([-1 if b == a else 1 for b in range(3)])
        squared += (cell * (feature[a] - index).astype(np.float32)) ** 2
    boundary = (feature[0], feature[1], feature[2])
    del feature
    inside = np.sqrt(squared) + balls[boundary] - shrink[boundary]
    del squared, boundary, shrink
    return np.where(outside, balls - owner, inside).astype(np.float32)


def _splat_balls(
    centres: np.ndarray, radii: np.ndarray, grid: _Grid
) -> tuple[np.ndarray, np.ndarray]:
    """A union of balls on the grid: ``max over balls of (radius - distance)`` (positive
    inside; from 2 cells beyond the balls on, -2 cells), and the radius of the ball that
    attains it (the largest radius where none is near), both (X, Y, Z) float32.

    Each ball is written into the voxels within its radius and 2 cells, in chunks of at most
    :data:`_SPLAT_CHUNK` (ball, voxel) pairs. One ``maximum.at`` finds both: the value (in
    steps of 1/65536 cell) and the radius (in :data:`_RADIUS_CODES` steps of the largest) are
    packed into one int64, the value in the high bits, so the largest key holds the largest
    value and its ball's radius."""
    cell, reach = grid.cell, 2.0 * grid.cell
    largest = float(radii.max())
    step = cell / 65536
    # The grid leaves the largest radius and 3 cells around the points (a cell less on the
    # far side after rounding); a ball's voxels reach its radius, 2 cells and 1.4 cells of
    # rounding from its centre, so 4 spare cells on every side hold them.
    pad = 4
    padded = tuple(s + 2 * pad for s in grid.shape)
    strides = np.array([padded[1] * padded[2], padded[2], 1])
    codes = np.rint(radii / largest * _RADIUS_CODES).astype(np.int64)
    keys = np.full(int(np.prod(padded)), (math.floor(-reach / step) << 20) | _RADIUS_CODES)
    spans = np.ceil((radii + reach) / cell).astype(np.int64)
    for span in np.unique(spans):
        # Voxels within radius + 2 cells of a centre lie within span + 0.87 cells (half a
        # cell's diagonal) of the voxel nearest to it.
        steps = np.arange(-span - 1, span + 2)
        offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
        offsets = offsets[(offsets**2).sum(axis=1) <= (span + 0.87) ** 2]
        offset_flat = offsets @ strides
        offsets = offsets.astype(np.float64)
        offset_squares = (offsets**2).sum(axis=1)
        members = np.nonzero(spans == span)[0]
        batch = max(1, _SPLAT_CHUNK // len(offsets))
        for start in range(0, len(members), batch):
            chosen = members[start : start + batch]
            position = (centres[chosen] - grid.origin) / cell + pad  # in cells
            nearest = np.rint(position)
            fraction = position - nearest  # (B, 3)
            squares = (  # |offset - fraction|^2, (B, O)
                offset_squares - 2.0 * (fraction @ offsets.T) + (fraction**2).sum(axis=1)[:, None]
            )
            value = radii[chosen, None] - cell * np.sqrt(np.maximum(squares, 0.0))
            value = np.floor(np.maximum(value, -reach) / step).astype(np.int64)
            voxels = (nearest.astype(np.int64) @ strides)[:, None] + offset_flat
            np.maximum.at(keys, voxels.ravel(), ((value << 20) | codes[chosen, None]).ravel())
    keys = keys.reshape(padded)[pad:-pad, pad:-pad, pad:-pad]
    union = ((keys >> 20) * step).astype(np.float32)
    owner = ((keys & _RADIUS_CODES) * (largest / _RADIUS_CODES)).astype(np.float32)
    return union, owner


def _with_thin_parts(
    field: np.ndarray, cloud: np.ndarray, radii: np.ndarray, grid: _Grid
) -> np.ndarray:
    """``field`` pushed out by ``t`` around the thin parts of the cloud
    (:func:`points_to_mesh`, step 4): by ``t`` within ``t`` and half a point's radius of
    their points (which spans the gaps of a sparse line), by less over the next 2 cells."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    cell = grid.cell
    solid_near = ndimage.maximum_filter(field, size=5, mode="nearest")  # within 2 cells
    depth = ndimage.map_coordinates(
        solid_near, ((cloud - grid.origin) / cell).T, order=1, mode="nearest"
    )
    thin = np.nonzero(depth < cell)[0]
    typical = float(np.median(radii))
    if len(thin):
        company = cKDTree(cloud[thin]).query_ball_point(
            cloud[thin], r=2.0 * typical, return_length=True
        )
        thin = thin[company >= 4]
    if len(thin) == 0:
        return field
    extent = float(np.ptp(cloud, axis=0).max())
    thickness = min(max(0.5 * typical, cell), _THIN_CAP * extent)
    near, _ = _splat_balls(cloud[thin], thickness + 0.5 * radii[thin], grid)
    weight = np.clip(1.0 + near / (2.0 * cell), 0.0, 1.0)
    return field + thickness * weight


# --- files ------------------------------------------------------------------------------


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.ply`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, SHAPE_OUTPUT_SUFFIXES[0])


def _plain_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Only the vertices and triangles: no colours, and no ``metadata`` (a loaded mesh's
    holds its source file's path, which glTF export would copy into the file)."""
    if len(mesh.faces) == 0:
        raise ValueError("the shape's mesh has no triangles")
    return trimesh.Trimesh(
        np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), process=False
    )


def _comment_chunks(record: Mapping[str, Any], room: int) -> list[str]:
    """A record's one-line ASCII JSON in pieces of at most ``room`` characters, cut between
    two non-spaces where possible (see the module doc)."""
    record_json(record)  # one-line ValueError for a record that is not JSON
    text = json.dumps(dict(record), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    chunks = []
    while len(text) > room:
        cut = room
        while cut > 1 and (text[cut - 1] == " " or text[cut] == " "):
            cut -= 1
        if cut == 1:  # nothing but spaces around: cut anyway
            cut = room
        chunks.append(text[:cut])
        text = text[cut:]
    chunks.append(text)
    return chunks


def _ply_bytes(shape: Shape, record: Mapping[str, Any] | None) -> bytes:
    if shape.mesh is not None:
        source: Any = _plain_mesh(shape.mesh)
    else:
        if len(shape.points) == 0:
            raise ValueError("the shape has no points and no mesh")
        source = trimesh.PointCloud(shape.points)
    data = trimesh.exchange.ply.export_ply(
        source, encoding="binary", vertex_normal=False, include_attributes=False
    )
    if not record:
        return data
    # Comments go right after the "format" line (the PLY header's second line).
    second = data.index(b"\n", data.index(b"\n") + 1) + 1
    room = COMMENT_LINE_BYTES - len(_PLY_TAG) - 1
    lines = b"".join(_PLY_TAG + c.encode("ascii") + b"\n" for c in _comment_chunks(record, room))
    return data[:second] + lines + data[second:]


def _glb_bytes(mesh: trimesh.Trimesh, record: Mapping[str, Any] | None) -> bytes:
    extras = json.loads(record_json(record)) if record else None

    def finish(tree: dict[str, Any]) -> None:
        tree["materials"] = [
            {
                "name": "polydiff-matte",
                "pbrMetallicRoughness": {
                    "baseColorFactor": [0.8, 0.8, 0.8, 1.0],
                    "metallicFactor": 0.0,
                    "roughnessFactor": 0.8,
                },
            }
        ]
        for mesh_entry in tree.get("meshes", []):
            mesh_entry.pop("extras", None)
            for primitive in mesh_entry["primitives"]:
                primitive["material"] = 0
        if extras is not None:
            tree["asset"]["extras"] = extras
            tree["scenes"][tree.get("scene", 0)]["extras"] = extras

    scene = trimesh.Scene(_plain_mesh(mesh))
    return trimesh.exchange.gltf.export_glb(scene, include_normals=True, tree_postprocessor=finish)


def _obj_text(mesh: trimesh.Trimesh, record: Mapping[str, Any] | None) -> str:
    body = trimesh.exchange.obj.export_obj(
        _plain_mesh(mesh),
        include_normals=True,
        include_color=False,
        include_texture=False,
        header=None,
    )
    if not record:
        return body
    room = COMMENT_LINE_BYTES - len(_OBJ_TAG) - 1
    return "".join(f"{_OBJ_TAG}{c}\n" for c in _comment_chunks(record, room)) + body


def save_shapes(
    shapes: Sequence[Shape],
    paths: Sequence[str | Path] | str | Path,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Save shapes as PLY, GLB or OBJ (by each path's suffix), each with its provenance record.

    ``.ply``: the mesh when the Shape has one, else its points (a vertex-only PLY). ``.glb`` /
    ``.obj``: the mesh (:data:`MESH_ONLY_SUFFIXES`; reconstruct point clouds first with
    :func:`points_to_mesh`). See the module doc for the formats and where records go.

    Args:
        shapes: the shapes, in output order.
        paths: one path per shape (what :func:`polydiff.core.provenance.check_output`
            returns), or a single ``--out`` FILE, expanded by the ``--num`` naming rule
            (``FILE_0.ply`` ...) to ``len(shapes)`` files.
        metadata: one provenance record per shape (embedded and written as the sidecar
            ``<name>.<suffix>.json``); an empty record ``{}`` or ``None`` for all (previews
            during training) stores nothing and writes no sidecar.

    Returns:
        The written paths. Nothing is left beside a file whose writing fails.

    Raises:
        ValueError: no shapes, counts that do not match, a suffix other than .ply / .glb /
            .obj, a GLB / OBJ for a shape without mesh, an empty shape or a record that is
            not JSON; all raised before any file is written.
    """
    if not shapes:
        raise ValueError("no shapes to save")
    targets = output_targets(len(shapes), paths, metadata, SHAPE_OUTPUT_SUFFIXES, "shapes")
    encoded: list[tuple[Path, bytes, Mapping[str, Any] | None]] = []
    for shape, (target, record) in zip(shapes, targets, strict=True):
        suffix = target.suffix.lower()
        if suffix in MESH_ONLY_SUFFIXES and shape.mesh is None:
            raise ValueError(
                f"{target.name}: a {suffix} file holds a mesh and this shape has none "
                "(reconstruct it with points_to_mesh, or write .ply points)"
            )
        record = record or None
        if suffix == ".ply":
            data = _ply_bytes(shape, record)
        elif suffix == ".glb":
            data = _glb_bytes(shape.mesh, record)
        else:
            data = _obj_text(shape.mesh, record).encode("ascii")
        encoded.append((target, data, record))
    written = []
    for target, data, record in encoded:
        with atomic_output(target) as tmp:
            tmp.write_bytes(data)
        if record is not None:
            write_sidecar(target, record)
        written.append(target)
    return written


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record embedded in a ``.ply`` / ``.glb`` / ``.obj`` file written by
    :func:`save_shapes` (see the module doc); ``None`` when the file carries none.

    Raises:
        ValueError: another suffix, or a file that is not PLY / GLB as its suffix says.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        chunks = []
        with path.open("rb") as handle:
            if handle.readline().rstrip(b"\r\n") != b"ply":
                raise ValueError(f"{path.name} is not a PLY file")
            for line in handle:
                line = line.rstrip(b"\r\n")
                if line == b"end_header":
                    break
                if line.startswith(_PLY_TAG):
                    chunks.append(line[len(_PLY_TAG) :].decode("ascii"))
        return json.loads("".join(chunks)) if chunks else None
    if suffix == ".obj":
        chunks = []
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.startswith("#"):
                    break  # the record is the file's first comment lines
                if line.startswith(_OBJ_TAG):
                    chunks.append(line[len(_OBJ_TAG) :].rstrip("\r\n"))
        return json.loads("".join(chunks)) if chunks else None
    if suffix == ".glb":
        with path.open("rb") as handle:
            header = handle.read(20)
            if len(header) < 20 or header[:4] != _GLB_MAGIC:
                raise ValueError(f"{path.name} is not a GLB file")
            length, kind = struct.unpack("<II", header[12:20])
            if kind != _GLB_JSON:
                raise ValueError(f"{path.name} has no JSON chunk first")
            tree = json.loads(handle.read(length))
        extras = tree.get("asset", {}).get("extras")
        return extras if isinstance(extras, dict) and extras else None
    raise ValueError(f"cannot read provenance of {suffix!r} files; use one of .ply, .glb, .obj")


# --- previews ---------------------------------------------------------------------------


def _camera(azimuth: float, elevation: float) -> np.ndarray:
    """(3, 3) rows: the screen's right, up and toward-the-viewer directions of an orthographic
    camera ``azimuth`` degrees around +Y from the front (+Z, toward +X) and ``elevation``
    degrees above the horizon, in the shape's Y-up frame (right x up = toward the viewer)."""
    a, e = np.radians(azimuth), np.radians(elevation)
    right = [np.cos(a), 0.0, -np.sin(a)]
    up = [-np.sin(e) * np.sin(a), np.cos(e), -np.sin(e) * np.cos(a)]
    toward = [np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)]
    return np.array([right, up, toward])


def render_preview(
    shapes: Sequence[Shape], path: str | Path, views: int = 3, size: int = 256
) -> Path:
    """Draw shapes as a PNG contact sheet, headless (matplotlib's Agg), atomically.

    One row per shape, ``views`` columns seen from azimuths spread evenly around the up (Y)
    axis, starting at a three-quarter front view (30° toward +X), 20° above the horizon;
    orthographic, the same scale in every view of a shape (its bounding sphere fills the
    square), no axes. A Shape with a mesh is drawn as its triangles, far to near (painter's
    order), grey with Lambert shading from a light above and behind the camera (two-sided, so
    open or badly wound meshes still read); a bare point cloud as dots coloured by depth (near:
    bright yellow, far: dark blue), near dots drawn over far ones.

    The projection is done here and drawn with 2D collections rather than ``mplot3d``: the
    framing and the depth order are then exactly these, and it is faster.

    Args:
        shapes: 1 .. :data:`MAX_PREVIEW_SHAPES` shapes. path: the ``.png`` file.
        views: columns per shape, 1 .. :data:`MAX_PREVIEW_VIEWS`.
        size: the side of one view in pixels, 32 .. 1024.

    Returns:
        ``path``: a PNG ``views * size`` pixels wide and ``len(shapes) * size`` high.

    Raises:
        ValueError: a suffix other than .png, counts or size out of range, or an empty shape.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"a preview is a .png file, got {path.name!r}")
    if not 1 <= len(shapes) <= MAX_PREVIEW_SHAPES:
        raise ValueError(f"a preview draws 1 .. {MAX_PREVIEW_SHAPES} shapes, got {len(shapes)}")
    if isinstance(views, bool) or not 1 <= views <= MAX_PREVIEW_VIEWS:
        raise ValueError(f"views must be 1 .. {MAX_PREVIEW_VIEWS}, got {views!r}")
    if isinstance(size, bool) or not 32 <= size <= 1024:
        raise ValueError(f"size must be 32 .. 1024 pixels, got {size!r}")
    for shape in shapes:
        if (shape.mesh is None or len(shape.mesh.faces) == 0) and len(shape.points) == 0:
            raise ValueError("cannot draw a shape with no points and no mesh")

    dpi = 100
    rows = len(shapes)
    figure = Figure(figsize=(views * size / dpi, rows * size / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    depth_colours = colormaps["viridis"]
    dot_area = (max(1.5, size / 128) * 72 / dpi) ** 2  # in points squared: 2 px at 256
    for row, shape in enumerate(shapes):
        if shape.mesh is not None and len(shape.mesh.faces):
            triangles = np.asarray(shape.mesh.triangles, dtype=np.float64)  # (F, 3, 3)
            normals = np.asarray(shape.mesh.face_normals, dtype=np.float64)
            corners = triangles.reshape(-1, 3)
        else:
            triangles = normals = None
            corners = shape.points.astype(np.float64)
            if len(corners) > 8192:  # more dots only slow the drawing down
                corners = corners[np.linspace(0, len(corners) - 1, 8192).astype(int)]
        centre = (corners.min(axis=0) + corners.max(axis=0)) / 2
        reach = 1.05 * max(float(np.linalg.norm(corners - centre, axis=1).max()), 1e-9)
        for column in range(views):
            camera = _camera(30.0 + 360.0 * column / views, 20.0)
            axes = figure.add_axes((column / views, 1 - (row + 1) / rows, 1 / views, 1 / rows))
            axes.set_xlim(-reach, reach)
            axes.set_ylim(-reach, reach)
            axes.set_aspect("equal")
            axes.set_axis_off()
            if triangles is not None:
                on_screen = (triangles - centre) @ camera.T  # (F, 3, 3): right, up, depth
                order = np.argsort(on_screen[:, :, 2].mean(axis=1))  # far first
                facing = normals * np.sign(normals @ camera[2])[:, None]  # two-sided
                light = camera[2] + 0.6 * camera[1] + 0.3 * camera[0]
                light /= np.linalg.norm(light)
                brightness = 0.2 + 0.8 * np.clip(facing @ light, 0.0, 1.0)
                colours = np.ones((len(brightness), 4))
                colours[:, :3] = brightness[:, None] * np.array([0.85, 0.86, 0.9])
                colours = colours[order]
                axes.add_collection(
                    PolyCollection(
                        on_screen[order, :, :2],
                        facecolors=colours,
                        edgecolors=colours,  # hides the seams between antialiased triangles
                        linewidths=0.25,
                    )
                )
            else:
                on_screen = (corners - centre) @ camera.T
                order = np.argsort(on_screen[:, 2])  # far first: near dots end on top
                depth = on_screen[order, 2]
                nearness = (depth - depth.min()) / max(float(np.ptp(depth)), 1e-9)
                axes.scatter(
                    on_screen[order, 0],
                    on_screen[order, 1],
                    c=depth_colours(0.1 + 0.9 * nearness),
                    s=dot_area,
                    linewidths=0,
                )
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path
