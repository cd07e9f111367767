"""Built-in shape set that needs no download: ``synthetic:primitives[:COUNT]``.

Eleven kinds of procedural mesh, each with one exact caption (listed in :data:`CAPTIONS`;
its ``label`` is the caption without the article). Every shape draws its proportions at
random within its kind's ranges, a size (its diameter or width) of 0.5-1.5 units and a
rotation about the up axis (Y is up). Ratios are chosen so that the kinds stay apart after
normalisation (which keeps proportions): a box is never flat, a cylinder never tall, a
capsule never as slender as a tall cylinder.

=================  ==========================================================================
caption            shape (h: height along Y; d: diameter; w x d: width x depth)
=================  ==========================================================================
a sphere           icosphere (1280 faces)
a box              near-cube: each edge 0.9-1.15 of a common size (ratios 0.78-1.28)
a flat box         h 0.1-0.3 of both its width and depth; depth / width 0.8-1.25
a cylinder         upright, h / d 0.8-1.3
a tall cylinder    upright, h / d 2.2-3.5
a cone             base down, apex up, h / d 0.8-1.5
a torus            a ring lying flat (axis up); tube radius 0.2-0.4 of the ring radius
a capsule          upright cylinder with hemispherical ends, total h / d 1.6-2.2
a table            flat top (depth / width 0.5-0.9, thickness 0.04-0.07 of the width) on
                   four square legs (side 0.05-0.09, height 0.55-0.85 of the width)
a chair            square-ish seat (depth / width 0.9-1.1) on four legs (height 0.8-1.1 of
                   the width) and an upright back along one edge (0.8-1.2 of the width tall)
a mug              upright hollow wall (annulus, h / d 0.9-1.3, wall 0.06-0.12 of the
                   radius), a bottom disc and a ring handle (torus) on its side
=================  ==========================================================================

Compound shapes are unions of overlapping watertight parts (their occupancy is the union by
winding number, see :func:`polydiff.shape.data.occupancy`). Every part has outward-facing
triangles; meshes hold about 100-1300 faces. :func:`primitives` writes them as binary PLY
shard samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import trimesh
from trimesh import creation, transformations

from .data import encode_mesh

__all__ = [
    "CAPTIONS",
    "DEFAULT_COUNT",
    "SOURCE",
    "SYNTHETIC_SETS",
    "label",
    "primitives",
    "render",
]

CAPTIONS: tuple[str, ...] = (
    "a sphere",
    "a box",
    "a flat box",
    "a cylinder",
    "a tall cylinder",
    "a cone",
    "a torus",
    "a capsule",
    "a table",
    "a chair",
    "a mug",
)
SYNTHETIC_SETS = ("primitives",)
DEFAULT_COUNT = 2200  # 200 shapes of each of the 11 kinds
SOURCE = "synthetic:primitives"

_SECTIONS = 48  # around a cylinder, cone or mug: smooth enough, few faces
_SIZE = (0.5, 1.5)  # diameter or width in units, before normalisation
# trimesh's primitives have their axis along Z; this turns Z into Y (up).
_Z_TO_Y = transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])


def _moved(mesh: trimesh.Trimesh, offset: Sequence[float]) -> trimesh.Trimesh:
    mesh.apply_translation(offset)
    return mesh


def _upright(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A Z-aligned trimesh primitive turned so its axis is Y."""
    return mesh.apply_transform(_Z_TO_Y)


def _block(x: float, y: float, z: float, centre: Sequence[float]) -> trimesh.Trimesh:
    """An axis-aligned box with edges ``x, y, z`` around ``centre``."""
    return _moved(creation.box(extents=(x, y, z)), centre)


def _cylinder(radius: float, height: float, bottom: float = 0.0) -> trimesh.Trimesh:
    """An upright cylinder on the Y axis standing on ``y = bottom``."""
    mesh = _upright(creation.cylinder(radius=radius, height=height, sections=_SECTIONS))
    return _moved(mesh, (0.0, bottom + height / 2, 0.0))


def _union(parts: Sequence[trimesh.Trimesh]) -> trimesh.Trimesh:
    """The parts as one mesh, each part's vertices kept apart (no merging: coincident
    corners of two parts must not join them into a non-manifold surface)."""
    offsets = np.cumsum([0] + [len(part.vertices) for part in parts[:-1]])
    vertices = np.concatenate([part.vertices for part in parts])
    faces = np.concatenate(
        [part.faces + offset for part, offset in zip(parts, offsets, strict=True)]
    )
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


def _legs(
    width: float, depth: float, side: float, height: float, inset: float
) -> list[trimesh.Trimesh]:
    """Four square legs from ``y = 0`` up to ``height``, at the corners of a
    ``width`` x ``depth`` rectangle, ``inset`` in from its edges."""
    x = width / 2 - side / 2 - inset
    z = depth / 2 - side / 2 - inset
    return [
        _block(side, height, side, (sx * x, height / 2, sz * z)) for sx in (-1, 1) for sz in (-1, 1)
    ]


