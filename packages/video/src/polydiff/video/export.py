"""Writing videos: H.264 MP4 (:mod:`polydiff.core.mp4`, re-exported here: ``yuv420p``,
``faststart``, the provenance record in the container's ``comment`` tag) and animated GIF.

Given a provenance record (:mod:`polydiff.core.provenance`), an MP4 carries it as one line of
JSON in the container's ``comment`` tag (``av.open(p).metadata["comment"]``), a GIF in its
comment extension (``Image.open(p).info["comment"]``), and both get the sidecar
``<name>.mp4.json`` / ``<name>.gif.json``. Every file is written beside its target and renamed
into place (:func:`polydiff.core.provenance.atomic_output`), with the user's normal
permissions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from polydiff.core.files import output_paths as core_output_paths
from polydiff.core.mp4 import encode_mp4, to_uint8_frames, write_mp4
from polydiff.core.provenance import atomic_output, output_targets, record_json, write_sidecar

__all__ = [
    "VIDEO_OUTPUT_SUFFIXES",
    "encode_mp4",
    "output_paths",
    "save_videos",
    "to_uint8_frames",
    "write_gif",
    "write_mp4",
]

VIDEO_OUTPUT_SUFFIXES = (".mp4", ".gif")


def write_gif(
    video: Tensor | np.ndarray,
    path: str | Path,
    fps: float,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an endlessly looping animated GIF (frame time rounded to 10 ms, GIF's unit),
    atomically; ``metadata`` (a provenance record) goes into the GIF comment as JSON and into
    the sidecar ``<name>.gif.json``."""
    from PIL import Image

    frames = to_uint8_frames(video)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    duration = max(20, round(100.0 / fps) * 10)  # browsers slow frames under 20 ms down
    extra = {} if metadata is None else {"comment": record_json(metadata).encode("utf-8")}
    with atomic_output(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=0,
            optimize=False,
            **extra,
        )
    if metadata is not None:
        write_sidecar(path, metadata)
    return path


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.mp4`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, VIDEO_OUTPUT_SUFFIXES[0])


def save_videos(
    videos: Sequence[Tensor | np.ndarray],
    paths: Sequence[str | Path] | str | Path,
    fps: float,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Save videos as MP4 or GIF (by each path's suffix), each with its provenance record.

    Args:
        videos: the videos, in output order (see :func:`to_uint8_frames`).
        paths: one ``.mp4`` / ``.gif`` path per video (what
            :func:`polydiff.core.provenance.check_output` returns), or a single ``--out`` FILE,
            expanded by the ``--num`` naming rule (``FILE_0.mp4`` ...) to ``len(videos)`` files.
        fps: frames per second. metadata: one provenance record per video (embedded and
            written as sidecar), or ``None`` for bare files without sidecars.

    Raises:
        ValueError: no videos, counts that do not match, or a suffix other than .mp4 / .gif;
            raised before any file is written.
    """
    if not videos:
        raise ValueError("no videos to save")
    targets = output_targets(len(videos), paths, metadata, VIDEO_OUTPUT_SUFFIXES, "videos")
    written = []
    for video, (target, record) in zip(videos, targets, strict=True):
        if target.suffix.lower() == ".mp4":
            written.append(write_mp4(video, target, fps, metadata=record))
        else:
            written.append(write_gif(video, target, fps, metadata=record))
    return written
