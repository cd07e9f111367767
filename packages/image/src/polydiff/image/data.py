"""Images in and out of shards: a user's folder as shard samples, and shard samples as tensors.

A folder source holds PNG/JPEG files (searched recursively) and their captions (a sidecar
``.txt``, ``captions.csv`` or ``captions.jsonl``; see :mod:`polydiff.core.data.captions`).
Images keep their encoded bytes in the shard (``png`` or ``jpg`` field). An image that cannot
be decoded, or has no caption, is yielded as a ``polydiff.core.data.Skip`` so the shard
writer counts it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from polydiff.core.data.captions import captioned_source, payload_field, text_field

__all__ = ["IMAGE_SUFFIXES", "decode", "folder_source", "probe"]

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
_PAYLOAD_FIELDS = ("png", "jpg", "jpeg")
# DecompressionBombError: a small file claiming a huge image (Pillow refuses to allocate it).
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, DecompressionBombError)


def probe(payload: bytes) -> dict[str, Any]:
    """``{"width", "height", "mode"}`` of encoded image bytes, decoding every pixel so a
    truncated file fails here, not in training (ValueError naming the PIL error)."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            return {"width": image.width, "height": image.height, "mode": image.mode}
    except _UNREADABLE as e:
        raise ValueError(type(e).__name__) from e


def folder_source(path: str | Path) -> Iterator[dict[str, Any]]:
    """Shard samples of the captioned PNG/JPEG files in ``path`` (recursively, sorted by
    path; see :func:`polydiff.core.data.captioned_source`): ``{"__key__", "png" | "jpg",
    "txt", "json": {"file", "width", "height", "mode"}}``, or ``Skip(key, "unreadable image
    (<PIL error>)")`` / ``Skip(key, "no caption")``.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
    """
    return captioned_source(path, IMAGE_SUFFIXES, probe, "image")


def decode(sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One shard sample -> ``{"image": (C, H, W) float32 in [-1, 1], "caption": str}``.

    The image is converted to ``model_cfg["channels"]`` channels (1 = grayscale, 3 = RGB),
    centre-cropped to a square and resized to ``model_cfg["image_size"]`` (bicubic; identity
    when the size already matches).

    Raises:
        ValueError: no image field, or bytes that do not decode; the message names the key.
    """
    key = sample.get("__key__", "?")
    field, payload = payload_field(sample, _PAYLOAD_FIELDS, "image")
    channels, size = int(model_cfg["channels"]), int(model_cfg["image_size"])
    try:
        with Image.open(io.BytesIO(payload)) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
    except _UNREADABLE as e:
        raise ValueError(f"sample {key!r}: corrupt {field} image ({e})") from e
    side = min(image.size)
    if image.width != image.height:
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy())
    return {"image": tensor, "caption": text_field(sample.get("txt", ""))}
