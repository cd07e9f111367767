"""Sounds in and out of shards: a user's folder as shard samples; shard samples as log-mels.

Shards keep the sound as 16-bit FLAC (``flac`` field: lossless, about half of WAV's size),
the caption (``txt``) and metadata (``json``: ``sample_rate``, ``channels``, ``frames`` (the
sample count per channel), ``duration`` in seconds, ``file``). WAV, OGG and MP3 inputs are
decoded and re-encoded as FLAC when the shard is written; FLAC inputs of 16 bits or less are
kept byte for byte. The sample rate and the channels are kept as they are: decoding mixes to
mono and resamples to the mel settings' rate, so one shard set serves any mel settings.

``frames`` is counted by decoding the whole file, not read from its header (MP3 and
truncated WAV headers misstate it). A file is skipped, and counted by reason, when it cannot
be decoded (``"unreadable audio (<why>)"``), has NaN or infinite samples (``"non-finite
samples"``), is shorter than ``min_seconds`` (``"too short (0.05 s < 0.10 s)"``) or is silent
(peak below :data:`SILENCE_PEAK`: ``"silent audio"``).

Decoding (in the loader workers) crops a random segment of a fixed number of mel frames or
zero-pads a shorter sound to it, and returns the log-mel with a ``valid`` mask of the frames
made from real audio.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from polydiff.core.data.captions import captioned_source, payload_field, text_field
from polydiff.core.data.shards import Skip

from .export import encode_flac
from .mel import MelSettings

__all__ = [
    "AUDIO_FIELDS",
    "AUDIO_SUFFIXES",
    "MIN_SECONDS",
    "SILENCE_PEAK",
    "decode",
    "folder_source",
    "load_wave",
    "probe",
    "read_audio",
    "to_flac",
]

AUDIO_SUFFIXES = {".wav": "wav", ".flac": "flac", ".ogg": "ogg", ".mp3": "mp3"}
#: Shard fields that hold encoded sound, in the order a sample's payload is looked up.
AUDIO_FIELDS = ("flac", "wav", "ogg", "mp3")
#: Sounds shorter than this (seconds) are skipped: under ~6 mel frames there is nothing to learn.
MIN_SECONDS = 0.1
#: A sound whose peak stays below this (-80 dBFS) is silence.
SILENCE_PEAK = 1e-4
# FLAC inputs at these bit depths are kept byte for byte; deeper ones become 16-bit.
_KEPT_FLAC_SUBTYPES = {"PCM_S8", "PCM_16"}
# The skip reasons that say what is wrong with readable audio (not "unreadable audio (...)").
_CONTENT_REASONS = ("silent audio", "non-finite samples", "too short (")


# --------------------------------------------------------------------------- reading


def _decode_bytes(payload: bytes) -> tuple[np.ndarray, int]:
    """Encoded bytes -> ((C, S) float32, sample rate); ValueError with libsndfile's reason."""
    try:
        samples, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        # libsndfile's message names the BytesIO object; keep only its reason.
        reason = str(e).split(": ", 1)[-1] if "BytesIO" in str(e) else str(e)
        raise ValueError(reason.strip() or type(e).__name__) from e
    return np.ascontiguousarray(samples.T), int(rate)


