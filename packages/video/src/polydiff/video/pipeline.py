"""Text-to-video and image-to-video generation from a checkpoint written by ``polydiff train``.

Videos longer than the model's trained clip are generated in chunks: each new chunk starts
with the last ``overlap`` frames of the one before, kept fixed by the sampler's inpainting
mask (and its first frame is also the model's first-frame condition), so motion carries over
the seam; the shared frames are written once. Inference only: nothing here imports the
trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
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
    model_params,
)
from polydiff.core.modality import (
    generate as generate_request,
)
from polydiff.core.pixels import to_uint8

from .data import model_buckets, resize_crop

__all__ = [
    "BATCH_SIZE",
    "VideoOptions",
    "check_chunking",
    "check_video_options",
    "contact_sheet",
    "extend_videos",
    "generate",
    "generate_videos",
    "load_first_frame",
    "resolved_fps",
    "sample_videos",
    "trained_shape",
]

BATCH_SIZE = 8  # videos per sampling batch (the default of --batch-size)
MAX_FRAMES = 2048  # one call's length bound: each frame costs chunked sampling time
MIN_FPS, MAX_FPS = 0.1, 240.0  # playback rates players and containers handle


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


def trained_shape(model_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """The longest trained clip (frames, height, width): the chunk length of generation."""
    return tuple(max(model_buckets(model_cfg), key=lambda b: (b[0], b[1] * b[2])))  # type: ignore[return-value]


def sample_videos(
    model: nn.Module,
    model_cfg: Mapping[str, Any],
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
    options: Sampling | None = None,
    conditioner: Conditioner | None = None,
) -> Tensor:
    """Sample one clip per prompt: (N, C, T, H, W) float32 in [-1, 1] on the CPU.

    Args:
        frames, height, width: clip size in pixels (default: the trained clip); the model's
            clip (latent, for a latent model) must be divisible by its patch.
        steps, sampler, guidance: default to the model config's sampling defaults
            (``options`` gives them all at once, with negative prompt and batch size).
            Guidance applies to the text only: both branches see the first frame.
        first_frames: (N, C, H, W) pixel frames to start from (image-to-video): the model is
            conditioned on them and the sampler keeps them as frame 0 exactly.
        known: (init, mask) in the model's space for extending a clip: frames of ``init``
            (N, c, t, h, w) where ``mask`` (N, 1, t, 1, 1) is 0 are kept, the rest generated.
        generator: the noise source (default: seeded by ``seed``).
        decode: False returns what the model diffuses (latents for a latent model).
    """
    trained = trained_shape(model_cfg)
    frames, height, width = (v if v is not None else d for v, d in zip(
        (frames, height, width), trained, strict=True
    ))  # fmt: skip
    shape = model.model_shape(int(model_cfg["channels"]), frames, height, width)
    if options is None:
        request = GenerationRequest(("",), steps=steps, sampler=sampler, guidance=guidance)
        options = Sampling.resolve(model_cfg, request, BATCH_SIZE)
    conditioner = conditioner or TextConditioner.from_config(model_cfg)
    generator = generator or torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        first = None
        if first_frames is not None:
            device, dtype = model_params(model)
            pixels = first_frames.to(device=device, dtype=dtype)[:, :, None]
            first = model.encode_video(pixels)[:, :, 0].float().cpu()
        x = _sample(model, model_cfg, list(prompts), shape, first, known, generator, options,
                    conditioner)  # fmt: skip
        return _decoded(model, x) if decode else x


def _decoded(model: nn.Module, x: Tensor) -> Tensor:
    device, dtype = model_params(model)
    pixels = model.decode_video(x.to(device=device, dtype=dtype))
    return pixels.float().clamp(-1.0, 1.0).cpu()


def _sample(
    model: nn.Module,
    model_cfg: Mapping[str, Any],
    prompts: list[str],
    shape: Sequence[int],
    first: Tensor | None,
    known: tuple[Tensor, Tensor] | None,
    generator: torch.Generator,
    options: Sampling,
    conditioner: Conditioner,
) -> Tensor:
    """Sample (N, *shape) in the model's space; ``first`` (N, c, h, w) model-space frames."""
    count = len(prompts)
    init = mask = None
    if known is not None:
        init, mask = known
    if first is not None:
        if init is None:
            init = torch.zeros((count, *shape))
            mask = torch.ones((count, 1, shape[1], 1, 1))
        init = init.clone()
        init[:, :, 0] = first
        mask = mask.clone()
        mask[:, :, 0] = 0.0
    latent = getattr(model, "autoencoder", None) is not None
    return denoise(
        model,
        model_cfg,
        conditioner,
        prompts,
        shape,
        options,
        generator=generator,
        extra=None if first is None else {"first_frame": first},
        init=init,
        mask=mask,
        clip_x0=None if latent else 1.0,  # pixels live in [-1, 1]; latents do not
    )


