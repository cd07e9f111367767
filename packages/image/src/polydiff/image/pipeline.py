"""Text-to-image generation from a checkpoint folder written by ``polydiff train``.

A checkpoint is the trainer's ``final/`` folder: ``model.safetensors`` + ``config.json`` with
``{"class", "config", "modality": "image", "model": <the validated model config>}``. The model
config supplies the schedule, prediction type, text encoder and sampling defaults. Inference
only: nothing here imports the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from polydiff.core.modality import (
    Conditioner,
    GenerationRequest,
    RequestOptions,
    Sampling,
    TextConditioner,
    denoise,
)
from polydiff.core.modality import (
    generate as generate_request,
)
from polydiff.core.pixels import to_uint8

from .model import LatentDiT

__all__ = ["BATCH_SIZE", "generate", "grid_image", "image_shape", "sample_images", "to_pil"]

BATCH_SIZE = 64  # images per sampling batch (the default of --batch-size)


def image_shape(model: nn.Module, config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of what ``model`` diffuses: pixels, or its codec's latents."""
    size, channels = int(config["image_size"]), int(config["channels"])
    if isinstance(model, LatentDiT):
        return model.autoencoder.latent_shape((channels, size, size))  # type: ignore[return-value]
    return (channels, size, size)


def sample_images(
    model: nn.Module,
    config: Mapping[str, Any],
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    options: Sampling | None = None,
    conditioner: Conditioner | None = None,
) -> Tensor:
    """Generate one image per prompt: (N, C, H, W) float32 in [-1, 1] on the CPU.

    ``None`` options take the model config's ``sample_steps`` / ``sampler`` / ``guidance``
    (``options`` gives them all at once, with negative prompt, batch size and progress).
    Guidance 1 runs the conditional model alone; any other scale runs classifier-free guidance
    against the empty prompt (or the negative prompt). The starting noise is drawn for all
    prompts at once from ``seed``, so an image depends on its position in ``prompts`` and the
    seed only.
    """
    if options is None:
        request = GenerationRequest(("",), steps=steps, sampler=sampler, guidance=guidance)
        options = Sampling.resolve(config, request, BATCH_SIZE)
    latent = isinstance(model, LatentDiT)
    with torch.no_grad():
        x = denoise(
            model,
            config,
            conditioner or TextConditioner.from_config(config),
            list(prompts),
            image_shape(model, config),
            options,
            generator=torch.Generator().manual_seed(int(seed)),
            clip_x0=None if latent else 1.0,  # pixels live in [-1, 1]; latents do not
        )
        if latent and len(x):
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            x = model.decode(x.to(device=device, dtype=dtype)).float().cpu()
    return x.clamp(-1.0, 1.0)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N 8-bit PIL images (mode L for C = 1, RGB for C = 3)."""
    pixels = to_uint8(images).numpy()
    if pixels.shape[1] == 1:
        return [Image.fromarray(p[0], mode="L") for p in pixels]
    return [Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0)), mode="RGB") for p in pixels]


def grid_image(images: Sequence[Image.Image], rows: int = 1, scale: int = 4) -> Image.Image:
    """Tile equally sized images into ``rows`` rows, each upscaled ``scale``x (nearest)."""
    if not images:
        raise ValueError("grid_image needs at least one image")
    cols = math.ceil(len(images) / rows)
    w, h = images[0].width * scale, images[0].height * scale
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, image in enumerate(images):
        tile = image.resize((w, h), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % cols) * w, (i // cols) * h))
    return grid


def generate(prompts: Sequence[str] | str, **options: Unpack[RequestOptions]) -> list[Image.Image]:
    """Generate ``num`` images for each prompt (see :func:`polydiff.core.modality.generate`).

    Args:
        prompts: the prompts (a single string is one prompt); at least one.
        options: ``checkpoint`` (a trainer ``final/`` folder; default: the bundled digits
            model), ``num`` (images per prompt), ``steps`` / ``sampler`` / ``guidance``
            (default: the checkpoint's), ``seed``, ``negative_prompt``, ``batch_size``
            (default 64), ``device`` and ``dtype`` (model and text encoder).

    Returns:
        ``len(prompts) * num`` PIL images, prompt by prompt: [p0 #0, p0 #1, ..., p1 #0, ...].

    Raises:
        ValueError: a bad option (checked before anything is loaded).
        FileNotFoundError: no checkpoint given and the bundled model is not installed.
        CheckpointError: missing folder, corrupt checkpoint, not an image denoiser.
    """
    return generate_request("image", GenerationRequest.of(prompts, **options)).outputs
