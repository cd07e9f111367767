"""The ``model:`` section of a motion config: :class:`MotionConfig`, a pydantic schema.

Every key is optional (defaults below), plus the denoising keys every modality shares (text
encoder, schedule, prediction, weighting, CFG dropout, sampling defaults:
:class:`polydiff.core.modality.schema.DenoisingSchema`); motion changes three of their
defaults to MDM's: it predicts x0, guides at 2.5 and weighs every time equally::

    length_buckets: [40, 64, 96, 128, 160, 196]   # feature frames (20 fps); a motion goes to
                                                  # the shortest bucket that holds it
    sample_seconds: 4.0      # the default --seconds
    geometric:               # weights of the losses on the x0 estimate's joints (0: off)
      positions: 1.0         #   joint positions (m^2), from the features by forward kinematics
      velocities: 1.0        #   joint velocities (m/s, squared)
      foot_contact: 1.0      #   foot speed where the data's foot is in contact ((m/s)^2)
    dit: {dim: 256, depth: 8, heads: 4, mlp_ratio: 4.0, qk_norm: true, rope_theta: 10000.0}
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from polydiff.core.modality.schema import (
    DenoisingSchema,
    IntList,
    ModelSchema,
    Number,
    OneOf,
    Problem,
    TransformerSchema,
)
from polydiff.core.objectives import WEIGHTINGS
from polydiff.core.predictions import PREDICTIONS

from .features import FPS, MAX_FRAMES, MIN_FRAMES

__all__ = ["DEFAULT_BUCKETS", "MAX_SECONDS", "DiTSection", "GeometricSection", "MotionConfig"]

DEFAULT_BUCKETS = (40, 64, 96, 128, 160, 196)
#: The longest motion one output may be (HumanML3D's 196 frames).
MAX_SECONDS = MAX_FRAMES / FPS


class DiTSection(TransformerSchema):
    """``dit:``: the transformer over frames (1D rotary and absolute positions)."""

    dim: Annotated[int, Number(8)] = 256
    depth: Annotated[int, Number(1)] = 8
    heads: Annotated[int, Number(1)] = 4
    rope_theta: Annotated[float, Number(1.0)] = 10000.0

    @model_validator(mode="after")
    def _heads(self) -> DiTSection:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise Problem("dim / heads must be an even integer (1D rotary)", "heads")
        return self


class GeometricSection(ModelSchema):
    """``geometric:``: weights of the losses on the joints of the model's x0 estimate."""

    positions: Annotated[float, Number(0.0)] = 1.0
    velocities: Annotated[float, Number(0.0)] = 1.0
    foot_contact: Annotated[float, Number(0.0)] = 1.0


class MotionConfig(DenoisingSchema):
    """The motion ``model:`` section (see the module doc)."""

    prediction: Annotated[str, OneOf(PREDICTIONS)] = "x0"
    guidance: Annotated[float, Number(0.0)] = 2.5
    weighting: Annotated[str, OneOf(WEIGHTINGS)] = "none"
    length_buckets: Annotated[list[int], IntList(MIN_FRAMES)] = Field(
        default_factory=lambda: list(DEFAULT_BUCKETS)
    )
    sample_seconds: Annotated[float, Number(MIN_FRAMES / FPS, MAX_SECONDS)] = 4.0
    geometric: GeometricSection = Field(default_factory=GeometricSection)
    dit: DiTSection = Field(default_factory=DiTSection)

    @model_validator(mode="after")
    def _buckets(self) -> MotionConfig:
        if not self.length_buckets:
            raise Problem("needs at least one length", "length_buckets")
        if len(set(self.length_buckets)) != len(self.length_buckets):
            raise Problem("lengths must be distinct", "length_buckets")
        if max(self.length_buckets) > MAX_FRAMES:
            raise Problem(f"lengths must be at most {MAX_FRAMES} frames", "length_buckets")
        return self