def read_audio(source: str | os.PathLike[str] | bytes) -> tuple[np.ndarray, int]:
    """Decode a sound file (WAV, FLAC, OGG, MP3 or anything libsndfile reads) or its bytes.

    Returns:
        ((channels, S) float32 samples, nominally in [-1, 1]; sample rate in Hz).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: the file or bytes cannot be decoded (one line naming it and why).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        try:
            return _decode_bytes(bytes(source))
        except ValueError as e:
            raise ValueError(f"unreadable audio ({e})") from e
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        return _decode_bytes(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"cannot read audio {path}: {e}") from e


def load_wave(path: str | os.PathLike[str], mel: MelSettings) -> Tensor:
    """A sound file as an (S,) float32 mono wave at ``mel.sample_rate`` (for ``--init FILE``):
    channels averaged, resampled.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, empty or non-finite audio.
    """
    samples, rate = read_audio(path)
    if samples.shape[1] == 0:
        raise ValueError(f"audio file {path} has no samples")
    if not np.isfinite(samples).all():
        raise ValueError(f"audio file {path} has NaN or infinite samples")
    return mel.resample(torch.from_numpy(samples.mean(axis=0)), rate).contiguous()


def probe(payload: bytes, min_seconds: float = MIN_SECONDS) -> dict[str, Any]:
    """Metadata of an encoded sound, from decoding all of it:
    ``{"sample_rate", "channels", "frames", "duration"}`` (``frames``: samples per channel).

    Raises:
        ValueError: the message is the skip reason: ``"<libsndfile's reason>"`` for bytes it
            cannot decode, ``"non-finite samples"``, ``"too short (0.05 s < 0.10 s)"`` below
            ``min_seconds``, ``"silent audio"`` for a peak below :data:`SILENCE_PEAK`.
    """
    samples, rate = _decode_bytes(payload)
    frames = samples.shape[1]
    duration = frames / rate
    if not np.isfinite(samples).all():
        raise ValueError("non-finite samples")
    if duration < min_seconds:
        raise ValueError(f"too short ({duration:.2f} s < {min_seconds:.2f} s)")
    if frames == 0 or float(np.abs(samples).max()) < SILENCE_PEAK:
        raise ValueError("silent audio")
    return {
        "sample_rate": rate,
        "channels": int(samples.shape[0]),
        "frames": int(frames),
        "duration": duration,
    }


# --------------------------------------------------------------------------- folders


def to_flac(payload: bytes, field: str) -> bytes:
    """The shard's FLAC bytes of an input file: a FLAC of 16 bits or less as it is, anything
    else decoded and re-encoded as 16-bit FLAC (rate and channels kept; float input louder
    than full scale is scaled down to it rather than clipped).

    Raises:
        ValueError: undecodable bytes, or more channels than FLAC holds (8).
    """
    if field == "flac":
        try:
            subtype = sf.info(io.BytesIO(payload)).subtype
        except (sf.LibsndfileError, RuntimeError, TypeError):
            subtype = None
        if subtype in _KEPT_FLAC_SUBTYPES:
            return payload
    samples, rate = _decode_bytes(payload)
    if samples.shape[0] > 8:
        raise ValueError(f"{samples.shape[0]} channels; FLAC holds at most 8")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > 1.0:  # float WAVs may exceed full scale; keep the waveform's shape
        samples = samples / peak
    return encode_flac(samples, rate)


def _as_flac_sample(item: dict[str, Any] | Skip) -> dict[str, Any] | Skip:
    """A folder sample with its payload moved to the ``flac`` field; skip reasons of readable
    but unusable audio without the ``unreadable audio (...)`` wrapper."""
    if isinstance(item, Skip):
        prefix = "unreadable audio ("
        inner = item.reason[len(prefix) : -1] if item.reason.startswith(prefix) else ""
        if inner.startswith(_CONTENT_REASONS):
            return Skip(item.key, inner)
        return item
    field = next(f for f in AUDIO_SUFFIXES.values() if f in item)
    try:
        flac = to_flac(item.pop(field), field)
    except ValueError as e:
        return Skip(item["__key__"], f"unreadable audio ({e})")
    return {**item, "flac": flac}


def folder_source(
    folder: str | Path,
    require_caption: bool = True,
    *,
    min_seconds: float = MIN_SECONDS,
) -> Iterator[dict[str, Any] | Skip]:
    """Shard samples of the sounds in ``folder`` (recursively, sorted by path): WAV, FLAC, OGG
    and MP3 files with a sidecar ``.txt`` or a ``captions.csv`` / ``captions.jsonl`` entry
    (see :func:`polydiff.core.data.captioned_source`).

    Args:
        require_caption: skip sounds without a caption (``"no caption"``); when False they
            are yielded with the caption ``""`` (for training on CLAP audio embeddings).
        min_seconds: shorter sounds are skipped.

    Yields:
        ``{"__key__", "flac": 16-bit FLAC bytes, "txt": caption, "json": {"file",
        "sample_rate", "channels", "frames", "duration"}}`` per usable sound, and
        ``Skip(key, reason)`` for the others (reasons in the module doc).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    samples = captioned_source(
        folder,
        AUDIO_SUFFIXES,
        partial(probe, min_seconds=min_seconds),
        "audio",
        require_caption=require_caption,
    )
    return (_as_flac_sample(item) for item in samples)


