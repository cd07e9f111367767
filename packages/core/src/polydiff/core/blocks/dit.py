"""Diffusion Transformer (DiT) blocks with adaLN-Zero conditioning (Peebles & Xie, 2023).

Tokens are unordered unless rotary positions are given, so the same model serves image
patches, spacetime video tokens, spectrogram frames, point sets and padded motion sequences.
For video the self-attention is either full (every spacetime token sees every other) or
factorised: attention within each frame, then along time at each spatial place (as in Latte /
Open-Sora's STDiT), which costs O(T (HW)^2 + HW T^2) instead of O((T HW)^2).
"""

from typing import Literal

import torch
from torch import Tensor, nn

from ._utils import maybe_checkpoint
from .attention import Attention, QKNorm
from .embeddings import TimestepEmbedder, sincos_position_embedding
from .rope import RotaryEmbedding


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Per-sample affine modulation: (B, L, D) tokens, (B, D) shift and scale -> (B, L, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


AttentionLayout = Literal["full", "factorised"]
ATTENTION_LAYOUTS: tuple[str, ...] = ("full", "factorised")


def _grouped(x: Tensor, grid: tuple[int, int, int], axis: str) -> Tensor:
    """(B, T*H*W, ...) in time-major token order -> (B*T, H*W, ...) for ``axis="space"``
    (one group per frame) or (B*H*W, T, ...) for ``axis="time"`` (one group per place)."""
    t, h, w = grid
    rest = x.shape[2:]
    if axis == "space":
        return x.reshape(x.shape[0] * t, h * w, *rest)
    return x.reshape(x.shape[0], t, h * w, *rest).transpose(1, 2).reshape(-1, t, *rest)


def _ungrouped(x: Tensor, grid: tuple[int, int, int], axis: str, batch: int) -> Tensor:
    """Inverse of :func:`_grouped`: back to (B, T*H*W, ...)."""
    t, h, w = grid
    rest = x.shape[2:]
    if axis == "space":
        return x.reshape(batch, t * h * w, *rest)
    return x.reshape(batch, h * w, t, *rest).transpose(1, 2).reshape(batch, t * h * w, *rest)


def attend_along(
    attn: "Attention",
    x: Tensor,
    grid: tuple[int, int, int],
    axis: str,
    mask: Tensor | None = None,
    rope: Tensor | None = None,
) -> Tensor:
    """Self-attention restricted to one frame (``axis="space"``) or one place (``"time"``).

    Args:
        attn: a self-attention layer. x: (B, T*H*W, dim) tokens in time-major order.
        grid: the token grid (T, H, W). mask: (B, T*H*W) bool, True = real token.
        rope: the rotary table of the full 3D grid, (L, ...) or (B, L, ...). Inside a group
            the other axes' coordinates are equal, so their rotations cancel in q.k and the
            3D table acts as a 2D (space) or 1D (time) one.

    Returns:
        (B, T*H*W, dim) tokens.
    """
    batch = x.shape[0]
    if rope is not None and rope.ndim == 3:
        rope = rope.expand(batch, *rope.shape)
    out = attn(
        _grouped(x, grid, axis),
        key_mask=None if mask is None else _grouped(mask, grid, axis),
        rope=None if rope is None else _grouped(rope, grid, axis),
    )
    return _ungrouped(out, grid, axis, batch)


def _zero_(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """Transformer block: adaLN-Zero self-attention, optional cross-attention, adaLN-Zero MLP.

    The conditioning vector ``c`` produces shift/scale/gate for both adaLN branches through a
    zero-initialised Linear, and the cross-attention output projection is zero-initialised, so
    a fresh block is the identity map.

    Args:
        dim: token width. heads: attention heads. mlp_ratio: MLP hidden width / dim.
        context_dim: width of text tokens to cross-attend to (None = no cross-attention).
        qk_norm: q/k normalisation, see :class:`Attention`.
        attention: "full" self-attention over all tokens, or "factorised": spatial attention
            within each frame then a temporal attention branch (its own adaLN-Zero shift,
            scale and gate) along time; factorised blocks need the token ``grid``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        qk_norm: QKNorm = False,
        attention: AttentionLayout = "full",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {attention!r}")
        self.attention = attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = Attention(dim, heads, qk_norm=qk_norm, context_dim=context_dim)
            _zero_(self.cross_attn.proj)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.temporal_attn = None
        if attention == "factorised":
            self.norm_temporal = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.temporal_attn = Attention(dim, heads, qk_norm=qk_norm)
        branches = 9 if attention == "factorised" else 6  # (shift, scale, gate) per branch
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_(nn.Linear(dim, branches * dim)))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rope: Tensor | None = None,
        mask: Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> Tensor:
        """Update tokens.

        Args:
            x: (B, L, dim) tokens. c: (B, dim) conditioning vector.
            context: (B, Lc, context_dim) text tokens; None skips the cross-attention branch.
            context_mask: (B, Lc) bool, True = real text token.
            rope: rotary table from :class:`RotaryEmbedding` for the self-attention.
            mask: (B, L) bool, True = real token; padded tokens are never attended to.
            grid: (T, H, W) token grid with T*H*W = L, time-major; factorised blocks only.

        Returns:
            (B, L, dim) tokens.
        """
        mods = self.adaLN_modulation(c).chunk(9 if self.temporal_attn is not None else 6, -1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:6]
        h = modulate(self.norm1(x), shift_a, scale_a)
        if self.temporal_attn is None:
            x = x + gate_a[:, None] * self.attn(h, key_mask=mask, rope=rope)
        else:
            if grid is None or grid[0] * grid[1] * grid[2] != x.shape[1]:
                raise ValueError(
                    f"factorised attention needs grid=(T, H, W) with T*H*W = {x.shape[1]} "
                    f"tokens, got {grid}"
                )
            x = x + gate_a[:, None] * attend_along(self.attn, h, grid, "space", mask, rope)
            shift_t, scale_t, gate_t = mods[6:]
            h = modulate(self.norm_temporal(x), shift_t, scale_t)
            x = x + gate_t[:, None] * attend_along(self.temporal_attn, h, grid, "time", mask, rope)
        if context is not None:
            if self.cross_attn is None:
                raise ValueError("DiTBlock got a context but was built without context_dim")
            x = x + self.cross_attn(self.norm_cross(x), context, key_mask=context_mask)
        h = modulate(self.norm2(x), shift_m, scale_m)
        return x + gate_m[:, None] * self.mlp(h)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear to the output width, both zero-initialised.

    Maps (B, L, dim) tokens and (B, dim) conditioning to (B, L, out_dim); outputs zeros at init.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_(nn.Linear(dim, 2 * dim)))
        self.linear = _zero_(nn.Linear(dim, out_dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """(B, L, dim) tokens, (B, dim) conditioning -> (B, L, out_dim)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Token-sequence diffusion transformer.

    Args:
        in_dim, out_dim: per-token input/output widths. dim: model width. depth: blocks.
        heads, mlp_ratio, qk_norm: see :class:`DiTBlock`.
        context_dim: text-token width for cross-attention (None = unconditional on text).
        rope_axes: 0 = no positions (permutation-equivariant, e.g. point sets); 1/2/3 = axial
            rotary positions for sequences/images/video.
        cond_dim: width of an optional pooled conditioning vector added to the time embedding.
        gradient_checkpointing: recompute block activations in backward (training mode only).
        rope_theta: rotary frequency base.
        attention: "full" or "factorised" (space then time; needs ``grid`` in forward), see
            :class:`DiTBlock`.
        absolute_positions: also add a fixed sin-cos embedding of the token coordinates to the
            input (as DiT does). Rotary attention sees only position differences, so without
            it a model cannot tell where (or when) a token is, only where it is relative to
            others: a layout that depends on the prompt (a shape that starts at the right and
            ends at the left) must then be inferred from the frame's edges.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        qk_norm: QKNorm = False,
        rope_axes: int = 0,
        cond_dim: int | None = None,
        gradient_checkpointing: bool = False,
        rope_theta: float = 10000.0,
        attention: AttentionLayout = "full",
        absolute_positions: bool = False,
    ) -> None:
        super().__init__()
        if rope_axes not in (0, 1, 2, 3):
            raise ValueError(f"rope_axes must be 0, 1, 2 or 3, got {rope_axes}")
        if absolute_positions and not rope_axes:
            raise ValueError("absolute_positions needs token positions (rope_axes 1, 2 or 3)")
        self.absolute_positions = absolute_positions
        self.gradient_checkpointing = gradient_checkpointing
        self.input_proj = nn.Linear(in_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.cond_proj = nn.Linear(cond_dim, dim) if cond_dim is not None else None
        self.rope = RotaryEmbedding(dim // heads, rope_axes, rope_theta) if rope_axes else None
        self.blocks = nn.ModuleList(
            DiTBlock(dim, heads, mlp_ratio, context_dim, qk_norm, attention) for _ in range(depth)
        )
        self.final_layer = FinalLayer(dim, out_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier for plain Linears as in DiT; the adaLN/final/cross-out layers stay zero so the
        # network starts as "output 0" regardless of input.
        zeroed = {self.final_layer.linear, self.final_layer.adaLN_modulation[1]}
        for block in self.blocks:
            zeroed.add(block.adaLN_modulation[1])
            if block.cross_attn is not None:
                zeroed.add(block.cross_attn.proj)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in zeroed:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.t_embedder.mlp[0::2]:
            nn.init.normal_(layer.weight, std=0.02)

    def forward(
        self,
        tokens: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        pooled: Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> Tensor:
        """Predict per-token outputs.

        Args:
            tokens: (B, L, in_dim). t: (B,) timesteps in model time units.
            context: (B, Lc, context_dim) text tokens. context_mask: (B, Lc) bool, True = real.
            positions: (L, rope_axes) or (B, L, rope_axes) token coordinates; optional for
                rope_axes=1 (defaults to 0..L-1), required for 2/3, forbidden for 0.
            mask: (B, L) bool, True = real token; padded tokens do not influence real ones and
                their outputs are zero.
            pooled: (B, cond_dim) pooled conditioning (e.g. a sentence embedding).
            grid: (T, H, W) token grid (time-major, T*H*W = L); needed by factorised attention.

        Returns:
            (B, L, out_dim) tensor.
        """
        rope = None
        if self.rope is None:
            if positions is not None:
                raise ValueError("positions were given but the DiT was built with rope_axes=0")
        else:
            if positions is None and self.rope.axes == 1:
                positions = torch.arange(tokens.shape[1], device=tokens.device)[:, None]
            if positions is None:
                raise ValueError(f"rope_axes={self.rope.axes} needs positions (L, axes)")
            rope = self.rope(positions)
        c = self.t_embedder(t)
        if (pooled is None) != (self.cond_proj is None):
            raise ValueError("pass `pooled` exactly when the DiT was built with cond_dim")
        if self.cond_proj is not None:
            c = c + self.cond_proj(pooled)

        x = self.input_proj(tokens)
        if self.absolute_positions:
            x = x + sincos_position_embedding(positions, x.shape[-1]).to(x.dtype)
        use_ckpt = self.gradient_checkpointing and self.training
        for block in self.blocks:
            x = maybe_checkpoint(
                block, x, c, context, context_mask, rope, mask, grid, enabled=use_ckpt
            )
        out = self.final_layer(x, c)
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return out
