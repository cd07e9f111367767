"""Text-to-audio generation from a checkpoint written by ``polydiff train``: mel sampling, a
vocoder, CLAP re-ranking, inpainting and continuation. Inference only: nothing here imports
the trainer.

A request's sound is ``seconds`` long (default: the trained segment, or the ``init`` sound
when one is given); its frames are rounded up to the network's multiple and the extra frames
are padding (the valid mask), cut before vocoding.

Inpainting and continuation (``init`` + ``keep``): the init sound's log-mel is the sampler's
known content over the kept frames (the core inpainting sampler regenerates the rest in
harmony with it), and after vocoding the kept samples are the init sound's own, exactly,
joined to the new sound by a 10 ms crossfade outside the kept ranges.

Re-ranking (``rerank`` N): N candidates per output, from consecutive noise draws, scored by a
CLAP model against the prompt; the best one is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch
from torch import Tensor, nn

from polydiff.core.modality import (
    Conditioner,
    GenerationRequest,
    RequestError,
    RequestOptions,
    Sampling,
    TextConditioner,
    denoise,
    time_ranges,
)
from polydiff.core.modality import generate as generate_request

from .config import mel_settings, segment_frames
from .mel import MelSettings
from .vocoder import GriffinLimVocoder, Vocoder

__all__ = [
    "BATCH_SIZE",
    "MAX_RERANK",
    "MAX_SECONDS",
    "MAX_TOTAL_SECONDS",
    "VOCODERS",
    "AudioOptions",
    "Sound",
    "check_audio_options",
    "conditioner_for",
    "generate",
    "generate_sounds",
    "keep_mask",
    "parse_keep",
    "resolved_seconds",
    "sample_mels",
    "select_vocoder",
]

BATCH_SIZE = 8  # sounds per sampling batch (the default of --batch-size)
MAX_SECONDS = 60.0  # one sound's length bound: attention and the vocoder grow with it
MAX_RERANK = 32  # candidates per output: each costs a whole sampling
#: Sound one call samples, candidates included: its noise, mels and waves are held at once
#: (an hour: ~60 MB of noise, ~230 MB of waves).
MAX_TOTAL_SECONDS = 3600.0
VOCODERS = ("griffin-lim", "neural")
_CROSSFADE_SECONDS = 0.01


@dataclass(frozen=True)
class Sound:
    """One generated sound: ``wave`` (S,) float32 in [-1, 1] at ``sample_rate`` Hz and the
    ``log_mel`` (n_mels, F) it was vocoded from."""

    wave: Tensor
    log_mel: Tensor
    sample_rate: int


class AudioOptions(RequestOptions, total=False):
    """Audio's own options of :func:`generate` (CLI: ``--seconds`` ...)."""

    seconds: float
    vocoder: str
    rerank: int
    clap: str
    init: str | Path
    keep: str
    mel_png: bool


# --- options ---------------------------------------------------------------------------------
def parse_keep(text: str) -> list[tuple[float, float]]:
    """``"0:1.5"`` or ``"0:1.5,3:4"`` -> [(0.0, 1.5), (3.0, 4.0)] seconds (RequestError)."""
    return time_ranges(text, "keep")


def check_audio_options(options: Mapping[str, Any]) -> None:
    """Refuse bad audio options with one line, before anything is loaded."""
    seconds = options.get("seconds")
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or not 0 < seconds <= MAX_SECONDS
    ):
        raise RequestError("seconds", f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds!r}")
    vocoder = options.get("vocoder")
    if vocoder is not None and vocoder not in VOCODERS:
        raise RequestError("vocoder", f"vocoder must be one of {', '.join(VOCODERS)}")
    rerank = options.get("rerank")
    if rerank is not None and (
        isinstance(rerank, bool) or not isinstance(rerank, int) or not 1 <= rerank <= MAX_RERANK
    ):
        raise RequestError("rerank", f"rerank must be an integer in [1, {MAX_RERANK}]")
    mel_png = options.get("mel_png")
    if mel_png is not None and not isinstance(mel_png, bool):
        raise RequestError("mel_png", f"mel_png must be True or False, got {mel_png!r}")
    for name in ("init", "clap"):
        path = options.get(name)
        if path is not None and not Path(path).exists():
            raise RequestError(name, f"{name} not found: {path}")
    if options.get("keep") is not None:
        if options.get("init") is None:
            raise RequestError("keep", "keep needs init: the sound whose ranges are kept")
        parse_keep(options["keep"])
    elif options.get("init") is not None:
        raise RequestError("init", "init needs keep: the ranges to keep (e.g. 0:1.5)")


