"""Built-in video set that needs no download: ``synthetic:moving-shapes[:COUNT]``.

Each clip is one shape on a black background, written as a real H.264 MP4 with PyAV:

- shapes ``circle square triangle``; colours ``red green blue yellow white``;
- motions ``moving left/right/up/down`` (1.0-1.4 pixels per frame at 32x32, scaled with the
  size, so the shape crosses about half the frame in 16 frames), ``growing`` and
  ``shrinking`` (radius x2.5 / x0.4 over the clip) and ``static``.

Captions read ``"a red circle moving left"``. Start position, speed and size are drawn from a
generator seeded by the clip index, so a set's frames are reproducible (libx264 may encode
them a few levels differently from run to run); shapes are drawn 4x supersampled
and box-filtered, so sub-pixel motion is smooth rather than jumping a pixel at a time.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .export import encode_mp4

__all__ = [
    "COLOURS",
    "MOTIONS",
    "SHAPES",
    "SYNTHETIC_SETS",
    "caption",
    "moving_shapes",
    "parse_caption",
    "render_clip",
]

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 60, 240),
    "yellow": (235, 220, 30),
    "white": (240, 240, 240),
}
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "static",
)
SYNTHETIC_SETS = ("moving-shapes",)
DEFAULT_COUNT = 2100  # 20 clips of each of the 105 (shape, colour, motion) combinations
_SUPERSAMPLE = 4
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def caption(shape: str, colour: str, motion: str) -> str:
    """``"a red circle moving left"``."""
    return f"a {colour} {shape} {motion}"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(shape, colour, motion) of a moving-shapes caption, or None if it is not one."""
    words = text.strip().lower().split()
    if len(words) < 4 or words[0] != "a":
        return None
    colour, shape, motion = words[1], words[2], " ".join(words[3:])
    if colour not in COLOURS or shape not in SHAPES or motion not in MOTIONS:
        return None
    return shape, colour, motion


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = r * 0.85  # about the circle's area
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # an upward triangle with its centroid at (cx, cy)
        draw.polygon(
            [(cx, cy - r), (cx - r * 0.95, cy + r * 0.7), (cx + r * 0.95, cy + r * 0.7)],
            fill=fill,
        )


def render_clip(
    shape: str,
    colour: str,
    motion: str,
    *,
    frames: int = 16,
    size: int = 32,
    rng: random.Random | None = None,
) -> np.ndarray:
    """Render one clip: (frames, size, size, 3) uint8 RGB.

    Raises:
        ValueError: an unknown shape, colour or motion (naming the valid ones), or a clip
            smaller than 16x16 / shorter than 2 frames.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; valid: {', '.join(COLOURS)}")
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; valid: {', '.join(MOTIONS)}")
    if size < 16 or frames < 2:
        raise ValueError(f"clips need size >= 16 and frames >= 2, got {size}, {frames}")
    rng = rng or random.Random(0)
    unit = size / 32.0  # distances below are for 32x32 frames
    radius = rng.uniform(4.5, 6.0) * unit
    radii = [radius] * frames
    dx = dy = 0.0
    if motion in ("growing", "shrinking"):
        small, large = rng.uniform(2.5, 3.2) * unit, rng.uniform(8.0, 9.5) * unit
        ends = (small, large) if motion == "growing" else (large, small)
        radii = [ends[0] + (ends[1] - ends[0]) * i / (frames - 1) for i in range(frames)]
    elif motion.startswith("moving"):
        ux, uy = _DIRECTIONS[motion.split()[1]]
        speed = rng.uniform(1.0, 1.4) * unit * 16 / frames  # same travel for any length
        dx, dy = ux * speed, uy * speed
    margin = max(radii) + 1.0 * unit
    travel_x, travel_y = dx * (frames - 1), dy * (frames - 1)
    # Start so the whole path stays inside the frame.
    cx = rng.uniform(margin - min(0.0, travel_x), size - margin - max(0.0, travel_x))
    cy = rng.uniform(margin - min(0.0, travel_y), size - margin - max(0.0, travel_y))
    big = size * _SUPERSAMPLE
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        canvas = Image.new("RGB", (big, big))
        _draw(
            ImageDraw.Draw(canvas),
            shape,
            (cx + dx * i) * _SUPERSAMPLE,
            (cy + dy * i) * _SUPERSAMPLE,
            radii[i] * _SUPERSAMPLE,
            COLOURS[colour],
        )
        out[i] = np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
    return out


def moving_shapes(
    count: int | None = None,
    *,
    frames: int = 16,
    size: int = 32,
    fps: int = 8,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Shard samples of the moving-shapes set.

    The combinations (shape, colour, motion) are visited in a fixed shuffled cycle, so any
    ``count`` >= 105 covers all of them about equally.

    Yields:
        ``{"__key__": "clip_000042", "mp4": H.264 bytes, "txt": caption, "json": {"fps",
        "frames", "width", "height", "shape", "colour", "motion"}}``.
    """
    count = DEFAULT_COUNT if count is None else count
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    combos = list(itertools.product(SHAPES, COLOURS, MOTIONS))
    random.Random(seed).shuffle(combos)
    for index in range(count):
        shape, colour, motion = combos[index % len(combos)]
        rng = random.Random(f"{seed}/{index}")
        clip = render_clip(shape, colour, motion, frames=frames, size=size, rng=rng)
        yield {
            "__key__": f"clip_{index:06d}",
            "mp4": encode_mp4(clip, fps),
            "txt": caption(shape, colour, motion),
            "json": {
                "fps": fps,
                "frames": frames,
                "width": size,
                "height": size,
                "shape": shape,
                "colour": colour,
                "motion": motion,
            },
        }
