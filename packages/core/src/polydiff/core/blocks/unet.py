"""U-Net for 2D (images, spectrograms) and 1D (waveform-like or per-frame) signals.

Layout follows the ADM / latent-diffusion family: ResBlocks with timestep FiLM, optional
self/cross-attention at chosen resolutions, strided-conv downsampling, nearest + conv
upsampling, and skip connections concatenated on the way up.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import maybe_checkpoint
from .attention import Attention
from .embeddings import TimestepEmbedder


def _conv(dims: int, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Module:
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    return conv_cls(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups is the usual choice; gcd keeps small/odd channel counts valid.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def _zero_(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 residual block with timestep FiLM (scale and shift).

    Maps (B, in_ch, *spatial) and a (B, time_dim) embedding to (B, out_ch, *spatial). The last
    conv is zero-initialised so a fresh block reduces to its skip path.
    """

    def __init__(
        self, in_ch: int, out_ch: int, time_dim: int, dims: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = _conv(dims, in_ch, out_ch, 3)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch))
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(_conv(dims, out_ch, out_ch, 3))
        self.skip = _conv(dims, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(B, in_ch, *spatial), (B, time_dim) -> (B, out_ch, *spatial)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(emb).chunk(2, dim=-1)
        # Broadcast the per-channel FiLM over every spatial axis (1D or 2D).
        extra = (1,) * (h.ndim - 2)
        scale, shift = scale.view(*scale.shape, *extra), shift.view(*shift.shape, *extra)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Transformer layer over the spatial positions of a feature map.

    GroupNorm, then tokens (B, N, C) go through pre-LN self-attention, optional cross-attention
    to text tokens, and an MLP; a zero-initialised output Linear makes the block start as the
    identity. Input and output: (B, C, *spatial).
    """

    def __init__(self, channels: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.ln_self = nn.LayerNorm(channels)
        self.self_attn = Attention(channels, heads)
        self.cross_attn = None
        if context_dim is not None:
            self.ln_cross = nn.LayerNorm(channels)
            self.cross_attn = Attention(channels, heads, context_dim=context_dim)
        self.ln_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )
        self.proj_out = _zero_(nn.Linear(channels, channels))

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """(B, C, *spatial) features, (B, Lc, context_dim) context, (B, Lc) bool mask."""
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.self_attn(self.ln_self(tokens))
        if self.cross_attn is not None and context is not None:
            tokens = tokens + self.cross_attn(self.ln_cross(tokens), context, context_mask)
        tokens = tokens + self.mlp(self.ln_mlp(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(x.shape)


class _Stage(nn.Module):
    """One U-Net step: optional ResBlock, optional attention, optional resampling conv."""

    def __init__(
        self,
        res: ResBlock | None = None,
        attn: SpatialAttention | None = None,
        resample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        if self.resample is not None:
            x = self.resample(x)
        return x


class _Upsample(nn.Module):
    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.conv = _conv(dims, channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimeAndPooledEmbedding(nn.Module):
    """A U-Net's timestep embedder plus a projection of a pooled conditioning vector.

    ``UNet.forward`` hands its ``t`` argument only to ``time_embed``; a denoiser that replaces
    ``unet.time_embed`` with this module passes (t, pooled) packed as one (B, 1 + P) tensor,
    which is unpacked here: the pooled vector (a sentence or CLAP embedding) then modulates
    every ResBlock (FiLM), next to the cross-attention on the tokens.
    """

    def __init__(self, time_embed: nn.Module, pooled_dim: int, time_dim: int) -> None:
        super().__init__()
        self.time_embed = time_embed
        self.pooled_proj = nn.Linear(pooled_dim, time_dim)

    def forward(self, packed: Tensor) -> Tensor:
        """(B, 1 + P) packed (t, pooled) -> (B, time_dim)."""
        t, pooled = packed[:, 0], packed[:, 1:]
        emb = self.time_embed(t)
        return emb + self.pooled_proj(pooled.to(emb.dtype))


class UNet(nn.Module):
    """Timestep-conditioned U-Net for 2D (``dims=2``) or 1D (``dims=1``) signals.

    Args:
        in_channels, out_channels: signal channels in and out.
        dims: 2 for (B, C, H, W) inputs, 1 for (B, C, L).
        base_channels: width at full resolution; level ``i`` has ``base * channel_mult[i]``.
        channel_mult: width multipliers, one level per entry; each level after the first
            halves every spatial size.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_levels: indices into ``channel_mult`` whose ResBlocks are followed by
            self-attention (and cross-attention if ``context_dim``); the middle block has
            attention iff the deepest level does.
        heads: attention heads (must divide every attended width).
        context_dim: width of text tokens for cross-attention.
        dropout: dropout probability inside ResBlocks.
        gradient_checkpointing: recompute stage activations in backward (training mode only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dims: int = 2,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (2,),
        heads: int = 4,
        context_dim: int | None = None,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"UNet: dims must be 1 or 2, got {dims}")
        if any(not 0 <= level < len(channel_mult) for level in attention_levels):
            raise ValueError(
                f"UNet: attention_levels {tuple(attention_levels)} must index channel_mult "
                f"(0..{len(channel_mult) - 1})"
            )
        self.dims = dims
        self.in_channels = in_channels
        self.context_dim = context_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.gradient_checkpointing = gradient_checkpointing
        time_dim = 4 * base_channels
        self.time_embed = TimestepEmbedder(time_dim, freq_dim=base_channels)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_dim, dims, dropout)

        def attn(ch: int, level: int) -> SpatialAttention | None:
            return SpatialAttention(ch, heads, context_dim) if level in attention_levels else None

        self.input_conv = _conv(dims, in_channels, base_channels, 3)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(
                    _Stage(res(ch, base_channels * mult), attn(base_channels * mult, level))
                )
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != last:
                self.down.append(_Stage(resample=_conv(dims, ch, ch, 3, stride=2)))
                skip_channels.append(ch)

        self.middle = nn.ModuleList([_Stage(res(ch, ch), attn(ch, last)), _Stage(res(ch, ch))])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = base_channels * mult
                upsample = _Upsample(dims, out_ch) if level != 0 and i == num_res_blocks else None
                self.up.append(
                    _Stage(res(ch + skip_channels.pop(), out_ch), attn(out_ch, level), upsample)
                )
                ch = out_ch

        self.out = nn.Sequential(
            _group_norm(ch), nn.SiLU(), _zero_(_conv(dims, ch, out_channels, 3))
        )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict a tensor shaped like ``x``.

        Args:
            x: (B, in_channels, H, W) for dims=2 or (B, in_channels, L) for dims=1; every
                spatial size divisible by ``2 ** (len(channel_mult) - 1)``.
            t: (B,) timesteps in model time units.
            context: (B, Lc, context_dim) text tokens (needs ``context_dim``).
            context_mask: (B, Lc) bool, True = real text token.

        Returns:
            (B, out_channels, *spatial) tensor.
        """
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet(dims={self.dims}, in_channels={self.in_channels}) got input of shape "
                f"{tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(size % self.downsample_factor for size in spatial):
            raise ValueError(
                f"UNet: spatial size {spatial} must be divisible by {self.downsample_factor} "
                f"(2 ** (len(channel_mult) - 1))"
            )
        if context is not None and self.context_dim is None:
            raise ValueError("UNet got a context but was built without context_dim")

        use_ckpt = self.gradient_checkpointing and self.training
        emb = self.time_embed(t)
        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = maybe_checkpoint(stage, h, emb, context, context_mask, enabled=use_ckpt)
            skips.append(h)
        for stage in self.middle:
            h = maybe_checkpoint(stage, h, emb, context, context_mask, enabled=use_ckpt)
        for stage in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = maybe_checkpoint(stage, h, emb, context, context_mask, enabled=use_ckpt)
        return self.out(h)
