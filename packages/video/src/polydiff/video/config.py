"""The ``model:`` section of a video config: :class:`VideoConfig`, a pydantic schema.

Every key is optional (defaults below), plus the denoising keys every modality shares
(schedule, prediction, text encoder, CFG dropout, sampling defaults:
:class:`polydiff.core.modality.schema.DenoisingSchema`)::

    frames: 16              # clip length (frames) when no buckets are given
    height: 32              # frame size in pixels
    width: 32
    fps: 8                  # clips are sampled at this frame rate from any source rate
    channels: 3             # 3 = RGB, 1 = grey
    buckets: null           # or [[frames, height, width], ...]: variable duration / size
    decoder: auto           # auto (decord, PyAV fallback) | decord | pyav
    first_frame_prob: 0.25  # image-to-video training: share of clips given their first frame
    autoencoder: null       # or the final/ folder of a trained autoencoder: latent diffusion
    dit: {patch: [2, 4, 4], dim: 192, depth: 6, heads: 6, mlp_ratio: 4.0, qk_norm: true,
          attention: full, rope_theta: 10000.0, absolute_positions: true}
                            # attention: full | factorised; absolute_positions: sin-cos
                            # (t, h, w) added to the tokens, besides the rotary offsets

In pixel space every (frames, height, width) must be divisible by ``dit.patch``; with an
autoencoder its latent sizes are checked when it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from polydiff.core.blocks.dit import ATTENTION_LAYOUTS
from polydiff.core.modality.schema import (
    DenoisingSchema,
    Flag,
    IntList,
    Number,
    OneOf,
    Probability,
    Problem,
    Text,
    TransformerSchema,
    defaults,
)

from .data import DECODERS

__all__ = [
    "DEFAULTS",
    "DIT_DEFAULTS",
    "DiTSection",
    "VideoConfig",
    "indivisible",
]

_Checkpoint = Annotated[str, Text("null (pixels) or a checkpoint folder", empty=False)]


def indivisible(sizes: Sequence[Sequence[int]], patch: Sequence[int]) -> tuple[str, str] | None:
    """The first of frames / height / width of ``sizes`` that ``patch`` does not divide, and
    the problem in words; None when every size is divisible."""
    for size in sizes:
        for value, p, what in zip(size, patch, ("frames", "height", "width"), strict=True):
            if value % p:
                return what, f"{what} {value} of {list(size)} is not divisible by dit.patch {patch}"
    return None


class DiTSection(TransformerSchema):
    """``dit:``: the spacetime-patch DiT with 3D rotary offsets."""

    patch: Annotated[list[int], IntList(1, length=3)] = Field(default_factory=lambda: [2, 4, 4])
    attention: Annotated[str, OneOf(ATTENTION_LAYOUTS)] = "full"
    rope_theta: Annotated[float, Number(1.0)] = 10000.0
    absolute_positions: Flag = True

    @model_validator(mode="after")
    def _rotary_head_dim(self) -> DiTSection:
        self.rotary_head_dim(3)
        return self


class VideoConfig(DenoisingSchema):
    """The video ``model:`` section (see the module doc)."""

    frames: Annotated[int, Number(1)] = 16
    height: Annotated[int, Number(1)] = 32
    width: Annotated[int, Number(1)] = 32
    fps: Annotated[float, Number(1)] = 8
    channels: Annotated[int, OneOf((1, 3), "1 (grey) or 3 (RGB)")] = 3
    buckets: list[Annotated[list[int], IntList(1, length=3)]] | None = None
    decoder: Annotated[str, OneOf(DECODERS)] = "auto"
    first_frame_prob: Probability = 0.25
    autoencoder: _Checkpoint | None = None
    dit: DiTSection = Field(default_factory=DiTSection)

    @field_validator("buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> list[Any] | None:
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not value:
            raise Problem("expected a non-empty list of [frames, height, width]")
        return list(value)  # each bucket is checked as an item of the list

    @model_validator(mode="after")
    def _patch_divides_the_sizes(self) -> VideoConfig:
        if self.autoencoder is None:  # latent sizes are checked when it is loaded
            sizes = self.buckets or [[self.frames, self.height, self.width]]
            found = indivisible(sizes, self.dit.patch)
            if found is not None:
                what, problem = found
                raise Problem(problem, "buckets" if self.buckets else what)
        return self


DEFAULTS: dict[str, Any] = {k: v for k, v in defaults(VideoConfig).items() if k != "dit"}
DIT_DEFAULTS: dict[str, Any] = defaults(DiTSection)
