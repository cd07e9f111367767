"""Neural-network building blocks shared by every polydiff modality.

Embeddings, rotary positions, attention, DiT (adaLN-Zero) blocks, patchify helpers and a
1D/2D U-Net. Nothing here is modality-specific.
"""

from .attention import Attention
from .dit import ATTENTION_LAYOUTS, DiT, DiTBlock, FinalLayer, attend_along, modulate
from .embeddings import (
    TimestepEmbedder,
    sincos_pos_embed,
    sincos_position_embedding,
    timestep_embedding,
)
from .patch import (
    PatchEmbed,
    patchify_1d,
    patchify_2d,
    spacetime_patchify,
    spacetime_unpatchify,
    unpatchify_1d,
    unpatchify_2d,
)
from .rope import RotaryEmbedding, apply_rotary, grid_positions
from .unet import ResBlock, SpatialAttention, TimeAndPooledEmbedding, UNet

__all__ = [
    "ATTENTION_LAYOUTS",
    "Attention",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "PatchEmbed",
    "ResBlock",
    "RotaryEmbedding",
    "SpatialAttention",
    "TimeAndPooledEmbedding",
    "TimestepEmbedder",
    "UNet",
    "apply_rotary",
    "attend_along",
    "grid_positions",
    "modulate",
    "patchify_1d",
    "patchify_2d",
    "sincos_pos_embed",
    "sincos_position_embedding",
    "spacetime_patchify",
    "spacetime_unpatchify",
    "timestep_embedding",
    "unpatchify_1d",
    "unpatchify_2d",
]
