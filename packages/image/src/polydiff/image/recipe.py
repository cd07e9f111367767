"""``ImageRecipe``: text-to-image with a pixel U-Net / DiT, a latent DiT and its KL
autoencoder, on the shared modality kit (``polydiff.core.modality``).

The ``model:`` section is :class:`polydiff.image.config.ImageConfig`: the shared denoising keys
(text encoder, schedule, prediction, weighting, CFG dropout, sampling defaults) plus ``kind``
(unet | dit | latent_dit | autoencoder), ``image_size``, ``channels`` and the section of the
kind's network.

Latent diffusion is two runs of ``polydiff train``: first ``kind: autoencoder`` (loss =
reconstruction MSE + ``kl_weight`` * KL), then ``kind: latent_dit`` with ``autoencoder:`` set
to the first run's ``final/`` folder; the latent DiT's checkpoint then holds the (frozen)
autoencoder as its latent codec.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    ConfigError,
    GenerationRequest,
    Modality,
    Sampling,
    codec_record,
    conditioned_batch,
    denoising_loss,
    load_codec,
    model_params,
)
from polydiff.core.pretrained import CheckpointError

from . import data, synthetic
from .config import ImageConfig
from .export import IMAGE_OUTPUT_SUFFIXES, save_images
from .model import KLAutoencoder, LatentDiT, PixelDiT, PixelUNet
from .pipeline import BATCH_SIZE, grid_image, sample_images, to_pil

__all__ = ["ImageRecipe"]

_BUNDLED = Path(__file__).resolve().parent / "bundled" / "digits"


def _config_error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"model.{key}: {problem}")


class ImageRecipe(Modality):
    """Text-to-image: pixel U-Net / DiT, latent DiT and its KL autoencoder."""

    name = "image"
    schema = ImageConfig
    output_suffixes = IMAGE_OUTPUT_SUFFIXES
    bundled = (_BUNDLED, "shared/configs/image/digits.yaml")
    synthetic_sets: ClassVar[dict[str, Any]] = {"digits": synthetic.digits}
    example_config: ClassVar[dict[str, Any]] = {
        "image_size": 8,
        "text_max_length": 8,
        "sample_steps": 2,
        "unet": {"base_channels": 8, "num_res_blocks": 1, "attention_levels": [], "heads": 2},
    }

    # --- data ----------------------------------------------------------------------------
    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        """Captioned PNG/JPEG files of a folder (see ``data.folder_source``)."""
        return data.folder_source(folder)

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"image": (C, H, W) in [-1, 1], "caption": str}``."""
        return data.decode(sample, self.config)

    # --- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh model of ``kind`` (latent_dit: with the trained autoencoder loaded)."""
        cfg = self.config
        kind = cfg["kind"]
        checkpointing = bool(cfg["gradient_checkpointing"])
        if kind == "autoencoder":
            sec = cfg["autoencoder"]
            return KLAutoencoder(
                channels=cfg["channels"],
                latent_channels=sec["latent_channels"],
                base_channels=sec["base_channels"],
                channel_mult=list(sec["channel_mult"]),
            )
        context_dim, pooled_dim = self.conditioner().dims
        if kind == "unet":
            sec = cfg["unet"]
            return PixelUNet(
                channels=cfg["channels"],
                base_channels=sec["base_channels"],
                channel_mult=list(sec["channel_mult"]),
                num_res_blocks=sec["num_res_blocks"],
                attention_levels=list(sec["attention_levels"]),
                heads=sec["heads"],
                context_dim=context_dim,
                pooled_dim=pooled_dim,
                dropout=float(sec["dropout"]),
                gradient_checkpointing=checkpointing,
            )
        sec = cfg["dit"]
        dit_args = {
            "patch": sec["patch"],
            "dim": sec["dim"],
            "depth": sec["depth"],
            "heads": sec["heads"],
            "mlp_ratio": float(sec["mlp_ratio"]),
            "context_dim": context_dim,
            "pooled_dim": pooled_dim,
            "qk_norm": sec["qk_norm"],
            "gradient_checkpointing": checkpointing,
        }
        if kind == "dit":
            return PixelDiT(channels=cfg["channels"], **dit_args)
        return self._build_latent_dit(dit_args)

    def _build_latent_dit(self, dit_args: dict[str, Any]) -> LatentDiT:
        cfg = self.config
        codec = load_codec(cfg["autoencoder"], "model.autoencoder")
        size, channels = cfg["image_size"], cfg["channels"]
        if codec.config.get("channels") != channels:
            raise _config_error(
                "autoencoder",
                f"{cfg['autoencoder']} encodes {codec.config.get('channels')}-channel images "
                f"but model.channels is {channels}",
            )
        try:
            latent = codec.latent_shape((channels, size, size))
        except ValueError as e:
            raise _config_error("image_size", f"{e} (the autoencoder's factor)") from e
        if latent[1] % dit_args["patch"] or latent[2] % dit_args["patch"]:
            raise _config_error(
                "image_size",
                f"{size} must be divisible by the autoencoder's factor times dit.patch "
                f"{dit_args['patch']}",
            )
        model = LatentDiT(**codec_record(codec), **dit_args)
        model.autoencoder.load_state_dict(codec.state_dict())
        return model

    # --- training ------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Tensor:
        """Denoisers: captions dropped to the empty prompt with probability ``cond_drop``
        (CFG training), then the configured diffusion loss (latent DiT: on the codec's
        normalised latents). Autoencoder: reconstruction MSE + ``kl_weight`` * KL."""
        device, dtype = model_params(model)
        images = batch["image"].to(device=device, dtype=dtype)
        if self.config["kind"] == "autoencoder":
            return self._autoencoder_loss(model, images, generator)
        cond = conditioned_batch(
            self.conditioner(), batch["caption"], self.config["cond_drop"], generator, device,
            dtype,
        )  # fmt: skip
        x0 = images
        if self.config["kind"] == "latent_dit":
            x0 = unwrap_model(model).encode(images)
        return denoising_loss(model, x0, self.config, cond, generator)

    def _autoencoder_loss(
        self, model: nn.Module, images: Tensor, generator: torch.Generator
    ) -> Tensor:
        autoencoder = unwrap_model(model)
        latent = autoencoder.latent_shape(images.shape[1:])
        noise = torch.randn(
            (images.shape[0], *latent), generator=generator, device=generator.device
        )
        recon, mean, logvar = model(images, noise.to(device=images.device, dtype=images.dtype))
        if autoencoder.training:
            autoencoder.track_latent_std(mean)
        mse = (recon.float() - images.float()).pow(2).mean()
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / images.numel()
        return mse + float(self.config["autoencoder"]["kl_weight"]) * kl

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """One PNG grid in ``out_dir``: ``digits.png``, digits 0..9 drawn from their prompts,
        or for an autoencoder ``reconstructions.png``, real digits over their
        reconstructions."""
        net = unwrap_model(model)
        with torch.no_grad():
            if self.config["kind"] == "autoencoder":
                tensors, name, rows = self._reconstruction_pairs(net), "reconstructions.png", 2
            else:
                prompts = [synthetic.digit_caption(d) for d in range(10)]
                tensors = sample_images(net, self.config, prompts, seed=step)
                name, rows = "digits.png", 1
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        grid_image(to_pil(tensors), rows=rows).save(path)
        return [path]

    def _reconstruction_pairs(self, net: nn.Module) -> Tensor:
        device, dtype = model_params(net)
        firsts: dict[int, dict[str, Any]] = {}
        for sample in synthetic.digits(size=int(self.config["image_size"])):
            firsts.setdefault(sample["json"]["label"], sample)
            if len(firsts) == 10:
                break
        images = torch.stack([self.decode(firsts[d])["image"] for d in range(10)]).to(
            device=device, dtype=dtype
        )
        recon = net.decode(net.encode(images)[0])  # the posterior mean: no sampling noise
        return torch.cat([images, recon.clamp(-1, 1)]).float()

    # --- generation ----------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        if self.config["kind"] == "autoencoder":
            raise CheckpointError(
                f"{request.checkpoint or 'the checkpoint'} is an autoencoder; generate from a "
                "denoiser (unet, dit or latent_dit)"
            )

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Image.Image]:
        """PIL images, one per ``request.repeated`` prompt."""
        images = sample_images(
            model,
            self.config,
            request.repeated,
            seed=request.seed,
            options=Sampling.resolve(self.config, request, BATCH_SIZE),
            conditioner=self.conditioner(request.device, request.torch_dtype),
        )
        return to_pil(images)

    def export(
        self,
        outputs: Sequence[Image.Image],
        paths: Sequence[Path],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[Path]:
        """PNG files with their provenance in text chunks and a
        sidecar JSON (see ``polydiff.image.export``)."""
        return save_images(outputs, paths, metadata)