def resolved_seconds(
    config: Mapping[str, Any], options: Mapping[str, Any], init_seconds: float | None = None
) -> float:
    """The length of the sounds: ``seconds``, else the init sound's (``init_seconds`` when
    the caller has it decoded, else read from ``options["init"]``), else the trained one."""
    if options.get("seconds") is not None:
        return float(options["seconds"])
    if options.get("init") is not None:
        if init_seconds is None:
            from .data import read_audio

            samples, rate = read_audio(Path(options["init"]))
            init_seconds = samples.shape[-1] / rate
        return min(MAX_SECONDS, max(init_seconds, float(config["seconds"])))
    return float(config["seconds"])


def select_vocoder(model: nn.Module, name: str | None) -> Vocoder:
    """The named vocoder (None: the denoiser's own neural one, else Griffin-Lim)."""
    neural = getattr(model, "vocoder", None)
    if name == "neural" and neural is None:
        raise RequestError(
            "vocoder", "this checkpoint carries no neural vocoder; use --vocoder griffin-lim"
        )
    if name == "griffin-lim" or neural is None:
        return GriffinLimVocoder(model.mel)
    return neural


def conditioner_for(
    config: Mapping[str, Any], device: str | None = None, dtype: torch.dtype | None = None
) -> Conditioner:
    """The conditioner the config trains with: the text encoder, or CLAP embeddings."""
    if config["conditioning"] == "clap":
        from .clap import ClapConditioner

        sample_rate = mel_settings(config).sample_rate
        return ClapConditioner(config["clap"], sample_rate=sample_rate, device=device, dtype=dtype)
    return TextConditioner.from_config(config, device=device, dtype=dtype)


# --- sampling --------------------------------------------------------------------------------
def keep_mask(ranges: Sequence[tuple[float, float]], mel: MelSettings, frames: int) -> Tensor:
    """(frames,) float: 0 at frames whose centre lies in a kept range, 1 elsewhere."""
    centres = torch.arange(frames, dtype=torch.float64) / mel.frames_per_second
    keep = torch.zeros(frames, dtype=torch.bool)
    for start, stop in ranges:
        keep |= (centres >= start) & (centres < stop)
    return (~keep).float()


def sample_mels(
    model: nn.Module,
    config: Mapping[str, Any],
    prompts: Sequence[Any],
    *,
    seconds: float | None = None,
    seed: int = 0,
    options: Sampling | None = None,
    conditioner: Conditioner | None = None,
    init_wave: Tensor | None = None,
    keep: Sequence[tuple[float, float]] = (),
) -> Tensor:
    """Log-mels (N, n_mels, F) of ``seconds`` (F: its frames, padding cut) for N prompts.

    ``init_wave`` (S,) at the model's rate with ``keep`` ranges: inpainting (see the module
    doc); the init sound is cut or padded with silence to the length.
    """
    mel: MelSettings = model.mel
    seconds = float(config["seconds"]) if seconds is None else seconds
    frames = mel.frames_for_seconds(seconds)
    padded = segment_frames(config, seconds)
    count = len(prompts)
    valid = model.frames_mask([frames] * count, padded)
    init = mask = None
    if init_wave is not None:
        samples = mel.samples(frames)
        wave = torch.zeros(samples)
        wave[: min(samples, init_wave.shape[-1])] = init_wave[:samples].float()
        log_mel = torch.full((mel.n_mels, padded), mel.silence)
        log_mel[:, :frames] = mel.log_mel(wave)[:, :frames]
        device = model.mel_mean.device
        normalised = model.normalize(log_mel[None].to(device)).cpu()
        init = normalised.expand(count, -1, -1, -1).contiguous()
        mask = keep_mask(keep, mel, padded).reshape(1, 1, 1, padded).expand(count, -1, -1, -1)
    x = denoise(
        model,
        config,
        conditioner or conditioner_for(config),
        prompts,
        (1, mel.n_mels, padded),
        options or Sampling.resolve(config, default_batch_size=BATCH_SIZE),
        generator=torch.Generator().manual_seed(seed),
        init=init,
        mask=mask,
        valid=valid,
    )
    device = model.mel_mean.device
    return model.denormalize(x.to(device)).cpu()[..., :frames]


