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

__all__ = ["IMAGE_SUFFIXES", "collate", "decode", "folder_source"]

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
_PAYLOAD_FIELDS = ("png", "jpg", "jpeg")


def _skip(key: str, reason: str) -> Any:
    # Imported at call time: polydiff.core.data is the shared shard layer, and this module
    # must import without it (e.g. to decode samples in a loader worker).
    from polydiff.core.data import Skip

    return Skip(key, reason)


def folder_source(path: str | Path) -> Iterator[dict[str, Any]]:
    """Shard samples of the captioned images in ``path`` (recursively, sorted by path).

    Yields:
        ``{"__key__": "sub/cat", "png" | "jpg": encoded bytes, "txt": caption, "json":
        {"file", "width", "height", "mode"}}`` per readable image, and
        ``Skip(key, reason)`` for an image that cannot be decoded ("unreadable image") or has
        no caption ("no caption").

    Raises:
        FileNotFoundError: ``path`` is not a folder.
    """
    from polydiff.core.data import captioned_files

    if not Path(path).is_dir():
        raise FileNotFoundError(f"image source folder not found: {path}")
    for entry in captioned_files(path, IMAGE_SUFFIXES):
        key, relative = entry.key, entry.relative
        payload = entry.path.read_bytes()
        try:
            with Image.open(io.BytesIO(payload)) as image:
                image.load()  # decode every pixel: truncated files fail here, not in training
                width, height, mode = image.width, image.height, image.mode
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            yield _skip(key, f"unreadable image ({type(e).__name__})")
            continue
        caption = entry.caption
        if not caption:
            yield _skip(key, "no caption")
            continue
        yield {
            "__key__": key,
            IMAGE_SUFFIXES[entry.path.suffix.lower()]: payload,
            "txt": caption,
            "json": {"file": relative.as_posix(), "width": width, "height": height, "mode": mode},
        }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


def decode(sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One shard sample -> ``{"image": (C, H, W) float32 in [-1, 1], "caption": str}``.

    The image is converted to ``model_cfg["channels"]`` channels (1 = grayscale, 3 = RGB),
    centre-cropped to a square and resized to ``model_cfg["image_size"]`` (bicubic; identity
    when the size already matches).

    Raises:
        ValueError: no image field, or bytes that do not decode; the message names the key.
    """
    key = sample.get("__key__", "?")
    field = next((f for f in _PAYLOAD_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"sample {key!r} has no image field (expected one of {_PAYLOAD_FIELDS})")
    channels, size = int(model_cfg["channels"]), int(model_cfg["image_size"])
    try:
        with Image.open(io.BytesIO(sample[field])) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"sample {key!r}: corrupt {field} image ({e})") from e
    side = min(image.size)
    if image.width != image.height:
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy())
    return {"image": tensor, "caption": _text(sample.get("txt", ""))}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> ``{"image": (B, C, H, W) float32, "caption": list[str]}``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
    }
