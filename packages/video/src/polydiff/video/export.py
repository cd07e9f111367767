"""Writing videos: H.264 MP4 (PyAV / FFmpeg's libx264) that decord, ffprobe and browsers open,
and animated GIF.

MP4s are ``yuv420p`` (the pixel format browsers and QuickTime play) with the ``moov`` atom at
the front (``movflags=faststart``) so a browser can start playing before the whole file
arrives. 4:2:0 needs even sides, so odd-sized frames are padded by one edge pixel.

Given a provenance record (:mod:`polydiff.core.provenance`), an MP4 carries it as one line of
JSON in the container's ``comment`` tag (``av.open(p).metadata["comment"]``; ffprobe shows it
under ``format.tags.comment``), a GIF in its comment extension (``Image.open(p).info
["comment"]``), and both get the sidecar ``<name>.mp4.json`` / ``<name>.gif.json``. Every file
is written beside its target and renamed into place
(:func:`polydiff.core.provenance.atomic_output`), with the user's normal permissions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from polydiff.core.files import output_paths as core_output_paths
from polydiff.core.pixels import to_uint8
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


def to_uint8_frames(video: Tensor | np.ndarray) -> np.ndarray:
    """A video -> (T, H, W, 3) uint8 RGB frames.

    Accepts a (C, T, H, W) float tensor in [-1, 1] (what the models produce; C = 1 or 3) or a
    (T, H, W, 3) uint8 array (returned as is, made contiguous).
    """
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {video.dtype} {video.shape}")
        return np.ascontiguousarray(video)
    if video.ndim != 4 or video.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, T, H, W) video with C = 1 or 3, got {tuple(video.shape)}")
    frames = to_uint8(video).permute(1, 2, 3, 0).numpy()
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def write_mp4(
    video: Tensor | np.ndarray,
    path: str | Path,
    fps: float,
    crf: int = 17,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Encode a video as H.264 MP4 at ``fps`` frames per second.

    Args:
        video: see :func:`to_uint8_frames`. path: output file (parent folders are created).
        fps: frames per second (> 0). crf: x264 quality (0 = lossless .. 51; 17 is visually
            lossless, which keeps the colours of small synthetic clips exact enough to learn).
        metadata: a provenance record: stored as JSON in the ``comment`` tag and written as
            the sidecar ``<name>.mp4.json``; ``None`` (shards, previews) stores nothing.

    Returns:
        ``path``. The file is written next to its target and renamed into place, so a crash
        never leaves a truncated MP4 behind; it is as readable as any file the user writes.
    """
    from fractions import Fraction

    import av

    frames = to_uint8_frames(video)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sides
        pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
        frames = np.pad(frames, pad, mode="edge")
    path = Path(path)
    # faststart rewrites the file to move the index to the front, so it needs a real path.
    with (
        atomic_output(path) as tmp,
        av.open(str(tmp), mode="w", format="mp4", options={"movflags": "faststart"}) as out,
    ):
        if metadata is not None:
            out.metadata["comment"] = record_json(metadata)
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    if metadata is not None:
        write_sidecar(path, metadata)
    return path


def encode_mp4(video: Tensor | np.ndarray, fps: float, crf: int = 17) -> bytes:
    """The bytes of :func:`write_mp4`'s file (for shards)."""
    with tempfile.TemporaryDirectory() as folder:
        return write_mp4(video, Path(folder) / "clip.mp4", fps, crf).read_bytes()


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
