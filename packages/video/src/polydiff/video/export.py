"""Writing videos: H.264 MP4 (PyAV / FFmpeg's libx264) that decord, ffprobe and browsers open,
and animated GIF.

MP4s are ``yuv420p`` (the pixel format browsers and QuickTime play) with the ``moov`` atom at
the front (``movflags=faststart``) so a browser can start playing before the whole file
arrives. 4:2:0 needs even sides, so odd-sized frames are padded by one edge pixel.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polydiff.core.files import output_paths as core_output_paths

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
    pixels = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    frames = pixels.permute(1, 2, 3, 0).cpu().numpy()
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def write_mp4(video: Tensor | np.ndarray, path: str | Path, fps: float, crf: int = 17) -> Path:
    """Encode a video as H.264 MP4 at ``fps`` frames per second.

    Args:
        video: see :func:`to_uint8_frames`. path: output file (parent folders are created).
        fps: frames per second (> 0). crf: x264 quality (0 = lossless .. 51; 17 is visually
            lossless, which keeps the colours of small synthetic clips exact enough to learn).

    Returns:
        ``path``. The file is written next to its target and renamed into place, so a crash
        never leaves a truncated MP4 behind.
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
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".mp4", dir=path.parent, prefix=f".{path.stem}.")
    os.close(handle)
    try:
        # faststart rewrites the file to move the index to the front, so it needs a real path.
        with av.open(tmp, mode="w", format="mp4", options={"movflags": "faststart"}) as out:
            stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a video is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def encode_mp4(video: Tensor | np.ndarray, fps: float, crf: int = 17) -> bytes:
    """The bytes of :func:`write_mp4`'s file (for shards)."""
    with tempfile.TemporaryDirectory() as folder:
        return write_mp4(video, Path(folder) / "clip.mp4", fps, crf).read_bytes()


def write_gif(video: Tensor | np.ndarray, path: str | Path, fps: float) -> Path:
    """Write an endlessly looping animated GIF (frame time rounded to 10 ms, GIF's unit)."""
    from PIL import Image

    frames = to_uint8_frames(video)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    duration = max(20, round(100.0 / fps) * 10)  # browsers slow frames under 20 ms down
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False
    )
    return path


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.mp4`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, ".mp4")


def save_videos(videos: Sequence[Tensor | np.ndarray], out: str | Path, fps: float) -> list[Path]:
    """Save videos as MP4 or GIF (by the suffix of ``out``) under the ``--num`` naming rule.

    Raises:
        ValueError: no videos, or a suffix other than .mp4 / .gif.
    """
    if not videos:
        raise ValueError("no videos to save")
    paths = output_paths(out, len(videos))
    suffix = paths[0].suffix.lower()
    if suffix not in VIDEO_OUTPUT_SUFFIXES:
        raise ValueError(
            f"cannot write {suffix!r} videos; use one of {', '.join(VIDEO_OUTPUT_SUFFIXES)}"
        )
    writer = write_mp4 if suffix == ".mp4" else write_gif
    return [writer(video, path, fps) for video, path in zip(videos, paths, strict=True)]
