"""Headless stick-figure pictures of motions: frames, MP4s and contact sheets (PIL only).

The camera is a perspective camera at a fixed 3/4 view (30 degrees to the body's left of its
rest facing +Z, 15 degrees above the horizon, 4 m away) looking at 0.9 m above the root;
it follows the root's XZ path smoothed over about a second, so walks stay in frame while the
floor, a world-fixed checker of 0.5 m tiles on y = 0, slides past and shows the speed. A
soft shadow under the root shows the height of jumps.

Bones are thick lines, coloured by side (the body's left, +X, blue; its right red; the spine
and head grey), joints dots, the head a larger disc; everything is drawn far to near and at
twice the size, then downscaled, which antialiases lines and edges. 196 frames at 480 x 480
take about a second on one core.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter1d

from polydiff.core.mp4 import write_mp4
from polydiff.core.provenance import atomic_output

from .features import FPS
from .skeleton import JOINT_NAMES, NUM_JOINTS, PARENTS

__all__ = ["contact_sheet", "render_frames", "write_stick_figure_mp4"]

_AZIMUTH, _ELEVATION, _DISTANCE = math.radians(30.0), math.radians(15.0), 4.0  # metres
_LOOK_HEIGHT = 0.9  # metres: about the middle of a standing body
_FIELD_OF_VIEW = math.radians(40.0)  # vertical
_FOLLOW_SIGMA = 10.0  # frames (0.5 s at 20 fps): the camera's smoothing of the root path
_TILE, _FLOOR_REACH = 0.5, 8.0  # metres: checker tile side, floor drawn around the target
_NEAR = 0.3  # metres: floor tiles closer to the camera than this are skipped
_SUPERSAMPLE = 2

_BACKGROUND = np.array([236, 238, 242])
_TILE_COLOURS = (np.array([206, 210, 216]), np.array([184, 189, 197]))
_SHADOW = (150, 155, 163)
_SIDE_COLOURS = {"left": (52, 110, 220), "right": (215, 60, 55), "centre": (95, 95, 100)}
_BONE_WIDTH, _JOINT_RADIUS, _HEAD_RADIUS = 0.035, 0.028, 0.10  # metres
_HEAD = JOINT_NAMES.index("head")


def _side(joint: int) -> str:
    name = JOINT_NAMES[joint]
    return "left" if name.startswith("left") else "right" if name.startswith("right") else "centre"


def _darker(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c * 0.7) for c in colour)  # type: ignore[return-value]


class _Camera:
    """A perspective camera per frame: eye (T, 3), basis rows (3, 3) (right, up, forward),
    focal length and image centre in (supersampled) pixels."""

    def __init__(self, joints: np.ndarray, width: int, height: int) -> None:
        path = joints[:, 0, [0, 2]]
        if len(path) > 1:
            path = gaussian_filter1d(path, _FOLLOW_SIGMA, axis=0, mode="nearest")
        self.target = np.stack([path[:, 0], np.full(len(path), _LOOK_HEIGHT), path[:, 1]], 1)
        towards_eye = np.array(
            [
                math.sin(_AZIMUTH) * math.cos(_ELEVATION),
                math.sin(_ELEVATION),
                math.cos(_AZIMUTH) * math.cos(_ELEVATION),
            ]
        )
        self.eye = self.target + _DISTANCE * towards_eye
        forward = -towards_eye
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        self.basis = np.stack([right, up, forward])
        self.focal = (height / 2) / math.tan(_FIELD_OF_VIEW / 2)
        self.centre = np.array([width / 2, height / 2])

    def project(self, frame: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) world points -> (N, 2) pixels and (N,) depths (metres along the view)."""
        local = (points - self.eye[frame]) @ self.basis.T
        depth = local[:, 2]
        safe = np.maximum(depth, 1e-6)
        pixels = np.stack(
            [
                self.centre[0] + self.focal * local[:, 0] / safe,
                self.centre[1] - self.focal * local[:, 1] / safe,
            ],
            axis=1,
        )
        return pixels, depth


def _check_joints(joints: np.ndarray) -> np.ndarray:
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3) or len(joints) < 1:
        raise ValueError(f"expected (T, {NUM_JOINTS}, 3) joints with T >= 1, got {joints.shape}")
    if not np.isfinite(joints).all():
        raise ValueError("the motion has NaN or infinite joint positions")
    return joints


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height) pixels, got {size!r}") from None
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise ValueError(f"size must be 16 .. 4096 pixels a side, got {size!r}")
    return width, height


