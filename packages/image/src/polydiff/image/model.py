"""Image denoisers and the KL autoencoder, built from ``polydiff.core.blocks``.

Every denoiser has the same call signature, which is what ``diffusion_loss`` and ``sample``
pass through ``cond``::

    model(x, t, context=None, context_mask=None, pooled=None) -> Tensor shaped like x

with ``x`` (B, C, H, W) pixels or latents, ``t`` (B,) model time, ``context`` (B, L, D) text
tokens, ``context_mask`` (B, L) bool (True = real token) and ``pooled`` (B, P) one text vector
per prompt. All classes are ``Configurable``, so ``save_pretrained`` / ``from_pretrained`` work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polydiff.core.blocks import (
    DiT,
    TimeAndPooledEmbedding,
    UNet,
    grid_positions,
    patchify_2d,
    unpatchify_2d,
)
from polydiff.core.modality.codec import frozen_codec, track_latent_std
from polydiff.core.pretrained import Configurable, class_path

__all__ = ["KLAutoencoder", "LatentDiT", "PixelDiT", "PixelUNet"]


class PixelUNet(Configurable, nn.Module):
    """Text-conditioned U-Net denoiser on (B, channels, H, W) pixels.

    Text tokens enter through cross-attention at the ``attention_levels`` (and the middle
    block when the deepest level attends); the pooled text vector is added to the timestep
    embedding. H and W must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(
        self,
        channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        heads: int = 4,
        context_dim: int = 384,
        pooled_dim: int = 384,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.unet = UNet(
            channels,
            channels,
            dims=2,
            base_channels=base_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_levels=tuple(attention_levels),
            heads=heads,
            context_dim=context_dim,
            dropout=dropout,
            gradient_checkpointing=gradient_checkpointing,
        )
        time_dim = 4 * base_channels  # the width UNet gives its time embedding
        self.unet.time_embed = TimeAndPooledEmbedding(self.unet.time_embed, pooled_dim, time_dim)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """(B, C, H, W), (B,), (B, L, D), (B, L) bool, (B, P) -> (B, C, H, W)."""
        if pooled is None:
            raise ValueError("PixelUNet needs `pooled` (B, pooled_dim) text vectors")
        packed = torch.cat([t.float()[:, None], pooled.float()], dim=1)
        return self.unet(x, packed, context, context_mask)


class _PatchDiT(nn.Module):
    """A DiT over the patches of a (B, C, H, W) map with 2D rotary positions."""

    def __init__(
        self,
        channels: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        context_dim: int,
        pooled_dim: int,
        qk_norm: bool,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        self.channels, self.patch = channels, patch
        token_dim = channels * patch * patch
        self.dit = DiT(
            token_dim,
            token_dim,
            dim,
            depth,
            heads,
            mlp_ratio=mlp_ratio,
            context_dim=context_dim,
            qk_norm=qk_norm,
            rope_axes=2,
            cond_dim=pooled_dim,
            gradient_checkpointing=gradient_checkpointing,
        )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None,
        context_mask: Tensor | None,
        pooled: Tensor | None,
    ) -> Tensor:
        if pooled is None:
            raise ValueError("the image DiT needs `pooled` (B, pooled_dim) text vectors")
        h, w = x.shape[-2:]
        tokens = patchify_2d(x, self.patch)  # raises ValueError when patch does not divide h, w
        positions = grid_positions((h // self.patch, w // self.patch), device=x.device)
        out = self.dit(tokens, t, context, context_mask, positions=positions, pooled=pooled)
        return unpatchify_2d(out, self.patch, h, w, self.channels)


class PixelDiT(Configurable, nn.Module):
    """Text-conditioned DiT denoiser on (B, channels, H, W) pixels cut into ``patch`` squares.

    Text tokens enter through cross-attention in every block, the pooled text vector through
    adaLN (added to the timestep embedding). H and W must be divisible by ``patch``.
    """

    def __init__(
        self,
        channels: int = 1,
        patch: int = 2,
        dim: int = 192,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        context_dim: int = 384,
        pooled_dim: int = 384,
        qk_norm: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.net = _PatchDiT(
            channels, patch, dim, depth, heads, mlp_ratio, context_dim, pooled_dim, qk_norm,
            gradient_checkpointing,
        )  # fmt: skip

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """(B, C, H, W), (B,), (B, L, D), (B, L) bool, (B, P) -> (B, C, H, W)."""
        return self.net(x, t, context, context_mask, pooled)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class _ConvBlock(nn.Module):
    """Residual GroupNorm-SiLU-conv x2 block: (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _group_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class KLAutoencoder(Configurable, nn.Module):
    """Small convolutional VAE: (B, channels, H, W) in [-1, 1] <-> (B, latent_channels, H/f, W/f).

    ``f = 2 ** (len(channel_mult) - 1)``. The encoder outputs a diagonal Gaussian (mean,
    logvar) per latent element; training adds a KL term that keeps the latent space smooth
    enough for a latent denoiser (see ``ImageRecipe`` kind ``autoencoder``).

    The persistent buffer ``latent_std`` tracks the standard deviation of the latent means
    seen in training (updated by the recipe's loss); as a
    :class:`polydiff.core.modality.codec.LatentCodec` the autoencoder divides latents by it
    so that diffusion runs on unit-variance data.
    """

    data_ndim = 3  # (C, H, W)

    def __init__(
        self,
        channels: int = 1,
        latent_channels: int = 4,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
    ) -> None:
        super().__init__()
        mult = tuple(channel_mult)
        self.downsample_factor = 2 ** (len(mult) - 1)
        widths = [base_channels * m for m in mult]

        enc: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for i, width in enumerate(widths):
            enc.append(_ConvBlock(widths[max(i - 1, 0)], width))
            if i < len(widths) - 1:
                enc.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        enc += [_group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 2 * latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1)]
        for i in reversed(range(len(widths))):
            dec.append(_ConvBlock(widths[min(i + 1, len(widths) - 1)], widths[i]))
            if i > 0:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest")]
        dec += [_group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("latent_std_updates", torch.zeros((), dtype=torch.long))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) image -> (mean, logvar), each (B, latent_channels, H/f, W/f)."""
        size = x.shape[-2:]
        if any(s % self.downsample_factor for s in size):
            raise ValueError(
                f"KLAutoencoder: image size {tuple(size)} must be divisible by "
                f"{self.downsample_factor}"
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        # Clamped as in latent-diffusion's autoencoder: exp(logvar) cannot overflow.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) latent -> (B, C, h*f, w*f) image (unbounded; ~[-1, 1])."""
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct ``x`` through a sampled latent mean + exp(logvar / 2) * noise.

        Returns:
            (reconstruction (B, C, H, W), mean, logvar) — the last two as from ``encode``.
        """
        mean, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return self.decode(z), mean, logvar

    # --- LatentCodec -----------------------------------------------------------------------
    @property
    def latent_scale(self) -> Tensor:
        return self.latent_std

    @torch.no_grad()
    def encode_latents(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, latent_channels, H/f, W/f) latents /
        latent_std. Uses the posterior mean: the KL term keeps the variance small, and the
        mean makes the latent of an image deterministic."""
        mean, _ = self.encode(x)
        return mean / self.latent_std.to(mean.dtype)

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`encode_latents`: latents -> (B, C, h*f, w*f) images."""
        return self.decode(z * self.latent_std.to(z.dtype))

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, H, W) -> (latent_channels, H/f, W/f); ValueError when f does not divide H, W."""
        _, height, width = data_shape
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image size {(height, width)} must be divisible by {f}")
        return (self.config["latent_channels"], height // f, width // f)

    @torch.no_grad()
    def track_latent_std(self, mean: Tensor) -> None:
        """Fold a batch of latent means into ``latent_std`` (running average, then EMA 0.99)."""
        track_latent_std(self.latent_std, self.latent_std_updates, mean)


class LatentDiT(Configurable, nn.Module):
    """Text-conditioned DiT denoiser on the latents of a frozen latent codec.

    ``autoencoder`` is the codec's config (its ``.config``) and ``autoencoder_class`` its
    class (a :class:`KLAutoencoder` by default), so a LatentDiT checkpoint records the codec
    and holds its weights: generation needs nothing but this checkpoint. The codec is frozen
    (``requires_grad=False``).

    ``forward`` denoises normalised latents (B, latent_channels, h, w); ``encode`` /
    ``decode`` convert between images and these latents.
    """

    def __init__(
        self,
        autoencoder: dict[str, Any],
        patch: int = 1,
        dim: int = 192,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        context_dim: int = 384,
        pooled_dim: int = 384,
        qk_norm: bool = True,
        gradient_checkpointing: bool = False,
        autoencoder_class: str = class_path(KLAutoencoder),
    ) -> None:
        super().__init__()
        self.autoencoder = frozen_codec(autoencoder_class, autoencoder, "LatentDiT(autoencoder)")
        self.latent_channels = self.autoencoder.config["latent_channels"]
        self.net = _PatchDiT(
            self.latent_channels, patch, dim, depth, heads, mlp_ratio, context_dim, pooled_dim,
            qk_norm, gradient_checkpointing,
        )  # fmt: skip

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> normalised latents (the codec's
        ``encode_latents``)."""
        return self.autoencoder.encode_latents(images)

    def decode(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`encode`: (B, latent_channels, h, w) -> (B, C, h*f, w*f) images."""
        return self.autoencoder.decode_latents(latents)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """(B, latent_channels, h, w) noisy latents, (B,), text -> same shape as ``x``."""
        return self.net(x, t, context, context_mask, pooled)
