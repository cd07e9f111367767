"""Multi-head self/cross attention on top of ``F.scaled_dot_product_attention``."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rotary

QKNorm = bool | Literal["rms", "layer"]


def _make_qk_norm(kind: QKNorm, head_dim: int) -> nn.Module:
    if kind is False:
        return nn.Identity()
    if kind is True or kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    raise ValueError(f"qk_norm must be False, True, 'rms' or 'layer', got {kind!r}")


class Attention(nn.Module):
    """Multi-head attention; self-attention if ``context_dim`` is None, else cross-attention.

    Args:
        dim: width of the query tokens (and of the output).
        heads: number of heads; must divide ``dim``.
        qk_norm: normalise q and k per head before the dot product (stabilises training at
            large scale): False, True/'rms' (RMSNorm) or 'layer' (LayerNorm).
        context_dim: width of the key/value tokens for cross-attention.
    """

    def __init__(
        self, dim: int, heads: int, qk_norm: QKNorm = False, context_dim: int | None = None
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _make_qk_norm(qk_norm, self.head_dim)
        self.k_norm = _make_qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        rope: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``x`` to itself (self) or to ``context`` (cross).

        Args:
            x: (B, L, dim) query tokens.
            context: (B, Lc, context_dim) key/value tokens; required iff cross-attention.
            key_mask: (B, Lk) bool, True = real key, over ``x`` (self) or ``context`` (cross).
                Padded keys receive exactly zero attention weight; a row with no real key at
                all outputs zeros (attending to nothing contributes nothing).
            rope: rotary table (L, head_dim // 2, 2) or (B, L, head_dim // 2, 2) from
                :class:`RotaryEmbedding`; self-attention only.

        Returns:
            (B, L, dim) tensor.
        """
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            if rope is not None:
                raise ValueError("rotary embeddings are only supported in self-attention")
            q = self.to_q(x)
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            if context is not None:
                raise ValueError("self-attention got a context; set context_dim to cross-attend")
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)

        attn_mask, has_key = None, None
        if key_mask is not None:
            if key_mask.dtype != torch.bool or key_mask.shape != k.shape[:1] + k.shape[2:3]:
                raise ValueError(
                    f"key_mask must be bool of shape (B, Lk) = {(k.shape[0], k.shape[2])}, "
                    f"got {key_mask.dtype} {tuple(key_mask.shape)}"
                )
            has_key = key_mask.any(dim=-1)
            # A fully masked row would softmax over all -inf -> NaN; let it see every key and
            # zero its output below instead.
            safe_mask = key_mask | ~has_key[:, None]
            attn_mask = safe_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).flatten(2))
        if has_key is not None:
            out = out * has_key[:, None, None].to(out.dtype)
        return out