def _draw_floor(draw: ImageDraw.ImageDraw, camera: _Camera, frame: int) -> None:
    """The checker around the camera target, tiles fading into the background far away."""
    cx, cz = camera.target[frame, 0], camera.target[frame, 2]
    first_x = math.floor((cx - _FLOOR_REACH) / _TILE)
    first_z = math.floor((cz - _FLOOR_REACH) / _TILE)
    count = int(2 * _FLOOR_REACH / _TILE) + 1
    ix, iz = np.meshgrid(np.arange(count + 1) + first_x, np.arange(count + 1) + first_z)
    corners = np.stack([ix * _TILE, np.zeros(ix.shape), iz * _TILE], -1).reshape(-1, 3)
    pixels, depth = camera.project(frame, corners)
    pixels = pixels.reshape(count + 1, count + 1, 2)
    depth = depth.reshape(count + 1, count + 1)
    # Per tile (count, count): its four corners, nearest depth, mean depth, screen box.
    quads = np.stack(
        [pixels[:-1, :-1], pixels[:-1, 1:], pixels[1:, 1:], pixels[1:, :-1]], axis=2
    )  # (count, count, 4, 2)
    four = np.stack([depth[:-1, :-1], depth[:-1, 1:], depth[1:, 1:], depth[1:, :-1]], axis=2)
    width, height = 2 * camera.centre
    visible = (
        (four.min(axis=2) > _NEAR)
        & (quads[..., 0].max(axis=2) >= 0)
        & (quads[..., 0].min(axis=2) <= width)
        & (quads[..., 1].max(axis=2) >= 0)
        & (quads[..., 1].min(axis=2) <= height)
    )
    fade = np.clip((four.mean(axis=2) - _DISTANCE) / (2.0 * _FLOOR_REACH), 0.0, 1.0)
    parity = (np.add.outer(np.arange(count), np.arange(count)) + first_x + first_z) % 2
    tiles = np.where(parity[..., None] == 0, _TILE_COLOURS[0], _TILE_COLOURS[1])
    colours = (tiles + (_BACKGROUND - tiles) * fade[..., None]).astype(np.int64)
    # Tiles never overlap on a flat floor, so they need no depth order.
    for quad, colour in zip(quads[visible].tolist(), colours[visible].tolist(), strict=True):
        draw.polygon([tuple(corner) for corner in quad], fill=tuple(colour))


def _draw_figure(
    draw: ImageDraw.ImageDraw, camera: _Camera, frame: int, joints: np.ndarray
) -> None:
    """Shadow, then bones and joints far to near."""
    root = joints[0]
    angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    height = max(float(root[1]), 0.0)
    radius = 0.3 / (1.0 + 0.8 * max(height - 0.9, 0.0))  # a jump shrinks the shadow
    ring = np.zeros((len(angles), 3))
    ring[:, 0] = root[0] + radius * np.cos(angles)
    ring[:, 2] = root[2] + radius * np.sin(angles)
    ring_pixels, ring_depth = camera.project(frame, ring)
    if ring_depth.min() > _NEAR:
        draw.polygon([tuple(p) for p in ring_pixels], fill=_SHADOW)

    pixels, depth = camera.project(frame, joints)
    if depth.min() <= _NEAR:  # a joint behind the camera: nothing sensible to draw
        return
    items: list[tuple[float, int, int]] = []  # (depth, kind, joint): kind 0 bone, 1 joint
    for j in range(1, NUM_JOINTS):
        items.append(((depth[j] + depth[PARENTS[j]]) / 2, 0, j))
    for j in range(NUM_JOINTS):
        items.append((depth[j] - 1e-3, 1, j))  # a joint covers the ends of its bones
    for item_depth, kind, j in sorted(items, key=lambda item: -item[0]):
        scale = camera.focal / item_depth
        colour = _SIDE_COLOURS[_side(j)]
        if kind == 0:
            start, end = pixels[PARENTS[j]], pixels[j]
            width = max(1, round(_BONE_WIDTH * scale))
            draw.line([tuple(start), tuple(end)], fill=colour, width=width)
            cap = width / 2  # round caps: PIL's wide lines end square
            for x, y in (start, end):
                draw.ellipse([x - cap, y - cap, x + cap, y + cap], fill=colour)
        else:
            r = (_HEAD_RADIUS if j == _HEAD else _JOINT_RADIUS) * scale
            x, y = pixels[j]
            fill = colour if j == _HEAD else _darker(colour)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=_darker(colour))


