"""Videos in and out of shards: a user's folder as shard samples; shard samples as clips.

Shards keep the *encoded* video (``mp4`` / ``webm`` / ``avi`` / ``mov`` field), the caption
(``txt``) and metadata (``json``: ``fps``, ``frames``, ``width``, ``height``). ``frames`` is
the real frame count, counted from the demuxed packets when the shard is written, not the
container's claim: decord believes an over-reporting container and can hang in ``get_batch``
past the real end (decord #373), so decoding never asks for a frame at or past this count.

Decoding runs in the loader workers: decord reads straight from the bytes; PyAV decodes what
decord cannot (or when decord is not installed) and is always closed explicitly (Open-Sora
leaked memory until it did). A clip is ``frames`` frames sampled at the target ``fps`` from
a random start, resized to cover the bucket's height x width and centre-cropped.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polydiff.core.data.captions import (
    captioned_source,
    metadata_field,
    payload_field,
    text_field,
)

__all__ = [
    "DECODERS",
    "VIDEO_FIELDS",
    "VIDEO_SUFFIXES",
    "choose_bucket",
    "clip_indices",
    "count_frames",
    "decode",
    "folder_source",
    "probe",
    "read_frames",
    "resize_crop",
]

VIDEO_SUFFIXES = {".mp4": "mp4", ".webm": "webm", ".avi": "avi", ".mov": "mov", ".mkv": "mkv"}
VIDEO_FIELDS = tuple(dict.fromkeys(VIDEO_SUFFIXES.values()))
DECODERS = ("auto", "decord", "pyav")


def _meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's metadata, probed from its bytes when a shard written elsewhere lacks it."""
    meta = metadata_field(sample)
    if "frames" not in meta or "fps" not in meta:
        meta = {**probe(_payload(sample)), **meta}
    return meta


def _payload(sample: Mapping[str, Any]) -> bytes:
    return payload_field(sample, VIDEO_FIELDS, "video")[1]


# --------------------------------------------------------------------------- probing


