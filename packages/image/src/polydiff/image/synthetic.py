"""Built-in image sets that need no download: ``synthetic:digits[:COUNT]``.

``digits`` are the 1,797 real 8x8 handwritten digits bundled with scikit-learn
(``sklearn.datasets.load_digits``, grey levels 0..16), upsampled bilinearly to ``size`` and
stored as 8-bit grayscale PNGs with the caption ``"a handwritten digit 7"``.

A COUNT above 1,797 cycles through the set again; every repeat (pass 1, 2, ...) gets a small
random affine jitter (rotation within +-8 degrees, shift within +-1 pixel at 16x16, scaled with
``size``), seeded by the sample index, so repeats are new yet reproducible images of the same
digit. The first pass is always the unmodified set.
"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DIGITS_COUNT", "SYNTHETIC_SETS", "digit_caption", "digits", "real_digits"]

DIGITS_COUNT = 1797  # images in sklearn's bundled digits set
SYNTHETIC_SETS = ("digits",)
_MAX_ROTATION_DEG = 8.0
_MAX_SHIFT_AT_16 = 1.0


def digit_caption(digit: int) -> str:
    """The caption of a digit image, e.g. ``"a handwritten digit 7"``."""
    return f"a handwritten digit {digit}"


@functools.cache
def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: images (1797, 8, 8) float64 grey levels 0..16 and labels (1797,) int."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target.astype(np.int64)


def _upsample(image8: np.ndarray, size: int) -> Image.Image:
    """(8, 8) levels 0..16 -> ``size`` x ``size`` 8-bit grayscale image, bilinear."""
    pixels = np.clip(np.rint(image8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)


def _jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """A small random rotation + shift about the centre (background stays black)."""
    size = image.width
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    max_shift = _MAX_SHIFT_AT_16 * size / 16.0
    dx, dy = rng.uniform(-max_shift, max_shift), rng.uniform(-max_shift, max_shift)
    # PIL's affine transform maps output pixels to input pixels: inverse rotation about the
    # centre, then the inverse shift.
    c, s = math.cos(angle), math.sin(angle)
    cx = cy = size / 2.0
    a, b = c, s
    d, e = -s, c
    x0 = cx - a * (cx + dx) - b * (cy + dy)
    y0 = cy - d * (cx + dx) - e * (cy + dy)
    return image.transform(
        image.size, Image.Transform.AFFINE, (a, b, x0, d, e, y0), Image.Resampling.BILINEAR
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digits(count: int | None = None, size: int = 16) -> Iterator[dict[str, Any]]:
    """Shard samples of sklearn's real handwritten digits.

    Args:
        count: number of samples; ``None`` = the 1,797 real images once. Above 1,797 the set
            repeats with a seeded affine jitter (see the module docstring).
        size: output width and height in pixels (>= 8).

    Yields:
        ``{"__key__": "digits-000042", "png": bytes (size x size, 8-bit grayscale),
        "txt": "a handwritten digit 7", "json": {"label", "source": "sklearn-digits",
        "index", "size"}}``; ``index`` is the position in sklearn's set.
    """
    if count is not None and count < 0:
        raise ValueError(f"digits: count must be >= 0, got {count}")
    if size < 8:
        raise ValueError(f"digits: size must be >= 8 pixels, got {size}")
    images, labels = real_digits()
    total = DIGITS_COUNT if count is None else count
    for i in range(total):
        index = i % DIGITS_COUNT
        image = _upsample(images[index], size)
        if i >= DIGITS_COUNT:
            image = _jitter(image, random.Random(i))
        label = int(labels[index])
        yield {
            "__key__": f"digits-{i:06d}",
            "png": _png_bytes(image),
            "txt": digit_caption(label),
            "json": {"label": label, "source": "sklearn-digits", "index": index, "size": size},
        }
