"""``VideoRecipe``: text-to-video and image-to-video with a spacetime-patch DiT, on the
shared modality kit (``polydiff.core.modality``).

The ``model:`` section is :class:`polydiff.video.config.VideoConfig`: the shared denoising keys
plus the clip (frames, height, width, fps, channels, buckets), the decoder, the share of clips
trained image-to-video (``first_frame_prob``), an optional latent codec (``autoencoder``) and
the DiT (``dit``). Clips given their first frame learn image-to-video; that frame is left out
of their loss.

Latent video diffusion: ``autoencoder`` names a trained latent codec checkpoint (for example
the ``final/`` folder of an image ``kind: autoencoder`` run, applied frame by frame, or a
spacetime codec; see ``polydiff.video.model``). It is frozen, the DiT diffuses its latents,
and the video checkpoint carries it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    ConfigError,
    GenerateOption,
    GenerationRequest,
    Modality,
    codec_record,
    conditioned_batch,
    denoising_loss,
    load_codec,
    model_params,
)

from . import data, synthetic
from .config import VideoConfig, indivisible
from .export import VIDEO_OUTPUT_SUFFIXES, save_videos, write_mp4
from .model import VideoDiT, latent_shape
from .pipeline import (
    check_chunking,
    check_video_options,
    contact_sheet,
    generate_videos,
    resolved_fps,
    sample_videos,
)

__all__ = ["PREVIEW_PROMPTS", "VideoRecipe"]

PREVIEW_PROMPTS = (
    "a red circle moving right",
    "a blue square moving up",
    "a yellow triangle moving left",
    "a green circle moving down",
    "a white square growing",
)
_BUNDLED = Path(__file__).resolve().parent / "bundled" / "moving-shapes"


class VideoRecipe(Modality):
    """Text-to-video and image-to-video with a spacetime-patch DiT."""

    name = "video"
    schema = VideoConfig
    output_suffixes = VIDEO_OUTPUT_SUFFIXES
    bundled = (_BUNDLED, "shared/configs/video/moving-shapes.yaml")
    synthetic_sets: ClassVar[dict[str, Any]] = {"moving-shapes": synthetic.moving_shapes}
    example_config: ClassVar[dict[str, Any]] = {
        "frames": 8,
        "height": 32,  # decord 0.6 cannot return frames 16 or 24 pixels wide
        "width": 32,
        "text_max_length": 8,
        "sample_steps": 2,
        "dit": {"patch": [2, 8, 8], "dim": 24, "depth": 1, "heads": 4},
    }
    generate_options = (
        GenerateOption("frames", int, "frames (default: the trained clip; longer in chunks)"),
        GenerateOption("fps", float, "frames per second (default: the trained rate)"),
        GenerateOption("first_frame", Path, "an image to animate (image-to-video)"),
        GenerateOption("overlap", int, "frames shared by consecutive chunks"),
    )

    # --- data ----------------------------------------------------------------------------
    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        """Captioned MP4/WebM/AVI/MOV/MKV files of a folder (see ``data.folder_source``)."""
        return data.folder_source(folder)

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"video": (C, T, H, W) in [-1, 1], "caption": str}``."""
        return data.decode(sample, self.config)

    def bucket(self, sample: Mapping[str, Any]) -> Hashable | None:
        """(frames, height, width) from the sample's metadata (see ``data.choose_bucket``)."""
        return data.bucket(sample, self.config)

    # --- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh :class:`VideoDiT` of the configured size (with the frozen latent codec
        loaded, for latent diffusion)."""
        cfg = self.config
        dit = cfg["dit"]
        context_dim, pooled_dim = self.conditioner().dims
        channels, codec_args, codec = int(cfg["channels"]), {}, None
        if cfg["autoencoder"] is not None:
            codec = load_codec(cfg["autoencoder"], "model.autoencoder")
            shapes = [latent_shape(codec, channels, *b) for b in data.model_buckets(cfg)]
            problem = indivisible([s[1:] for s in shapes], dit["patch"])
            if problem is not None:
                raise ConfigError(f"model.autoencoder: latent {problem[1]}")
            channels = shapes[0][0]
            codec_args = codec_record(codec)
        model = VideoDiT(
            channels=channels,
            patch=list(dit["patch"]),
            dim=dit["dim"],
            depth=dit["depth"],
            heads=dit["heads"],
            mlp_ratio=float(dit["mlp_ratio"]),
            attention=dit["attention"],
            context_dim=context_dim,
            pooled_dim=pooled_dim,
            qk_norm=dit["qk_norm"],
            first_frame=True,
            gradient_checkpointing=bool(cfg["gradient_checkpointing"]),
            rope_theta=float(dit["rope_theta"]),
            absolute_positions=dit["absolute_positions"],
            **codec_args,
        )
        if codec is not None:
            model.autoencoder.load_state_dict(codec.state_dict())
        return model

    # --- training ------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Tensor:
        """The configured diffusion loss on the clips with text conditioning (dropped to the
        empty prompt with probability ``cond_drop``); a share ``first_frame_prob`` of the clips
        also gets its clean first frame, which is then masked out of the loss."""
        device, dtype = model_params(model)
        video = unwrap_model(model).encode_video(batch["video"].to(device=device, dtype=dtype))
        cond = conditioned_batch(
            self.conditioner(), batch["caption"], self.config["cond_drop"], generator, device,
            dtype,
        )  # fmt: skip
        batch_size, frames = video.shape[0], video.shape[2]
        draw = torch.rand(batch_size, generator=generator, device=generator.device)
        given = (draw < float(self.config["first_frame_prob"])).to(device)
        cond["first_frame"] = video[:, :, 0]
        cond["first_frame_given"] = given
        mask = torch.ones((batch_size, 1, frames, 1, 1), device=device, dtype=dtype)
        mask[given, :, 0] = 0.0
        return denoising_loss(model, video, self.config, cond, generator, mask)

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """``previews.mp4`` in ``out_dir``: the ``PREVIEW_PROMPTS`` side by side, and
        ``previews.png``: their first, middle and last frames (rows) for a quick look."""
        net = unwrap_model(model)
        videos = sample_videos(net, self.config, list(PREVIEW_PROMPTS), seed=step)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        side_by_side = torch.cat(list(videos), dim=-1)  # (C, T, H, N*W)
        movie = write_mp4(side_by_side, out_dir / "previews.mp4", float(self.config["fps"]))
        sheet = out_dir / "previews.png"
        contact_sheet(videos).save(sheet)
        return [movie, sheet]

    # --- generation ----------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        check_video_options(request.options)
        check_chunking(self.config, request.options)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Tensor]:
        """Videos (C, T, H, W) in [-1, 1], one per ``request.repeated`` prompt."""
        conditioner = self.conditioner(request.device, request.torch_dtype)
        return generate_videos(model, self.config, request, conditioner)

    def output_metadata(self, request: GenerationRequest) -> dict[str, Any]:
        frames, _ = check_chunking(self.config, request.options)
        return {"frames": frames, "fps": resolved_fps(self.config, request.options)}

    def export(
        self,
        outputs: Sequence[Tensor],
        paths: Sequence[Path],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[Path]:
        """H.264 MP4 or looping GIF by suffix, with the provenance in the container's comment
        and a sidecar JSON (see ``polydiff.video.export``)."""
        return save_videos(outputs, paths, float(metadata[0]["fps"]), metadata)
