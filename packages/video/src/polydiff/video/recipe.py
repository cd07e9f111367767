"""``VideoRecipe``: how the shared trainer and CLI train and sample videos.

The ``model:`` section of a video config (every key optional; defaults below), plus the
denoising keys every modality shares (schedule, prediction, text encoder, CFG dropout,
sampling defaults: see :mod:`polydiff.core.train.denoising`)::

    frames: 16              # clip length (frames) when no buckets are given
    height: 32              # frame size in pixels
    width: 32
    fps: 8                  # clips are sampled at this frame rate from any source rate
    channels: 3             # 3 = RGB, 1 = grey
    buckets: null           # or [[frames, height, width], ...]: variable duration / size
    decoder: auto           # auto (decord, PyAV fallback) | decord | pyav
    first_frame_prob: 0.25  # image-to-video training: share of clips given their first frame
    autoencoder: null       # or the final/ folder of a trained autoencoder: latent diffusion
    dit: {patch: [2, 4, 4], dim: 192, depth: 6, heads: 6, mlp_ratio: 4.0, qk_norm: true,
          attention: full, rope_theta: 10000.0, absolute_positions: true}
                            # attention: full | factorised; absolute_positions: sin-cos
                            # (t, h, w) added to the tokens, besides the rotary offsets

Clips given their first frame learn image-to-video; that frame is left out of their loss.

Latent video diffusion: ``autoencoder`` names a trained autoencoder checkpoint (for example
the ``final/`` folder of an image ``kind: autoencoder`` run, applied frame by frame, or a 3D
video autoencoder with ``encode_video``/``decode_video``; see ``polydiff.video.model``). It is
frozen, the DiT diffuses its latents, and the video checkpoint carries it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polydiff.core.blocks.dit import ATTENTION_LAYOUTS
from polydiff.core.ema import unwrap_model
from polydiff.core.guidance import drop_conditioning
from polydiff.core.objectives import diffusion_loss
from polydiff.core.pretrained import class_path, from_pretrained
from polydiff.core.train import ConfigError
from polydiff.core.train.denoising import (
    DENOISING_DEFAULTS,
    check_denoising,
    check_keys,
    choice,
    config_error,
    flag,
    int_list,
    make_schedule,
    model_params,
    number,
    text_conditioning,
    text_dims,
)

from . import data, synthetic
from .model import VideoDiT, latent_shape

__all__ = ["DEFAULTS", "DIT_DEFAULTS", "PREVIEW_PROMPTS", "VideoRecipe"]

DEFAULTS: dict[str, Any] = {
    "frames": 16,
    "height": 32,
    "width": 32,
    "fps": 8,
    "channels": 3,
    "buckets": None,
    "decoder": "auto",
    "first_frame_prob": 0.25,
    "autoencoder": None,
    **DENOISING_DEFAULTS,
}
DIT_DEFAULTS: dict[str, Any] = {
    "patch": [2, 4, 4],
    "dim": 192,
    "depth": 6,
    "heads": 6,
    "mlp_ratio": 4.0,
    "qk_norm": True,
    "attention": "full",
    "rope_theta": 10000.0,
    "absolute_positions": True,
}
PREVIEW_PROMPTS = (
    "a red circle moving right",
    "a blue square moving up",
    "a yellow triangle moving left",
    "a green circle moving down",
    "a white square growing",
)


def _check_divisible(sizes: list, patch: list[int], key: str | None) -> None:
    """Every (frames, height, width) of ``sizes`` must be divisible by ``patch``; ConfigError
    names ``model.<key>`` (None: the frames / height / width key itself)."""
    for size in sizes:
        for value, p, what in zip(size, patch, ("frames", "height", "width"), strict=True):
            if value % p:
                raise config_error(
                    key or what,
                    f"{what} {value} of {list(size)} is not divisible by dit.patch {patch}",
                )


class VideoRecipe:
    """Text-to-video and image-to-video with a spacetime-patch DiT."""

    name = "video"

    # --- config --------------------------------------------------------------------------
    def validate(self, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Fill in defaults and check every key and value; ConfigError names the bad key."""
        if not isinstance(model_cfg, Mapping):
            raise ConfigError(f"model: expected a mapping, got {type(model_cfg).__name__}")
        check_keys(model_cfg, {**DEFAULTS, "dit": None}, "model.")
        cfg: dict[str, Any] = {**DEFAULTS, **{k: v for k, v in model_cfg.items() if k != "dit"}}
        for key in ("frames", "height", "width", "fps"):
            number(cfg, key, int if key != "fps" else float, 1)
        if cfg["channels"] not in (1, 3):
            raise config_error("channels", f"expected 1 (grey) or 3 (RGB), got {cfg['channels']!r}")
        choice(cfg, "decoder", data.DECODERS)
        number(cfg, "first_frame_prob", float, 0.0)
        if cfg["first_frame_prob"] > 1:
            raise config_error("first_frame_prob", "expected a probability in [0, 1]")
        check_denoising(cfg)
        if cfg["autoencoder"] is not None and (
            not isinstance(cfg["autoencoder"], str) or not cfg["autoencoder"]
        ):
            raise config_error("autoencoder", "expected null (pixels) or a checkpoint folder")

        given = model_cfg.get("dit", {})
        if not isinstance(given, Mapping):
            raise config_error("dit", f"expected a mapping, got {type(given).__name__}")
        check_keys(given, DIT_DEFAULTS, "model.dit.")
        dit = cfg["dit"] = {**DIT_DEFAULTS, **given}
        int_list(dit, "patch", "dit.patch", 1, length=3)
        for key in ("dim", "depth", "heads"):
            number(dit, key, int, 1, f"dit.{key}")
        head_dim, rest = divmod(dit["dim"], dit["heads"])
        if rest or head_dim % 2 or head_dim < 6:
            raise config_error("dit.heads", "dim / heads must be an even number >= 6 (3D rotary)")
        number(dit, "mlp_ratio", float, 1e-6, "dit.mlp_ratio")
        number(dit, "rope_theta", float, 1.0, "dit.rope_theta")
        flag(dit, "qk_norm", "dit.qk_norm")
        flag(dit, "absolute_positions", "dit.absolute_positions")
        choice(dit, "attention", ATTENTION_LAYOUTS, "dit.attention")

        if cfg["buckets"] is not None:
            buckets = cfg["buckets"]
            if not isinstance(buckets, list | tuple) or not buckets:
                raise config_error(
                    "buckets", "expected a non-empty list of [frames, height, width]"
                )
            for i, item in enumerate(buckets):
                holder = {"b": item}
                int_list(holder, "b", f"buckets[{i}]", 1, length=3)
            cfg["buckets"] = [list(b) for b in buckets]
        if cfg["autoencoder"] is None:  # latent sizes are checked when it is loaded
            _check_divisible(data.model_buckets(cfg), dit["patch"], "buckets" if cfg["buckets"]
                             else None)  # fmt: skip
        return cfg

    # --- model ---------------------------------------------------------------------------
    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        """A fresh :class:`VideoDiT` of the configured size (with the frozen autoencoder
        loaded, for latent diffusion)."""
        dit = model_cfg["dit"]
        context_dim, pooled_dim = text_dims(model_cfg)
        channels, codec, autoencoder = int(model_cfg["channels"]), {}, None
        if model_cfg["autoencoder"] is not None:
            autoencoder = from_pretrained(model_cfg["autoencoder"])
            shapes = [
                latent_shape(autoencoder, channels, *b) for b in data.model_buckets(model_cfg)
            ]
            _check_divisible([s[1:] for s in shapes], dit["patch"], "autoencoder")
            channels = shapes[0][0]
            codec = {
                "autoencoder_class": class_path(type(autoencoder)),
                "autoencoder": dict(autoencoder.config),
            }
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
            gradient_checkpointing=bool(model_cfg["gradient_checkpointing"]),
            rope_theta=float(dit["rope_theta"]),
            absolute_positions=dit["absolute_positions"],
            **codec,
        )
        if autoencoder is not None:
            model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model

    # --- data ----------------------------------------------------------------------------
    def decode(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"video": (C, T, H, W) in [-1, 1], "caption": str}``."""
        return data.decode(sample, model_cfg)

    def bucket(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> Hashable | None:
        """(frames, height, width) from the sample's metadata (see ``data.choose_bucket``)."""
        return data.bucket(sample, model_cfg)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """-> ``{"video": (B, C, T, H, W), "caption": list[str]}``."""
        return data.collate(samples)

    def synthetic(self, name: str, count: int | None) -> Iterator[dict[str, Any]]:
        """``moving-shapes``: one coloured shape moving on black (see ``synthetic``)."""
        if name not in synthetic.SYNTHETIC_SETS:
            raise ValueError(
                f"unknown synthetic video set {name!r}; available: "
                f"{', '.join(synthetic.SYNTHETIC_SETS)}"
            )
        return synthetic.moving_shapes(count)

    def source(self, folder: Path) -> Iterator[dict[str, Any]]:
        """Captioned MP4/WebM/AVI/MOV/MKV files of a folder (see ``data.folder_source``)."""
        return data.folder_source(folder)

    # --- training ------------------------------------------------------------------------
    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        generator: torch.Generator,
        model_cfg: Mapping[str, Any],
    ) -> Tensor:
        """Scalar loss of one micro-batch: ``diffusion_loss`` on the clips with text
        conditioning (dropped to the empty prompt with probability ``cond_drop``); a share
        ``first_frame_prob`` of the clips also gets its clean first frame, which is then
        masked out of the loss."""
        device, dtype = model_params(model)
        video = unwrap_model(model).encode_video(batch["video"].to(device=device, dtype=dtype))
        cond = text_conditioning(list(batch["caption"]), model_cfg, device, dtype)
        null = text_conditioning([""], model_cfg, device, dtype)
        cond, _ = drop_conditioning(cond, null, float(model_cfg["cond_drop"]), generator)
        batch_size, frames = video.shape[0], video.shape[2]
        draw = torch.rand(batch_size, generator=generator, device=generator.device)
        given = (draw < float(model_cfg["first_frame_prob"])).to(device)
        cond["first_frame"] = video[:, :, 0]
        cond["first_frame_given"] = given
        mask = torch.ones((batch_size, 1, frames, 1, 1), device=device, dtype=dtype)
        mask[given, :, 0] = 0.0
        return diffusion_loss(
            model,
            video,
            make_schedule(model_cfg),
            prediction=model_cfg["prediction"],
            cond=cond,
            mask=mask,
            time_distribution=model_cfg["time_distribution"],
            weighting=model_cfg["weighting"],
            snr_gamma=float(model_cfg["snr_gamma"]),
            generator=generator,
        )

    def preview(
        self, model: nn.Module, out_dir: Path, step: int, model_cfg: Mapping[str, Any]
    ) -> list[Path]:
        """``previews.mp4`` in ``out_dir``: the ``PREVIEW_PROMPTS`` side by side, and
        ``previews.png``: their first, middle and last frames (rows) for a quick look."""
        from .export import write_mp4
        from .pipeline import contact_sheet, sample_videos

        net = unwrap_model(model)
        was_training = net.training
        net.eval()
        try:
            videos = sample_videos(net, model_cfg, list(PREVIEW_PROMPTS), seed=step)
        finally:
            net.train(was_training)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        side_by_side = torch.cat(list(videos), dim=-1)  # (C, T, H, N*W)
        movie = write_mp4(side_by_side, out_dir / "previews.mp4", float(model_cfg["fps"]))
        sheet = out_dir / "previews.png"
        contact_sheet(videos).save(sheet)
        return [movie, sheet]

    # --- generation ----------------------------------------------------------------------
    def add_generate_arguments(self, parser: Any) -> None:
        """``--frames``, ``--fps``, ``--first-frame``, ``--overlap`` for ``polydiff generate``."""
        parser.add_argument("--frames", type=int, default=None, help="frames (default: trained)")
        parser.add_argument("--fps", type=float, default=None, help="frames per second")
        parser.add_argument("--first-frame", type=Path, default=None, help="image to animate")
        parser.add_argument(
            "--overlap", type=int, default=None, help="frames shared by consecutive chunks"
        )

    def generate(self, args: Any) -> list[Path]:
        """``polydiff generate video``: every prompt ``args.num`` times as MP4 (or GIF)."""
        from .export import save_videos
        from .pipeline import generate

        videos, fps = generate(
            args.prompt,
            checkpoint=args.checkpoint,
            num=args.num,
            frames=args.frames,
            fps=args.fps,
            first_frame=args.first_frame,
            overlap=args.overlap,
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            seed=args.seed,
        )
        return save_videos(videos, args.out, fps)