def count_frames(payload: bytes) -> int:
    """The real number of frames of the first video stream, counted from its demuxed
    packets (no decoding; the container's own frame count is not trusted).

    Raises:
        ValueError: no video stream, or the bytes are not a readable container.
    """
    import av

    try:
        with av.open(io.BytesIO(payload)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as e:
        raise ValueError(f"not a readable container ({e})") from e


def probe(payload: bytes) -> dict[str, Any]:
    """Metadata of an encoded video: ``{"fps", "frames", "width", "height", "codec"}``.

    ``frames`` is the real count (:func:`count_frames`); the first frame is decoded, so a
    container whose video cannot be decoded at all fails here.

    Raises:
        ValueError: unreadable bytes, no video stream, no decodable frame or no frame rate.
    """
    import av

    frames = count_frames(payload)
    try:
        with av.open(io.BytesIO(payload)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            first = next(container.decode(stream), None)
            codec = stream.codec_context.name
    except av.FFmpegError as e:
        raise ValueError(f"not a readable container ({e})") from e
    if first is None or frames == 0:
        raise ValueError("no decodable video frame")
    if not rate or float(rate) <= 0:
        raise ValueError("the video has no frame rate")
    return {
        "fps": float(rate),
        "frames": frames,
        "width": first.width,
        "height": first.height,
        "codec": codec,
    }


def folder_source(path: str | Path) -> Iterator[dict[str, Any]]:
    """Shard samples of the captioned videos in ``path`` (recursively, sorted by path):
    MP4, WebM, AVI, MOV and MKV files with a sidecar ``.txt`` or a ``captions.csv`` /
    ``captions.jsonl`` entry (see :func:`polydiff.core.data.captioned_source`).

    Yields:
        ``{"__key__", "<suffix>": encoded bytes, "txt": caption, "json": {"file", "fps",
        "frames", "width", "height", "codec"}}`` per readable video, and
        ``Skip(key, reason)`` for one that cannot be read ("unreadable video (...)") or has no
        caption ("no caption").

    Raises:
        FileNotFoundError: ``path`` is not a folder.
    """
    return captioned_source(path, VIDEO_SUFFIXES, probe, "video")


# --------------------------------------------------------------------------- clips


def clip_indices(
    available: int, source_fps: float, frames: int, fps: float, rng: random.Random | None
) -> list[int]:
    """Frame indices of a ``frames``-frame clip at ``fps`` from a video of ``available``
    frames at ``source_fps``; a random start when ``rng`` is given, else the first frames.

    Raises:
        ValueError: the video is too short for the clip (names both durations).
    """
    stride = source_fps / fps
    span = (frames - 1) * stride
    if available < 1 or span > available - 1 + 1e-6:
        raise ValueError(
            f"video too short: {frames} frames at {fps:g} fps need {math.floor(span) + 1} "
            f"source frames at {source_fps:g} fps, it has {available}"
        )
    start = rng.uniform(0.0, available - 1 - span) if rng is not None else 0.0
    return [min(available - 1, round(start + i * stride)) for i in range(frames)]


def choose_bucket(
    meta: Mapping[str, Any], buckets: Sequence[Sequence[int]], fps: float
) -> tuple[int, int, int]:
    """The (frames, height, width) bucket a video goes to: among the buckets it is long
    enough for (at ``fps``), the one whose aspect ratio is closest to the video's; ties go
    to the longest clip, then the largest frame.

    Raises:
        ValueError: metadata without fps/frames/width/height, or no bucket the video is long
            enough for.
    """
    try:
        source_fps, available = float(meta["fps"]), int(meta["frames"])
        aspect = float(meta["width"]) / float(meta["height"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"video metadata lacks fps/frames/width/height: {dict(meta)}") from e
    fitting = [tuple(b) for b in buckets if (b[0] - 1) * source_fps / fps <= available - 1 + 1e-6]
    if not fitting:
        shortest = min(b[0] for b in buckets)
        raise ValueError(
            f"video too short: {available} frames at {source_fps:g} fps; the shortest bucket "
            f"needs {shortest} frames at {fps:g} fps"
        )
    return min(fitting, key=lambda b: (abs(math.log(aspect * b[1] / b[2])), -b[0], -b[1] * b[2]))  # type: ignore[return-value]


def _decord_frames(payload: bytes, indices: list[int], real_count: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(io.BytesIO(payload), ctx=decord.cpu(0), num_threads=1)
    # The guard: never ask decord for a frame past the real count, even if it claims more.
    if max(indices) >= min(len(reader), real_count):
        raise ValueError(
            f"decord sees {len(reader)} frames, the stream has {real_count}; "
            f"frame {max(indices)} is not there"
        )
    return reader.get_batch(indices).asnumpy()


def _pyav_frames(payload: bytes, indices: list[int]) -> np.ndarray:
    import av

    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        wanted.setdefault(index, []).append(position)
    out: list[np.ndarray | None] = [None] * len(indices)
    last = max(indices)
    container = av.open(io.BytesIO(payload))
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for number, frame in enumerate(container.decode(stream)):
            if number in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                for position in wanted[number]:
                    out[position] = rgb
            if number >= last:
                break
    finally:
        container.close()  # explicit: PyAV containers hold native buffers until closed
    missing = [indices[i] for i, frame in enumerate(out) if frame is None]
    if missing:
        raise ValueError(f"the video ended before frame {missing[0]}")
    return np.stack(out)  # type: ignore[arg-type]


def read_frames(
    payload: bytes, indices: Sequence[int], *, real_count: int | None = None, decoder: str = "auto"
) -> np.ndarray:
    """Decode the frames ``indices`` of an encoded video -> (len(indices), H, W, 3) uint8 RGB.

    Args:
        payload: the encoded video. indices: frame numbers (any order, repeats allowed).
        real_count: the stream's real frame count (from the shard's metadata); counted from
            the packets when None.
        decoder: ``auto`` (decord, then PyAV for what decord cannot read), ``decord`` or
            ``pyav``.

    Raises:
        ValueError: an unknown decoder, or a video that neither decoder can read (naming the
            reasons).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"frame indices must be non-empty and >= 0, got {indices[:8]}")
    if real_count is None:
        real_count = count_frames(payload)
    if max(indices) >= real_count:
        raise ValueError(f"frame {max(indices)} asked of a video with {real_count} frames")
    errors = []
    if decoder in ("auto", "decord"):
        try:
            return _decord_frames(payload, indices, real_count)
        except ImportError as e:
            if decoder == "decord":
                raise ValueError("decoder 'decord' is not installed") from e
            errors.append("decord: not installed")
        except Exception as e:  # decord raises its own DECORDError (a RuntimeError) types
            if decoder == "decord":
                raise ValueError(f"decord cannot read the video: {e}") from e
            errors.append(f"decord: {e}")
    try:
        return _pyav_frames(payload, indices)
    except Exception as e:
        errors.append(f"pyav: {e}")
    raise ValueError("unreadable video (" + "; ".join(errors) + ")")


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, height, width) float32 in [-1, 1]: scale to cover the
    target (antialiased bilinear), then centre-crop; identity when the size already fits."""
    video = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2)
    video = video.float()
    h, w = video.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        video = video[:, :, top : top + height, left : left + width].clamp(0, 255)
    return (video / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def model_buckets(model_cfg: Mapping[str, Any]) -> list[list[int]]:
    """The configured buckets, or the one (frames, height, width) of the model config."""
    return model_cfg.get("buckets") or [
        [model_cfg["frames"], model_cfg["height"], model_cfg["width"]]
    ]


def decode(sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One shard sample -> ``{"video": (C, T, H, W) float32 in [-1, 1], "caption": str}``.

    (T, H, W) is the sample's bucket (:func:`choose_bucket`); C is ``model_cfg["channels"]``
    (1 = grey, 3 = RGB). The clip start is random (Python's ``random``, which the stream
    seeds per batch, so a resumed run reads the same clips).

    Raises:
        ValueError: no video field, missing metadata, too short, or undecodable; the message
            names the key.
    """
    key = sample.get("__key__", "?")
    try:
        payload = _payload(sample)
        meta = _meta(sample)  # probed when a shard written by another tool lacks it
        frames, height, width = choose_bucket(meta, model_buckets(model_cfg), model_cfg["fps"])
        indices = clip_indices(
            int(meta["frames"]), float(meta["fps"]), frames, float(model_cfg["fps"]), random
        )
        pixels = read_frames(
            payload, indices, real_count=int(meta["frames"]), decoder=model_cfg["decoder"]
        )
    except ValueError as e:
        raise ValueError(f"sample {key!r}: {e}") from e
    video = resize_crop(pixels, height, width)
    if int(model_cfg["channels"]) == 1:
        video = (video * torch.tensor([0.299, 0.587, 0.114])[:, None, None, None]).sum(0)[None]
    return {"video": video, "caption": text_field(sample.get("txt", ""))}


def bucket(sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """The sample's (frames, height, width) bucket from its metadata (nothing decoded)."""
    return choose_bucket(_meta(sample), model_buckets(model_cfg), model_cfg["fps"])
