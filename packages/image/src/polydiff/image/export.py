"""Writing generated images to files, with the CLI's naming rule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from polydiff.core.files import output_paths as core_output_paths

__all__ = ["output_paths", "save_images"]


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.png`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, ".png")


def save_images(images: Sequence[Image.Image], out: str | Path, num: int) -> list[Path]:
    """Save ``num`` images under the naming rule of :func:`output_paths`; create parent folders.

    Returns:
        The written paths, in image order.

    Raises:
        ValueError: ``len(images) != num``, or an output suffix PIL cannot write.
    """
    if len(images) != num:
        raise ValueError(f"got {len(images)} images to save as --num {num}")
    paths = output_paths(out, num)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths
