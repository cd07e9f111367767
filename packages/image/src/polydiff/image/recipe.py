"""``ImageRecipe``: how the shared trainer and CLI train and sample images.

The ``model:`` section of an image config (every key optional; defaults below), plus the
denoising keys every modality shares (text encoder, schedule, prediction, weighting, CFG
dropout, sampling defaults, gradient checkpointing: see :mod:`polydiff.core.train.denoising`)::

    kind: unet              # unet | dit (pixel denoisers) | latent_dit | autoencoder
    image_size: 16          # square side in pixels; samples are centre-cropped and resized
    channels: 1             # 1 = grayscale, 3 = RGB
    unet: {base_channels: 32, channel_mult: [1, 2], num_res_blocks: 2,
           attention_levels: [1], heads: 4, dropout: 0.0}              # kind unet
    dit: {patch: 2, dim: 192, depth: 6, heads: 6, mlp_ratio: 4.0,
          qk_norm: true}                                               # kinds dit, latent_dit
    autoencoder: {latent_channels: 4, base_channels: 32, channel_mult: [1, 2],
                  kl_weight: 1.0e-4}                                   # kind autoencoder
    autoencoder: path/to/autoencoder/final                             # kind latent_dit

Latent diffusion is two runs of ``polydiff train``: first ``kind: autoencoder`` (loss =
reconstruction MSE + ``kl_weight`` * KL), then ``kind: latent_dit`` with ``autoencoder:`` set
to the first run's ``final/`` folder; the latent DiT's checkpoint then holds the (frozen)
autoencoder too.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.guidance import drop_conditioning
from polydiff.core.objectives import diffusion_loss
from polydiff.core.train import ConfigError
from polydiff.core.train.denoising import (
    DENOISING_DEFAULTS,
    check_denoising,
    check_keys,
    choice,
    config_error,
    int_list,
    make_schedule,
    model_params,
    number,
    text_conditioning,
    text_dims,
)

from . import data, synthetic
from .model import KLAutoencoder, LatentDiT, PixelDiT, PixelUNet

__all__ = ["DEFAULTS", "KINDS", "ImageRecipe"]

KINDS = ("unet", "dit", "latent_dit", "autoencoder")

DEFAULTS: dict[str, Any] = {
    "kind": "unet",
    "image_size": 16,
    "channels": 1,
    **DENOISING_DEFAULTS,
}
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {
        "base_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 2,
        "attention_levels": [1],
        "heads": 4,
        "dropout": 0.0,
    },
    "dit": {"patch": 2, "dim": 192, "depth": 6, "heads": 6, "mlp_ratio": 4.0, "qk_norm": True},
    "autoencoder": {
        "latent_channels": 4,
        "base_channels": 32,
        "channel_mult": [1, 2],
        "kl_weight": 1.0e-4,
    },
}
# Which sections each kind reads; any other section is a mistake and is refused.
KIND_SECTIONS = {
    "unet": ("unet",),
    "dit": ("dit",),
    "latent_dit": ("dit", "autoencoder"),
    "autoencoder": ("autoencoder",),
}
_LATENT_DIT_DEFAULTS = {"patch": 1}  # latents are already small; one token per latent pixel


class ImageRecipe:
    """Text-to-image recipe: pixel U-Net / DiT, latent DiT and its KL autoencoder."""

    name = "image"

    # --- config --------------------------------------------------------------------------
    def validate(self, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Fill in defaults and check every key and value; ConfigError names the bad key."""
        if not isinstance(model_cfg, Mapping):
            raise ConfigError(f"model: expected a mapping, got {type(model_cfg).__name__}")
        allowed = {**DEFAULTS, **SECTION_DEFAULTS}
        check_keys(model_cfg, allowed, "model.")
        cfg: dict[str, Any] = {**DEFAULTS, **{k: v for k, v in model_cfg.items() if k in DEFAULTS}}
        choice(cfg, "kind", KINDS)
        kind = cfg["kind"]
        for section in SECTION_DEFAULTS:
            if section in model_cfg and section not in KIND_SECTIONS[kind]:
                raise config_error(section, f"is not used by kind {kind!r}; remove it")

        number(cfg, "image_size", int, 1)
        if cfg["channels"] not in (1, 3):
            raise config_error(
                "channels", f"expected 1 (grayscale) or 3 (RGB), got {cfg['channels']!r}"
            )
        check_denoising(cfg)

        for section in KIND_SECTIONS[kind]:
            given = model_cfg.get(section, {})
            if section == "autoencoder" and kind == "latent_dit":
                if not isinstance(given, str | Path) or not str(given):
                    raise config_error(
                        "autoencoder",
                        "kind latent_dit needs the path of a trained autoencoder checkpoint "
                        "(the final/ folder of a kind: autoencoder run)",
                    )
                cfg["autoencoder"] = str(given)
                continue
            if not isinstance(given, Mapping):
                raise config_error(section, f"expected a mapping, got {type(given).__name__}")
            defaults = dict(SECTION_DEFAULTS[section])
            if section == "dit" and kind == "latent_dit":
                defaults.update(_LATENT_DIT_DEFAULTS)
            check_keys(given, defaults, f"model.{section}.")
            cfg[section] = {**defaults, **given}
            self._check_section(section, cfg[section])

        factor = self._downsample_factor(cfg)
        if cfg["image_size"] % factor:
            raise config_error("image_size", f"{cfg['image_size']} is not divisible by {factor}")
        return cfg

    @staticmethod
    def _check_section(section: str, sec: dict[str, Any]) -> None:
        def name(key: str) -> str:
            return f"{section}.{key}"

        if section == "unet":
            for key in ("base_channels", "num_res_blocks", "heads"):
                number(sec, key, int, 1, name(key))
            int_list(sec, "channel_mult", name("channel_mult"), 1)
            int_list(sec, "attention_levels", name("attention_levels"), 0)
            if not sec["channel_mult"]:
                raise config_error(name("channel_mult"), "needs at least one level")
            if any(level >= len(sec["channel_mult"]) for level in sec["attention_levels"]):
                raise config_error(name("attention_levels"), "must index channel_mult")
            if any(sec["base_channels"] * m % sec["heads"] for m in sec["channel_mult"]):
                raise config_error(name("heads"), "must divide every level's width")
            number(sec, "dropout", float, 0.0, name("dropout"))
        elif section == "dit":
            for key in ("patch", "dim", "depth", "heads"):
                number(sec, key, int, 1, name(key))
            if sec["dim"] % sec["heads"] or (sec["dim"] // sec["heads"]) % 4:
                raise config_error(name("heads"), "dim / heads must be a multiple of 4 (2D rotary)")
            number(sec, "mlp_ratio", float, 1e-6, name("mlp_ratio"))
            if not isinstance(sec["qk_norm"], bool):
                raise config_error(name("qk_norm"), "expected true/false")
        else:
            for key in ("latent_channels", "base_channels"):
                number(sec, key, int, 1, name(key))
            int_list(sec, "channel_mult", name("channel_mult"), 1)
            if not sec["channel_mult"]:
                raise config_error(name("channel_mult"), "needs at least one level")
            number(sec, "kl_weight", float, 0.0, name("kl_weight"))

    @staticmethod
    def _downsample_factor(cfg: Mapping[str, Any]) -> int:
        """What the image side must be divisible by (known before loading anything)."""
        kind = cfg["kind"]
        if kind == "unet":
            return 2 ** (len(cfg["unet"]["channel_mult"]) - 1)
        if kind == "dit":
            return cfg["dit"]["patch"]
        if kind == "autoencoder":
            return 2 ** (len(cfg["autoencoder"]["channel_mult"]) - 1)
        return 1  # latent_dit: checked against the autoencoder when it is loaded

    # --- model ---------------------------------------------------------------------------
    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        """A fresh model of ``kind`` (latent_dit: with the trained autoencoder loaded)."""
        cfg = model_cfg
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
        context_dim, pooled_dim = text_dims(cfg)
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
        return self._build_latent_dit(cfg, dit_args)

    @staticmethod
    def _build_latent_dit(cfg: Mapping[str, Any], dit_args: dict[str, Any]) -> LatentDiT:
        from polydiff.core.pretrained import from_pretrained

        autoencoder = from_pretrained(cfg["autoencoder"], KLAutoencoder)
        if autoencoder.config["channels"] != cfg["channels"]:
            raise config_error(
                "autoencoder",
                f"{cfg['autoencoder']} encodes {autoencoder.config['channels']}-channel images "
                f"but model.channels is {cfg['channels']}",
            )
        latent_size, rest = divmod(cfg["image_size"], autoencoder.downsample_factor)
        if rest or latent_size % dit_args["patch"]:
            raise config_error(
                "image_size",
                f"{cfg['image_size']} must be divisible by the autoencoder's factor "
                f"{autoencoder.downsample_factor} times dit.patch {dit_args['patch']}",
            )
        model = LatentDiT(autoencoder=dict(autoencoder.config), **dit_args)
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model

    # --- data ----------------------------------------------------------------------------
    def decode(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"image": (C, H, W) in [-1, 1], "caption": str}``."""
        return data.decode(sample, model_cfg)

    def bucket(self, sample: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> Hashable | None:
        """Every image is resized to ``image_size``: one bucket."""
        return None

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """-> ``{"image": (B, C, H, W), "caption": list[str]}``."""
        return data.collate(samples)

    def synthetic(self, name: str, count: int | None) -> Iterator[dict[str, Any]]:
        """``digits``: sklearn's real handwritten digits at 16x16 (see ``synthetic.digits``)."""
        if name != "digits":
            raise ValueError(
                f"unknown synthetic image set {name!r}; available: "
                f"{', '.join(synthetic.SYNTHETIC_SETS)}"
            )
        return synthetic.digits(count)

    def generate(self, args: Any) -> list[Path]:
        """``polydiff generate image``: every prompt ``args.num`` times, saved as PNG files
        (``FILE.png``, or ``FILE_0.png`` ... when there is more than one image)."""
        from .export import save_images
        from .pipeline import generate

        images = generate(
            args.prompt,
            checkpoint=args.checkpoint,
            num=args.num,
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            seed=args.seed,
        )
        return save_images(images, args.out, len(images))

    def source(self, folder: Path) -> Iterator[dict[str, Any]]:
        """Captioned PNG/JPEG files of a folder (see ``data.folder_source``)."""
        return data.folder_source(folder)

    # --- training ------------------------------------------------------------------------
    def loss(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        generator: torch.Generator,
        model_cfg: Mapping[str, Any],
    ) -> Tensor:
        """Scalar loss of one micro-batch.

        Denoisers: captions -> text tokens/mask/pooled; each caption is replaced by the empty
        prompt with probability ``cond_drop`` (classifier-free guidance training); then
        ``diffusion_loss`` with the configured schedule, prediction, time distribution and
        weighting. Latent DiT: on the frozen autoencoder's normalised latents.
        Autoencoder: reconstruction MSE + ``kl_weight`` * KL per image element.
        """
        device, dtype = model_params(model)
        images = batch["image"].to(device=device, dtype=dtype)
        if model_cfg["kind"] == "autoencoder":
            return self._autoencoder_loss(model, images, generator, model_cfg)
        captions = list(batch["caption"])
        cond = text_conditioning(captions, model_cfg, device, dtype)
        null = text_conditioning([""], model_cfg, device, dtype)
        cond, _ = drop_conditioning(cond, null, float(model_cfg["cond_drop"]), generator)
        x0 = images
        if model_cfg["kind"] == "latent_dit":
            x0 = unwrap_model(model).encode(images)
        return diffusion_loss(
            model,
            x0,
            make_schedule(model_cfg),
            prediction=model_cfg["prediction"],
            cond=cond,
            time_distribution=model_cfg["time_distribution"],
            weighting=model_cfg["weighting"],
            snr_gamma=float(model_cfg["snr_gamma"]),
            generator=generator,
        )

    @staticmethod
    def _autoencoder_loss(
        model: nn.Module, images: Tensor, generator: torch.Generator, model_cfg: Mapping[str, Any]
    ) -> Tensor:
        autoencoder = unwrap_model(model)
        factor = autoencoder.downsample_factor
        latent_shape = (
            images.shape[0],
            autoencoder.config["latent_channels"],
            images.shape[2] // factor,
            images.shape[3] // factor,
        )
        noise = torch.randn(latent_shape, generator=generator, device=generator.device)
        recon, mean, logvar = model(images, noise.to(device=images.device, dtype=images.dtype))
        if autoencoder.training:
            autoencoder.track_latent_std(mean)
        mse = (recon.float() - images.float()).pow(2).mean()
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / images.numel()
        return mse + float(model_cfg["autoencoder"]["kl_weight"]) * kl

    def preview(
        self, model: nn.Module, out_dir: Path, step: int, model_cfg: Mapping[str, Any]
    ) -> list[Path]:
        """One PNG grid in ``out_dir`` (the trainer's ``previews/step_XXXXXX/``):
        ``digits.png``, digits 0..9 drawn from their prompts, or for an autoencoder
        ``reconstructions.png``, real digits over their reconstructions."""
        from .pipeline import grid_image, sample_images, to_pil

        net = unwrap_model(model)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                if model_cfg["kind"] == "autoencoder":
                    tensors = self._reconstruction_pairs(net, model_cfg)
                    name, rows = "reconstructions.png", 2
                else:
                    prompts = [synthetic.digit_caption(d) for d in range(10)]
                    tensors = sample_images(net, model_cfg, prompts, seed=step)
                    name, rows = "digits.png", 1
        finally:
            net.train(was_training)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / name
        grid_image(to_pil(tensors), rows=rows).save(path)
        return [path]

    @staticmethod
    def _reconstruction_pairs(net: nn.Module, model_cfg: Mapping[str, Any]) -> Tensor:
        device, dtype = model_params(net)
        firsts: dict[int, dict[str, Any]] = {}
        for sample in synthetic.digits(size=int(model_cfg["image_size"])):
            firsts.setdefault(sample["json"]["label"], sample)
            if len(firsts) == 10:
                break
        images = torch.stack([data.decode(firsts[d], model_cfg)["image"] for d in range(10)]).to(
            device=device, dtype=dtype
        )
        recon = net.decode(net.encode(images)[0])  # the posterior mean: no sampling noise
        return torch.cat([images, recon.clamp(-1, 1)]).float()
