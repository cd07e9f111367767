"""What every denoiser modality derives from its validated config: the schedule it trains and
samples on, its loss, and where its model lives (device and dtype)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import schedules
from ..ema import unwrap_model
from ..objectives import diffusion_loss

__all__ = ["denoising_loss", "make_schedule", "model_params"]


def make_schedule(config: Mapping[str, Any]) -> schedules.Schedule:
    """The noise schedule a validated denoising config names (``schedule``, ``shift``,
    ``zero_terminal_snr``)."""
    name, shift = config["schedule"], float(config["shift"])
    if name == "flow":
        return schedules.flow(shift=shift)
    base = getattr(schedules, name)(zero_terminal_snr=bool(config["zero_terminal_snr"]))
    if shift == 1.0:
        return base
    return schedules.DiscreteVP(base.alphas_cumprod, shift=shift)


def model_params(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's first floating-point parameter (through DeepSpeed)."""
    for param in unwrap_model(model).parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def denoising_loss(
    model: nn.Module,
    x0: Tensor,
    config: Mapping[str, Any],
    cond: Mapping[str, Any],
    generator: torch.Generator,
    mask: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """``diffusion_loss`` with everything a denoising config sets: schedule, prediction,
    time distribution, weighting and min-SNR gamma. ``mask`` (broadcastable to ``x0``) is 0
    where the loss ignores the target (given frames); ``valid`` is 0 at padding, which the
    model is told about and which stays exactly 0 (variable length)."""
    return diffusion_loss(
        model,
        x0,
        make_schedule(config),
        prediction=config["prediction"],
        cond=cond,
        mask=mask,
        valid=valid,
        time_distribution=config["time_distribution"],
        weighting=config["weighting"],
        snr_gamma=float(config["snr_gamma"]),
        generator=generator,
    )
