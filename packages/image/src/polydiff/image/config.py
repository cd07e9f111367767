"""The ``model:`` section of an image config: :class:`ImageConfig`, a pydantic schema.

Every key is optional (defaults below), plus the denoising keys every modality shares (text
encoder, schedule, prediction, weighting, CFG dropout, sampling defaults, gradient
checkpointing: :class:`polydiff.core.modality.schema.DenoisingSchema`)::

    kind: unet              # unet | dit (pixel denoisers) | latent_dit | autoencoder
    image_size: 16          # square side in pixels; samples are centre-cropped and resized
    channels: 1             # 1 = grayscale, 3 = RGB
    unet: {base_channels: 32, channel_mult: [1, 2], num_res_blocks: 2,
           attention_levels: [1], heads: 4, dropout: 0.0}              # kind unet
    dit: {patch: 2, dim: 192, depth: 6, heads: 6, mlp_ratio: 4.0,
          qk_norm: true}                                               # kinds dit, latent_dit
    autoencoder: {latent_channels: 4, base_channels: 32, channel_mult: [1, 2],
                  kl_weight: 1.0e-4}                                   # kind autoencoder
    autoencoder: path/to/autoencoder/final                             # kind latent_dit

Each kind reads only its sections (``KIND_SECTIONS``): another section is refused, and the
validated config holds exactly the kind's sections. In kind latent_dit ``dit.patch`` defaults
to 1 (latents are already small) and the image side is checked against the autoencoder when
it is loaded; the other kinds check it against their downsampling here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Annotated, Any, ClassVar

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from polydiff.core.modality.schema import (
    IntList,
    KindSchema,
    ModelSchema,
    Number,
    OneOf,
    Problem,
    TransformerSchema,
    UNetSchema,
    defaults,
)

__all__ = [
    "DEFAULTS",
    "KINDS",
    "KIND_SECTIONS",
    "LATENT_DIT_DEFAULTS",
    "SECTIONS",
    "SECTION_DEFAULTS",
    "AutoencoderSection",
    "DiTSection",
    "ImageConfig",
    "UNetSection",
]

KINDS: tuple[str, ...] = ("unet", "dit", "latent_dit", "autoencoder")
SECTIONS: tuple[str, ...] = ("unet", "dit", "autoencoder")
#: Which sections each kind reads; any other section is a mistake and is refused.
KIND_SECTIONS: dict[str, tuple[str, ...]] = {
    "unet": ("unet",),
    "dit": ("dit",),
    "latent_dit": ("dit", "autoencoder"),
    "autoencoder": ("autoencoder",),
}
#: What kind latent_dit changes in the ``dit`` defaults: one token per latent pixel.
LATENT_DIT_DEFAULTS: dict[str, Any] = {"patch": 1}

_KIND = OneOf(KINDS)
_NEEDS_AUTOENCODER = (
    "kind latent_dit needs the path of a trained autoencoder checkpoint "
    "(the final/ folder of a kind: autoencoder run)"
)


def _levels(value: list[int]) -> list[int]:
    if not value:
        raise Problem("needs at least one level")
    return value


class UNetSection(UNetSchema):
    """``unet:`` (kind unet): a pixel U-Net."""


class DiTSection(TransformerSchema):
    """``dit:`` (kinds dit and latent_dit): a DiT on square patches with 2D rotary offsets."""

    patch: Annotated[int, Number(1)] = 2

    @model_validator(mode="after")
    def _rotary_head_dim(self) -> DiTSection:
        self.rotary_head_dim(2)
        return self


class AutoencoderSection(ModelSchema):
    """``autoencoder:`` (kind autoencoder): a KL autoencoder for latent diffusion."""

    latent_channels: Annotated[int, Number(1)] = 4
    base_channels: Annotated[int, Number(1)] = 32
    channel_mult: Annotated[list[int], IntList(1)] = Field(default_factory=lambda: [1, 2])
    kl_weight: Annotated[float, Number(0.0)] = 1.0e-4

    _channel_mult = field_validator("channel_mult")(_levels)


class ImageConfig(KindSchema):
    """The image ``model:`` section (see the module doc)."""

    kind: Annotated[str, _KIND] = "unet"
    image_size: Annotated[int, Number(1)] = 16
    channels: Annotated[int, OneOf((1, 3), "1 (grayscale) or 3 (RGB)")] = 1
    unet: UNetSection | None = None
    dit: DiTSection | None = None
    #: A section (kind autoencoder) or a checkpoint folder (kind latent_dit).
    autoencoder: AutoencoderSection | str | None = None

    kind_sections: ClassVar[Mapping[str, tuple[str, ...]]] = KIND_SECTIONS

    @classmethod
    def prepare_section(cls, kind: str, section: str, given: Any) -> Any:
        """Kind latent_dit: ``autoencoder`` is a checkpoint path and ``dit`` defaults to
        ``LATENT_DIT_DEFAULTS``."""
        if kind == "latent_dit" and section == "autoencoder":
            if not isinstance(given, str | PurePath) or not str(given):
                raise Problem(_NEEDS_AUTOENCODER, "autoencoder")
            return str(given)
        given = super().prepare_section(kind, section, given)
        if kind == "latent_dit" and section == "dit":
            return {**LATENT_DIT_DEFAULTS, **given}
        return given

    @field_validator("autoencoder", mode="wrap")
    @classmethod
    def _section_or_path(cls, value: Any, handler: Any) -> Any:
        # ``prepare`` chose by kind; a union would name its members in error locations.
        if value is None or isinstance(value, str):
            return value
        return AutoencoderSection.model_validate(value)

    @property
    def downsample_factor(self) -> int:
        """What the image side must be divisible by (known before loading anything)."""
        if self.unet is not None:
            return self.unet.downsample_factor
        if isinstance(self.autoencoder, AutoencoderSection):
            return 2 ** (len(self.autoencoder.channel_mult) - 1)
        if self.kind == "dit" and self.dit is not None:
            return self.dit.patch
        return 1  # latent_dit: checked against the autoencoder when it is loaded

    @model_validator(mode="after")
    def _image_size_fits(self) -> ImageConfig:
        factor = self.downsample_factor
        if self.image_size % factor:
            raise Problem(f"{self.image_size} is not divisible by {factor}", "image_size")
        return self


#: The top-level defaults (sections aside: ``SECTION_DEFAULTS``).
DEFAULTS: dict[str, Any] = {k: v for k, v in defaults(ImageConfig).items() if k not in SECTIONS}
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": defaults(UNetSection),
    "dit": defaults(DiTSection),
    "autoencoder": defaults(AutoencoderSection),
}
