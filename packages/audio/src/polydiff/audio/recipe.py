"""``AudioRecipe``: text-to-audio by mel-spectrogram diffusion, and its neural vocoder, on the
shared modality kit (``polydiff.core.modality``).

The ``model:`` section is :class:`polydiff.audio.config.AudioConfig`. Two runs make a
text-to-audio model, as image's autoencoder + latent DiT:

1. ``kind: vocoder``: a GAN (the generator, multi-period and multi-resolution
   discriminators; two parts, two optimizers: discriminator then generator each step) that
   learns log-mel -> wave; ``final/`` is the generator (EMA weights).
2. ``kind: dit`` or ``unet`` with ``vocoder:`` naming that ``final/`` folder: the mel
   denoiser, which carries the frozen vocoder in its checkpoint. Per-band log-mel mean and
   std are fitted before step 0 (``fit_statistics``) and normalise the denoiser's space.

``conditioning: clap`` trains on CLAP *audio* embeddings of the training sounds (captions are
not needed) and samples from CLAP *text* embeddings of the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from polydiff.core.ema import unwrap_model
from polydiff.core.modality import (
    ConfigError,
    GenerateOption,
    GenerationRequest,
    Loss,
    Modality,
    conditioned_batch,
    denoising_loss,
    model_params,
)
from polydiff.core.pretrained import CheckpointError, class_path, from_pretrained

from . import data, synthetic
from .config import AudioConfig, mel_settings, segment_frames
from .export import AUDIO_OUTPUT_SUFFIXES, mel_png, save_sounds
from .mel import MelSettings
from .model import MelDenoiser
from .pipeline import (
    Sound,
    check_audio_options,
    conditioner_for,
    generate_sounds,
    resolved_seconds,
    sample_mels,
    select_vocoder,
)
from .vocoder import NeuralVocoder, VocoderGAN, vocoder_loss

__all__ = ["PREVIEW_PROMPTS", "AudioRecipe"]

_LOSS_WEIGHTS = ("mel", "feature", "adversarial", "stft")

PREVIEW_PROMPTS = (
    "a low sine tone",
    "a high square tone",
    "a rising chirp",
    "a falling chirp",
    "a fast beat",
    "a slow beat",
    "white noise",
    "silence then a beep",
)
_BUNDLED = Path(__file__).resolve().parent / "bundled" / "sounds"


class AudioRecipe(Modality):
    """Text-to-audio: a mel DiT or U-Net, Griffin-Lim and a trained neural vocoder."""

    name = "audio"
    schema = AudioConfig
    output_suffixes = AUDIO_OUTPUT_SUFFIXES
    bundled = (_BUNDLED, "shared/configs/audio/sounds.yaml")
    synthetic_sets: ClassVar[dict[str, Any]] = {"sounds": synthetic.sounds}
    example_config: ClassVar[dict[str, Any]] = {
        "seconds": 0.5,
        "text_max_length": 8,
        "sample_steps": 2,
        "dit": {"patch": 4, "dim": 32, "depth": 1, "heads": 2},
    }
    generate_options = (
        GenerateOption("seconds", float, "length in seconds (default: the trained length)"),
        GenerateOption("vocoder", str, "griffin-lim | neural (default: neural when carried)"),
        GenerateOption("rerank", int, "draw N candidates, keep the one CLAP ranks best"),
        GenerateOption("clap", Path, "a CLAP model (folder or LAION .pt) for --rerank"),
        GenerateOption("init", Path, "a sound to continue or inpaint (with --keep)"),
        GenerateOption("keep", str, "ranges of --init kept, in seconds: 0:1.5[,3:4]"),
        GenerateOption("mel_png", bool, "also write each output's mel spectrogram as PNG"),
    )

    @property
    def statistics_batches(self) -> int:  # type: ignore[override]
        """Denoisers fit per-band log-mel statistics on 8 batches; a vocoder needs none."""
        return 0 if self.config["kind"] == "vocoder" else 8

    @property
    def ema_part(self) -> str:  # type: ignore[override]
        return "generator" if self.config["kind"] == "vocoder" else "model"

    @property
    def mel(self) -> MelSettings:
        return mel_settings(self.config)

    # --- data ----------------------------------------------------------------------------
    @classmethod
    def source(cls, folder: Path) -> Iterator[dict[str, Any]]:
        """WAV/FLAC/OGG/MP3 files of a folder with their captions (see ``data``); files
        without a caption are kept too (CLAP conditioning trains on them; text conditioning
        skips them when decoding)."""
        return data.folder_source(folder, require_caption=False)

    def decode(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Shard sample -> ``{"mel": (n_mels, F) log-mel, "valid": (F,), "caption": str}``
        (+ ``"wave"`` (S,) for the vocoder and CLAP conditioning); a random segment."""
        cfg = self.config
        needs_wave = cfg["kind"] == "vocoder" or cfg["conditioning"] == "clap"
        decoded = data.decode(sample, self.mel, segment_frames(cfg), random, with_wave=needs_wave)
        if cfg["kind"] != "vocoder" and cfg["conditioning"] == "text" and not decoded["caption"]:
            raise ValueError("no caption (text conditioning)")
        return decoded

    # --- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh :class:`VocoderGAN` (kind vocoder) or :class:`MelDenoiser` (with the
        trained vocoder the config names, frozen)."""
        cfg = self.config
        if cfg["kind"] == "vocoder":
            gan = cfg["gan"]
            width = int(gan["discriminator_channels"])
            model = VocoderGAN(
                mel=cfg["mel"],
                generator={k: gan[k] for k in ("dim", "intermediate", "layers")},
                mpd={"periods": list(gan["periods"]), "channels": [width * 2**i for i in range(4)]},
                mrd={"channels": width},
            )
            # The discriminators' update count (see ``loss``), saved with their part.
            model.discriminator.register_buffer("updates", torch.zeros((), dtype=torch.long))
            return model
        context_dim, pooled_dim = conditioner_for(cfg).dims
        vocoder_args: dict[str, Any] = {}
        if cfg["vocoder"] is not None:
            vocoder = self._trained_vocoder(cfg["vocoder"])
            vocoder_args = {"vocoder_class": class_path(type(vocoder)), "vocoder": vocoder.config}
        model = MelDenoiser(
            mel=cfg["mel"],
            network=cfg["kind"],
            dit=cfg.get("dit"),
            unet=cfg.get("unet"),
            context_dim=context_dim,
            pooled_dim=pooled_dim,
            gradient_checkpointing=bool(cfg["gradient_checkpointing"]),
            **vocoder_args,
        )
        if model.vocoder is not None:
            model.vocoder.load_state_dict(vocoder.state_dict())
        return model

    def _trained_vocoder(self, folder: str) -> NeuralVocoder:
        try:
            vocoder = from_pretrained(folder)
        except CheckpointError as e:
            raise ConfigError(f"model.vocoder: {e}") from e
        if not isinstance(vocoder, NeuralVocoder):
            raise ConfigError(
                f"model.vocoder: {folder} holds a {type(vocoder).__name__}, not a NeuralVocoder "
                "(the final/ folder of a kind: vocoder run)"
            )
        if vocoder.mel != self.mel:
            raise ConfigError(
                f"model.vocoder: {folder} was trained on other mel settings "
                f"({vocoder.mel.to_dict()}) than model.mel"
            )
        return vocoder

    def parts(self, model: nn.Module) -> dict[str, nn.Module]:
        """Vocoder: the discriminators, then the generator (one optimizer each)."""
        if self.config["kind"] == "vocoder":
            return {"discriminator": model.discriminator, "generator": model.generator}
        return {"model": model}

    def fit_statistics(
        self, model: nn.Module, batches: Iterable[dict[str, Any]]
    ) -> dict[str, Tensor]:
        """Per-band mean and std of the training log-mels over real frames (denoisers). Each
        process fits its own and the trainer averages them."""
        total = torch.zeros(self.mel.n_mels, dtype=torch.float64)
        squares = torch.zeros_like(total)
        count = 0.0
        for batch in batches:
            log_mel = batch["mel"].double()  # (B, n_mels, F)
            valid = batch["valid"].double()[:, None]  # (B, 1, F)
            total += (log_mel * valid).sum((0, 2))
            squares += (log_mel.square() * valid).sum((0, 2))
            count += float(valid.sum())
        if count == 0:
            return {}
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(1e-4).sqrt()
        return {"mel_mean": mean.float(), "mel_std": std.float()}

    # --- training ------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, part: str
    ) -> Loss:
        """Vocoder: the GAN loss of ``part``. Denoisers: the configured diffusion loss over
        real frames, conditioned on captions (text) or the sounds' CLAP audio embeddings,
        dropped to the null input with probability ``cond_drop``."""
        device, dtype = model_params(model)
        net = unwrap_model(model)
        if self.config["kind"] == "vocoder":
            gan = self.config["gan"]
            weights = {k: float(gan[f"{k}_weight"]) for k in _LOSS_WEIGHTS}
            wave = batch["wave"].to(device=device, dtype=dtype)
            log_mel = batch["mel"].to(device=device, dtype=dtype)
            # The discriminator part counts its own updates in a buffer its checkpoint
            # carries, so the adversarial phase starts at the same step after a resume.
            updates = net.discriminator.updates
            if part == "discriminator":
                updates += 1
            return vocoder_loss(net, wave, log_mel, part, weights, step=int(updates) - 1,
                                adversarial_start=int(gan["adversarial_start"]))  # fmt: skip
        valid_frames = batch["valid"].to(device=device) > 0.5  # (B, F)
        x0 = net.normalize(batch["mel"].to(device=device)).to(dtype)
        valid = valid_frames[:, None, None]
        x0 = torch.where(valid, x0, 0.0)
        values = batch["wave"] if self.config["conditioning"] == "clap" else batch["caption"]
        cond = conditioned_batch(
            self.conditioner(), values, self.config["cond_drop"], generator, device, dtype
        )
        return denoising_loss(model, x0, self.config, cond, generator, valid=valid)

    def conditioner(self, device: str | None = None, dtype: torch.dtype | None = None):
        return conditioner_for(self.config, device, dtype)

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        """Denoisers: ``previews.wav`` (the ``PREVIEW_PROMPTS`` one after another, vocoded)
        and ``previews.png`` (their mels). Vocoder: ``reconstructions.wav``: synthetic sounds,
        each followed by its reconstruction."""
        net = unwrap_model(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        mel = self.mel
        with torch.no_grad():
            if self.config["kind"] == "vocoder":
                vocoder = getattr(net, "generator", net)  # the trainer passes the EMA part
                waves = []
                rng = np.random.default_rng(step)
                for caption in PREVIEW_PROMPTS:
                    wave = torch.from_numpy(synthetic.render(caption, rng, 1.0, mel.sample_rate))
                    device = next(vocoder.parameters()).device
                    made = vocoder.vocode(mel.log_mel(wave)[None].to(device))[0].cpu()
                    waves += [wave[: made.shape[-1]], made]
                path = out_dir / "reconstructions.wav"
                save_sounds([torch.cat(waves)], [path], mel.sample_rate, [{}])
                return [path]
            log_mels = sample_mels(net, self.config, list(PREVIEW_PROMPTS), seed=step)
            vocoder = select_vocoder(net, None)
            device = next(net.parameters()).device
            waves = vocoder.vocode(log_mels.to(device)).cpu()
        wav, png = out_dir / "previews.wav", out_dir / "previews.png"
        save_sounds([waves.flatten()], [wav], mel.sample_rate, [{}])
        mel_png(torch.cat(list(log_mels), dim=-1), png, mel)
        return [wav, png]

    # --- generation ----------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        if self.config["kind"] == "vocoder":
            raise CheckpointError(
                f"{request.checkpoint or 'the checkpoint'} is a vocoder; generate from a mel "
                "denoiser (kind dit or unet)"
            )
        check_audio_options(request.options)

    def generate(self, model: nn.Module, request: GenerationRequest) -> list[Sound]:
        """Sounds, one per ``request.repeated`` prompt."""
        conditioner = self.conditioner(request.device, request.torch_dtype)
        return generate_sounds(model, self.config, request, conditioner)

    def output_metadata(self, request: GenerationRequest) -> dict[str, Any]:
        options = request.options
        vocoder = options.get("vocoder") or ("neural" if self.config["vocoder"] else "griffin-lim")
        return {
            "seconds": resolved_seconds(self.config, options),
            "sample_rate": self.mel.sample_rate,
            "vocoder": vocoder,
            "mel": self.mel.to_dict(),
        }

    def export(
        self,
        outputs: Sequence[Sound],
        paths: Sequence[Path],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[Path]:
        """16-bit WAV or FLAC by suffix with the provenance embedded and a sidecar JSON; with
        ``mel_png`` also ``FILE.mel.png`` beside each (see ``polydiff.audio.export``)."""
        written = save_sounds(
            [s.wave for s in outputs], paths, outputs[0].sample_rate if outputs else 16000,
            metadata,
        )  # fmt: skip
        if metadata and metadata[0].get("mel_png"):
            for sound, path in zip(outputs, paths, strict=True):
                written.append(mel_png(sound.log_mel, Path(path).with_suffix(".mel.png"), self.mel))
        return written
