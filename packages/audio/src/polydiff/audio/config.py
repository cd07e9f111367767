"""The ``model:`` section of an audio config: :class:`AudioConfig`, a pydantic schema.

Every key is optional (defaults below), plus the denoising keys every modality shares (text
encoder, schedule, prediction, weighting, CFG dropout, sampling defaults:
:class:`polydiff.core.modality.schema.DenoisingSchema`)::

    kind: dit               # dit | unet (mel denoisers) | vocoder (the neural vocoder, a GAN)
    mel: {sample_rate: 16000, n_fft: 1024, win_length: 1024, hop_length: 256, n_mels: 64,
          f_min: 0.0, f_max: 8000.0, log_floor: 1.0e-5}
                            # one MelSettings for the denoiser, both vocoders and the metrics
    seconds: 2.0            # training segment; shorter sounds are padded (valid mask)
    conditioning: text      # text (the text encoder) | clap (CLAP embeddings: audio ones at
                            # training, so captions are not needed; text ones at sampling)
    clap: null              # a CLAP model: a transformers folder or a LAION .pt file
                            # (needed by conditioning clap; the default of --rerank)
    vocoder: null           # denoisers: a trained vocoder's final/ folder, carried in the
                            # checkpoint (null: Griffin-Lim only)
    dit: {patch: 4, dim: 192, depth: 6, heads: 6, mlp_ratio: 4.0, qk_norm: true,
          rope_theta: 10000.0}                       # kind dit: tokens of `patch` frames
    unet: {base_channels: 32, channel_mult: [1, 2, 2], num_res_blocks: 1,
           attention_levels: [2], heads: 4, dropout: 0.0}   # kind unet: the mel as an image
    gan: {segment_seconds: 0.5, dim: 128, intermediate: 384, layers: 6,
          periods: [2, 3, 5, 7, 11], discriminator_channels: 8,
          mel_weight: 45.0, feature_weight: 2.0, adversarial_weight: 1.0, stft_weight: 45.0,
          adversarial_start: 0}
                            # kind vocoder

Each kind reads only its section (``KIND_SECTIONS``); another is refused. Denoisers train on
``segment_frames`` frames: the frames of ``seconds``, rounded up to the network's multiple.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from polydiff.core.modality.schema import (
    IntList,
    KindSchema,
    ModelSchema,
    Number,
    OneOf,
    Problem,
    Text,
    TransformerSchema,
    UNetSchema,
)

from .mel import MelSettings

__all__ = [
    "CONDITIONINGS",
    "KINDS",
    "KIND_SECTIONS",
    "AudioConfig",
    "DiTSection",
    "GanSection",
    "MelSection",
    "UNetSection",
    "frame_multiple",
    "mel_settings",
    "segment_frames",
]

KINDS: tuple[str, ...] = ("dit", "unet", "vocoder")
SECTIONS: tuple[str, ...] = ("dit", "unet", "gan")
KIND_SECTIONS: dict[str, tuple[str, ...]] = {
    "dit": ("dit",),
    "unet": ("unet",),
    "vocoder": ("gan",),
}
CONDITIONINGS: tuple[str, ...] = ("text", "clap")

_KIND = OneOf(KINDS)
_Path = Annotated[str, Text("a folder or file path", empty=False)]


class MelSection(ModelSchema):
    """``mel:``: :class:`polydiff.audio.mel.MelSettings`, checked as a whole."""

    sample_rate: Annotated[int, Number(1000)] = 16_000
    n_fft: Annotated[int, Number(16)] = 1024
    win_length: Annotated[int, Number(16)] = 1024
    hop_length: Annotated[int, Number(1)] = 256
    n_mels: Annotated[int, Number(1)] = 64
    f_min: Annotated[float, Number(0.0)] = 0.0
    f_max: Annotated[float, Number(1.0)] = 8_000.0
    log_floor: Annotated[float, Number(1e-12)] = 1e-5

    @model_validator(mode="after")
    def _consistent(self) -> MelSection:
        try:
            MelSettings(**self.model_dump())
        except ValueError as e:
            raise Problem(str(e).removeprefix("mel: ")) from e
        return self


class DiTSection(TransformerSchema):
    """``dit:``: a DiT over tokens of ``patch`` mel frames (all bands), 1D rotary positions."""

    patch: Annotated[int, Number(1)] = 4
    rope_theta: Annotated[float, Number(1.0)] = 10000.0

    @model_validator(mode="after")
    def _head_dim(self) -> DiTSection:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise Problem("dim / heads must be an even integer (1D rotary)", "heads")
        return self


class UNetSection(UNetSchema):
    """``unet:``: a 2D U-Net over the (1, n_mels, frames) mel image."""

    channel_mult: Annotated[list[int], IntList(1)] = Field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: Annotated[int, Number(1)] = 1
    attention_levels: Annotated[list[int], IntList(0)] = Field(default_factory=lambda: [2])


class GanSection(ModelSchema):
    """``gan:`` (kind vocoder): the neural vocoder, its discriminators and loss weights."""

    segment_seconds: Annotated[float, Number(0.05)] = 0.5
    dim: Annotated[int, Number(1)] = 128
    intermediate: Annotated[int, Number(1)] = 384
    layers: Annotated[int, Number(1)] = 6
    periods: Annotated[list[int], IntList(2)] = Field(default_factory=lambda: [2, 3, 5, 7, 11])
    discriminator_channels: Annotated[int, Number(1)] = 8
    mel_weight: Annotated[float, Number(0.0)] = 45.0
    feature_weight: Annotated[float, Number(0.0)] = 2.0
    adversarial_weight: Annotated[float, Number(0.0)] = 1.0
    stft_weight: Annotated[float, Number(0.0)] = 45.0
    #: Discriminator updates before the adversarial phase: until then the generator learns
    #: from mel + STFT alone and the discriminators idle (Parallel WaveGAN's schedule).
    adversarial_start: Annotated[int, Number(0)] = 0


class AudioConfig(KindSchema):
    """The audio ``model:`` section (see the module doc)."""

    kind: Annotated[str, _KIND] = "dit"
    mel: MelSection = Field(default_factory=MelSection)
    seconds: Annotated[float, Number(0.1)] = 2.0
    conditioning: Annotated[str, OneOf(CONDITIONINGS)] = "text"
    clap: _Path | None = None
    vocoder: _Path | None = None
    dit: DiTSection | None = None
    unet: UNetSection | None = None
    gan: GanSection | None = None

    kind_sections: ClassVar[Mapping[str, tuple[str, ...]]] = KIND_SECTIONS

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = super().prepare(data)
        if data.get("kind", "dit") == "vocoder" and data.get("vocoder") is not None:
            raise Problem("a vocoder run trains the vocoder; remove it", "vocoder")
        return data

    @model_validator(mode="after")
    def _fits(self) -> AudioConfig:
        if self.conditioning == "clap" and self.clap is None:
            raise Problem("conditioning clap needs a CLAP model (folder or .pt)", "clap")
        if self.unet is not None:
            factor = self.unet.downsample_factor
            if self.mel.n_mels % factor:
                raise Problem(
                    f"n_mels {self.mel.n_mels} is not divisible by the U-Net's factor {factor}",
                    "unet",
                )
        return self


def mel_settings(config: Mapping[str, Any]) -> MelSettings:
    """The MelSettings of a validated audio config."""
    return MelSettings.from_dict(config["mel"])


def frame_multiple(config: Mapping[str, Any]) -> int:
    """What a denoiser's frame count must be divisible by (DiT patch, U-Net downsampling)."""
    if config["kind"] == "dit":
        return int(config["dit"]["patch"])
    if config["kind"] == "unet":
        return 2 ** (len(config["unet"]["channel_mult"]) - 1)
    return 1


def segment_frames(config: Mapping[str, Any], seconds: float | None = None) -> int:
    """Frames of ``seconds`` (default: the training ``seconds``; a vocoder: its
    ``gan.segment_seconds``) rounded up to :func:`frame_multiple`."""
    if seconds is None:
        gan = config.get("gan")
        seconds = float(gan["segment_seconds"] if gan else config["seconds"])
    frames = mel_settings(config).frames_for_seconds(float(seconds))
    multiple = frame_multiple(config)
    return math.ceil(frames / multiple) * multiple
