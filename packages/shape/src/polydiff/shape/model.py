"""Shape networks, built from ``polydiff.core.blocks``.

- :class:`PointDenoiser` (kind points): a DiT over the points of a cloud, (B, N, 3) in and
  out, with no positional encoding: attention without positions is permutation-equivariant,
  so the order of the points means nothing and any N works. Points are divided by
  ``point_std`` (the training clouds' RMS coordinate, fitted by the recipe's statistics hook)
  so diffusion sees unit-variance data.
- :class:`PointAutoencoder` (kind autoencoder): a set encoder (learned queries
  cross-attending to the points, as a Perceiver) to a latent *set* of ``latents`` tokens of
  ``latent_channels`` (a diagonal Gaussian, KL-regularised), and two decoders from it: an
  occupancy field (query points cross-attending to the decoded latent tokens -> one logit)
  and a point decoder (seed points on the unit sphere cross-attending to them -> surface
  points, as a folding decoder). It is the kit's :class:`~polydiff.core.modality.LatentCodec` for
  (N, 3) clouds <-> (latents, latent_channels) latents.
- :class:`LatentShapeDenoiser` (kind latent): the same set DiT over the latent tokens,
  carrying the frozen autoencoder, so its checkpoint is all generation needs.

Every denoiser's call signature is what ``diffusion_loss`` and ``sample`` pass::

    model(x, t, context=None, context_mask=None, pooled=None, label=None) -> like x

with text conditioning (``context`` (B, L, D), ``context_mask`` (B, L), ``pooled`` (B, P))
or label conditioning (``label`` (B,) long; ``num_classes`` is the null label).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polydiff.core.blocks import Attention, DiT
from polydiff.core.ema import unwrap_model
from polydiff.core.modality import frozen_codec, track_latent_std
from polydiff.core.pretrained import Configurable, class_path

__all__ = [
    "FIELD_BOUND",
    "FourierFeatures",
    "LatentShapeDenoiser",
    "PointAutoencoder",
    "PointDenoiser",
    "autoencoder_loss",
    "sphere_seeds",
]

#: The occupancy field is trained and meshed on [-FIELD_BOUND, FIELD_BOUND]^3: the normalised
#: shape (within the unit sphere or box) plus a margin, so surfaces never touch the grid edge.
FIELD_BOUND = 1.1


class _SetDiT(nn.Module):
    """A DiT over an unordered token set (no positions), conditioned on text or a label."""

    def __init__(self, width: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 qk_norm: bool, conditioning: str, context_dim: int | None, pooled_dim: int,
                 num_classes: int, gradient_checkpointing: bool) -> None:  # fmt: skip
        super().__init__()
        self.label_embed = None
        if conditioning == "label":
            # Index num_classes is "no label": what CFG dropout trains and guidance uses.
            self.label_embed = nn.Embedding(num_classes + 1, dim)
            context_dim, pooled_dim = None, dim
        self.dit = DiT(
            width,
            width,
            dim,
            depth,
            heads,
            mlp_ratio=mlp_ratio,
            context_dim=context_dim,
            qk_norm=qk_norm,
            rope_axes=0,
            cond_dim=pooled_dim,
            gradient_checkpointing=gradient_checkpointing,
        )

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None, context_mask: Tensor | None,
                pooled: Tensor | None, label: Tensor | None) -> Tensor:  # fmt: skip
        if self.label_embed is not None:
            if label is None:
                raise ValueError("a label-conditioned shape denoiser needs `label`")
            return self.dit(x, t, pooled=self.label_embed(label))
        return self.dit(x, t, context, context_mask, pooled=pooled)


class _SetDenoiser(nn.Module):
    """What both denoisers share: ``self.net``, a :class:`_SetDiT`, and its call signature."""

    net: _SetDiT

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, pooled: Tensor | None = None,
                label: Tensor | None = None) -> Tensor:  # fmt: skip
        """(B, L, width) noisy tokens (points, or latent tokens), (B,) model time -> the same
        shape (the denoiser's prediction)."""
        return self.net(x, t, context, context_mask, pooled, label)


class PointDenoiser(Configurable, _SetDenoiser):
    """Text- or label-conditioned denoiser of point clouds (see the module doc).

    Args:
        dim, depth, heads, mlp_ratio, qk_norm: the DiT.
        conditioning: ``"text"`` (cross-attention to ``context_dim`` tokens, ``pooled_dim``
            pooled vector) or ``"label"`` (``num_classes`` classes, embedded as the pooled
            vector).
    """

    def __init__(
        self,
        dim: int = 192,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        conditioning: str = "text",
        context_dim: int | None = 384,
        pooled_dim: int = 384,
        num_classes: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.net = _SetDiT(
            3, dim, depth, heads, mlp_ratio, qk_norm, conditioning, context_dim, pooled_dim,
            num_classes, gradient_checkpointing,
        )  # fmt: skip
        self.register_buffer("point_std", torch.ones(()))

    def normalize(self, points: Tensor) -> Tensor:
        """(B, N, 3) points in the normalised shape space -> the denoiser's unit-variance space."""
        return points / self.point_std.to(points.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        return x * self.point_std.to(x.dtype)


class FourierFeatures(nn.Module):
    """xyz -> [xyz, sin(2^k pi xyz), cos(2^k pi xyz) for k < frequencies] -> Linear -> dim.

    Coordinates alone make a smooth, blurry field; the octaves let a small network place
    sharp surfaces (NeRF's positional encoding)."""

    def __init__(self, frequencies: int, dim: int) -> None:
        super().__init__()
        self.register_buffer(
            "bands", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32),
            persistent=False,
        )  # fmt: skip
        self.proj = nn.Linear(3 + 6 * frequencies, dim)

    def forward(self, xyz: Tensor) -> Tensor:
        """(..., 3) -> (..., dim)."""
        angles = (xyz[..., None] * self.bands.to(xyz.dtype)).flatten(-2)
        return self.proj(torch.cat([xyz, angles.sin(), angles.cos()], dim=-1))


def sphere_seeds(gaussian: Tensor) -> Tensor:
    """(..., 3) Gaussian draws -> points uniform on the unit sphere: the point decoder's seeds.
    A closed surface is a deformation of the sphere, an easier map to learn than one from the
    whole Gaussian cloud (AtlasNet's sphere template)."""
    return F.normalize(gaussian, dim=-1)


class _Block(nn.Module):
    """Pre-norm transformer block: (cross- or self-) attention, then an MLP."""

    def __init__(self, dim: int, heads: int, cross: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads, qk_norm=True, context_dim=dim if cross else None)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.norm_context is None:
            x = x + self.attn(self.norm(x))
        else:
            x = x + self.attn(self.norm(x), self.norm_context(context))
        return x + self.mlp(self.norm_mlp(x))


class PointAutoencoder(Configurable, nn.Module):
    """Point clouds <-> a latent set, with point and occupancy-field decoders (module doc).

    Args:
        latents: K, tokens of the latent set. latent_channels: C, their width.
        dim, heads: the network width and attention heads.
        encoder_depth, decoder_depth: self-attention blocks over the K tokens on each side.
        frequencies: Fourier octaves of the xyz embeddings.

    The persistent buffer ``latent_std`` tracks the std of the latent means seen in training
    (the recipe's loss updates it); as a codec the autoencoder divides latents by it, so the
    latent denoiser sees unit-variance data.
    """

    data_ndim = 2  # (N, 3)

    def __init__(
        self,
        latents: int = 32,
        latent_channels: int = 8,
        dim: int = 128,
        heads: int = 4,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        frequencies: int = 8,
    ) -> None:
        super().__init__()
        self.latent_count, self.latent_channels = latents, latent_channels
        self.embed = FourierFeatures(frequencies, dim)
        self.queries = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.gather = _Block(dim, heads, cross=True)
        self.encoder = nn.ModuleList(_Block(dim, heads) for _ in range(encoder_depth))
        self.to_posterior = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * latent_channels))
        self.from_latent = nn.Linear(latent_channels, dim)
        self.decoder = nn.ModuleList(_Block(dim, heads) for _ in range(decoder_depth))
        self.field_head = _Block(dim, heads, cross=True)
        self.field_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))
        self.points_head = _Block(dim, heads, cross=True)
        self.points_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3))
        self.register_buffer("latent_std", torch.ones(()))
        self.register_buffer("latent_std_updates", torch.zeros((), dtype=torch.long))

    # --- the two halves -------------------------------------------------------------------
    def encode(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, 3) points -> posterior (mean, logvar), each (B, K, C)."""
        tokens = self.embed(points)
        x = self.gather(self.queries.expand(points.shape[0], -1, -1).to(tokens.dtype), tokens)
        for block in self.encoder:
            x = block(x)
        mean, logvar = self.to_posterior(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_tokens(self, z: Tensor) -> Tensor:
        """(B, K, C) latents (unnormalised) -> (B, K, dim) tokens both decoders read."""
        x = self.from_latent(z)
        for block in self.decoder:
            x = block(x)
        return x

    def field(self, tokens: Tensor, queries: Tensor) -> Tensor:
        """Occupancy logits (B, Q) at (B, Q, 3) query points (> 0: inside)."""
        return self.field_out(self.field_head(self.embed(queries), tokens))[..., 0]

    def surface(self, tokens: Tensor, seeds: Tensor) -> Tensor:
        """(B, M, 3) surface points, one per (B, M, 3) seed point on the unit sphere."""
        return self.points_out(self.points_head(self.embed(seeds), tokens))

    def forward(self, points: Tensor, queries: Tensor, seeds: Tensor,
                noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Training pass: (B, N, 3) points, (B, Q, 3) queries, (B, M, 3) sphere seeds and (B, K, C)
        posterior noise -> (reconstructed points (B, M, 3), occupancy logits (B, Q), mean,
        logvar)."""
        mean, logvar = self.encode(points)
        z = mean + (0.5 * logvar).exp() * noise
        tokens = self.decode_tokens(z)
        return self.surface(tokens, seeds), self.field(tokens, queries), mean, logvar

    @torch.no_grad()
    def track_latent_std(self, mean: Tensor) -> None:
        """Fold a batch of latent means into ``latent_std`` (running average, then EMA 0.99)."""
        track_latent_std(self.latent_std, self.latent_std_updates, mean)

    # --- the LatentCodec protocol ---------------------------------------------------------
    @property
    def latent_scale(self) -> Tensor:
        return self.latent_std

    @torch.no_grad()
    def encode_latents(self, points: Tensor) -> Tensor:
        """(B, N, 3) normalised points -> (B, K, C) latents / latent_std (posterior mean:
        deterministic)."""
        mean, _ = self.encode(points)
        return mean / self.latent_std.to(mean.dtype)

    @torch.no_grad()
    def decode_latents(self, z: Tensor, count: int = 2048, seed: int = 0) -> Tensor:
        """(B, K, C) normalised latents -> (B, count, 3) surface points. Every latent decodes
        the same ``count`` seed points, drawn from a generator seeded with ``seed``: decoding
        is deterministic and a shape does not depend on the others in its batch."""
        tokens = self.decode_tokens(z * self.latent_std.to(z.dtype))
        generator = torch.Generator().manual_seed(seed)
        seeds = sphere_seeds(torch.randn((count, 3), generator=generator))
        seeds = seeds.expand(z.shape[0], -1, -1)
        return self.surface(tokens, seeds.to(device=z.device, dtype=tokens.dtype))

    @torch.no_grad()
    def occupancy_grid(self, z: Tensor, resolution: int, chunk: int = 32_768) -> Tensor:
        """(B, K, C) normalised latents -> (B, R, R, R) occupancy logits on
        ``linspace(-FIELD_BOUND, FIELD_BOUND, R)`` per axis, indexed [x, y, z]; queries go
        through in chunks of ``chunk`` so memory stays bounded at any resolution."""
        tokens = self.decode_tokens(z * self.latent_std.to(z.dtype))
        axis = torch.linspace(-FIELD_BOUND, FIELD_BOUND, resolution, device=z.device)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
        queries = grid.reshape(-1, 3).to(tokens.dtype)
        logits = torch.cat([
            self.field(tokens, queries[i : i + chunk].expand(z.shape[0], -1, -1))
            for i in range(0, queries.shape[0], chunk)
        ], dim=1)  # fmt: skip
        return logits.float().reshape(z.shape[0], resolution, resolution, resolution)

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(N, 3) -> (K, C), for any N."""
        if len(data_shape) != 2 or data_shape[-1] != 3:
            raise ValueError(f"a point autoencoder takes (N, 3) clouds, not {tuple(data_shape)}")
        return (self.latent_count, self.latent_channels)


def autoencoder_loss(
    autoencoder: nn.Module,
    batch: Mapping[str, Tensor],
    weights: Mapping[str, float],
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Chamfer distance of the decoded points to the input surface points, BCE of the
    occupancy logits at the query points (shapes with a field only: point-cloud inputs have
    none), and ``kl_weight`` x KL per latent value. Returns (loss, named parts)."""
    from .metrics import chamfer_distance

    net = unwrap_model(autoencoder)
    points, queries = batch["points"], batch["queries"]
    draw = {"generator": generator, "device": generator.device}
    seeds = sphere_seeds(torch.randn(points.shape, **draw)).to(points)
    noise = torch.randn((points.shape[0], net.latent_count, net.latent_channels), **draw)
    recon, logits, mean, logvar = autoencoder(points, queries, seeds, noise.to(points))
    if net.training:
        net.track_latent_std(mean)
    chamfer = chamfer_distance(recon.float(), points.float()).mean()
    has_field = batch["has_field"].to(logits.device, torch.float32)
    bce = F.binary_cross_entropy_with_logits(
        logits.float(), batch["occupancy"].float(), reduction="none"
    ).mean(dim=1)
    field = (bce * has_field).sum() / has_field.sum().clamp_min(1.0)
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = (
        weights["points_weight"] * chamfer
        + weights["field_weight"] * field
        + weights["kl_weight"] * kl
    )
    return loss, {"chamfer": chamfer.detach(), "field_bce": field.detach(), "kl": kl.detach()}


