"""Writing sounds: 16-bit PCM WAV or FLAC (libsndfile through ``soundfile``), and mel PNGs.

16-bit PCM is what every player, editor and browser opens and is below the noise floor of
anything the models make; FLAC is the same samples, losslessly compressed (about half the
size). A wave holds samples in [-1, 1]; 16-bit PCM stores [-1, 32767/32768], so samples
beyond are *clipped* (not rescaled): the loudness stays what the model made, and a rare
overshoot costs a click rather than quietening the whole sound.

Given a provenance record (:mod:`polydiff.core.provenance`), a file carries it as one line of
JSON in its ``comment`` tag (WAV: the RIFF ``INFO`` chunk's ``ICMT``; FLAC: the Vorbis comment
``COMMENT``; ``soundfile.SoundFile(p).comment`` reads both), the prompt in ``title``,
polydiff's version in ``software`` (libsndfile appends its own) and the record's time in
``date``, and gets the sidecar ``<name>.wav.json`` / ``<name>.flac.json``. libsndfile keeps at
most about 2 KB per WAV INFO string and silently drops *every* string when one is longer, so
a WAV whose record is longer than :data:`WAV_STRING_BYTES` says in its comment where the
sidecar is instead (FLAC has no such limit), and a long prompt is shortened in its ``title``.

Every file is written beside its target and renamed into place
(:func:`polydiff.core.provenance.atomic_output`), with the user's normal permissions.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from torch import Tensor

from polydiff.core.files import output_paths as core_output_paths
from polydiff.core.provenance import (
    atomic_output,
    output_targets,
    polydiff_version,
    record_json,
    sidecar_path,
    write_sidecar,
)

from .mel import MelSettings

__all__ = [
    "AUDIO_OUTPUT_SUFFIXES",
    "WAV_STRING_BYTES",
    "encode_flac",
    "mel_png",
    "output_paths",
    "save_sounds",
    "to_samples",
    "write_audio",
]

AUDIO_OUTPUT_SUFFIXES = (".wav", ".flac")
#: The longest WAV INFO string (UTF-8 bytes) written; libsndfile 1.2 drops all past ~2045.
WAV_STRING_BYTES = 2000
_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
_SUBTYPE = "PCM_16"


def to_samples(wave: Tensor | np.ndarray) -> np.ndarray:
    """A wave -> (S,) or (S, C) float32 samples clipped to [-1, 1], as soundfile writes them.

    Accepts (S,) mono or (C, S) with 1 <= C <= 8 channels (FLAC's most), tensor or array.

    Raises:
        ValueError: another shape, no samples, or NaN / inf samples.
    """
    if isinstance(wave, Tensor):
        wave = wave.detach().float().cpu().numpy()
    samples = np.asarray(wave, dtype=np.float32)
    if samples.ndim not in (1, 2) or (samples.ndim == 2 and not 1 <= samples.shape[0] <= 8):
        raise ValueError(f"expected an (S,) or (C, S) wave, got shape {samples.shape}")
    if samples.shape[-1] == 0:
        raise ValueError("the wave has no samples")
    if not np.isfinite(samples).all():
        raise ValueError("the wave has NaN or infinite samples")
    samples = np.clip(samples, -1.0, 1.0)  # see the module doc: clipped, not rescaled
    return samples if samples.ndim == 1 else np.ascontiguousarray(samples.T)


def _utf8_prefix(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _tags(record: Mapping[str, Any], target: Path) -> dict[str, str]:
    comment = record_json(record)
    tags = {
        "title": str(record.get("prompt", "")),
        "software": f"polydiff {record.get('polydiff_version') or polydiff_version()}",
        "date": str(record.get("created", "")),
        "comment": comment,
    }
    if target.suffix.lower() == ".wav":
        if len(comment.encode("utf-8")) > WAV_STRING_BYTES:
            tags["comment"] = f"polydiff provenance: see {sidecar_path(target).name}"
        tags = {name: _utf8_prefix(value, WAV_STRING_BYTES) for name, value in tags.items()}
    return {name: value for name, value in tags.items() if value}


def write_audio(
    wave: Tensor | np.ndarray,
    path: str | Path,
    sample_rate: int,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a wave as 16-bit PCM WAV or FLAC (by ``path``'s suffix), atomically.

    Args:
        wave: (S,) (or (C, S)) samples in [-1, 1] (see :func:`to_samples`; beyond is clipped).
        path: ``.wav`` or ``.flac`` file (parent folders are created). sample_rate: Hz.
        metadata: a provenance record: embedded (see the module doc) and written as the
            sidecar ``<name>.<suffix>.json``; ``None`` (shards, previews) stores nothing.

    Returns:
        ``path``. Nothing is left beside it when writing fails.

    Raises:
        ValueError: another suffix, a bad wave, sample rate or record (before any file is
            written).
    """
    path = Path(path)
    audio_format = _FORMATS.get(path.suffix.lower())
    if audio_format is None:
        raise ValueError(
            f"cannot write {path.suffix!r} audio; use one of {', '.join(AUDIO_OUTPUT_SUFFIXES)}"
        )
    if int(sample_rate) != sample_rate or not 1 <= sample_rate <= 655_350:
        raise ValueError(f"sample_rate must be whole Hz in [1, 655350], got {sample_rate}")
    samples = to_samples(wave)
    tags = {} if metadata is None else _tags(metadata, path)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with (
        atomic_output(path) as tmp,
        sf.SoundFile(
            tmp, "w", int(sample_rate), channels, subtype=_SUBTYPE, format=audio_format
        ) as out,
    ):
        for name, value in tags.items():  # before the samples: FLAC writes tags up front
            setattr(out, name, value)
        out.write(samples)
    if metadata is not None:
        write_sidecar(path, metadata)
    return path


def encode_flac(wave: Tensor | np.ndarray, sample_rate: int) -> bytes:
    """The bytes of a 16-bit FLAC of ``wave`` ((S,) or (C, S) in [-1, 1]), for shards."""
    buffer = io.BytesIO()
    sf.write(buffer, to_samples(wave), int(sample_rate), subtype=_SUBTYPE, format="FLAC")
    return buffer.getvalue()


def output_paths(out: str | Path, num: int) -> list[Path]:
    """The files ``--out FILE --num N`` writes (``.wav`` when ``out`` has no suffix); see
    :func:`polydiff.core.files.output_paths`."""
    return core_output_paths(out, num, AUDIO_OUTPUT_SUFFIXES[0])


def save_sounds(
    waves: Sequence[Tensor | np.ndarray],
    paths: Sequence[str | Path] | str | Path,
    sample_rate: int,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Save waves as WAV or FLAC (by each path's suffix), each with its provenance record.

    Args:
        waves: (S,) waves in [-1, 1], in output order.
        paths: one ``.wav`` / ``.flac`` path per wave (what
            :func:`polydiff.core.provenance.check_output` returns), or a single ``--out`` FILE,
            expanded by the ``--num`` naming rule (``FILE_0.wav`` ...) to ``len(waves)`` files.
        sample_rate: Hz. metadata: one provenance record per wave (embedded and written as
            sidecar), or ``None`` for bare files without sidecars.

    Raises:
        ValueError: no waves, counts that do not match, or a suffix other than .wav / .flac;
            raised before any file is written.
    """
    if not waves:
        raise ValueError("no sounds to save")
    targets = output_targets(len(waves), paths, metadata, AUDIO_OUTPUT_SUFFIXES, "sounds")
    return [
        write_audio(wave, target, sample_rate, metadata=record)
        for wave, (target, record) in zip(waves, targets, strict=True)
    ]


def _band_centres(mel: MelSettings) -> np.ndarray:
    """(n_mels,) the centre frequency of each mel band in Hz (its filter's peak)."""
    filters = mel.mel_filters().numpy()  # (n_freqs, n_mels)
    return filters.argmax(axis=0) * mel.sample_rate / mel.n_fft


def mel_png(
    log_mel: Tensor | np.ndarray,
    path: str | Path,
    mel: MelSettings,
    title: str | None = None,
) -> Path:
    """Draw a log-mel spectrogram as a PNG (``--mel-png``), atomically.

    Time in seconds runs left to right, low frequencies are at the bottom (the y axis is
    labelled with the bands' centre frequencies in Hz), loudness is the ``magma`` colour map
    from silence (``mel.silence``, black) to the loudest band (bright yellow).

    Args:
        log_mel: (n_mels, F) natural-log mel magnitudes (:meth:`MelSettings.log_mel`).
        path: the ``.png`` file. mel: the settings the spectrogram was made with.
        title: drawn above the plot (e.g. the prompt).

    Raises:
        ValueError: a suffix other than ``.png``, or a spectrogram of another shape.
    """
    from matplotlib.figure import Figure  # lazy: matplotlib takes a while to import

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"a mel picture is a .png file, got {path.name!r}")
    if isinstance(log_mel, Tensor):
        log_mel = log_mel.detach().float().cpu().numpy()
    values = np.asarray(log_mel, dtype=np.float32)
    if values.ndim != 2 or values.shape[0] != mel.n_mels or values.shape[1] < 1:
        raise ValueError(f"expected a ({mel.n_mels}, F) log-mel, got shape {values.shape}")
    values = np.nan_to_num(values, nan=mel.silence, posinf=mel.silence, neginf=mel.silence)
    seconds = values.shape[1] / mel.frames_per_second
    loudest = max(float(values.max()), mel.silence + 1e-3)

    figure = Figure(figsize=(max(4.0, min(12.0, 2.0 + 2.0 * seconds)), 3.2), dpi=100)
    axes = figure.add_subplot()
    # Band index on the y axis keeps the mel spacing; ticks name the bands' frequencies.
    image = axes.imshow(
        values,
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=mel.silence,
        vmax=loudest,
        extent=(0.0, seconds, -0.5, mel.n_mels - 0.5),
        interpolation="nearest",
    )
    centres = _band_centres(mel)
    ticks = np.unique(np.linspace(0, mel.n_mels - 1, num=min(6, mel.n_mels)).round().astype(int))
    axes.set_yticks(ticks, [f"{centres[t]:.0f}" for t in ticks])
    axes.set_xlabel("time (s)")
    axes.set_ylabel("frequency (Hz)")
    if title:
        axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="log mel magnitude")
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
