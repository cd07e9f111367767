"""Text-to-video and image-to-video generation from a checkpoint written by ``polydiff train``.

Videos longer than the model's trained clip are generated in chunks: each new chunk starts
with the last ``overlap`` frames of the one before, kept fixed by the sampler's inpainting
mask (and its first frame is also the model's first-frame condition), so motion carries over
the seam; the shared frames are written once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from polydiff.core import CFG, sample
from polydiff.core.train.denoising import (
    check_sampling_options,
    make_schedule,
    text_conditioning,
)
from polydiff.core.train.trained import bundled, load_trained

from .data import model_buckets, resize_crop

__all__ = [
    "bundled_checkpoint",
    "contact_sheet",
    "generate",
    "load_checkpoint",
    "load_first_frame",
    "sample_videos",
]

_BUNDLED = Path(__file__).resolve().parent / "bundled" / "moving-shapes"
_CHUNK = 8  # videos per sampling batch


def bundled_checkpoint() -> Path:
    """The moving-shapes model that ships with the package (``polydiff/video/bundled``).

    Raises:
        FileNotFoundError: the package was installed without it (it is trained with
            ``polydiff train --config shared/configs/video/moving-shapes.yaml``).
    """
    return bundled(_BUNDLED, "video", "shared/configs/video/moving-shapes.yaml")


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a trained video model and its validated model config (CheckpointError if not)."""
    from .recipe import VideoRecipe

    return load_trained(folder, VideoRecipe(), device)