# --------------------------------------------------------------------------- segments


def crop_or_pad(wave: Tensor, num_samples: int, rng: random.Random | None) -> tuple[Tensor, int]:
    """(S,) -> ((num_samples,), real samples in it): a random window of a longer wave (the
    start when ``rng`` is None), a shorter one zero-padded at the end."""
    length = wave.shape[-1]
    if length >= num_samples:
        start = rng.randint(0, length - num_samples) if rng is not None else 0
        return wave[start : start + num_samples], num_samples
    return torch.nn.functional.pad(wave, (0, num_samples - length)), length


def valid_frames(real_samples: int, num_samples: int, segment_frames: int, hop: int) -> Tensor:
    """(segment_frames,) float32: 1 for frames made from real audio, 0 for padding.

    A segment filled with real audio is valid throughout (its last frame is centred on the
    segment's end and reflect-padded from real samples). A zero-padded one is valid for the
    frames centred on a real sample: frame ``i`` when ``i * hop < real_samples``.
    """
    if real_samples >= num_samples:
        return torch.ones(segment_frames)
    return (torch.arange(segment_frames) * hop < real_samples).float()


def decode(
    sample: Mapping[str, Any],
    mel: MelSettings,
    segment_frames: int,
    rng: random.Random | None,
    *,
    with_wave: bool = False,
) -> dict[str, Any]:
    """One shard sample -> a fixed-size log-mel segment.

    The sound (any of :data:`AUDIO_FIELDS`) is decoded, mixed to mono (mean of the channels),
    resampled to ``mel.sample_rate``, cropped at a random start (``rng``; None: from the
    start) or zero-padded to ``mel.samples(segment_frames)`` samples, and turned into a
    log-mel whose padding frames are exactly ``mel.silence``.

    Returns:
        ``{"mel": (n_mels, segment_frames) float32, "valid": (segment_frames,) float32 (see
        :func:`valid_frames`), "caption": str}``, plus ``"wave": (S,) float32`` (the segment,
        S = ``mel.samples(segment_frames)``) when ``with_wave``.

    Raises:
        ValueError: no audio field, or undecodable / empty / non-finite audio; the message
            names the key.
    """
    key = sample.get("__key__", "?")
    if segment_frames < 2:
        raise ValueError(f"segment_frames must be >= 2, got {segment_frames}")
    try:
        _, payload = payload_field(sample, AUDIO_FIELDS, "audio")
        samples, rate = _decode_bytes(payload)
        if samples.shape[1] == 0:
            raise ValueError("no samples")
        if not np.isfinite(samples).all():
            raise ValueError("non-finite samples")
    except ValueError as e:
        raise ValueError(f"sample {key!r}: unreadable audio ({e})") from e
    mono = mel.resample(torch.from_numpy(samples.mean(axis=0)), rate)
    num_samples = mel.samples(segment_frames)
    wave, real = crop_or_pad(mono, num_samples, rng)
    log_mel = mel.log_mel(wave)
    valid = valid_frames(real, num_samples, segment_frames, mel.hop_length)
    log_mel[:, valid == 0] = mel.silence  # exactly silence, whatever the window saw
    out = {"mel": log_mel, "valid": valid, "caption": text_field(sample.get("txt", ""))}
    if with_wave:
        out["wave"] = wave.float().contiguous()
    return out
