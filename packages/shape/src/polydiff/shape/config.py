"""The ``model:`` section of a shape config: :class:`ShapeConfig`, a pydantic schema.

Every key is optional (defaults below), plus the denoising keys every modality shares (text
encoder, schedule, prediction, weighting, CFG dropout, sampling defaults:
:class:`polydiff.core.modality.schema.DenoisingSchema`)::

    kind: points            # points (point-cloud diffusion) | autoencoder (the point
                            # autoencoder with its occupancy field) | latent (diffusion over
                            # the autoencoder's latents)
    points: 2048            # surface points per training shape
    sample_points: null     # the default --points (null: points)
    queries: 2048           # occupancy query points per shape (kind autoencoder)
    normalize: sphere       # sphere (farthest point at radius 1) | box (largest extent 2),
                            # about the bounding-box centre; the same at export
    conditioning: text      # text (the text encoder) | label (one class per prompt)
    classes: []             # conditioning label: the class names (the prompts it accepts)
    mesh_resolution: 64     # marching-cubes grid per axis for --mesh (kinds latent, points)
    dit: {dim: 192, depth: 6, heads: 6, mlp_ratio: 4.0, qk_norm: true}   # kinds points, latent
    autoencoder: {latents: 32, latent_channels: 8, dim: 128, heads: 4, encoder_depth: 2,
                  decoder_depth: 2, frequencies: 8, kl_weight: 1.0e-3, field_weight: 1.0,
                  points_weight: 1.0}                                    # kind autoencoder
    codec: path/to/autoencoder/final                                     # kind latent

Each kind reads only its sections (``KIND_SECTIONS``); another is refused. Kind latent needs
``codec``, the ``final/`` folder of a kind autoencoder run, which its checkpoint then carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from polydiff.core.modality.schema import (
    KindSchema,
    ModelSchema,
    Number,
    OneOf,
    Problem,
    Text,
    TransformerSchema,
)

__all__ = [
    "CONDITIONINGS",
    "KINDS",
    "KIND_SECTIONS",
    "MAX_POINTS",
    "AutoencoderSection",
    "DiTSection",
    "ShapeConfig",
]

KINDS: tuple[str, ...] = ("points", "autoencoder", "latent")
KIND_SECTIONS: dict[str, tuple[str, ...]] = {
    "points": ("dit",),
    "autoencoder": ("autoencoder",),
    "latent": ("dit",),
}
CONDITIONINGS: tuple[str, ...] = ("text", "label")
NORMALIZATIONS: tuple[str, ...] = ("sphere", "box")
#: The most points one shape may have (training or --points): attention is O(N^2) per shape.
MAX_POINTS = 16_384

_Path = Annotated[str, Text("a folder path", empty=False)]


class DiTSection(TransformerSchema):
    """``dit:``: the permutation-equivariant DiT over points (kind points) or over the latent
    set (kind latent); no positions, so token order carries nothing."""


class AutoencoderSection(ModelSchema):
    """``autoencoder:`` (kind autoencoder): the set encoder, its latent set and the two
    decoders (points and occupancy field), and the loss weights."""

    latents: Annotated[int, Number(1, 512)] = 32
    latent_channels: Annotated[int, Number(1, 256)] = 8
    dim: Annotated[int, Number(8)] = 128
    heads: Annotated[int, Number(1)] = 4
    encoder_depth: Annotated[int, Number(0)] = 2
    decoder_depth: Annotated[int, Number(0)] = 2
    frequencies: Annotated[int, Number(0, 16)] = 8
    kl_weight: Annotated[float, Number(0.0)] = 1.0e-3
    field_weight: Annotated[float, Number(0.0)] = 1.0
    points_weight: Annotated[float, Number(0.0)] = 1.0

    @model_validator(mode="after")
    def _heads(self) -> AutoencoderSection:
        if self.dim % self.heads:
            raise Problem(f"dim {self.dim} is not divisible by heads {self.heads}", "heads")
        return self


class ShapeConfig(KindSchema):
    """The shape ``model:`` section (see the module doc)."""

    kind: Annotated[str, OneOf(KINDS)] = "points"
    points: Annotated[int, Number(16, MAX_POINTS)] = 2048
    sample_points: Annotated[int, Number(16, MAX_POINTS)] | None = None
    queries: Annotated[int, Number(16, MAX_POINTS)] = 2048
    normalize: Annotated[str, OneOf(NORMALIZATIONS)] = "sphere"
    conditioning: Annotated[str, OneOf(CONDITIONINGS)] = "text"
    classes: list[Annotated[str, Text("a class name", empty=False)]] = Field(default_factory=list)
    mesh_resolution: Annotated[int, Number(8, 256)] = 64
    codec: _Path | None = None
    dit: DiTSection | None = None
    autoencoder: AutoencoderSection | None = None

    kind_sections: ClassVar[Mapping[str, tuple[str, ...]]] = KIND_SECTIONS

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = super().prepare(data)
        if data.get("kind", KINDS[0]) == "latent":
            if not data.get("codec"):
                raise Problem("kind latent needs the autoencoder's final/ folder", "codec")
        elif data.get("codec") is not None:
            raise Problem("only kind latent diffuses a codec's latents; remove it", "codec")
        return data

    @model_validator(mode="after")
    def _conditioning(self) -> ShapeConfig:
        if self.conditioning == "label":
            if not self.classes:
                raise Problem("conditioning label needs the class names", "classes")
            if len(set(self.classes)) != len(self.classes):
                raise Problem("class names must be distinct", "classes")
        elif self.classes:
            raise Problem("classes are only read by conditioning label; remove them", "classes")
        return self
