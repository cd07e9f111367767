"""Writing generated images to files, with the CLI's naming rule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

__all__ = ["output_paths", "save_images"]


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes: ``FILE`` when N == 1, else ``FILE_0`` ..
    ``FILE_{N-1}`` (suffix kept; ``.png`` added when ``out`` has none)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    out = Path(out)
    if not out.suffix:
        out = out.with_suffix(".png")
    if num == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num)]


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
