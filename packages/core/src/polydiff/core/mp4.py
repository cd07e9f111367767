"""Writing H.264 MP4 (PyAV / FFmpeg's libx264) that decord, ffprobe and browsers open: the
one MP4 writer every modality that makes moving pictures uses (videos, motion stick figures).

MP4s are ``yuv420p`` (the pixel format browsers and QuickTime play) with the ``moov`` atom at
the front (``movflags=faststart``) so a browser can start playing before the whole file
arrives. 4:2:0 needs even sides, so odd-sized frames are padded by one edge pixel.

Given a provenance record (:mod:`polydiff.core.provenance`), an MP4 carries it as one line of
JSON in the container's ``comment`` tag (``av.open(p).metadata["comment"]``; ffprobe shows it
under ``format.tags.comment``) and gets the sidecar ``<name>.mp4.json``. The file is written
beside its target and renamed into place (:func:`polydiff.core.provenance.atomic_output`),
with the user's normal permissions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from polydiff.core.pixels import to_uint8
from polydiff.core.provenance import atomic_output, record_json, write_sidecar

__all__ = ["encode_mp4", "to_uint8_frames", "write_mp4"]


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