def load_first_frame(image: str | Path | Image.Image, channels: int, height: int, width: int):
    """An image file (or PIL image) -> (channels, height, width) float32 in [-1, 1], scaled
    to cover the frame and centre-cropped like training clips.

    Raises:
        ValueError: the file is missing or is not an image PIL can read.
    """
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the first frame {str(image)!r}: {e}") from e
    pixels = np.asarray(image.convert("RGB"))[None]  # (1, H, W, 3)
    frame = resize_crop(pixels, height, width)[:, 0]  # (3, height, width)
    if channels == 1:
        frame = (frame * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    return frame


def _trained_shape(model_cfg: dict[str, Any]) -> tuple[int, int, int]:
    """The longest trained clip (frames, height, width): the chunk length of generation."""
    return tuple(max(model_buckets(model_cfg), key=lambda b: (b[0], b[1] * b[2])))  # type: ignore[return-value]


@torch.no_grad()
def sample_videos(
    model: nn.Module,
    model_cfg: dict[str, Any],
    prompts: Sequence[str],
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    first_frames: Tensor | None = None,
    known: tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    decode: bool = True,
) -> Tensor:
    """Sample one clip per prompt: (N, C, T, H, W) float32 in [-1, 1] on the CPU.

    Args:
        frames, height, width: clip size in pixels (default: the trained clip); the model's
            clip (latent, for a latent model) must be divisible by its patch.
        steps, sampler, guidance: default to the model config's sampling defaults. Guidance
            applies to the text only: both branches see the first frame.
        first_frames: (N, C, H, W) pixel frames to start from (image-to-video): the model is
            conditioned on them and the sampler keeps them as frame 0 exactly.
        known: (init, mask) in the model's space for extending a clip: frames of ``init``
            (N, c, t, h, w) where ``mask`` (N, 1, t, 1, 1) is 0 are kept, the rest generated.
        generator: the noise source (default: seeded by ``seed``).
        decode: False returns what the model diffuses (latents for a latent model).
    """
    trained = _trained_shape(model_cfg)
    frames, height, width = (v if v is not None else d for v, d in zip(
        (frames, height, width), trained, strict=True
    ))  # fmt: skip
    shape = model.model_shape(int(model_cfg["channels"]), frames, height, width)
    first = None
    if first_frames is not None:
        param = next(p for p in model.parameters() if p.is_floating_point())
        pixels = first_frames.to(device=param.device, dtype=param.dtype)[:, :, None]
        first = model.encode_video(pixels)[:, :, 0].float().cpu()
    generator = generator or torch.Generator().manual_seed(int(seed))
    options = {"steps": steps, "sampler": sampler, "guidance": guidance}
    x = _sample(model, model_cfg, list(prompts), shape, first, known, generator, options)
    return _decoded(model, x) if decode else x


def _decoded(model: nn.Module, x: Tensor) -> Tensor:
    param = next(p for p in model.parameters() if p.is_floating_point())
    pixels = model.decode_video(x.to(device=param.device, dtype=param.dtype))
    return pixels.float().clamp(-1.0, 1.0).cpu()


def _sample(
    model: nn.Module,
    model_cfg: dict[str, Any],
    prompts: list[str],
    shape: Sequence[int],
    first: Tensor | None,
    known: tuple[Tensor, Tensor] | None,
    generator: torch.Generator,
    options: dict[str, Any],
) -> Tensor:
    """Sample (N, *shape) in the model's space; ``first`` (N, c, h, w) model-space frames."""
    steps = int(model_cfg["sample_steps"]) if options["steps"] is None else options["steps"]
    sampler = str(model_cfg["sampler"]) if options["sampler"] is None else options["sampler"]
    guidance = float(model_cfg["guidance"]) if options["guidance"] is None else options["guidance"]
    check_sampling_options(steps, sampler, guidance, 1)
    param = next(p for p in model.parameters() if p.is_floating_point())
    device, dtype = param.device, param.dtype
    full = (len(prompts), *shape)
    noise = torch.randn(full, generator=generator)
    init = mask = None
    if known is not None:
        init, mask = known
    if first is not None:
        if init is None:
            init = torch.zeros(full)
            mask = torch.ones((len(prompts), 1, shape[1], 1, 1))
        init = init.clone()
        init[:, :, 0] = first
        mask = mask.clone()
        mask[:, :, 0] = 0.0
    schedule = make_schedule(model_cfg)
    uncond_text = text_conditioning([""], model_cfg, device, dtype) if guidance != 1.0 else None
    latent = getattr(model, "autoencoder", None) is not None
    outputs = []
    for start in range(0, len(prompts), _CHUNK):
        part = slice(start, start + _CHUNK)
        chunk = prompts[part]
        cond: dict[str, Any] = text_conditioning(chunk, model_cfg, device, dtype)
        uncond = None if uncond_text is None else dict(uncond_text)
        if first is not None:
            frame = first[part].to(device=device, dtype=dtype)
            cond["first_frame"] = frame
            if uncond is not None:
                uncond = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in uncond.items()}
                uncond["first_frame"] = frame
        x = sample(
            model,
            noise[part].to(device=device, dtype=dtype),
            schedule=schedule,
            sampler=sampler,
            steps=steps,
            prediction=model_cfg["prediction"],
            guidance=CFG(guidance) if uncond is not None else None,
            cond=cond,
            uncond=uncond,
            init=None if init is None else init[part].to(device=device, dtype=dtype),
            mask=None if mask is None else mask[part].to(device=device, dtype=dtype),
            clip_x0=None if latent else 1.0,  # pixels live in [-1, 1]; latents do not
            generator=generator,
        )
        outputs.append(x.float().cpu())
    return torch.cat(outputs)


def _extend(
    model: nn.Module,
    model_cfg: dict[str, Any],
    prompts: list[str],
    frames: int,
    overlap: int,
    first_frames: Tensor | None,
    options: dict[str, Any],
) -> Tensor:
    """Chunked generation of ``frames`` frames (see the module docstring), in the model's
    space (``frames`` and ``overlap`` count its frames), decoded at the end."""
    generator = torch.Generator().manual_seed(int(options.pop("seed")))
    video = sample_videos(
        model, model_cfg, prompts, first_frames=first_frames, generator=generator, decode=False,
        **options,
    )  # fmt: skip
    shape = video.shape[1:]
    while video.shape[2] < frames:
        init = torch.zeros((len(prompts), *shape))
        init[:, :, :overlap] = video[:, :, -overlap:]
        mask = torch.ones((len(prompts), 1, shape[1], 1, 1))
        mask[:, :, :overlap] = 0.0
        nxt = _sample(
            model, model_cfg, prompts, shape, video[:, :, -overlap], (init, mask), generator,
            options,
        )  # fmt: skip
        video = torch.cat([video, nxt[:, :, overlap:]], dim=2)
    return _decoded(model, video[:, :, :frames])


