"""Spectral distances and pitch / rhythm analysis of polydiff.audio.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polydiff.audio.metrics import (
    log_spectral_distance,
    median_pitch,
    multi_resolution_stft_distance,
    onset_rate,
    pitch_slope,
    pitch_track,
    spectral_flatness,
    stft_magnitude,
)

SR = 16_000
TINY = ((64, 16, 64), (128, 32, 128))  # resolutions small enough for brute force


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tone(freq: float, seconds: float = 2.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return amp * np.sin(2 * np.pi * freq * t)


def _log_chirp(f0: float, f1: float, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    k = math.log(f1 / f0) / seconds
    return 0.5 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)


def _clicks(rate: float, seconds: float = 2.0) -> np.ndarray:
    x = np.zeros(int(seconds * SR))
    burst = 0.8 * np.exp(-np.arange(80) / 15) * _rng(3).standard_normal(80)
    for start in np.arange(0.05, seconds - 0.01, 1 / rate):
        i = int(start * SR)
        x[i : i + 80] += burst[: len(x) - i]
    return x


# --- brute force ---------------------------------------------------------------------------


def _np_stft_magnitude(x: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """(S,) -> (bins, frames): periodic hann of ``win`` centred in n_fft, reflect-padded."""
    n = np.arange(win)
    window = np.zeros(n_fft)
    offset = (n_fft - win) // 2
    window[offset : offset + win] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = [padded[i * hop : i * hop + n_fft] * window for i in range(len(x) // hop + 1)]
    return np.abs(np.fft.rfft(np.stack(frames), axis=1)).T


def _np_mrstft(pred: np.ndarray, target: np.ndarray, resolutions) -> float:
    total = 0.0
    for n_fft, hop, win in resolutions:
        p = np.maximum(_np_stft_magnitude(pred, n_fft, hop, win), 1e-5)
        t = np.maximum(_np_stft_magnitude(target, n_fft, hop, win), 1e-5)
        total += np.linalg.norm(t - p) / np.linalg.norm(t) + np.mean(np.abs(np.log(t) - np.log(p)))
    return total / len(resolutions)


def _np_lsd(pred: np.ndarray, target: np.ndarray, n_fft: int, hop: int) -> float:
    p = np.maximum(_np_stft_magnitude(pred, n_fft, hop, n_fft) ** 2, 1e-10)
    t = np.maximum(_np_stft_magnitude(target, n_fft, hop, n_fft) ** 2, 1e-10)
    diff = 10 * np.log10(t) - 10 * np.log10(p)
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=0))))


# --- STFT ----------------------------------------------------------------------------------


def test_stft_magnitude_has_centred_frames_and_matches_numpy():
    x = torch.from_numpy(_rng().standard_normal((2, 300)))
    mag = stft_magnitude(x, 128, 32, 96)
    assert mag.shape == (2, 65, 300 // 32 + 1)
    np.testing.assert_allclose(
        mag[1].numpy(), _np_stft_magnitude(x[1].numpy(), 128, 32, 96), atol=1e-9
    )


def test_stft_magnitude_refuses_bad_input():
    with pytest.raises(ValueError, match="too short"):
        stft_magnitude(torch.zeros(1, 100), 512, 128, 512)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        stft_magnitude(torch.zeros(100), 64, 16, 64)


# --- MR-STFT -------------------------------------------------------------------------------


def test_mrstft_is_zero_for_identical_waves_and_grows_with_noise():
    rng = _rng(1)
    target = torch.from_numpy(_tone(440, 0.5)[None].repeat(3, 0)).float()
    noise = torch.from_numpy(rng.standard_normal(target.shape)).float()
    assert multi_resolution_stft_distance(target, target).item() == pytest.approx(0.0, abs=1e-6)
    levels = [
        multi_resolution_stft_distance(target + s * noise, target).item()
        for s in (1e-3, 1e-2, 1e-1)
    ]
    assert 0 < levels[0] < levels[1] < levels[2]


def test_mrstft_per_item_and_mean_agree_and_it_is_roughly_symmetric():
    rng = _rng(2)
    a = torch.from_numpy(rng.standard_normal((3, 4000)) * 0.3).float()
    b = a + torch.from_numpy(rng.standard_normal((3, 4000)) * 0.05).float()
    per_item = multi_resolution_stft_distance(b, a, reduction="none")
    assert per_item.shape == (3,)
    assert multi_resolution_stft_distance(b, a).item() == pytest.approx(per_item.mean().item())
    forward, backward = per_item.mean().item(), multi_resolution_stft_distance(a, b).item()
    assert backward == pytest.approx(forward, rel=0.2)


def test_mrstft_matches_a_brute_force_numpy_computation():
    rng = _rng(3)
    target = rng.standard_normal((2, 400)) * 0.3
    pred = target + rng.standard_normal((2, 400)) * 0.1
    pred[1, :200] = 0.0  # a silent stretch exercises the floor
    got = multi_resolution_stft_distance(
        torch.from_numpy(pred), torch.from_numpy(target), TINY, "none"
    )
    expected = [_np_mrstft(pred[i], target[i], TINY) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_mrstft_is_differentiable_even_through_silence():
    pred = torch.zeros(2, 2048, requires_grad=True)
    target = torch.from_numpy(_rng(4).standard_normal((2, 2048))).float()
    multi_resolution_stft_distance(pred, target).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_mrstft_refuses_mismatched_shapes_and_bad_reduction():
    with pytest.raises(ValueError, match="same shape"):
        multi_resolution_stft_distance(torch.zeros(1, 4000), torch.zeros(1, 4001))
    with pytest.raises(ValueError, match="reduction"):
        multi_resolution_stft_distance(torch.zeros(1, 4000), torch.zeros(1, 4000), reduction="sum")


# --- LSD -----------------------------------------------------------------------------------


def test_lsd_is_zero_for_identical_symmetric_and_grows_with_noise():
    rng = _rng(5)
    target = torch.from_numpy(rng.standard_normal((2, 4096)) * 0.2).float()
    noise = torch.from_numpy(rng.standard_normal((2, 4096))).float()
    assert torch.equal(log_spectral_distance(target, target), torch.zeros(2))
    noisy = target + 0.05 * noise
    torch.testing.assert_close(
        log_spectral_distance(noisy, target), log_spectral_distance(target, noisy)
    )
    small, large = (log_spectral_distance(target + s * noise, target) for s in (0.01, 0.3))
    assert (small > 0).all() and (large > small).all()


def test_lsd_matches_a_brute_force_numpy_computation():
    rng = _rng(6)
    target = rng.standard_normal((2, 500)) * 0.3
    pred = target * 0.5 + rng.standard_normal((2, 500)) * 0.05
    pred[0, 100:300] = 0.0
    got = log_spectral_distance(torch.from_numpy(pred), torch.from_numpy(target), 128, 32)
    expected = [_np_lsd(pred[i], target[i], 128, 32) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


# --- pitch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("freq", [110.0, 440.0, 1234.5])
def test_median_pitch_of_a_sine_is_its_frequency(freq):
    assert median_pitch(_tone(freq, 1.0), SR) == pytest.approx(freq, rel=0.005)


def test_median_pitch_of_a_sawtooth_is_its_fundamental():
    t = np.arange(SR) / SR
    saw = 0.5 * (2 * ((t * 220) % 1.0) - 1)
    assert median_pitch(saw, SR) == pytest.approx(220, rel=0.01)


def test_pitch_slope_is_octaves_per_second():
    assert pitch_slope(_log_chirp(200, 800), SR) == pytest.approx(1.0, abs=0.05)
    assert pitch_slope(_log_chirp(800, 200), SR) == pytest.approx(-1.0, abs=0.05)
    assert abs(pitch_slope(_tone(440), SR)) < 0.01


def test_pitch_track_is_nan_where_silent():
    beep = np.concatenate([np.zeros(SR // 2), _tone(1000, 0.5)])
    track = pitch_track(beep, SR, hop=256)
    assert track.shape == (len(beep) // 256 + 1,)
    first_sound = (SR // 2 - 1024) // 256  # frames whose window misses the beep
    assert np.isnan(track[:first_sound]).all()
    assert np.nanmedian(track) == pytest.approx(1000, rel=0.005)
    assert np.isnan(median_pitch(np.zeros(SR), SR))
    assert np.isnan(pitch_slope(np.zeros(SR), SR))


def test_pitch_track_accepts_tensors_and_refuses_batches():
    tone = torch.from_numpy(_tone(440, 0.5)).float()
    assert median_pitch(tone, SR) == pytest.approx(440, rel=0.005)
    with pytest.raises(ValueError, match="mono"):
        pitch_track(tone[None], SR)


# --- rhythm and noisiness ------------------------------------------------------------------


@pytest.mark.parametrize("rate", [2.0, 8.0])
def test_onset_rate_counts_clicks_per_second(rate):
    assert onset_rate(_clicks(rate), SR) == pytest.approx(rate, abs=0.5)


def test_steady_sounds_have_one_onset_and_silence_none():
    noise = 0.3 * _rng(7).standard_normal(2 * SR)
    assert onset_rate(noise, SR) == pytest.approx(0.5)  # its start, over 2 s
    assert onset_rate(_tone(440), SR) == pytest.approx(0.5)
    assert onset_rate(np.zeros(2 * SR), SR) == 0.0


def test_white_noise_and_a_tone_are_told_apart():
    noise = 0.3 * _rng(8).standard_normal(SR)
    tone = _tone(440, 1.0)
    assert spectral_flatness(noise, SR) > 0.3
    assert spectral_flatness(tone, SR) < 0.01
    # a tone's pitch track is steady, noise's jumps about
    assert np.nanstd(np.log2(pitch_track(tone, SR))) < 0.01
    assert np.nanstd(np.log2(pitch_track(noise, SR))) > 0.5
