"""The one mel-settings object: the denoiser, both vocoders and the metrics all read it.

Defaults (:class:`MelSettings`): 16 kHz mono, ``n_fft`` 1024 (64 ms windows), hop 256
(16 ms, 62.5 frames a second), 64 mel bands over 0-8 kHz, Slaney mel scale and area
normalisation (librosa's and HiFi-GAN's), magnitude (not power) spectra, natural log with a
floor of 1e-5 (-11.5). AudioLDM uses hop 160 and HiFi-GAN 80 bands at 22.05 kHz; hop 256 is
chosen here because it makes 37 % fewer frames than 160 for the denoiser to model, on CPUs.

Frames are centred (``center=True``, reflect padding): a wave of ``S`` samples gives
``S // hop + 1`` frames, and ``F`` frames are vocoded to ``(F - 1) * hop`` samples
(:meth:`MelSettings.samples`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import torch
import torchaudio
from torch import Tensor

__all__ = ["MelSettings"]


@dataclass(frozen=True)
class MelSettings:
    """How a wave becomes a log-mel spectrogram (see the module doc for the defaults' why).

    Attributes:
        sample_rate: Hz; every wave is resampled to it. n_fft, win_length, hop_length: the
        STFT, in samples. n_mels: mel bands over [f_min, f_max] Hz. log_floor: magnitudes
        are clamped to it before the natural log.
    """

    sample_rate: int = 16_000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8_000.0
    log_floor: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"mel: win_length must be in (0, n_fft], got {self.win_length}")
        if not 0 < self.hop_length <= self.win_length:
            raise ValueError(f"mel: hop_length must be in (0, win_length], got {self.hop_length}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(
                f"mel: need 0 <= f_min < f_max <= sample_rate / 2, got {self.f_min}, {self.f_max}"
            )
        if self.n_mels < 1 or self.log_floor <= 0:
            raise ValueError("mel: n_mels must be >= 1 and log_floor > 0")

    # --- records -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (model configs and checkpoints record them)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | None) -> MelSettings:
        """Settings from :meth:`to_dict` (None: the defaults); unknown keys are refused."""
        record = dict(record or {})
        unknown = set(record) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"mel: unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**record)

    # --- sizes ---------------------------------------------------------------------------
    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def frames(self, num_samples: int) -> int:
        """Frames of a wave of ``num_samples`` samples (centred frames)."""
        return num_samples // self.hop_length + 1

    def samples(self, num_frames: int) -> int:
        """Samples a vocoder makes of ``num_frames`` frames."""
        return max(0, num_frames - 1) * self.hop_length

    def frames_for_seconds(self, seconds: float) -> int:
        """The fewest frames whose vocoded samples cover ``seconds`` of sound."""
        return math.ceil(round(seconds * self.sample_rate) / self.hop_length) + 1

    # --- transforms ----------------------------------------------------------------------
    @cached_property
    def _mel_transform(self) -> torchaudio.transforms.MelSpectrogram:
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            power=1.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )

    def mel_filters(self) -> Tensor:
        """(n_fft // 2 + 1, n_mels) the mel filterbank (linear magnitude -> mel)."""
        return self._mel_transform.mel_scale.fb.clone()

    def mel(self, wave: Tensor) -> Tensor:
        """(..., S) wave in [-1, 1] at ``sample_rate`` -> (..., n_mels, S // hop + 1) linear
        mel magnitudes (float32, on the wave's device; differentiable)."""
        transform = self._mel_transform.to(wave.device)
        return transform(wave.float())

    def log_mel(self, wave: Tensor) -> Tensor:
        """(..., S) wave -> (..., n_mels, S // hop + 1) natural-log mel magnitudes."""
        return self.log(self.mel(wave))

    def log(self, mel: Tensor) -> Tensor:
        """Linear mel magnitudes -> the log-mel every part of polydiff.audio works in."""
        return torch.log(mel.clamp_min(self.log_floor))

    @property
    def silence(self) -> float:
        """The log-mel value of silence (``log(log_floor)``)."""
        return math.log(self.log_floor)

    def resample(self, wave: Tensor, rate: int) -> Tensor:
        """(..., S) at ``rate`` Hz -> (..., S') at ``sample_rate`` (windowed-sinc, torchaudio)."""
        if int(rate) == self.sample_rate:
            return wave
        return torchaudio.functional.resample(wave, int(rate), self.sample_rate)
