"""Text-to-image generation from a checkpoint folder written by ``polydiff train``.

A checkpoint is the trainer's ``final/`` folder: ``model.safetensors`` + ``config.json`` with
``{"class", "config", "modality": "image", "model": <the validated model config>}``. The model
config supplies the schedule, prediction type, text encoder and sampling defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from polydiff.core import CFG, SAMPLERS, sample
from polydiff.core.pretrained import CheckpointError
from polydiff.core.train.denoising import (
    check_sampling_options,
    make_schedule,
    text_conditioning,
)
from polydiff.core.train.trained import bundled, load_trained

from .model import LatentDiT

__all__ = [
    "bundled_checkpoint",
    "generate",
    "grid_image",
    "load_checkpoint",
    "sample_images",
    "to_pil",
]

_BUNDLED = Path(__file__).resolve().parent / "bundled" / "digits"
_CHUNK = 64  # images per sampling batch


def bundled_checkpoint() -> Path:
    """The digits model that ships with the package (``polydiff/image/bundled/digits``).

    Raises:
        FileNotFoundError: the package was installed without it (it is trained with
            ``polydiff train --config shared/configs/image/digits.yaml``).
    """
    return bundled(_BUNDLED, "image", "shared/configs/image/digits.yaml")


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained image model and its validated model config.

    Raises:
        CheckpointError: missing folder, corrupt or mismatched files, not an image model, or
            no usable ``model`` section in ``config.json``.
    """
    from .recipe import ImageRecipe

    model, model_cfg = load_trained(folder, ImageRecipe(), device)
    if model_cfg["kind"] == "autoencoder":
        raise CheckpointError(
            f"{folder} is an autoencoder; generate from a denoiser (unet, dit or latent_dit)"
        )
    return model, model_cfg


@torch.no_grad()
def sample_images(
    model: nn.Module,
    model_cfg: Mapping[str, Any],
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> Tensor:
    """Generate one image per prompt: (N, C, H, W) float32 in [-1, 1] on the CPU.

    ``None`` options take the model config's ``sample_steps`` / ``sampler`` / ``guidance``.
    Guidance 1 runs the conditional model alone; any other scale runs classifier-free guidance
    against the empty prompt. The starting noise is drawn for all prompts at once from
    ``seed``, so an image depends on its position in ``prompts`` and the seed only.
    """
    steps = int(model_cfg["sample_steps"]) if steps is None else steps
    sampler = str(model_cfg["sampler"]) if sampler is None else sampler
    guidance = float(model_cfg["guidance"]) if guidance is None else guidance
    check_sampling_options(steps, sampler, guidance, 1)
    param = next(p for p in model.parameters() if p.is_floating_point())
    device, dtype = param.device, param.dtype
    size, channels = int(model_cfg["image_size"]), int(model_cfg["channels"])
    latent = isinstance(model, LatentDiT)
    if latent:
        factor = model.autoencoder.downsample_factor
        shape: tuple[int, ...] = (model.latent_channels, size // factor, size // factor)
    else:
        shape = (channels, size, size)
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(prompts), *shape), generator=generator)
    schedule = make_schedule(model_cfg)
    uncond = text_conditioning([""], model_cfg, device, dtype) if guidance != 1.0 else None
    outputs = []
    for start in range(0, len(prompts), _CHUNK):
        chunk = list(prompts[start : start + _CHUNK])
        cond = text_conditioning(chunk, model_cfg, device, dtype)
        x = sample(
            model,
            noise[start : start + len(chunk)].to(device=device, dtype=dtype),
            schedule=schedule,
            sampler=sampler,
            steps=steps,
            prediction=model_cfg["prediction"],
            guidance=CFG(guidance) if uncond is not None else None,
            cond=cond,
            uncond=uncond,
            clip_x0=None if latent else 1.0,  # pixels live in [-1, 1]; latents do not
            generator=generator,
        )
        if latent:
            x = model.decode(x)
        outputs.append(x.float().clamp(-1.0, 1.0).cpu())
    return torch.cat(outputs) if outputs else torch.zeros((0, channels, size, size))


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N 8-bit PIL images (mode L for C = 1, RGB for C = 3)."""
    pixels = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
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


def generate(
    prompts: Sequence[str] | str,
    *,
    checkpoint: str | Path | None = None,
    num: int = 1,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[Image.Image]:
    """Generate ``num`` images for each prompt.

    Args:
        prompts: the prompts (a single string is one prompt); at least one.
        checkpoint: a trainer ``final/`` folder; ``None`` = the bundled digits model.
        num: images per prompt.
        steps, sampler, guidance: sampling options; ``None`` = the checkpoint's defaults
            (``sample_steps``, ``sampler``, ``guidance`` of its model config).
        seed: seeds the starting noise (and any ancestral noise).
        device: where the model runs.

    Returns:
        ``len(prompts) * num`` PIL images, prompt by prompt: [p0 #0, p0 #1, ..., p1 #0, ...].

    Raises:
        ValueError: no prompts, num < 1, steps < 1, unknown sampler, guidance < 0 or not
            finite (checked before anything is loaded).
        FileNotFoundError: ``checkpoint=None`` and the bundled model is not installed.
        CheckpointError: missing folder, corrupt checkpoint, not an image model.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("no prompts given: pass at least one prompt")
    if not all(isinstance(p, str) for p in prompt_list):
        raise ValueError("prompts must be strings")
    check_sampling_options(
        1 if steps is None else steps,
        next(iter(SAMPLERS)) if sampler is None else sampler,
        1.0 if guidance is None else guidance,
        num,
    )
    folder = bundled_checkpoint() if checkpoint is None else Path(checkpoint)
    model, model_cfg = load_checkpoint(folder, device=device)
    repeated = [p for p in prompt_list for _ in range(num)]
    images = sample_images(
        model, model_cfg, repeated, steps=steps, sampler=sampler, guidance=guidance, seed=seed
    )
    return to_pil(images)
