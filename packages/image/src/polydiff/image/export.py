"""Writing generated images to PNG files that record how they were made.

Each PNG carries its provenance record (:mod:`polydiff.core.provenance`) in two text chunks,
which ``PIL.Image.open(p).text`` (and most image viewers) show:

- ``parameters``: the record for people (:func:`polydiff.core.provenance.parameters_text`);
- ``polydiff``: the record as one line of JSON.

The same record is written beside the image as ``<name>.png.json``. Files are written beside
their target and renamed into place (:func:`polydiff.core.provenance.atomic_output`), with the
user's normal permissions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from polydiff.core.files import output_paths as core_output_paths
from polydiff.core.provenance import (
    atomic_output,
    check_output,
    parameters_text,
    record_json,
    write_sidecar,
)

__all__ = ["IMAGE_OUTPUT_SUFFIXES", "output_paths", "save_images", "write_png"]

#: What ``save_images`` writes (PNG: its text chunks carry the provenance record).
IMAGE_OUTPUT_SUFFIXES = (".png",)


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.png`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, IMAGE_OUTPUT_SUFFIXES[0])


def write_png(
    image: Image.Image, path: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write one PNG atomically; with ``metadata`` (a provenance record) it gets the
    ``parameters`` and ``polydiff`` text chunks and a ``<name>.png.json`` sidecar. -> ``path``."""
    path = Path(path)
    info = None
    if metadata is not None:
        info = PngInfo()
        info.add_text("parameters", parameters_text(metadata))  # iTXt when not Latin-1
        info.add_text("polydiff", record_json(metadata))
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    if metadata is not None:
        write_sidecar(path, metadata)
    return path


def save_images(
    images: Sequence[Image.Image],
    paths: Sequence[str | Path] | str | Path,
    metadata: Sequence[Mapping[str, Any]] | int | None = None,
) -> list[Path]:
    """Save images as PNG files, each with its provenance record.

    Args:
        images: the images, in output order.
        paths: one ``.png`` path per image (what :func:`polydiff.core.provenance.check_output`
            returns), or a single ``--out`` FILE, expanded by the naming rule of
            :func:`output_paths` to ``len(images)`` files (checked, parent folders created).
        metadata: one provenance record per image (embedded and written as sidecar), or
            ``None`` for bare PNGs without sidecars. An ``int`` is the older ``num`` argument
            of ``save_images(images, out, num)``: it must equal ``len(images)``.

    Returns:
        The written image paths, in image order.

    Raises:
        ValueError: counts that do not match, or a suffix other than ``.png``; raised
            before any file is written.
    """
    records: Sequence[Mapping[str, Any] | None]
    if isinstance(metadata, int) and not isinstance(metadata, bool):
        if len(images) != metadata:
            raise ValueError(f"got {len(images)} images to save as --num {metadata}")
        records = [None] * len(images)
    elif metadata is None:
        records = [None] * len(images)
    else:
        records = list(metadata)
        if len(records) != len(images):
            raise ValueError(f"got {len(records)} metadata records for {len(images)} images")
    if isinstance(paths, str | Path):
        targets = check_output(paths, IMAGE_OUTPUT_SUFFIXES, len(images))
    else:
        targets = [Path(p) for p in paths]
        if len(targets) != len(images):
            raise ValueError(f"got {len(targets)} paths for {len(images)} images")
        for target in targets:
            if target.suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
                raise ValueError(f"cannot write {target}: images are saved as .png")
    return [
        write_png(image, target, record)
        for image, target, record in zip(images, targets, records, strict=True)
    ]