def _render(joints: np.ndarray, size: tuple[int, int], frames: Sequence[int]) -> np.ndarray:
    """Frames ``frames`` of a checked motion -> (len(frames), H, W, 3) uint8."""
    width, height = size
    big = (width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    camera = _Camera(joints, *big)
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    background = tuple(int(v) for v in _BACKGROUND)
    for index, frame in enumerate(frames):
        image = Image.new("RGB", big, background)
        draw = ImageDraw.Draw(image)
        _draw_floor(draw, camera, frame)
        _draw_figure(draw, camera, frame, joints[frame])
        out[index] = np.asarray(image.reduce(_SUPERSAMPLE))
    return out


def render_frames(joints: np.ndarray, size: tuple[int, int] = (480, 480)) -> np.ndarray:
    """Draw a motion as stick-figure frames (camera and style in the module doc).

    Args:
        joints: (T, 22, 3) joint positions in metres, Y up, floor at y = 0.
        size: (width, height) of each frame in pixels, 16 .. 4096.

    Returns:
        (T, H, W, 3) uint8 RGB frames.

    Raises:
        ValueError: joints of another shape, NaN / infinite joints or a bad size.
    """
    joints = _check_joints(joints)
    return _render(joints, _check_size(size), range(len(joints)))


def write_stick_figure_mp4(
    joints: np.ndarray,
    path: str | os.PathLike[str],
    fps: float = FPS,
    metadata: Mapping[str, Any] | None = None,
    size: tuple[int, int] = (480, 480),
) -> Path:
    """Render a motion (:func:`render_frames`) and write it as an H.264 MP4
    (:func:`polydiff.core.mp4.write_mp4`: ``metadata``, a provenance record, goes into the
    container's ``comment`` tag and the sidecar ``<name>.mp4.json``), atomically.

    Args:
        joints: (T, 22, 3) metres. path: the ``.mp4`` file. fps: frames per second (> 0).
        metadata: a provenance record or ``None`` (nothing embedded, no sidecar).
        size: (width, height) pixels.
    """
    return write_mp4(render_frames(joints, size), path, fps, metadata=metadata)


def contact_sheet(
    joints_list: Sequence[np.ndarray],
    path: str | os.PathLike[str],
    frames: int = 5,
    cell: int = 192,
    captions: Sequence[str] | None = None,
) -> Path:
    """A PNG grid of a few frames of several motions (training previews), atomically.

    One row per motion, ``frames`` columns at evenly spaced times from its first frame to its
    last; each row's caption (e.g. the prompt) is written over its first cell.

    Args:
        joints_list: (T_i, 22, 3) motions in metres (lengths may differ).
        path: the ``.png`` file (parent folders are created). frames: columns, 1 .. 16.
        cell: side of each square cell in pixels, 32 .. 1024.
        captions: one text per motion, or ``None``.

    Returns:
        ``path``.

    Raises:
        ValueError: no motions, a bad motion, a caption count that does not match, or a
            bad ``frames`` / ``cell``.
    """
    if not joints_list:
        raise ValueError("no motions to draw")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 16:
        raise ValueError(f"frames must be 1 .. 16, got {frames!r}")
    if isinstance(cell, bool) or not isinstance(cell, int) or not 32 <= cell <= 1024:
        raise ValueError(f"cell must be 32 .. 1024 pixels, got {cell!r}")
    if captions is not None and len(captions) != len(joints_list):
        raise ValueError(f"got {len(captions)} captions for {len(joints_list)} motions")
    motions = [_check_joints(j) for j in joints_list]
    sheet = Image.new("RGB", (frames * cell, len(motions) * cell), (255, 255, 255))
    font = ImageFont.load_default()
    for row, motion in enumerate(motions):
        picked = np.linspace(0, len(motion) - 1, frames).round().astype(int)
        cells = _render(motion, (cell, cell), picked.tolist())
        for column, image in enumerate(cells):
            sheet.paste(Image.fromarray(image), (column * cell, row * cell))
        if captions is not None and captions[row]:
            draw = ImageDraw.Draw(sheet)
            text = str(captions[row]).replace("\n", " ")
            limit = max(8, (frames * cell - 8) // 6)  # the default font is about 6 px wide
            if len(text) > limit:
                text = text[: limit - 3] + "..."
            draw.text((4, row * cell + 3), text, fill=(20, 20, 20), font=font)
    path = Path(path)
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