def generate(
    prompts: Sequence[str] | str,
    *,
    checkpoint: str | Path | None = None,
    num: int = 1,
    frames: int | None = None,
    fps: float | None = None,
    first_frame: str | Path | Image.Image | None = None,
    overlap: int | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[list[Tensor], float]:
    """Generate ``num`` videos for each prompt.

    Args:
        prompts: the prompts (a single string is one prompt); at least one.
        checkpoint: a trainer ``final/`` folder; ``None`` = the bundled moving-shapes model.
        num: videos per prompt.
        frames: length; more than the trained clip is generated in chunks (default: trained).
        fps: playback rate of the written file (default: the rate the model was trained at).
        first_frame: an image to start every video from (image-to-video).
        overlap: frames shared by consecutive chunks (default: a quarter of the trained clip).
        steps, sampler, guidance: sampling options (default: the checkpoint's).
        seed: seeds the starting noise. device: where the model runs.

    Returns:
        (``len(prompts) * num`` videos (C, T, H, W) in [-1, 1], prompt by prompt; fps).

    Raises:
        ValueError: bad options (checked before anything is loaded), or an unreadable first
            frame.
        FileNotFoundError: ``checkpoint=None`` and the bundled model is not installed.
        CheckpointError: missing folder, corrupt checkpoint, not a video model.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
        raise ValueError("no prompts given: pass at least one prompt string")
    check_sampling_options(
        1 if steps is None else steps, sampler or "ddim", 1.0 if guidance is None else guidance, num
    )
    for name, value in (("frames", frames), ("overlap", overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if frames is not None and frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a number > 0, got {fps}")
    if first_frame is not None and not isinstance(first_frame, Image.Image):  # noqa: SIM102
        if not Path(first_frame).is_file():
            raise ValueError(f"first frame image not found: {first_frame}")

    folder = bundled_checkpoint() if checkpoint is None else Path(checkpoint)
    model, model_cfg = load_checkpoint(folder, device=device)
    model.eval()
    chunk, height, width = _trained_shape(model_cfg)
    patch_t = int(model_cfg["dit"]["patch"][0])
    frames = chunk if frames is None else frames
    overlap = max(1, chunk // 4) if overlap is None else overlap
    if not 1 <= overlap < chunk:
        raise ValueError(
            f"overlap must be in [1, {chunk - 1}] (the chunk is {chunk} frames), got {overlap}"
        )
    first = None
    if first_frame is not None:
        frame = load_first_frame(first_frame, int(model_cfg["channels"]), height, width)
        first = frame.expand(len(prompt_list) * num, *frame.shape)
    repeated = [p for p in prompt_list for _ in range(num)]
    options = {"steps": steps, "sampler": sampler, "guidance": guidance, "seed": seed}
    if frames <= chunk:
        length = math.ceil(frames / patch_t) * patch_t  # whole tubelets, then trimmed
        video = sample_videos(
            model, model_cfg, repeated, frames=length, first_frames=first, **options
        )[:, :, :frames]
    else:
        if model.model_shape(int(model_cfg["channels"]), chunk, height, width)[1] != chunk:
            raise ValueError(
                f"this model's autoencoder compresses time, so it cannot extend clips past "
                f"the trained {chunk} frames; ask for at most {chunk}"
            )
        video = _extend(model, model_cfg, repeated, frames, overlap, first, options)
    return list(video), float(model_cfg["fps"]) if fps is None else float(fps)


def contact_sheet(videos: Tensor | Sequence[Tensor], scale: int = 4) -> Image.Image:
    """First, middle and last frames (rows) of each video (columns), upscaled ``scale``x."""
    columns = []
    for video in videos:
        t = video.shape[1]
        picks = torch.stack([video[:, 0], video[:, t // 2], video[:, t - 1]], dim=1)
        columns.append(torch.cat(list(picks.unbind(1)), dim=1))  # (C, 3H, W)
    sheet = torch.cat(columns, dim=2)
    pixels = ((sheet.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
