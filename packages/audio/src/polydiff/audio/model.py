"""Mel denoisers, built from ``polydiff.core.blocks``.

A denoiser works on the normalised log-mel image ``x`` (B, 1, n_mels, F): each band's
log-mel minus its dataset mean, over its dataset std (``mel_mean`` / ``mel_std``, fitted by
the recipe's statistics hook and carried in the checkpoint). Its call signature is what
``diffusion_loss`` and ``sample`` pass::

    model(x, t, context=None, context_mask=None, pooled=None, valid=None) -> like x

with ``t`` (B,) model time, ``context`` (B, L, D) text tokens and ``context_mask`` (B, L)
(text conditioning only), ``pooled`` (B, P) one vector per prompt (the sentence embedding,
or the CLAP embedding) and ``valid`` (B, 1, 1, F) bool, True at real frames (padding is
exactly 0 in ``x``; the DiT masks padded tokens out of attention).

The denoiser holds its neural vocoder (frozen, from a ``kind: vocoder`` run) when the config
names one, so its checkpoint folder is all generation needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polydiff.core.blocks import DiT, TimeAndPooledEmbedding, UNet
from polydiff.core.pretrained import Configurable, import_class

from .mel import MelSettings

__all__ = ["MelDenoiser"]


class _FrameDiT(nn.Module):
    """A DiT over tokens of ``patch`` consecutive frames (all bands), 1D rotary positions."""

    def __init__(self, n_mels: int, patch: int, context_dim: int | None, pooled_dim: int,
                 dit: Mapping[str, Any], gradient_checkpointing: bool) -> None:  # fmt: skip
        super().__init__()
        self.patch = patch
        width = n_mels * patch
        self.dit = DiT(
            width,
            width,
            int(dit["dim"]),
            int(dit["depth"]),
            int(dit["heads"]),
            mlp_ratio=float(dit["mlp_ratio"]),
            context_dim=context_dim,
            qk_norm=bool(dit["qk_norm"]),
            rope_axes=1,
            cond_dim=pooled_dim,
            gradient_checkpointing=gradient_checkpointing,
            rope_theta=float(dit["rope_theta"]),
            absolute_positions=True,
        )

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None, context_mask: Tensor | None,
                pooled: Tensor, valid: Tensor | None) -> Tensor:  # fmt: skip
        b, _, m, f = x.shape
        p = self.patch
        tokens = x[:, 0].reshape(b, m, f // p, p).permute(0, 2, 1, 3).reshape(b, f // p, m * p)
        mask = None if valid is None else valid.reshape(b, f)[:, ::p]  # a token's first frame
        positions = torch.arange(f // p, device=x.device)[:, None]
        out = self.dit(tokens, t, context, context_mask, positions, mask, pooled)
        return out.reshape(b, f // p, m, p).permute(0, 2, 1, 3).reshape(b, 1, m, f)


class _MelUNet(nn.Module):
    """The core 2D U-Net over the (1, n_mels, F) mel image; the pooled vector joins the time
    embedding (FiLM), text tokens enter through cross-attention."""

    def __init__(self, context_dim: int | None, pooled_dim: int, unet: Mapping[str, Any],
                 gradient_checkpointing: bool) -> None:  # fmt: skip
        super().__init__()
        base = int(unet["base_channels"])
        self.unet = UNet(
            1,
            1,
            dims=2,
            base_channels=base,
            channel_mult=tuple(unet["channel_mult"]),
            num_res_blocks=int(unet["num_res_blocks"]),
            attention_levels=tuple(unet["attention_levels"]),
            heads=int(unet["heads"]),
            context_dim=context_dim,
            dropout=float(unet["dropout"]),
            gradient_checkpointing=gradient_checkpointing,
        )
        self.unet.time_embed = TimeAndPooledEmbedding(self.unet.time_embed, pooled_dim, 4 * base)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None, context_mask: Tensor | None,
                pooled: Tensor, valid: Tensor | None) -> Tensor:  # fmt: skip
        packed = torch.cat([t.float()[:, None], pooled.float()], dim=1)
        out = self.unet(x, packed, context, context_mask)
        # Convolutions see the (zero) padding; what they write there is dropped.
        return out if valid is None else out * valid.to(out.dtype)


class MelDenoiser(Configurable, nn.Module):
    """Text- or CLAP-conditioned denoiser of normalised log-mel images (see the module doc).

    Args:
        mel: the MelSettings record (``MelSettings.to_dict()``).
        network: ``"dit"`` (with ``dit``: patch, dim, depth, heads, mlp_ratio, qk_norm,
            rope_theta) or ``"unet"`` (with ``unet``: the U-Net section).
        context_dim: text-token width (None: no cross-attention, e.g. CLAP conditioning).
        pooled_dim: width of the pooled conditioning vector.
        vocoder_class, vocoder: the neural vocoder's class path and config (None: none).
    """

    def __init__(
        self,
        mel: Mapping[str, Any] | None = None,
        network: str = "dit",
        dit: Mapping[str, Any] | None = None,
        unet: Mapping[str, Any] | None = None,
        context_dim: int | None = 384,
        pooled_dim: int = 384,
        gradient_checkpointing: bool = False,
        vocoder_class: str | None = None,
        vocoder: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.mel = MelSettings.from_dict(mel)
        n_mels = self.mel.n_mels
        if network == "dit":
            if dit is None:
                raise ValueError("MelDenoiser: network 'dit' needs its dit section")
            self.frame_multiple = int(dit["patch"])
            self.net: nn.Module = _FrameDiT(
                n_mels, self.frame_multiple, context_dim, pooled_dim, dit, gradient_checkpointing
            )
        elif network == "unet":
            if unet is None:
                raise ValueError("MelDenoiser: network 'unet' needs its unet section")
            self.frame_multiple = 2 ** (len(unet["channel_mult"]) - 1)
            self.net = _MelUNet(context_dim, pooled_dim, unet, gradient_checkpointing)
        else:
            raise ValueError(f"MelDenoiser: network must be 'dit' or 'unet', got {network!r}")
        # Per-band statistics of the training log-mels (fitted at step 0; carried in
        # checkpoints). Until fitted: the log-mel range's rough centre and spread.
        self.register_buffer("mel_mean", torch.full((n_mels,), -5.0))
        self.register_buffer("mel_std", torch.full((n_mels,), 3.0))
        self.vocoder: nn.Module | None = None
        if vocoder_class is not None:
            cls = import_class(vocoder_class, "the denoiser's vocoder")
            self.vocoder = cls(**dict(vocoder or {})).requires_grad_(False).eval()
            if getattr(self.vocoder, "mel", None) != self.mel:
                raise ValueError("MelDenoiser: the vocoder was trained on other mel settings")

    def train(self, mode: bool = True) -> MelDenoiser:
        super().train(mode)
        if self.vocoder is not None:  # frozen: always in eval mode
            self.vocoder.eval()
        return self

    def normalize(self, log_mel: Tensor) -> Tensor:
        """(B, n_mels, F) log-mel -> (B, 1, n_mels, F) the denoiser's space."""
        mean, std = self.mel_mean.float()[:, None], self.mel_std.float()[:, None]
        return ((log_mel.float() - mean) / std)[:, None]

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: (B, 1, n_mels, F) -> (B, n_mels, F) log-mel."""
        mean, std = self.mel_mean.float()[:, None], self.mel_std.float()[:, None]
        return x[:, 0].float() * std + mean

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """(B, 1, n_mels, F), (B,), (B, L, D), (B, L), (B, P), (B, 1, 1, F) -> like ``x``.
        F must be a multiple of ``frame_multiple``."""
        if pooled is None:
            raise ValueError("MelDenoiser needs `pooled` (B, pooled_dim) conditioning vectors")
        if x.shape[-1] % self.frame_multiple:
            raise ValueError(
                f"MelDenoiser: {x.shape[-1]} frames is not a multiple of {self.frame_multiple}"
            )
        return self.net(x, t, context, context_mask, pooled, valid)

    @staticmethod
    def frames_mask(lengths: Sequence[int], frames: int) -> Tensor:
        """(B, 1, 1, frames) bool: True at the first ``lengths[i]`` frames of item i."""
        return (torch.arange(frames)[None] < torch.tensor(list(lengths))[:, None])[:, None, None]
