"""Frozen latent codecs: one mechanism for every autoencoder a denoiser diffuses the latents of.

A codec is an ``nn.Module`` with the :class:`LatentCodec` methods: image KL autoencoders
(``data_ndim`` 3: (C, H, W)), spacetime video autoencoders (4: (C, T, H, W)), a mel
autoencoder or a point autoencoder. A denoiser that diffuses latents holds its codec as a
frozen sub-module built by :func:`frozen_codec` from the codec's class path and config, so its
checkpoint carries the codec's weights and generation needs nothing else. A 2D codec applies
to video frame by frame through :func:`encode_frames` / :func:`decode_frames`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..pretrained import CheckpointError, class_path, from_pretrained, import_class

__all__ = [
    "LatentCodec",
    "check_codec",
    "codec_record",
    "decode_frames",
    "encode_frames",
    "frozen_codec",
    "load_codec",
    "track_latent_std",
]


@runtime_checkable
class LatentCodec(Protocol):
    """What a latent denoiser needs of its autoencoder.

    Attributes:
        data_ndim: dims of one data sample without batch ((C, H, W): 3; (C, T, H, W): 4).
        latent_scale: the scalar latents are divided by so diffusion sees unit variance.
    """

    data_ndim: int

    @property
    def latent_scale(self) -> Tensor: ...

    def encode_latents(self, x: Tensor) -> Tensor:
        """(B, *data) in the data range -> (B, *latent) normalised latents (deterministic)."""
        ...

    def decode_latents(self, z: Tensor) -> Tensor:
        """Inverse of ``encode_latents``."""
        ...

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """The latent shape (no batch) of one sample of ``data_shape`` (ValueError if the
        codec cannot take that shape)."""
        ...


def check_codec(module: Any, where: str) -> nn.Module:
    """``module`` if it is an ``nn.Module`` implementing :class:`LatentCodec`, else
    CheckpointError naming ``where``."""
    if not isinstance(module, nn.Module) or not isinstance(module, LatentCodec):
        raise CheckpointError(
            f"{where}: {type(module).__name__} is not a latent codec (an nn.Module with "
            "data_ndim, latent_scale, encode_latents, decode_latents, latent_shape)"
        )
    return module


def frozen_codec(class_name: str, config: Mapping[str, Any], where: str = "a codec") -> nn.Module:
    """Build the codec ``class_name`` (``"polydiff.<...>:Class"``) from ``config``, frozen
    (no gradients, eval mode); its weights are loaded with the denoiser's."""
    cls = import_class(class_name, where)
    return check_codec(cls(**dict(config)), where).requires_grad_(False).eval()


def load_codec(folder: str | Path, where: str = "autoencoder") -> nn.Module:
    """A trained codec checkpoint (a ``final/`` folder), frozen."""
    module = from_pretrained(folder)
    return check_codec(module, f"{where} {folder}").requires_grad_(False).eval()


def codec_record(codec: nn.Module) -> dict[str, Any]:
    """``{"autoencoder_class", "autoencoder"}``: the keywords with which a latent denoiser
    (``LatentDiT``, ``VideoDiT``) rebuilds ``codec`` through :func:`frozen_codec`."""
    return {"autoencoder_class": class_path(type(codec)), "autoencoder": dict(codec.config)}


@torch.no_grad()
def track_latent_std(latent_std: Tensor, updates: Tensor, mean: Tensor) -> None:
    """Fold a batch of latent means into an autoencoder's ``latent_std`` buffer (its
    ``latent_scale``), in place: a running average over the first updates, then an EMA with
    momentum 0.99; ``updates`` (a long scalar buffer) counts them, so a resumed run
    continues the same average."""
    n = int(updates)
    momentum = min(0.99, n / (n + 1))  # the first update replaces the initial 1.0
    std = mean.detach().float().std().clamp_min(1e-6)
    latent_std.copy_(momentum * latent_std.float() + (1 - momentum) * std)
    updates.add_(1)


@torch.no_grad()
def encode_frames(codec: LatentCodec, video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B, c, T, h, w) through a 2D codec, frame by frame."""
    b, t = video.shape[0], video.shape[2]
    latents = codec.encode_latents(video.transpose(1, 2).flatten(0, 1))
    return latents.unflatten(0, (b, t)).transpose(1, 2)


@torch.no_grad()
def decode_frames(codec: LatentCodec, latents: Tensor) -> Tensor:
    """Inverse of :func:`encode_frames`."""
    b, t = latents.shape[0], latents.shape[2]
    frames = codec.decode_latents(latents.transpose(1, 2).flatten(0, 1))
    return frames.unflatten(0, (b, t)).transpose(1, 2)
