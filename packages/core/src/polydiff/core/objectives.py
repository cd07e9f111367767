"""Training objectives: timestep sampling, the noise-prediction loss, weightings and masks.

``diffusion_loss`` is the one loss every modality trains with: draw model times, noise the clean
batch on the schedule, ask the model for its prediction (eps, x0, v or flow) and take a
(weighted, masked) mean squared error against the exact target.

Padded batches use the same ``valid`` keyword as :func:`polydiff.core.sample`, with the same
meaning, so a modality writes the same thing in training and in sampling: the noisy input is
exactly 0 at padding, the model gets ``valid=`` (see :func:`polydiff.core.guidance.valid_mask`)
and padding adds nothing to the loss or its gradient. ``mask`` is only a loss mask (elements
that exist but are not scored, e.g. a given first frame); ``valid=m`` scores exactly what
``mask=m`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .guidance import valid_mask
from .predictions import check_prediction, model_output, target, x0_error_scale
from .schedules import Schedule, shift_time

__all__ = ["TIME_DISTRIBUTIONS", "WEIGHTINGS", "diffusion_loss", "loss_weight", "sample_time"]

TIME_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "logit_normal")
WEIGHTINGS: tuple[str, ...] = ("none", "min_snr")
_EDGE = 1e-5  # keep continuous times off the exact ends, where some targets are undefined


def sample_time(
    schedule: Schedule,
    batch: int,
    *,
    distribution: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw (batch,) training model times (float32).

    ``uniform``: DDPM's uniform integer timesteps for VP schedules, uniform s in (0, 1) for
    flow. ``logit_normal``: s = sigmoid(N(mean, std)) (Esser et al. 2024), for either family.
    The schedule's time shift (``schedule.shift``) is applied on top, as at sampling time.
    """
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(
            f"unknown time distribution {distribution!r}; valid: {', '.join(TIME_DISTRIBUTIONS)}"
        )
    gen_device = generator.device if generator is not None else device
    if distribution == "uniform":
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    else:
        z = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float64)
        u = torch.sigmoid(mean + std * z)
    if schedule.shift != 1.0:
        u = shift_time(u, schedule.shift)
    if schedule.kind == "vp" and distribution == "uniform" and schedule.shift == 1.0:
        t = torch.floor(u * schedule.train_steps).clamp(max=schedule.t_max)
    else:
        t = u.clamp(_EDGE, 1.0 - _EDGE) * schedule.t_max
    return t.to(device=device, dtype=torch.float32)


def loss_weight(
    schedule: Schedule, t: Tensor, prediction: str, weighting: str = "none", snr_gamma: float = 5.0
) -> Tensor:
    """Per-sample loss weights (B,) for the MSE on ``prediction``.

    ``min_snr`` (Hang et al. 2023) weights the x0 error by min(SNR, gamma); for other targets the
    weight is converted exactly: w = min(SNR, gamma) * (d x0 / d prediction)**2, which gives the
    familiar min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return torch.ones_like(t, dtype=torch.float32)
    tt = t.to(torch.float64)
    alpha, sigma = schedule.alpha(tt), schedule.sigma(tt)
    snr = torch.exp(schedule.log_snr(tt))
    scale = x0_error_scale(alpha, sigma, prediction)
    return (torch.clamp(snr, max=snr_gamma) * scale * scale).to(torch.float32)


def _expand(value: Tensor, like: Tensor) -> Tensor:
    return value.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def diffusion_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    cond: Mapping[str, Any] | None = None,
    mask: Tensor | None = None,
    valid: Tensor | None = None,
    time_distribution: str = "uniform",
    weighting: str = "none",
    snr_gamma: float = 5.0,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The denoising loss on a clean batch.

    Args:
        model: ``model(x_t, t, **cond)`` returning a tensor shaped like ``x0`` (or an object
            with a ``.sample`` tensor, or a tuple whose first item is the tensor:
            :func:`~polydiff.core.predictions.model_output`).
        x0: (B, ...) clean samples.
        schedule: the noise schedule.
        prediction: the model's target: eps, x0, v or flow.
        cond: keyword inputs for the model (text tokens, masks...).
        mask: loss mask broadcastable to ``x0``; 1/True marks scored elements, so elements at 0
            add nothing to the loss or the gradient. Each sample is averaged over its scored
            elements. The model does not see it; for padding use ``valid``.
        valid: padding mask broadcastable to ``x0``, bool or 0/1, 1 = real, exactly as in
            :func:`polydiff.core.sample`: ``x_t`` is 0 at padding, the model is called as
            ``model(x_t, t, **cond, valid=v)`` (a bool tensor with ``x0.ndim`` dims and the
            batch of ``x0``; ``v[:, 0]`` is a DiT token mask for (B, C, T)) and padding is left
            out of the loss like ``mask``. With both, elements count where both are 1.
        time_distribution, weighting, snr_gamma: see :func:`sample_time`, :func:`loss_weight`.
        t, noise: fixed model times (B,) and noise (like ``x0``) instead of random draws.
        reduction: ``mean`` (a scalar) or ``none`` (per-sample losses (B,)).
    """
    check_prediction(prediction)
    if time_distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(
            f"unknown time distribution {time_distribution!r}; "
            f"valid: {', '.join(TIME_DISTRIBUTIONS)}"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    batch = x0.shape[0]
    if t is None:
        t = sample_time(
            schedule, batch, distribution=time_distribution, generator=generator, device=x0.device
        )
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(
            x0.device
        )
    tt = t.to(torch.float64)
    alpha = _expand(schedule.alpha(tt), x0)
    sigma = _expand(schedule.sigma(tt), x0)
    x_t = alpha * x0 + sigma * noise
    goal = target(x0, noise, alpha, sigma, prediction)
    kwargs = dict(cond or {})
    if valid is not None:
        if "valid" in kwargs:
            raise ValueError("pass the padding mask as valid=, not as a cond key 'valid'")
        valid = valid_mask(valid, x0)
        x_t = torch.where(valid, x_t, 0.0)  # the state sampling sees at padding
        kwargs["valid"] = valid
        mask = valid if mask is None else torch.broadcast_to(mask, x0.shape) * valid
    out = model_output(model(x_t, t.to(torch.float32), **kwargs))
    if out.shape != x0.shape:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x0.shape)}")
    diff = out.float() - goal.float()
    dims = tuple(range(1, x0.ndim))
    if mask is None:
        per_sample = (diff * diff).mean(dim=dims)
    else:
        m = torch.broadcast_to(mask.to(diff.dtype), diff.shape)
        count = m.sum(dim=dims)
        if torch.any(count == 0):
            raise ValueError("a sample in the batch has no unmasked elements")
        # Select before squaring: whatever the model emits at padding (even NaN) is dropped,
        # and no NaN reaches the gradient through a 0 * NaN product.
        diff = torch.where(m > 0, diff, 0.0)
        per_sample = (diff * diff * m).sum(dim=dims) / count
    per_sample = per_sample * loss_weight(schedule, t, prediction, weighting, snr_gamma).to(
        per_sample.device
    )
    return per_sample.mean() if reduction == "mean" else per_sample
