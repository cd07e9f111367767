"""Images in and out of shards: a user's folder as shard samples, and shard samples as tensors.

A folder source holds PNG/JPEG files (searched recursively) and their captions, given by any
of (first match wins):

1. a sidecar text file next to the image: ``cat.png`` + ``cat.txt``;
2. ``captions.csv`` in the folder, with a header row and the columns ``file,caption``;
3. ``captions.jsonl`` in the folder, one ``{"file": ..., "caption": ...}`` object per line.

``file`` is the image path relative to the folder. Images keep their encoded bytes in the
shard (``png`` or ``jpg`` field). An image that cannot be decoded, or has no caption, is
yielded as a ``polydiff.core.data.Skip`` so the shard writer counts it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "collate", "decode", "folder_source", "read_captions"]

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
_PAYLOAD_FIELDS = ("png", "jpg", "jpeg")


def _skip(key: str, reason: str) -> Any:
    # Imported at call time: polydiff.core.data is the shared shard layer, and this module
    # must import without it (e.g. to decode samples in a loader worker).
    from polydiff.core.data import Skip

    return Skip(key, reason)


def read_captions(folder: Path) -> dict[str, str]:
    """Captions from ``captions.csv`` and ``captions.jsonl`` in ``folder``: {relative file: text}.

    Raises:
        ValueError: a captions file without the required columns/fields, naming the file and
            the line.
    """
    captions: dict[str, str] = {}
    jsonl = folder / "captions.jsonl"
    if jsonl.is_file():
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{jsonl}:{number}: expected {{"file": ..., "caption": ...}}, got {line!r}'
                ) from e
    table = folder / "captions.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"file", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{table}: needs a header row with columns file,caption")
            for row in reader:
                captions[row["file"]] = row["caption"]  # csv wins over jsonl
    return captions


def _key(relative: Path) -> str:
    # WebDataset splits a member name at its first dot into key and field, so the key must
    # not contain one; slashes (sub-folders) are fine.
    return relative.with_suffix("").as_posix().replace(".", "_")


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
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"image source folder not found: {folder}")
    captions = read_captions(folder)
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    for file in files:
        relative = file.relative_to(folder)
        key = _key(relative)
        payload = file.read_bytes()
        try:
            with Image.open(io.BytesIO(payload)) as image:
                image.load()  # decode every pixel: truncated files fail here, not in training
                width, height, mode = image.width, image.height, image.mode
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            yield _skip(key, f"unreadable image ({type(e).__name__})")
            continue
        sidecar = file.with_suffix(".txt")
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        else:
            caption = captions.get(relative.as_posix(), "").strip()
        if not caption:
            yield _skip(key, "no caption")
            continue
        yield {
            "__key__": key,
            IMAGE_SUFFIXES[file.suffix.lower()]: payload,
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