class LatentShapeDenoiser(Configurable, _SetDenoiser):
    """Set DiT denoiser on the latents of a frozen :class:`PointAutoencoder` (or another
    codec of (N, 3) clouds), which it carries: ``autoencoder`` is the codec's config and
    ``autoencoder_class`` its class path. Conditioning as :class:`PointDenoiser`."""

    def __init__(
        self,
        autoencoder: dict[str, Any],
        dim: int = 192,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        conditioning: str = "text",
        context_dim: int | None = 384,
        pooled_dim: int = 384,
        num_classes: int = 0,
        gradient_checkpointing: bool = False,
        autoencoder_class: str = class_path(PointAutoencoder),
    ) -> None:
        super().__init__()
        self.autoencoder = frozen_codec(
            autoencoder_class, autoencoder, "LatentShapeDenoiser(autoencoder)"
        )
        self.latent_shape = self.autoencoder.latent_shape((1, 3))
        self.net = _SetDiT(
            self.latent_shape[1], dim, depth, heads, mlp_ratio, qk_norm, conditioning,
            context_dim, pooled_dim, num_classes, gradient_checkpointing,
        )  # fmt: skip

    def encode(self, points: Tensor) -> Tensor:
        """(B, N, 3) normalised points -> (B, K, C) normalised latents."""
        return self.autoencoder.encode_latents(points)