def _splice_kept(
    wave: Tensor, init_wave: Tensor, ranges: Sequence[tuple[float, float]], sample_rate: int
) -> Tensor:
    """``wave`` with the kept ranges replaced by ``init_wave``'s samples, exactly, and a
    linear crossfade just outside each range."""
    out = wave.clone()
    fade = max(1, round(_CROSSFADE_SECONDS * sample_rate))
    length = min(wave.shape[-1], init_wave.shape[-1])
    for start_s, stop_s in ranges:
        start, stop = round(start_s * sample_rate), min(length, round(stop_s * sample_rate))
        if start >= stop:
            continue
        out[start:stop] = init_wave[start:stop]
        ramp = torch.linspace(1.0, 0.0, fade + 2)[1:-1]  # weight of the init sound
        after = slice(stop, min(length, stop + fade))
        n = after.stop - after.start
        out[after] = ramp[:n] * init_wave[after] + (1 - ramp[:n]) * wave[after]
        before = slice(max(0, start - fade), start)
        n = before.stop - before.start
        weights = ramp.flip(0)[fade - n :]
        out[before] = weights * init_wave[before] + (1 - weights) * wave[before]
    return out


def generate_sounds(
    model: nn.Module, config: Mapping[str, Any], request: GenerationRequest,
    conditioner: Conditioner,
) -> list[Sound]:  # fmt: skip
    """One :class:`Sound` per ``request.repeated`` prompt (see the module doc)."""
    opts = request.options
    mel: MelSettings = model.mel
    init_wave, keep = None, []
    if opts.get("init") is not None:
        from .data import load_wave

        init_wave, keep = load_wave(Path(opts["init"]), mel), parse_keep(opts["keep"])
    init_seconds = None if init_wave is None else init_wave.shape[-1] / mel.sample_rate
    seconds = resolved_seconds(config, opts, init_seconds)
    vocoder = select_vocoder(model, opts.get("vocoder"))
    rerank = int(opts.get("rerank") or 1)
    total = len(request.repeated) * rerank * seconds
    if total > MAX_TOTAL_SECONDS:
        raise RequestError(
            "num",
            f"{len(request.repeated)} sound(s) x {rerank} candidate(s) x {seconds:g} s is more "
            f"than {MAX_TOTAL_SECONDS:g} s of sound in one call; split the request",
        )
    embedder = None
    if rerank > 1:
        clap_path = opts.get("clap") or config.get("clap")
        if clap_path is None:
            raise RequestError(
                "rerank", "rerank needs a CLAP model: pass --clap PATH (a folder or .pt file)"
            )
        from .clap import load_clap

        embedder = load_clap(clap_path, device=request.device)
    prompts = [p for p in request.repeated for _ in range(rerank)]
    log_mels = sample_mels(
        model,
        config,
        prompts,
        seconds=seconds,
        seed=request.seed,
        options=Sampling.resolve(config, request, BATCH_SIZE),
        conditioner=conditioner,
        init_wave=init_wave,
        keep=keep,
    )
    device = next(model.parameters()).device
    waves = torch.cat(
        [
            vocoder.vocode(log_mels[i : i + BATCH_SIZE].to(device)).float().cpu()
            for i in range(0, len(prompts), BATCH_SIZE)
        ]
    )
    waves = waves[:, : round(seconds * mel.sample_rate)]  # frames cover it; cut the rest
    if init_wave is not None:
        waves = torch.stack([_splice_kept(w, init_wave, keep, mel.sample_rate) for w in waves])
    chosen = list(range(0, len(prompts), rerank))
    if embedder is not None:
        from .clap import rerank as rank_candidates

        chosen = []
        for start in range(0, len(prompts), rerank):
            order, _ = rank_candidates(
                embedder, waves[start : start + rerank], mel.sample_rate, prompts[start]
            )
            chosen.append(start + order[0])
    return [Sound(waves[i].clamp(-1, 1), log_mels[i], mel.sample_rate) for i in chosen]


def generate(prompts: str | Sequence[str], **options: Unpack[AudioOptions]) -> list[Sound]:
    """Generate sounds in Python: ``generate("a rising chirp", seconds=3.0)``.

    ``options`` are those of ``polydiff generate audio`` (``checkpoint`` None: the bundled
    model). Returns one :class:`Sound` per prompt and ``num`` (prompt by prompt).
    """
    return list(generate_request("audio", GenerationRequest.of(prompts, **options)).outputs)