def _table(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    width, depth = 1.0, rng.uniform(0.5, 0.9)
    top, leg_height, side = (
        rng.uniform(0.04, 0.07),
        rng.uniform(0.55, 0.85),
        rng.uniform(0.05, 0.09),
    )
    # The legs reach halfway into the top, so the parts overlap (one solid as a union).
    legs = _legs(width, depth, side, leg_height + top / 2, rng.uniform(0.0, 0.05))
    return [_block(width, top, depth, (0.0, leg_height + top / 2, 0.0)), *legs]


def _chair(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    width, depth = 1.0, rng.uniform(0.9, 1.1)
    seat, leg_height, side = rng.uniform(0.06, 0.1), rng.uniform(0.8, 1.1), rng.uniform(0.06, 0.1)
    back_height, back = rng.uniform(0.8, 1.2), rng.uniform(0.06, 0.1)
    legs = _legs(width, depth, side, leg_height + seat / 2, 0.0)
    seat_part = _block(width, seat, depth, (0.0, leg_height + seat / 2, 0.0))
    # The back stands on the seat's rear edge, from inside the seat up.
    back_span = seat / 2 + back_height
    back_part = _block(
        width, back_span, back, (0.0, leg_height + seat / 2 + back_span / 2, -(depth - back) / 2)
    )
    return [seat_part, back_part, *legs]


def _mug(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    radius = 0.5
    height = rng.uniform(0.9, 1.3) * 2 * radius
    wall = rng.uniform(0.06, 0.12) * radius
    inner = radius - wall
    shell = _upright(creation.annulus(r_min=inner, r_max=radius, height=height, sections=_SECTIONS))
    shell = _moved(shell, (0.0, height / 2, 0.0))
    bottom = _cylinder(radius - wall / 2, wall)  # within the wall: no rim sticks out
    ring, tube = rng.uniform(0.25, 0.35) * height, rng.uniform(0.05, 0.08) * height
    # trimesh's torus lies in the XY plane: upright already. Its innermost point reaches
    # the middle of the wall, so the handle joins the wall without entering the cup.
    handle = creation.torus(ring, tube, major_sections=24, minor_sections=12)
    handle = _moved(handle, (inner + wall / 2 + ring + tube, height / 2, 0.0))
    return [shell, bottom, handle]


def _parts(caption: str, rng: np.random.Generator) -> list[trimesh.Trimesh]:
    """The parts of one shape in the upright frame (sizes around 1 unit)."""
    if caption == "a sphere":
        return [creation.icosphere(subdivisions=3, radius=0.5)]
    if caption == "a box":
        return [creation.box(extents=rng.uniform(0.9, 1.15, size=3))]
    if caption == "a flat box":
        width, depth = 1.0, rng.uniform(0.8, 1.25)
        # Both ratios height / width and height / depth in [0.1, 0.3].
        height = rng.uniform(0.1 * max(width, depth), 0.3 * min(width, depth))
        return [creation.box(extents=(width, height, depth))]
    if caption in ("a cylinder", "a tall cylinder"):
        ratio = rng.uniform(0.8, 1.3) if caption == "a cylinder" else rng.uniform(2.2, 3.5)
        return [_cylinder(0.5, ratio)]
    if caption == "a cone":  # trimesh's cone has its base at z = 0 and its apex up
        return [
            _upright(creation.cone(radius=0.5, height=rng.uniform(0.8, 1.5), sections=_SECTIONS))
        ]
    if caption == "a torus":
        ring = 0.5
        mesh = creation.torus(
            ring, rng.uniform(0.2, 0.4) * ring, major_sections=32, minor_sections=16
        )
        return [_upright(mesh)]
    if caption == "a capsule":
        total = rng.uniform(1.6, 2.2)  # in diameters; trimesh's height is between the caps' centres
        return [_upright(creation.capsule(height=total - 1.0, radius=0.5, count=[24, 12]))]
    if caption == "a table":
        return _table(rng)
    if caption == "a chair":
        return _chair(rng)
    return _mug(rng)


def render(caption: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """One mesh of the kind ``caption`` names (see the module doc), Y up.

    Proportions, the size (diameter or width: 0.5-1.5 units) and a rotation about the Y axis
    are drawn from ``rng``; the mesh is not normalised (see
    :func:`polydiff.shape.data.normalize_mesh`).

    Returns:
        A triangle mesh made of one or more watertight parts with outward-facing triangles.

    Raises:
        ValueError: a caption not in :data:`CAPTIONS` (naming them).
    """
    if caption not in CAPTIONS:
        raise ValueError(f"unknown shape {caption!r}; valid: {', '.join(CAPTIONS)}")
    mesh = _union(_parts(caption, rng))
    mesh.apply_scale(rng.uniform(*_SIZE))
    mesh.apply_transform(transformations.rotation_matrix(rng.uniform(0, 2 * np.pi), [0, 1, 0]))
    return mesh


def label(caption: str) -> str:
    """The class name of a caption: ``"a flat box"`` -> ``"flat box"``."""
    article, _, name = caption.partition(" ")
    return name if article in ("a", "an") and name else caption


def _primitives(count: int, seed: int) -> Iterator[dict[str, Any]]:
    for index in range(count):
        caption = CAPTIONS[index % len(CAPTIONS)]
        mesh = render(caption, np.random.default_rng([seed, index]))
        yield {
            "__key__": f"{index:06d}",
            "ply": encode_mesh(mesh),
            "json": {"caption": caption, "label": label(caption), "source": SOURCE},
        }


def primitives(count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Shard samples of the synthetic primitives set, made lazily one at a time.

    Shape ``i`` has caption ``CAPTIONS[i % 11]`` (so a ``count`` that is a multiple of 11
    holds every kind equally often) and is drawn from a generator seeded by ``(seed, i)``:
    the same ``seed`` gives the same bytes.

    Args:
        count: how many shapes (None: :data:`DEFAULT_COUNT`).

    Yields:
        ``{"__key__": "000042", "ply": binary PLY bytes, "json": {"caption", "label",
        "source": "synthetic:primitives"}}``.

    Raises:
        ValueError: ``count`` < 1 (at once, before anything is rendered).
    """
    count = DEFAULT_COUNT if count is None else count
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return _primitives(count, seed)
