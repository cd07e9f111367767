"""Rotary position embeddings (RoPE) for 1D, 2D and 3D axial positions.

``head_dim`` is split into an even share per axis; each share rotates channel pairs
``(x[2i], x[2i+1])`` by ``position_along_axis * theta ** (-2i / share)`` radians. Because a
rotation by ``a`` followed by the transpose of a rotation by ``b`` is a rotation by ``a - b``,
the rotated dot product ``q_m . k_n`` depends only on the position difference ``m - n``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._utils import split_even


def grid_positions(shape: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Integer coordinates of every cell of a 1D/2D/3D grid.

    Args:
        shape: grid size per axis, e.g. (L,), (H, W) or (T, H, W).

    Returns:
        (prod(shape), len(shape)) int64 tensor in row-major (C) order, i.e. the last axis varies
        fastest, matching the token order of the patchify functions.
    """
    axes = [torch.arange(size, device=device) for size in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


class RotaryEmbedding(nn.Module):
    """Axial rotary embedding: positions -> rotation table consumed by :func:`apply_rotary`.

    Args:
        head_dim: per-head channel count; must be even and at least ``2 * axes``.
        axes: number of position axes (1 for sequences, 2 for images, 3 for video).
        theta: base of the frequency ladder; larger means longer wavelengths (in positions).
    """

    freq_axis: Tensor

    def __init__(self, head_dim: int, axes: int = 1, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.axes = axes
        self.theta = theta
        self.shares = split_even(head_dim, axes, "RotaryEmbedding head_dim")
        owners = [
            torch.full((s // 2,), axis, dtype=torch.long) for axis, s in enumerate(self.shares)
        ]
        # Integer buffer: follows .to(device) but is never cast by .to(dtype).
        self.register_buffer("freq_axis", torch.cat(owners), persistent=False)

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """(head_dim // 2,) float32 angular frequencies in radians per position step."""
        # Rebuilt per call rather than stored, so half-precision model casts cannot round them.
        return torch.cat(
            [
                self.theta ** (-torch.arange(0, s, 2, device=device, dtype=torch.float32) / s)
                for s in self.shares
            ]
        )

    def forward(self, positions: Tensor) -> Tensor:
        """Build the rotation table for token positions.

        Args:
            positions: (L, axes) or (B, L, axes) integer or float positions, in grid cells.

        Returns:
            ``freqs`` of shape (L, head_dim // 2, 2) or (B, L, head_dim // 2, 2), float32,
            whose last axis holds (cos, sin) of the rotation angle of each channel pair.
        """
        if positions.ndim not in (2, 3) or positions.shape[-1] != self.axes:
            raise ValueError(
                f"RotaryEmbedding(axes={self.axes}) expects positions of shape (L, {self.axes}) "
                f"or (B, L, {self.axes}), got {tuple(positions.shape)}"
            )
        # Each frequency reads the coordinate of the axis that owns it.
        coords = positions.to(torch.float32)[..., self.freq_axis]
        angles = coords * self.inv_freq(positions.device)
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate channel pairs of queries or keys by position-dependent angles.

    Args:
        x: (B, heads, L, head_dim) queries or keys.
        freqs: (L, head_dim // 2, 2) shared by the batch, or (B, L, head_dim // 2, 2) per
            sample, from :class:`RotaryEmbedding`.

    Returns:
        Tensor shaped and typed like ``x``; vector norms are preserved.
    """
    if freqs.shape[-3:] != (x.shape[-2], x.shape[-1] // 2, 2):
        raise ValueError(
            f"apply_rotary: freqs {tuple(freqs.shape)} do not match x {tuple(x.shape)}; "
            f"expected (..., {x.shape[-2]}, {x.shape[-1] // 2}, 2)"
        )
    # Broadcast over heads (and over batch for shared positions).
    freqs = freqs[None, None] if freqs.ndim == 3 else freqs[:, None]
    cos, sin = freqs[..., 0], freqs[..., 1]
    # Rotate in float32: low-precision trig products lose the relative-position property.
    pairs = x.to(torch.float32).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
