"""The synthetic sound set: every caption, reproducible, the right length, and each kind
sounds like its caption (pitch ranges, sweep direction, beat rate, broadband noise)."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import soundfile as sf

from polydiff.audio.synthetic import DEFAULT_COUNT, SOUND_CAPTIONS, render, sounds

RATE = 16_000


def _dominant_hz(wave: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def _onsets(wave: np.ndarray, rate: int = RATE) -> int:
    """Rises of the 5 ms peak envelope through 30 % of its maximum."""
    frame = rate // 200
    envelope = np.abs(wave[: len(wave) // frame * frame]).reshape(-1, frame).max(axis=1)
    loud = envelope > 0.3 * envelope.max()
    return int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))


def _clips(caption: str, count: int = 4) -> list[np.ndarray]:
    return [render(caption, np.random.default_rng(seed)) for seed in range(count)]


def test_the_vocabulary_is_the_twelve_documented_captions():
    assert SOUND_CAPTIONS == (
        "a low sine tone", "a low square tone", "a low sawtooth tone",
        "a high sine tone", "a high square tone", "a high sawtooth tone",
        "a rising chirp", "a falling chirp", "a fast beat", "a slow beat",
        "white noise", "silence then a beep",
    )  # fmt: skip


def test_sounds_cover_every_caption_equally_as_16_bit_mono_flac():
    samples = list(sounds(24, seed=1))
    assert [s["__key__"] for s in samples[:2]] == ["000000", "000001"]
    assert sorted(s["txt"] for s in samples) == sorted(SOUND_CAPTIONS * 2)
    assert DEFAULT_COUNT % len(SOUND_CAPTIONS) == 0
    for sample in samples:
        assert SOUND_CAPTIONS[sample["json"]["label"]] == sample["txt"]
        wave, rate = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
        info = sf.info(io.BytesIO(sample["flac"]))
        assert (info.format, info.subtype, info.channels) == ("FLAC", "PCM_16", 1)
        assert rate == RATE and wave.shape == (32_000,)
        assert sample["json"] == {
            "label": sample["json"]["label"],
            "sample_rate": RATE,
            "channels": 1,
            "frames": 32_000,
            "duration": 2.0,
        }
        assert 0.3 - 1e-3 <= np.abs(wave).max() <= 0.9 + 1e-3


def test_sounds_are_reproducible_from_the_seed_and_lazy():
    first = [s["flac"] for s in sounds(12, seed=3)]
    assert first == [s["flac"] for s in sounds(12, seed=3)]
    assert first != [s["flac"] for s in sounds(12, seed=4)]
    stream = sounds(None)
    assert inspect.isgenerator(stream) and next(stream)["__key__"] == "000000"
    short = next(sounds(1, seconds=0.5, sample_rate=8000))
    assert short["json"]["frames"] == 4000 and sf.info(io.BytesIO(short["flac"])).samplerate == 8000
    with pytest.raises(ValueError, match="count"):
        sounds(0)  # refused at once, not when first read


def test_render_refuses_unknown_captions_and_tiny_clips():
    with pytest.raises(ValueError, match="unknown sound 'a cat'.*a low sine tone"):
        render("a cat", np.random.default_rng(0))
    with pytest.raises(ValueError, match="seconds"):
        render("white noise", np.random.default_rng(0), seconds=0.01)


def test_every_clip_fades_in_and_out():
    for caption in SOUND_CAPTIONS:
        wave = render(caption, np.random.default_rng(5))
        assert wave.dtype == np.float32 and wave.shape == (32_000,)
        assert abs(wave[0]) < 1e-3 and abs(wave[-1]) < 1e-2, caption


@pytest.mark.parametrize("pitch,low,high", [("low", 110, 250), ("high", 800, 1800)])
@pytest.mark.parametrize("shape", ["sine", "square", "sawtooth"])
def test_steady_tones_stay_in_their_pitch_range(pitch, low, high, shape):
    pitches = [_dominant_hz(w) for w in _clips(f"a {pitch} {shape} tone", 6)]
    assert all(low - 1 <= f <= high + 1 for f in pitches), pitches
    assert len({round(f) for f in pitches}) > 1  # drawn at random, not one fixed pitch


@pytest.mark.parametrize("shape,step", [("square", 2), ("sawtooth", 1)])
def test_square_and_sawtooth_are_band_limited_harmonic_series(shape, step):
    wave = render(f"a high {shape} tone", np.random.default_rng(2))
    f0 = _dominant_hz(wave)
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)))) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / RATE)
    harmonics = np.arange(1, RATE / 2 / f0, step) * f0
    near = np.min(np.abs(freqs[:, None] - harmonics[None, :]), axis=1) < 4.0
    assert spectrum[~near].sum() < 1e-4 * spectrum.sum()  # no aliased partials in between
    second = spectrum[np.abs(freqs - 2 * f0) < 4.0].sum() / spectrum[np.abs(freqs - f0) < 4].sum()
    assert (second > 0.1) if shape == "sawtooth" else (second < 1e-4)  # 1/k^2: 0.25 vs none


def test_chirps_sweep_up_or_down_by_an_octave_or_more():
    for caption, direction in (("a rising chirp", 1), ("a falling chirp", -1)):
        for wave in _clips(caption):
            start, end = _dominant_hz(wave[:6400]), _dominant_hz(wave[-6400:])
            assert min(start, end) >= 140 and max(start, end) <= 3100
            # The first and last fifths are 60 % of the sweep apart: >= 0.6 octave.
            assert direction * np.log2(end / start) >= 0.55, (caption, start, end)


def test_fast_beats_have_more_hits_than_slow_beats():
    fast = [_onsets(w) for w in _clips("a fast beat")]
    slow = [_onsets(w) for w in _clips("a slow beat")]
    assert all(11 <= n <= 21 for n in fast), fast  # 6-10 hits a second for 2 s
    assert all(2 <= n <= 7 for n in slow), slow  # 1.5-3 a second
    assert min(fast) > max(slow)


def test_white_noise_is_broadband_and_tones_are_not():
    def band_shares(wave: np.ndarray) -> np.ndarray:
        power = np.abs(np.fft.rfft(wave)) ** 2
        return np.array([b.sum() for b in np.array_split(power[1:], 4)]) / power[1:].sum()

    for wave in _clips("white noise"):
        assert np.all(np.abs(band_shares(wave) - 0.25) < 0.05)  # 0-2, 2-4, 4-6, 6-8 kHz
    assert band_shares(render("a high sine tone", np.random.default_rng(0)))[0] > 0.99


def test_silence_then_a_beep():
    for wave in _clips("silence then a beep", 6):
        start = int(np.argmax(np.abs(wave) > 1e-3))
        assert 0.35 * 32_000 <= start <= 0.6 * 32_000 + 100
        assert np.all(wave[: int(0.35 * 32_000)] == 0)
        beep = wave[start : start + 4000]  # every beep lasts at least 0.25 s
        assert 500 - 5 <= _dominant_hz(beep) <= 1500 + 5
        assert np.sqrt(np.mean(beep**2)) > 0.15
