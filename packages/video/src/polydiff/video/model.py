"""The spacetime-patch video DiT, built from ``polydiff.core.blocks``.

A (B, C, T, H, W) video (pixels, or the latents of an autoencoder: the model only sees
channels) is cut into ``patch = (pt, ph, pw)`` tubelets; each tubelet is a token with a 3D
rotary position (frame, row, column), so any clip length and frame size divisible by the
patch works with the same weights (the buckets train several). Blocks are adaLN-Zero DiT
blocks with full 3D self-attention or factorised spatial-then-temporal attention, and text
cross-attention; the pooled text vector is added to the timestep embedding.

Image-to-video: the input carries, next to the noisy video, a conditioning video that is the
clean first frame at frame 0 and zeros elsewhere, plus a one-channel mask that is 1 where a
frame is given. Without a first frame both are zero, so one model does text-to-video and
image-to-video. The call signature is what ``diffusion_loss`` and ``sample`` pass through
``cond``::

    model(x, t, context=None, context_mask=None, pooled=None, first_frame=None,
          first_frame_given=None) -> Tensor shaped like x

Latent video diffusion: give the DiT a frozen latent codec (``autoencoder_class`` +
``autoencoder`` config, a :class:`polydiff.core.modality.codec.LatentCodec`; its weights
travel in the same checkpoint) and it diffuses the codec's latents. A 2D image codec
(``data_ndim`` 3, such as ``polydiff.image.model.KLAutoencoder``) is applied frame by frame;
a spacetime codec (``data_ndim`` 4) takes whole clips and may also compress time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polydiff.core.blocks import DiT, grid_positions, spacetime_patchify, spacetime_unpatchify
from polydiff.core.blocks.dit import AttentionLayout
from polydiff.core.modality.codec import decode_frames, encode_frames, frozen_codec
from polydiff.core.pretrained import Configurable

__all__ = ["VideoDiT", "first_frame_condition", "latent_shape"]


def latent_shape(
    codec: nn.Module, channels: int, frames: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """(c, t, h, w) of a latent codec's latents of a (channels, frames, height, width) clip:
    a 2D codec keeps the frame count, a spacetime codec says (ValueError if it cannot take
    that size)."""
    if codec.data_ndim == 3:
        c, h, w = codec.latent_shape((channels, height, width))
        return (c, frames, h, w)
    return tuple(codec.latent_shape((channels, frames, height, width)))  # type: ignore[return-value]


def first_frame_condition(
    first_frame: Tensor | None,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    given: Tensor | None = None,
) -> Tensor:
    """The conditioning channels of a batch: (B, C + 1, T, H, W) = [clean frames, mask].

    Args:
        first_frame: (B, C, H, W) clean first frames in the model's space, or None.
        shape: the video batch shape (B, C, T, H, W).
        given: (B,) bool, which samples get their first frame (default: all).

    Returns:
        Zeros everywhere except frame 0 of the given samples, which holds their frame and a
        mask of 1.
    """
    b, c, t, h, w = shape
    cond = torch.zeros((b, c + 1, t, h, w), dtype=dtype, device=device)
    if first_frame is not None:
        if tuple(first_frame.shape) != (b, c, h, w):
            raise ValueError(
                f"first_frame must have shape (B, C, H, W) = {(b, c, h, w)}, "
                f"got {tuple(first_frame.shape)}"
            )
        keep = torch.ones(b, device=device) if given is None else given.to(device, dtype)
        cond[:, :c, 0] = first_frame.to(dtype) * keep[:, None, None, None]
        cond[:, c, 0] = keep[:, None, None]
    return cond


class VideoDiT(Configurable, nn.Module):
    """Text- (and first-frame-) conditioned DiT over spacetime patches.

    Args:
        channels: video channels (3 for RGB pixels; the latent channels of an autoencoder).
        patch: tubelet size (pt, ph, pw); T, H, W must be divisible by it.
        dim, depth, heads, mlp_ratio, qk_norm: transformer sizes (see ``polydiff.core.DiT``).
        attention: "full" 3D attention or "factorised" (space, then time, in every block).
        context_dim, pooled_dim: widths of the text encoder's tokens and pooled vector.
        first_frame: accept a first frame to condition on (image-to-video).
        gradient_checkpointing: recompute block activations in backward.
        rope_theta: rotary frequency base.
        absolute_positions: add a sin-cos embedding of each tubelet's (t, h, w) to its token,
            so the model knows where and when it is, not only relative offsets (rotary).
            Off by default so checkpoints saved before it existed load unchanged.
        autoencoder_class, autoencoder: ``"module:Class"`` and constructor config of a frozen
            latent autoencoder (see the module docstring); ``channels`` is then its latent
            channels. None = pixel space.
    """

    def __init__(
        self,
        channels: int = 3,
        patch: Sequence[int] = (2, 4, 4),
        dim: int = 192,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        attention: AttentionLayout = "full",
        context_dim: int = 384,
        pooled_dim: int = 384,
        qk_norm: bool = True,
        first_frame: bool = True,
        gradient_checkpointing: bool = False,
        rope_theta: float = 10000.0,
        absolute_positions: bool = False,
        autoencoder_class: str | None = None,
        autoencoder: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder: nn.Module | None = None
        if autoencoder_class is not None:
            where = "VideoDiT(autoencoder_class=...)"
            self.autoencoder = frozen_codec(autoencoder_class, autoencoder or {}, where)
        if len(patch) != 3 or any(int(p) < 1 for p in patch):
            raise ValueError(f"patch must be three sizes (pt, ph, pw) >= 1, got {patch}")
        self.channels = channels
        self.patch = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.first_frame = first_frame
        volume = self.patch[0] * self.patch[1] * self.patch[2]
        in_channels = 2 * channels + 1 if first_frame else channels
        self.dit = DiT(
            in_channels * volume,
            channels * volume,
            dim,
            depth,
            heads,
            mlp_ratio=mlp_ratio,
            context_dim=context_dim,
            qk_norm=qk_norm,
            rope_axes=3,
            cond_dim=pooled_dim,
            gradient_checkpointing=gradient_checkpointing,
            rope_theta=rope_theta,
            attention=attention,
            absolute_positions=absolute_positions,
        )

    # --- latent space ----------------------------------------------------------------------
    def encode_video(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) pixels in [-1, 1] -> what the DiT diffuses (identity in pixel
        space; a 2D codec frame by frame)."""
        codec = self.autoencoder
        if codec is None:
            return video
        if codec.data_ndim == 3:
            return encode_frames(codec, video)
        with torch.no_grad():
            return codec.encode_latents(video)

    def decode_video(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`encode_video`."""
        codec = self.autoencoder
        if codec is None:
            return latents
        if codec.data_ndim == 3:
            return decode_frames(codec, latents)
        with torch.no_grad():
            return codec.decode_latents(latents)

    def model_shape(self, pixel_channels: int, frames: int, height: int, width: int) -> tuple:
        """(C, T, H, W) of what the DiT diffuses for clips of that pixel size."""
        if self.autoencoder is None:
            return (self.channels, frames, height, width)
        return latent_shape(self.autoencoder, pixel_channels, frames, height, width)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        first_frame: Tensor | None = None,
        first_frame_given: Tensor | None = None,
    ) -> Tensor:
        """Predict the denoising target of a video batch.

        Args:
            x: (B, C, T, H, W) noisy videos. t: (B,) model time.
            context: (B, L, D) text tokens; context_mask: (B, L) bool, True = real token.
            pooled: (B, P) pooled text vectors (required).
            first_frame: (B, C, H, W) clean first frames to condition on, or None.
            first_frame_given: (B,) bool, the samples whose ``first_frame`` counts (default:
                all); the others are text-to-video.

        Returns:
            (B, C, T, H, W).
        """
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(
                f"VideoDiT expects (B, {self.channels}, T, H, W), got {tuple(x.shape)}"
            )
        if pooled is None:
            raise ValueError("the video DiT needs `pooled` (B, pooled_dim) text vectors")
        if first_frame is not None and not self.first_frame:
            raise ValueError("this VideoDiT was built with first_frame=False")
        t_len, h, w = x.shape[-3:]
        inputs = x
        if self.first_frame:
            cond = first_frame_condition(first_frame, x.shape, x.dtype, x.device, first_frame_given)
            inputs = torch.cat([x, cond], dim=1)
        tokens = spacetime_patchify(inputs, self.patch)  # ValueError if the patch does not fit
        pt, ph, pw = self.patch
        grid = (t_len // pt, h // ph, w // pw)
        positions = grid_positions(grid, device=x.device)
        out = self.dit(
            tokens, t, context, context_mask, positions=positions, pooled=pooled, grid=grid
        )
        return spacetime_unpatchify(out, self.patch, t_len, h, w, self.channels)
