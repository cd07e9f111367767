"""Built-in sound set that needs no download: ``synthetic:sounds[:COUNT]``.

Twelve kinds of procedural sound, each with one exact caption (its index in
:data:`SOUND_CAPTIONS` is its ``label``). Every clip draws its pitch, loudness (peak amplitude
0.3-0.9) and phase at random within its kind's ranges:

========================== ===================================================================
caption                    sound
========================== ===================================================================
a low sine tone            steady sine, 110-250 Hz
a low square tone          steady square wave, 110-250 Hz (odd harmonics, amplitude 1/k)
a low sawtooth tone        steady sawtooth wave, 110-250 Hz (all harmonics, amplitude 1/k)
a high sine tone           steady sine, 800-1800 Hz
a high square tone         steady square wave, 800-1800 Hz
a high sawtooth tone       steady sawtooth wave, 800-1800 Hz
a rising chirp             sine sweeping up exponentially by 1-2 octaves, within 150-3000 Hz
a falling chirp            sine sweeping down exponentially by 1-2 octaves, within 150-3000 Hz
a fast beat                drum hits (a decaying thump falling from 70-180 Hz to half, with
                           a noise attack) at 6-10 per second, starting at a random phase
a slow beat                the same hits at 1.5-3 per second
white noise                Gaussian white noise (flat spectrum up to the Nyquist frequency)
silence then a beep        silence for 35-60 % of the clip, then a 500-1500 Hz sine beep that
                           lasts to the end or for at least 0.25 s
========================== ===================================================================

Pitches are drawn log-uniformly (equal chances per octave). Square and sawtooth waves are
built from their harmonics below the Nyquist frequency only, so nothing aliases. Every clip
fades in and out over 10 ms (a beep over 5 ms at its own edges) so no clip starts or ends
with a click; the beats' hits are the only sharp onsets. The default clip is 2 s of 16 kHz
mono; :func:`sounds` writes them as 16-bit FLAC shard samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .export import encode_flac

__all__ = [
    "DEFAULT_COUNT",
    "SOUND_CAPTIONS",
    "SYNTHETIC_SETS",
    "render",
    "sounds",
]

SOUND_CAPTIONS: tuple[str, ...] = (
    "a low sine tone",
    "a low square tone",
    "a low sawtooth tone",
    "a high sine tone",
    "a high square tone",
    "a high sawtooth tone",
    "a rising chirp",
    "a falling chirp",
    "a fast beat",
    "a slow beat",
    "white noise",
    "silence then a beep",
)
SYNTHETIC_SETS = ("sounds",)
DEFAULT_COUNT = 2400  # 200 clips of each of the 12 kinds

_PITCH = {"low": (110.0, 250.0), "high": (800.0, 1800.0)}
_CHIRP_RANGE = (150.0, 3000.0)
_BEAT_RATE = {"fast": (6.0, 10.0), "slow": (1.5, 3.0)}
_BEEP_PITCH = (500.0, 1500.0)
_PEAK = (0.3, 0.9)
_FADE_SECONDS = 0.01
_BEEP_FADE_SECONDS = 0.005


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _fade(wave: np.ndarray, samples: int) -> np.ndarray:
    """``wave`` with raised-cosine fades over ``samples`` at both ends (in place)."""
    samples = min(samples, len(wave) // 2)
    if samples > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(samples) / samples)
        wave[:samples] *= ramp
        wave[len(wave) - samples :] *= ramp[::-1]
    return wave


def _tone(shape: str, freq: float, phase: float, t: np.ndarray, sample_rate: int) -> np.ndarray:
    """A steady sine / square / sawtooth of ``freq`` Hz at times ``t`` (s), harmonics below
    the Nyquist frequency only (band-limited: no aliasing)."""
    if shape == "sine":
        return np.sin(2 * np.pi * freq * t + phase)
    step = 2 if shape == "square" else 1  # a square wave has the odd harmonics only
    wave = np.zeros_like(t)
    for k in range(1, math.ceil(sample_rate / 2 / freq), step):  # k * freq < Nyquist
        sign = 1.0 if shape == "square" or k % 2 else -1.0  # a sawtooth alternates signs
        wave += sign * np.sin(2 * np.pi * k * freq * t + k * phase) / k
    return wave


def _chirp(direction: str, rng: np.random.Generator, t: np.ndarray, seconds: float) -> np.ndarray:
    """An exponential sine sweep over 1-2 octaves, all of it within ``_CHIRP_RANGE``."""
    octaves = rng.uniform(1.0, 2.0)
    low, high = _CHIRP_RANGE
    start = _log_uniform(rng, low, high / 2**octaves)  # the sweep's lowest frequency
    ratio = 2**octaves
    if direction == "falling":
        start, ratio = start * ratio, 1 / ratio
    # f(t) = start * ratio ** (t / T); the phase is its integral.
    rate = math.log(ratio) / seconds
    return np.sin(2 * np.pi * start * np.expm1(rate * t) / rate + rng.uniform(0, 2 * np.pi))


def _beat(tempo: str, rng: np.random.Generator, num_samples: int, sample_rate: int) -> np.ndarray:
    """Identical short drum hits at a steady rate, the first at a random phase."""
    period = 1.0 / rng.uniform(*_BEAT_RATE[tempo])
    length = int(min(0.08, 0.9 * period) * sample_rate)
    t = np.arange(length) / sample_rate
    decay = rng.uniform(0.012, 0.025)  # seconds: a hit is over well before the next one
    pitch = rng.uniform(70.0, 180.0)
    # A thump whose pitch drops by half, plus a faster-decaying noise burst for the attack.
    thump = np.sin(2 * np.pi * pitch * (0.5 * t + 0.5 * decay * -np.expm1(-t / decay)))
    noise = rng.standard_normal(length) * np.exp(-t / (decay / 3))
    hit = (thump + 0.5 * noise) * np.exp(-t / decay)
    wave = np.zeros(num_samples)
    onset = rng.uniform(0.0, period)
    while (start := int(onset * sample_rate)) < num_samples:
        end = min(num_samples, start + length)
        wave[start:end] += hit[: end - start]
        onset += period
    return wave


def _beep(rng: np.random.Generator, t: np.ndarray, sample_rate: int) -> np.ndarray:
    """Silence for 35-60 % of the clip, then a sine beep to the end or for a while."""
    num_samples = len(t)
    start = int(rng.uniform(0.35, 0.60) * num_samples)
    remaining = num_samples - start
    length = remaining  # to the end, or half the time for a while (at least 0.25 s)
    if rng.random() < 0.5:
        length = int(rng.integers(min(remaining, int(0.25 * sample_rate)), remaining + 1))
    freq = _log_uniform(rng, *_BEEP_PITCH)
    wave = np.zeros(num_samples)
    beep = np.sin(2 * np.pi * freq * t[:length] + rng.uniform(0, 2 * np.pi))
    wave[start : start + length] = _fade(beep, int(_BEEP_FADE_SECONDS * sample_rate))
    return wave


def _check_size(seconds: float, sample_rate: int) -> None:
    if not seconds >= 0.1 or int(sample_rate) != sample_rate or sample_rate < 4000:
        raise ValueError(
            f"sounds need seconds >= 0.1 and a whole sample_rate >= 4000 Hz, "
            f"got {seconds}, {sample_rate}"
        )


def render(
    caption: str, rng: np.random.Generator, seconds: float = 2.0, sample_rate: int = 16000
) -> np.ndarray:
    """One clip of the kind ``caption`` names (see the module doc).

    Returns:
        (round(seconds * sample_rate),) float32 mono samples, peak amplitude in [0.3, 0.9].

    Raises:
        ValueError: a caption not in :data:`SOUND_CAPTIONS` (naming them), a clip shorter
            than 0.1 s, or a sample rate below 4 kHz.
    """
    if caption not in SOUND_CAPTIONS:
        raise ValueError(f"unknown sound {caption!r}; valid: {', '.join(SOUND_CAPTIONS)}")
    _check_size(seconds, sample_rate)
    num_samples = round(seconds * sample_rate)
    t = np.arange(num_samples) / sample_rate
    words = caption.split()
    if caption.endswith(" tone"):  # "a low square tone"
        freq = _log_uniform(rng, *_PITCH[words[1]])
        wave = _tone(words[2], freq, rng.uniform(0, 2 * np.pi), t, sample_rate)
    elif caption.endswith(" chirp"):
        wave = _chirp(words[1], rng, t, num_samples / sample_rate)
    elif caption.endswith(" beat"):
        wave = _beat(words[1], rng, num_samples, sample_rate)
    elif caption == "white noise":
        wave = rng.standard_normal(num_samples)
    else:  # "silence then a beep"
        wave = _beep(rng, t, sample_rate)
    wave = _fade(wave, int(_FADE_SECONDS * sample_rate))
    peak = float(np.abs(wave).max())
    return (wave * (rng.uniform(*_PEAK) / peak)).astype(np.float32)


def _sounds(count: int, seconds: float, sample_rate: int, seed: int) -> Iterator[dict[str, Any]]:
    order = np.random.default_rng(seed).permutation(len(SOUND_CAPTIONS))
    for index in range(count):
        label = int(order[index % len(order)])
        caption = SOUND_CAPTIONS[label]
        wave = render(caption, np.random.default_rng([seed, index]), seconds, sample_rate)
        yield {
            "__key__": f"{index:06d}",
            "flac": encode_flac(wave, sample_rate),
            "txt": caption,
            "json": {
                "label": label,
                "sample_rate": sample_rate,
                "channels": 1,
                "frames": len(wave),
                "duration": seconds,
            },
        }


def sounds(
    count: int | None = None,
    *,
    seconds: float = 2.0,
    sample_rate: int = 16000,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Shard samples of the synthetic sound set, made lazily one at a time.

    The 12 kinds are visited in a cycle whose order ``seed`` shuffles, so any ``count`` that
    is a multiple of 12 holds every kind equally often. Clip ``i`` is drawn from a generator
    seeded by ``(seed, i)``: the same ``seed`` gives the same sounds.

    Args:
        count: how many clips (None: :data:`DEFAULT_COUNT`). seconds, sample_rate: each clip.

    Yields:
        ``{"__key__": "000042", "flac": 16-bit mono FLAC bytes, "txt": caption, "json":
        {"label", "sample_rate", "channels": 1, "frames", "duration"}}``.

    Raises:
        ValueError: ``count`` < 1 (at once, before anything is rendered).
    """
    count = DEFAULT_COUNT if count is None else count
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    _check_size(seconds, sample_rate)
    return _sounds(count, seconds, sample_rate, seed)