def extend_videos(
    model: nn.Module,
    model_cfg: Mapping[str, Any],
    prompts: list[str],
    frames: int,
    overlap: int,
    first_frames: Tensor | None,
    options: Sampling,
    seed: int,
    conditioner: Conditioner,
) -> Tensor:
    """Chunked generation of ``frames`` frames (see the module docstring), in the model's
    space (``frames`` and ``overlap`` count its frames), decoded at the end."""
    generator = torch.Generator().manual_seed(int(seed))
    video = sample_videos(
        model, model_cfg, prompts, first_frames=first_frames, generator=generator, decode=False,
        options=options, conditioner=conditioner,
    )  # fmt: skip
    shape = video.shape[1:]
    with torch.no_grad():
        while video.shape[2] < frames:
            init = torch.zeros((len(prompts), *shape))
            init[:, :, :overlap] = video[:, :, -overlap:]
            mask = torch.ones((len(prompts), 1, shape[1], 1, 1))
            mask[:, :, :overlap] = 0.0
            nxt = _sample(
                model, model_cfg, prompts, shape, video[:, :, -overlap], (init, mask), generator,
                options, conditioner,
            )  # fmt: skip
            video = torch.cat([video, nxt[:, :, overlap:]], dim=2)
        return _decoded(model, video[:, :, :frames])


def check_video_options(options: Mapping[str, Any]) -> None:
    """ValueError naming a bad ``frames`` / ``fps`` / ``overlap`` / ``first_frame`` (checked
    before anything is loaded)."""
    frames, overlap, fps = options.get("frames"), options.get("overlap"), options.get("fps")
    for name, value in (("frames", frames), ("overlap", overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in [1, {MAX_FRAMES}], got {frames}")
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, int | float) or not MIN_FPS <= fps <= MAX_FPS
    ):
        raise ValueError(f"fps must be a number in [{MIN_FPS}, {MAX_FPS}], got {fps}")
    first_frame = options.get("first_frame")
    if first_frame is not None and not isinstance(first_frame, Image.Image):  # noqa: SIM102
        if not Path(first_frame).is_file():
            raise ValueError(f"first frame image not found: {first_frame}")


def resolved_fps(model_cfg: Mapping[str, Any], options: Mapping[str, Any]) -> float:
    """The playback rate: ``fps`` if given, else the rate the model was trained at."""
    fps = options.get("fps")
    return float(model_cfg["fps"]) if fps is None else float(fps)


