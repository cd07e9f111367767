"""What every text-conditioned denoiser recipe shares: its config keys, their checks, the
schedule and text conditioning they name, and the sampling-option checks.

A modality's ``model:`` section is these keys (defaults in ``DENOISING_DEFAULTS``) plus its own
(sizes, network sections). Recipes call :func:`check_denoising` after filling defaults, then
check their own keys with the small validators below, so every config error reads the same::

    text_encoder: null      # null = the bundled all-MiniLM-L6-v2; or a local model folder
    text_max_length: 16     # text token positions (prompts are padded / truncated)
    schedule: cosine        # linear | scaled_linear | cosine | flow
    zero_terminal_snr: false
    shift: 1.0              # time shift (training times and flow_shift sampling grids)
    prediction: v           # eps | x0 | v | flow
    time_distribution: uniform   # uniform | logit_normal
    weighting: min_snr      # none | min_snr
    snr_gamma: 5.0
    cond_drop: 0.1          # CFG training: probability of the empty prompt
    sampler: unipc          # defaults of previews and `polydiff generate`
    sample_steps: 30
    guidance: 3.0
    gradient_checkpointing: false
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import schedules
from ..ema import unwrap_model
from ..objectives import TIME_DISTRIBUTIONS, WEIGHTINGS
from ..predictions import PREDICTIONS
from ..sampling import SAMPLERS
from .recipe import ConfigError

__all__ = [
    "DENOISING_DEFAULTS",
    "SCHEDULES",
    "check_denoising",
    "check_keys",
    "check_sampling_options",
    "choice",
    "config_error",
    "flag",
    "int_list",
    "make_schedule",
    "model_params",
    "number",
    "text_conditioning",
    "text_dims",
]

SCHEDULES = ("linear", "scaled_linear", "cosine", "flow")

DENOISING_DEFAULTS: dict[str, Any] = {
    "text_encoder": None,
    "text_max_length": 16,
    "schedule": "cosine",
    "zero_terminal_snr": False,
    "shift": 1.0,
    "prediction": "v",
    "time_distribution": "uniform",
    "weighting": "min_snr",
    "snr_gamma": 5.0,
    "cond_drop": 0.1,
    "sampler": "unipc",
    "sample_steps": 30,
    "guidance": 3.0,
    "gradient_checkpointing": False,
}


def config_error(key: str, problem: str) -> ConfigError:
    """``ConfigError("model.<key>: <problem>")``."""
    return ConfigError(f"model.{key}: {problem}")


def check_keys(given: Mapping[str, Any], allowed: Mapping[str, Any], prefix: str) -> None:
    """Refuse keys of ``given`` that ``allowed`` lacks, naming them and the valid ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown key(s) {names}; valid: {', '.join(sorted(allowed))}")


def number(cfg: dict[str, Any], key: str, kind: type, low: float, name: str = "") -> None:
    """Check ``cfg[key]`` is an ``int`` (or ``float``) >= ``low``; "1e-4" strings become floats."""
    value = cfg[key]
    if kind is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it spells.
        with contextlib.suppress(ValueError):  # a non-number is reported below
            value = cfg[key] = float(value)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < low:
        raise config_error(name or key, f"expected {kind.__name__} >= {low}, got {value!r}")


def int_list(cfg: dict[str, Any], key: str, name: str, low: int, length: int | None = None) -> None:
    """Check ``cfg[key]`` is a list of ints >= ``low`` (of ``length`` items when given)."""
    value = cfg[key]
    ok = isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value
    )
    if not ok or (length is not None and len(value) != length):
        items = "a list" if length is None else f"a list of {length}"
        raise config_error(name, f"expected {items} integers >= {low}, got {value!r}")
    cfg[key] = list(value)


def choice(cfg: Mapping[str, Any], key: str, valid: tuple[str, ...], name: str = "") -> None:
    """Check ``cfg[key]`` is one of ``valid``."""
    if cfg[key] not in valid:
        raise config_error(name or key, f"{cfg[key]!r} is not one of {', '.join(valid)}")


def flag(cfg: Mapping[str, Any], key: str, name: str = "") -> None:
    """Check ``cfg[key]`` is a bool."""
    if not isinstance(cfg[key], bool):
        raise config_error(name or key, f"expected true/false, got {cfg[key]!r}")


def check_denoising(cfg: dict[str, Any]) -> None:
    """Check the ``DENOISING_DEFAULTS`` keys of a defaults-filled model config (in place)."""
    if cfg["text_encoder"] is not None and not isinstance(cfg["text_encoder"], str):
        raise config_error("text_encoder", "expected null (bundled MiniLM) or a model folder path")
    number(cfg, "text_max_length", int, 2)
    choice(cfg, "schedule", SCHEDULES)
    flag(cfg, "zero_terminal_snr")
    flag(cfg, "gradient_checkpointing")
    number(cfg, "shift", float, 1e-6)
    choice(cfg, "prediction", PREDICTIONS)
    if cfg["zero_terminal_snr"] and cfg["prediction"] == "eps":
        raise config_error("prediction", "eps cannot be used with zero_terminal_snr (use v or x0)")
    choice(cfg, "time_distribution", TIME_DISTRIBUTIONS)
    choice(cfg, "weighting", WEIGHTINGS)
    number(cfg, "snr_gamma", float, 1e-6)
    number(cfg, "cond_drop", float, 0.0)
    if cfg["cond_drop"] > 1:
        raise config_error("cond_drop", f"expected a probability in [0, 1], got {cfg['cond_drop']}")
    choice(cfg, "sampler", tuple(SAMPLERS))
    number(cfg, "sample_steps", int, 1)
    number(cfg, "guidance", float, 0.0)


def check_sampling_options(steps: int, sampler: str, guidance: float, num: int) -> None:
    """ValueError naming a bad sampling option (checked before any model is loaded)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    if not isinstance(guidance, int | float) or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")


def make_schedule(model_cfg: Mapping[str, Any]) -> schedules.Schedule:
    """The noise schedule a validated model config names."""
    name, shift = model_cfg["schedule"], float(model_cfg["shift"])
    if name == "flow":
        return schedules.flow(shift=shift)
    base = getattr(schedules, name)(zero_terminal_snr=bool(model_cfg["zero_terminal_snr"]))
    if shift == 1.0:
        return base
    return schedules.DiscreteVP(base.alphas_cumprod, shift=shift)


@functools.cache
def _text_encoder(name: str | None, max_length: int) -> Any:
    # On the CPU: with its prompt cache the encoder runs once per distinct caption, so a GPU
    # would save nothing and cost memory; encodings are moved to the model's device.
    from ..text import load_text_encoder

    return load_text_encoder(name, max_length=max_length)


def text_conditioning(
    prompts: list[str], model_cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Prompts -> the denoiser's text inputs ``{"context": (N, L, D), "context_mask": (N, L)
    bool, "pooled": (N, P)}``.

    The encoder is loaded once per process and caches prompts, so the captions of a small
    synthetic set are encoded once.
    """
    encoder = _text_encoder(model_cfg["text_encoder"], int(model_cfg["text_max_length"]))
    encoding = encoder.encode(list(prompts)).to(device=device, dtype=dtype)
    return {"context": encoding.tokens, "context_mask": encoding.mask, "pooled": encoding.pooled}


def text_dims(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(token width D, pooled width P) of the configured text encoder."""
    encoder = _text_encoder(model_cfg["text_encoder"], int(model_cfg["text_max_length"]))
    return encoder.dim, encoder.pooled_dim


def model_params(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's first floating-point parameter (through DeepSpeed)."""
    for param in unwrap_model(model).parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32
