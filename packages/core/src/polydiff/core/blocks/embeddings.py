"""Timestep embeddings and fixed sin-cos positional tables.

Conventions: a timestep ``t`` is in model time units (e.g. 0..999 for a 1000-step DDPM, or any
float for continuous-time models); embeddings are float32 unless a module casts them.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._utils import split_even
from .rope import grid_positions


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps.

    Args:
        t: (B,) timesteps in model time units; fractional values are allowed.
        dim: embedding width; an odd ``dim`` gets a trailing zero column.
        max_period: longest wavelength, in the same units as ``t``.

    Returns:
        (B, dim) float32 tensor laid out as ``[cos(t * w_i), sin(t * w_i)]`` with frequencies
        ``w_i = max_period ** (-i / (dim // 2))``.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep -> conditioning vector: sinusoidal features followed by a 2-layer SiLU MLP.

    Args:
        hidden: output width.
        freq_dim: width of the sinusoidal features fed to the MLP.
        max_period: longest sinusoid wavelength, in model time units.
    """

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """Map (B,) timesteps (model time units) to (B, hidden) embeddings."""
        freqs = timestep_embedding(t, self.freq_dim, self.max_period)
        # Match the MLP's dtype so the module works under bf16/fp16 weights.
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


def sincos_position_embedding(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Fixed sin-cos embedding of token coordinates (absolute positions).

    ``dim`` is split into even per-axis shares (earlier axes get leftover pairs); each share
    holds ``[sin(p * w_i), cos(p * w_i)]`` of that axis' coordinate ``p``, with frequencies
    ``w_i = max_period ** (-i / half)``.

    Args:
        positions: (L, axes) or (B, L, axes) coordinates in grid cells, 1 <= axes <= 3.
        dim: embedding width; must be even and at least ``2 * axes``.
        max_period: longest wavelength, in grid cells.

    Returns:
        (L, dim) or (B, L, dim) float32.
    """
    axes = positions.shape[-1]
    if positions.ndim not in (2, 3) or not 1 <= axes <= 3:
        raise ValueError(
            "positions must be (L, axes) or (B, L, axes) with 1-3 axes, got "
            f"{tuple(positions.shape)}"
        )
    shares = split_even(dim, axes, "sincos_position_embedding")
    coords = positions.to(torch.float32)
    tables = []
    for axis, share in enumerate(shares):
        half = share // 2
        freqs = max_period ** (
            -torch.arange(half, dtype=torch.float32, device=positions.device) / half
        )
        args = coords[..., axis, None] * freqs
        tables.append(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
    return torch.cat(tables, dim=-1)


def sincos_pos_embed(
    dim: int, grid_shape: int | Sequence[int], max_period: float = 10000.0
) -> Tensor:
    """Fixed sin-cos positional table for a 1D (L,), 2D (H, W) or 3D (T, H, W) grid: the
    :func:`sincos_position_embedding` of every cell.

    Args:
        dim: embedding width; must be even and at least ``2 * len(grid_shape)``.
        grid_shape: grid size per axis.
        max_period: longest wavelength, in grid cells.

    Returns:
        (prod(grid_shape), dim) float32 table, rows in row-major (C) order of the grid, the same
        order as :func:`grid_positions` and the patchify functions.
    """
    shape = (grid_shape,) if isinstance(grid_shape, int) else tuple(grid_shape)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"sincos_pos_embed supports 1D, 2D or 3D grids, got shape {shape}")
    return sincos_position_embedding(grid_positions(shape), dim, max_period)