def check_chunking(model_cfg: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[int, int]:
    """(frames, overlap) of a request against the trained clip (ValueError if impossible)."""
    chunk = trained_shape(model_cfg)[0]
    frames = options.get("frames") or chunk
    overlap = options.get("overlap")
    overlap = max(1, chunk // 4) if overlap is None else overlap
    if not 1 <= overlap < chunk:
        raise ValueError(
            f"overlap must be in [1, {chunk - 1}] (the chunk is {chunk} frames), got {overlap}"
        )
    return frames, overlap


def generate_videos(
    model: nn.Module,
    model_cfg: Mapping[str, Any],
    request: GenerationRequest,
    conditioner: Conditioner,
) -> list[Tensor]:
    """The videos (C, T, H, W) in [-1, 1] of a request, one per ``request.repeated`` prompt:
    one chunk when ``frames`` fits the trained clip, else overlapping chunks."""
    options = request.options
    chunk, height, width = trained_shape(model_cfg)
    frames, overlap = check_chunking(model_cfg, options)
    patch_t = int(model_cfg["dit"]["patch"][0])
    repeated = request.repeated
    first = None
    if options.get("first_frame") is not None:
        frame = load_first_frame(options["first_frame"], int(model_cfg["channels"]), height, width)
        first = frame.expand(len(repeated), *frame.shape)
    sampling = Sampling.resolve(model_cfg, request, BATCH_SIZE)
    if frames <= chunk:
        length = math.ceil(frames / patch_t) * patch_t  # whole tubelets, then trimmed
        video = sample_videos(
            model, model_cfg, repeated, frames=length, first_frames=first, seed=request.seed,
            options=sampling, conditioner=conditioner,
        )[:, :, :frames]  # fmt: skip
    else:
        if model.model_shape(int(model_cfg["channels"]), chunk, height, width)[1] != chunk:
            raise ValueError(
                f"this model's autoencoder compresses time, so it cannot extend clips past "
                f"the trained {chunk} frames; ask for at most {chunk}"
            )
        video = extend_videos(
            model, model_cfg, repeated, frames, overlap, first, sampling, request.seed,
            conditioner,
        )  # fmt: skip
    return list(video)


class VideoOptions(RequestOptions, total=False):
    """The video generation options: the shared ones and the modality's own."""

    frames: int | None
    fps: float | None
    first_frame: str | Path | Image.Image | None
    overlap: int | None


def generate(
    prompts: Sequence[str] | str, **options: Unpack[VideoOptions]
) -> tuple[list[Tensor], float]:
    """Generate ``num`` videos for each prompt (see :func:`polydiff.core.modality.generate`).

    Args:
        prompts: the prompts (a single string is one prompt); at least one.
        options: the shared ones (``checkpoint``, default: the bundled moving-shapes model;
            ``num``; ``steps`` / ``sampler`` / ``guidance``, default: the checkpoint's;
            ``seed``, ``negative_prompt``, ``batch_size`` (default 8), ``device``, ``dtype``)
            and the video's: ``frames`` (more than the trained clip: in chunks), ``fps``
            (default: the trained rate), ``first_frame`` (an image to start every video from),
            ``overlap`` (frames shared by consecutive chunks; default: a quarter of the clip).

    Returns:
        (``len(prompts) * num`` videos (C, T, H, W) in [-1, 1], prompt by prompt; fps).

    Raises:
        ValueError: bad options (checked before anything is loaded), or an unreadable first
            frame.
        FileNotFoundError: no checkpoint given and the bundled model is not installed.
        CheckpointError: missing folder, corrupt checkpoint, not a video model.
    """
    request = GenerationRequest.of(prompts, **options)
    made = generate_request("video", request)
    return made.outputs, resolved_fps(made.modality.config, request.options)


def contact_sheet(videos: Tensor | Sequence[Tensor], scale: int = 4) -> Image.Image:
    """First, middle and last frames (rows) of each video (columns), upscaled ``scale``x."""
    columns = []
    for video in videos:
        t = video.shape[1]
        picks = torch.stack([video[:, 0], video[:, t // 2], video[:, t - 1]], dim=1)
        columns.append(torch.cat(list(picks.unbind(1)), dim=1))  # (C, 3H, W)
    sheet = torch.cat(columns, dim=2)
    array = to_uint8(sheet).permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
