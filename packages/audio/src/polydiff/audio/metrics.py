"""Audio metrics: spectral distances between waves, and pitch / rhythm analysis of one sound.

Spectral distances (batched torch, ``(B, S)`` waves in [-1, 1] at one sample rate):

* :func:`multi_resolution_stft_distance` - Parallel WaveGAN's multi-resolution STFT loss
  (Yamamoto et al. 2020). Per resolution (n_fft, hop, win), with ``|X|`` the STFT magnitude
  floored at 1e-5::

      SC  = || |T| - |P| ||_F / || |T| ||_F            (spectral convergence)
      MAG = mean | log|T| - log|P| |                    (log-magnitude L1, natural log)

  and the distance is ``mean over resolutions of (SC + MAG)``. Differentiable (it is also a
  vocoder training loss). PWG takes the Frobenius norms over the whole batch; here they are
  taken per item and averaged, so the batch value is the mean of the per-item values.
* :func:`log_spectral_distance` - in dB, per item: with power spectra ``|X|^2`` floored at
  1e-10, ``LSD = mean over frames of sqrt(mean over bins of (10 log10 P_t - 10 log10 P_p)^2)``.

Analysis of one sound (``(S,)`` numpy array or tensor; used to check that generated sounds
follow their prompt: "a rising tone", "a fast beat"):

* :func:`pitch_track` - the dominant frequency of each frame: the peak of the STFT magnitude
  between ``f_min`` and ``f_max``, refined by parabolic interpolation of the log magnitude
  around the peak bin; NaN for silent frames. :func:`median_pitch` and :func:`pitch_slope`
  (octaves per second, least-squares slope of log2 pitch over time) summarise it.
* :func:`onset_rate` - onsets per second: spectral flux of the log-mel
  (:class:`~polydiff.audio.mel.MelSettings`), peak-picked (see its doc).
* :func:`spectral_flatness` - geometric over arithmetic mean of the power spectrum: ~0 for a
  tone, ~0.5-1 for white noise.

Prompt adherence and distributions:

* :class:`SoundEvaluator` - a small CNN trained on real synthetic sounds (``synthetic``) to name
  their caption; bundled in ``bundled/evaluator``, reproduced with
  ``OMP_NUM_THREADS=1 python -m polydiff.audio.metrics --train-evaluator DIR``.
  :func:`prompt_adherence` is the share of sounds it names with their prompt (per prompt too),
  :func:`sound_frechet_distance` the Fréchet distance of its pooled features.
* :func:`clap_scores` - CLAP score (cosine of audio and prompt embeddings) with a CLAP model
  the user gives (``polydiff.audio.clap``).
* :func:`frechet_audio_distance` - FAD with an embedding model the user supplies as a local
  folder (``polydiff.audio.embedding``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polydiff.audio.mel import MelSettings
from polydiff.core.metrics import frechet_distance
from polydiff.core.pretrained import Configurable, from_pretrained, save_pretrained

from .clap import clap_scores
from .embedding import frechet_audio_distance
from .synthetic import SOUND_CAPTIONS, render

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "SoundEvaluator",
    "clap_scores",
    "evaluator_accuracy",
    "frechet_audio_distance",
    "load_evaluator",
    "log_spectral_distance",
    "median_pitch",
    "multi_resolution_stft_distance",
    "onset_rate",
    "pitch_slope",
    "pitch_track",
    "prompt_adherence",
    "real_sounds",
    "sound_frechet_distance",
    "spectral_flatness",
    "stft_magnitude",
    "train_evaluator",
]

# (n_fft, hop, win) of Parallel WaveGAN's loss scaled to 16 kHz: 32 ms, 64 ms and 128 ms windows.
DEFAULT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = (
    (512, 128, 512),
    (1024, 256, 1024),
    (2048, 512, 2048),
)
_MAG_FLOOR = 1e-5  # STFT magnitude floor of the MR-STFT distance (log of silence: -11.5)
_POWER_FLOOR = 1e-10  # power floor of the LSD (-100 dB)


# --- spectra ---------------------------------------------------------------------------------


def _as_batch(wave: Tensor, name: str) -> Tensor:
    if not isinstance(wave, Tensor) or wave.dim() != 2:
        shape = tuple(wave.shape) if isinstance(wave, Tensor) else type(wave).__name__
        raise ValueError(f"{name} must be a (B, S) tensor, got {shape}")
    return wave if wave.is_floating_point() else wave.float()


def stft_magnitude(wave: Tensor, n_fft: int, hop: int, win: int, floor: float = 0.0) -> Tensor:
    """(B, S) wave -> (B, n_fft // 2 + 1, S // hop + 1) STFT magnitude.

    Hann window of ``win`` samples (zero-padded to ``n_fft``), centred frames with reflect
    padding, unnormalised. With ``floor > 0`` the magnitude is ``sqrt(max(|X|^2, floor^2))``,
    which also keeps its gradient finite where the spectrum is zero. Differentiable.
    """
    wave = _as_batch(wave, "wave")
    if not 0 < win <= n_fft or hop <= 0:
        raise ValueError(f"stft: need 0 < win <= n_fft and hop > 0, got {n_fft}, {hop}, {win}")
    if wave.shape[-1] <= n_fft // 2:
        raise ValueError(
            f"stft: a wave of {wave.shape[-1]} samples is too short for n_fft {n_fft} "
            f"(need more than {n_fft // 2})"
        )
    window = torch.hann_window(win, device=wave.device, dtype=wave.dtype)
    spec = torch.stft(
        wave,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    if floor <= 0:
        return spec.abs()
    power = spec.real.square() + spec.imag.square()
    return power.clamp_min(floor * floor).sqrt()


def _check_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    pred, target = _as_batch(pred, "pred"), _as_batch(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    return pred, target


def multi_resolution_stft_distance(
    pred: Tensor,
    target: Tensor,
    resolutions: Sequence[tuple[int, int, int]] = DEFAULT_RESOLUTIONS,
    reduction: str = "mean",
) -> Tensor:
    """Parallel WaveGAN's multi-resolution STFT distance (module doc): per resolution
    spectral convergence plus mean absolute log-magnitude difference, averaged over
    resolutions. 0 for identical waves; not symmetric (SC divides by the target's norm).

    Args:
        pred, target: (B, S) waves.
        resolutions: (n_fft, hop, win) triples.
        reduction: ``"mean"`` -> a scalar (mean over the batch); ``"none"`` -> (B,) per item.

    Returns:
        A differentiable scalar or (B,) tensor (dimensionless).
    """
    pred, target = _check_pair(pred, target)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not resolutions:
        raise ValueError("resolutions must not be empty")
    total = pred.new_zeros(pred.shape[0])
    for n_fft, hop, win in resolutions:
        p = stft_magnitude(pred, n_fft, hop, win, floor=_MAG_FLOOR)
        t = stft_magnitude(target, n_fft, hop, win, floor=_MAG_FLOOR)
        convergence = (t - p).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1)
        log_mag = (t.log() - p.log()).abs().flatten(1).mean(dim=1)
        total = total + convergence + log_mag
    per_item = total / len(resolutions)
    return per_item.mean() if reduction == "mean" else per_item


def log_spectral_distance(
    pred: Tensor, target: Tensor, n_fft: int = 2048, hop: int = 512
) -> Tensor:
    """(B, S), (B, S) -> (B,) log-spectral distance in dB (module doc for the formula; hann
    window of ``n_fft``, centred frames). 0 for identical waves; symmetric."""
    pred, target = _check_pair(pred, target)
    p = stft_magnitude(pred, n_fft, hop, n_fft).square().clamp_min(_POWER_FLOOR)
    t = stft_magnitude(target, n_fft, hop, n_fft).square().clamp_min(_POWER_FLOOR)
    diff_db = 10.0 * (t.log10() - p.log10())  # (B, bins, frames)
    per_frame = diff_db.square().mean(dim=1).sqrt()
    return per_frame.mean(dim=1)


# --- analysis of one sound ------------------------------------------------------------------


def _as_wave(wave: np.ndarray | Tensor) -> Tensor:
    """One mono sound as a float64 (S,) tensor."""
    wave = wave.detach().cpu() if isinstance(wave, Tensor) else torch.as_tensor(np.asarray(wave))
    if wave.dim() != 1:
        raise ValueError(f"wave must be one mono sound of shape (S,), got {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise ValueError("wave is empty")
    return wave.double()


def _frames(wave: Tensor, n_fft: int, hop: int) -> Tensor:
    """(S,) -> (bins, frames) STFT magnitude; short waves are zero-padded to one window."""
    if wave.numel() <= n_fft // 2:
        wave = torch.nn.functional.pad(wave, (0, n_fft // 2 + 1 - wave.numel()))
    return stft_magnitude(wave[None], n_fft, hop, n_fft)[0]


def pitch_track(
    wave: np.ndarray | Tensor,
    sample_rate: int,
    n_fft: int = 2048,
    hop: int = 256,
    f_min: float = 40.0,
    f_max: float = 5000.0,
    silence_db: float = -50.0,
    relative_db: float = -30.0,
) -> np.ndarray:
    """(S,) sound -> (frames,) dominant frequency of each frame in Hz (NaN where silent).

    Frame ``i`` is centred on sample ``i * hop``. The frequency is the STFT magnitude peak
    among bins in [f_min, f_max], refined by fitting a parabola through the log magnitude of
    the peak bin and its neighbours (accurate to a few Hz with a hann window). A frame is
    silent when its RMS is below ``silence_db`` dBFS or ``relative_db`` dB below the loudest
    frame (fades and reverb tails are not tracked).
    """
    x = _as_wave(wave)
    if sample_rate <= 0 or not 0 <= f_min < f_max:
        raise ValueError(f"pitch_track: bad sample_rate {sample_rate} or band {f_min}-{f_max}")
    mag = _frames(x, n_fft, hop)  # (bins, frames)
    window_power = torch.hann_window(n_fft, dtype=torch.float64).square().sum()
    # Parseval: sum over the two-sided spectrum of |X|^2 / n_fft = windowed energy.
    two_sided = mag.square().sum(0) * 2 - mag[0].square() - mag[-1].square()
    rms = (two_sided / n_fft / window_power).sqrt()
    level_db = 20.0 * torch.log10(rms.clamp_min(1e-12))
    silent = (level_db < silence_db) | (level_db < level_db.max() + relative_db)

    freqs = torch.arange(mag.shape[0], dtype=torch.float64) * sample_rate / n_fft
    band = (freqs >= f_min) & (freqs <= min(f_max, sample_rate / 2))
    if not band.any():
        raise ValueError(f"pitch_track: no STFT bin lies in {f_min}-{f_max} Hz")
    masked = mag.masked_fill(~band[:, None], -1.0)
    peak = masked.argmax(0)  # (frames,)
    log_mag = mag.clamp_min(1e-12).log()
    inner = (peak > 0) & (peak < mag.shape[0] - 1)
    lo = log_mag.gather(0, (peak - 1).clamp_min(0)[None])[0]
    mid = log_mag.gather(0, peak[None])[0]
    hi = log_mag.gather(0, (peak + 1).clamp_max(mag.shape[0] - 1)[None])[0]
    curvature = lo - 2 * mid + hi
    # Vertex of the parabola through (-1, lo), (0, mid), (1, hi); |offset| <= 0.5 at a maximum.
    offset = torch.where(
        inner & (curvature < 0), 0.5 * (lo - hi) / curvature.clamp_max(-1e-12), 0.0
    ).clamp(-0.5, 0.5)
    pitch = (peak.double() + offset) * sample_rate / n_fft
    pitch[silent] = math.nan
    return pitch.numpy()


def median_pitch(wave: np.ndarray | Tensor, sample_rate: int, **track: float) -> float:
    """Median of :func:`pitch_track` over the non-silent frames, Hz (NaN if all silent)."""
    pitch = pitch_track(wave, sample_rate, **track)  # type: ignore[arg-type]
    voiced = pitch[~np.isnan(pitch)]
    return float(np.median(voiced)) if voiced.size else math.nan


def pitch_slope(wave: np.ndarray | Tensor, sample_rate: int, **track: float) -> float:
    """Least-squares slope of ``log2(pitch)`` against time over the non-silent frames of
    :func:`pitch_track`: octaves per second, positive for a rising sound (NaN with fewer than
    two non-silent frames)."""
    hop = int(track.get("hop", 256))
    pitch = pitch_track(wave, sample_rate, **track)  # type: ignore[arg-type]
    voiced = ~np.isnan(pitch)
    if voiced.sum() < 2:
        return math.nan
    times = np.arange(pitch.size)[voiced] * hop / sample_rate
    octaves = np.log2(pitch[voiced])
    slope, _ = np.polyfit(times, octaves, 1)
    return float(slope)


def onset_rate(
    wave: np.ndarray | Tensor,
    sample_rate: int,
    mel: MelSettings | None = None,
    threshold: float = 0.5,
    min_gap_s: float = 0.05,
    top_db: float = 60.0,
) -> float:
    """Onsets per second of a sound (by its whole duration).

    Spectral flux on the log-mel ``L`` of ``mel`` (default :class:`MelSettings`; the sound is
    resampled to its rate), clamped to ``top_db`` dB below its maximum so that leakage far
    below the sound does not count: ``flux[t] = mean over bands of max(0, L[t] - L[t-1])`` in
    natural-log units, with a floor-level frame before the first (a sound that starts at once
    is an onset). An onset is a frame whose flux is at least ``threshold`` above the median
    flux (0.5: a tone that appears in 1 band of 64 from 60 dB below gives about 2) and the
    largest within ``min_gap_s`` either side (50 ms, about 3 frames at hop 256: one hit counts
    once, while 10 hits a second still count apart). Stationary noise has a small steady flux
    and gives one onset, its start. The last 10 ms are faded out first: a sound cut off
    mid-cycle gets a kink from the reflect padding, and an abrupt end is not an onset.
    """
    x = _as_wave(wave).float()
    mel = mel or MelSettings()
    x = mel.resample(x, sample_rate).clone()
    fade = min(x.numel(), round(0.01 * mel.sample_rate))
    x[x.numel() - fade :] *= torch.linspace(1.0, 0.0, fade)
    log_mel = mel.log_mel(x)  # (n_mels, frames)
    floor = (log_mel.max() - top_db / 20.0 * math.log(10.0)).clamp_min(mel.silence)
    log_mel = log_mel.clamp_min(floor)
    padded = torch.cat([floor.expand(log_mel.shape[0], 1), log_mel], dim=1)
    flux = padded.diff(dim=1).clamp_min(0).mean(0).double().numpy()  # (frames,)
    gap = max(1, round(min_gap_s * mel.frames_per_second))
    level = float(np.median(flux)) + threshold
    onsets = 0
    for t, value in enumerate(flux):
        if value < level:
            continue
        start = max(0, t - gap)
        neighbourhood = flux[start : t + gap + 1]
        # The first frame of a plateau wins ties, so a flat peak counts once.
        if start + int(np.argmax(neighbourhood)) == t:
            onsets += 1
    return onsets / (x.numel() / mel.sample_rate)


def spectral_flatness(
    wave: np.ndarray | Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 256
) -> float:
    """Median over non-silent frames of the spectral flatness (geometric / arithmetic mean of
    the power spectrum, in [0, 1]): near 0 for a tone, about 0.5 or more for white noise
    (NaN if all frames are silent). ``sample_rate`` only sets which frames are silent via
    :func:`pitch_track`'s rule."""
    x = _as_wave(wave)
    power = _frames(x, n_fft, hop).square().clamp_min(1e-20)
    flatness = power.log().mean(0).exp() / power.mean(0)
    voiced = ~np.isnan(pitch_track(x, sample_rate, n_fft=n_fft, hop=hop))
    values = flatness.numpy()[voiced]
    return float(np.median(values)) if values.size else math.nan


# --- prompt adherence: an evaluator trained on real synthetic sounds -------------------------
class SoundEvaluator(Configurable, nn.Module):
    """A small CNN that names the synthetic-sound caption of a log-mel (prompt adherence) and
    whose pooled features give a Fréchet distance (as Inception features do for images).

    Input: (B, n_mels, F) log-mels of ``mel`` settings, any F >= 16. Four stride-2 conv
    stages see local time-frequency slopes (a chirp's direction) and onset density (a
    beat's rate); mean and max pooling over the map make the features length-independent.
    """

    def __init__(self, mel: Mapping[str, Any] | None = None, width: int = 24,
                 classes: Sequence[str] = SOUND_CAPTIONS) -> None:  # fmt: skip
        super().__init__()
        self.mel = MelSettings.from_dict(mel)
        self.classes = tuple(classes)
        layers: list[nn.Module] = []
        channels = 1
        for stage in range(4):
            out = width * 2 ** min(stage, 2)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(4, out),
                       nn.SiLU()]  # fmt: skip
            channels = out
        self.features_net = nn.Sequential(*layers)
        self.feature_dim = 2 * channels
        self.head = nn.Linear(self.feature_dim, len(self.classes))

    def features(self, log_mel: Tensor) -> Tensor:
        """(B, n_mels, F) log-mel -> (B, feature_dim) pooled features."""
        x = (log_mel.float() - self.mel.silence / 2) / 3.0  # roughly centred, unit-ish spread
        h = self.features_net(x[:, None])
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

    def forward(self, log_mel: Tensor) -> Tensor:
        """(B, n_mels, F) -> (B, classes) logits."""
        return self.head(self.features(log_mel))


def real_sounds(count: int, seed: int = 0, seconds: float = 2.0,
                mel: MelSettings | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``count`` synthetic sounds, the classes in turn: waves (count, S) and labels (count,)."""
    mel = mel or MelSettings()
    rng = np.random.default_rng(seed)
    labels = torch.arange(count) % len(SOUND_CAPTIONS)
    waves = [render(SOUND_CAPTIONS[int(k)], rng, seconds, mel.sample_rate) for k in labels]
    return torch.from_numpy(np.stack(waves)).float(), labels


def train_evaluator(out: str | os.PathLike[str], *, steps: int = 400, count: int = 1200,
                    seed: int = 0, log: Any = print) -> SoundEvaluator:  # fmt: skip
    """Train the evaluator on ``count`` fresh synthetic sounds and save it to ``out``; reports
    held-out accuracy. Augmentation: random gain, length crops and, on 70 % of the sounds, a
    white-noise floor 60-25 dB below full scale (mixed in the magnitude domain), so that a
    generator's background hiss does not hide what the sound is."""
    torch.manual_seed(seed)
    mel = MelSettings()
    waves, labels = real_sounds(count, seed=seed)
    log_mels = mel.log_mel(waves)
    model = SoundEvaluator(mel.to_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    frames = log_mels.shape[-1]
    noise_mels = mel.log_mel(torch.randn(64, waves.shape[-1], generator=generator))
    for step in range(steps):
        idx = torch.randint(0, count, (64,), generator=generator)
        length = int(torch.randint(frames // 2, frames + 1, (1,), generator=generator))
        start = int(torch.randint(0, frames - length + 1, (1,), generator=generator))
        gain = torch.empty(64, 1, 1).uniform_(-1.5, 1.0, generator=generator)  # log-amplitude
        batch = (log_mels[idx, :, start : start + length] + gain).clamp_min(mel.silence)
        floor = torch.empty(64, 1, 1).uniform_(math.log(5e-4), math.log(5e-2), generator=generator)
        noisy = torch.rand(64, 1, 1, generator=generator) < 0.7
        hiss = noise_mels[:, :, start : start + length] + floor
        batch = torch.where(noisy, torch.logaddexp(batch, hiss), batch)
        loss = F.cross_entropy(model(batch), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    held_out, held_labels = real_sounds(240, seed=seed + 1)
    accuracy = evaluator_accuracy(model, held_out, held_labels)
    log(f"held-out accuracy {accuracy:.3f}")
    save_pretrained(model, out)
    return model


@torch.no_grad()
def evaluator_accuracy(model: SoundEvaluator, waves: Tensor, labels: Tensor) -> float:
    """Share of ``waves`` (N, S) classified as ``labels`` (N,)."""
    logits = model(model.mel.log_mel(waves))
    return float((logits.argmax(1) == labels).float().mean())


_BUNDLED_EVALUATOR = Path(__file__).resolve().parent / "bundled" / "evaluator"


def load_evaluator(folder: str | os.PathLike[str] | None = None) -> SoundEvaluator:
    """A trained :class:`SoundEvaluator` (None: the bundled one)."""
    model = from_pretrained(_BUNDLED_EVALUATOR if folder is None else folder)
    if not isinstance(model, SoundEvaluator):
        raise ValueError(f"{folder} is not a SoundEvaluator checkpoint")
    return model.eval()


def _evaluator_mels(model: SoundEvaluator, waves: Tensor | Sequence[Tensor],
                    sample_rate: int) -> Tensor:  # fmt: skip
    if not isinstance(waves, Tensor):
        length = max(w.shape[-1] for w in waves)
        waves = torch.stack([F.pad(w.float(), (0, length - w.shape[-1])) for w in waves])
    return model.mel.log_mel(model.mel.resample(waves.float(), sample_rate))


@torch.no_grad()
def prompt_adherence(waves: Tensor | Sequence[Tensor], prompts: Sequence[str],
                     sample_rate: int = 16_000,
                     evaluator: SoundEvaluator | None = None) -> dict[str, float]:  # fmt: skip
    """Share of sounds the evaluator names with their prompt: ``{"accuracy": ...,
    "<prompt>": accuracy of that prompt's sounds, ...}``; prompts must be evaluator classes."""
    model = evaluator or load_evaluator()
    unknown = sorted(set(prompts) - set(model.classes))
    if unknown:
        raise ValueError(f"prompt(s) {unknown} are not evaluator classes: {model.classes}")
    predicted = model(_evaluator_mels(model, waves, sample_rate)).argmax(1).tolist()
    hits = [model.classes[p] == prompt for p, prompt in zip(predicted, prompts, strict=True)]
    report = {"accuracy": float(np.mean(hits))}
    for prompt in dict.fromkeys(prompts):
        report[prompt] = float(
            np.mean([h for h, q in zip(hits, prompts, strict=True) if q == prompt])
        )
    return report


@torch.no_grad()
def sound_frechet_distance(waves_a: Tensor | Sequence[Tensor], waves_b: Tensor | Sequence[Tensor],
                           sample_rate: int = 16_000,
                           evaluator: SoundEvaluator | None = None) -> float:  # fmt: skip
    """Fréchet distance between two sets of sounds in the evaluator's feature space."""
    model = evaluator or load_evaluator()
    features_a = model.features(_evaluator_mels(model, waves_a, sample_rate))
    features_b = model.features(_evaluator_mels(model, waves_b, sample_rate))
    return frechet_distance(features_a.numpy(), features_b.numpy())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m polydiff.audio.metrics --train-evaluator DIR``: reproduce the bundled one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m polydiff.audio.metrics")
    parser.add_argument("--train-evaluator", metavar="DIR", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_evaluator(args.train_evaluator, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    # Run from the imported module, so the checkpoint records the class as
    # "polydiff.audio.metrics:SoundEvaluator" rather than "__main__:SoundEvaluator".
    from polydiff.audio.metrics import main as _main

    raise SystemExit(_main())
