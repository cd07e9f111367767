"""Classifier-free guidance and conditioning dropout.

A guider sits between the sampler and the model. It sees the state ``x``, the noise level and
both conditionings, and returns the state to step from and the clean-sample estimate to step
towards. Samplers only ever call a guider, so a new guider plugs in without touching any
sampler. For ordinary guidance the returned state is ``x`` itself; CFG++ moves it (it renoises
with the unconditional noise estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .schedules import Level

__all__ = [
    "CFG",
    "CFGPlusPlus",
    "Cond",
    "Guider",
    "NoGuidance",
    "Predict",
    "as_guider",
    "concat_cond",
    "drop_conditioning",
]

Cond = Mapping[str, Any]
#: ``predict(x, level, cond) -> x0``: the model's clean-sample estimate for a batch.
Predict = Callable[[Tensor, Level, Cond], Tensor]


class Guider(Protocol):
    """``guider(predict, x, level, cond, uncond) -> (state, x0)``, shapes as ``x``."""

    def __call__(
        self, predict: Predict, x: Tensor, level: Level, cond: Cond, uncond: Cond | None
    ) -> tuple[Tensor, Tensor]: ...


def concat_cond(first: Cond, second: Cond) -> dict[str, Any]:
    """Stack two conditionings along the batch so cond and uncond share one forward pass.

    Tensors are concatenated on dim 0; any other value must be equal in both and is kept.
    """
    if set(first) != set(second):
        raise ValueError(
            f"cond and uncond must have the same keys, got {sorted(first)} and {sorted(second)}"
        )
    out: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.shape[1:] != b.shape[1:] or b.shape[0] not in (1, a.shape[0]):
                raise ValueError(
                    f"cond[{key!r}] has shape {tuple(a.shape)} but uncond[{key!r}] has "
                    f"{tuple(b.shape)}; pad them to the same length"
                )
            out[key] = torch.cat([a, b.expand(a.shape[0], *b.shape[1:]) if b.shape[0] == 1 else b])
        elif a is b or a == b:
            out[key] = a
        else:
            raise ValueError(f"cond[{key!r}] differs from uncond[{key!r}] and is not a tensor")
    return out


def _paired(
    predict: Predict, x: Tensor, level: Level, cond: Cond, uncond: Cond
) -> tuple[Tensor, Tensor]:
    x0 = predict(torch.cat([x, x]), level, concat_cond(cond, uncond))
    cond_x0, uncond_x0 = x0.chunk(2)
    return cond_x0, uncond_x0


def _check_scale(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _in_interval(level: Level, interval: tuple[float, float] | None) -> bool:
    if interval is None:
        return True
    low, high = interval
    return low <= level.noise_level <= high


@dataclass(frozen=True)
class NoGuidance:
    """Conditional prediction only (one forward pass)."""

    def __call__(
        self, predict: Predict, x: Tensor, level: Level, cond: Cond, uncond: Cond | None
    ) -> tuple[Tensor, Tensor]:
        return x, predict(x, level, cond)


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022): x0 = u + scale * (c - u).

    Args:
        scale: guidance weight (1 = conditional only, 0 = unconditional only).
        rescale: guidance rescale phi in [0, 1] (Lin et al. 2023): the guided x0 is scaled
            per sample towards the standard deviation of the conditional x0, which counters the
            over-exposure of large scales.
        interval: (low, high) in noise level sigma/alpha: guidance is applied only there
            (Kynkaanniemi et al. 2024); elsewhere one conditional forward pass is made.

    The uncond conditioning may be a negative prompt: guidance then pushes away from it.
    """

    scale: float = 5.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_scale("guidance scale", self.scale)
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.rescale}")
        if self.interval is not None and not self.interval[0] <= self.interval[1]:
            raise ValueError(f"guidance interval must be (low, high), got {self.interval}")

    def __call__(
        self, predict: Predict, x: Tensor, level: Level, cond: Cond, uncond: Cond | None
    ) -> tuple[Tensor, Tensor]:
        if self.scale == 1.0 or not _in_interval(level, self.interval):
            return x, predict(x, level, cond)
        if uncond is None:
            raise ValueError("classifier-free guidance needs an uncond (null or negative) input")
        cond_x0, uncond_x0 = _paired(predict, x, level, cond, uncond)
        x0 = torch.lerp(uncond_x0, cond_x0, self.scale)
        if self.rescale > 0:
            dims = tuple(range(1, x0.ndim))
            ratio = cond_x0.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True)
            x0 = x0 * (self.rescale * ratio + (1.0 - self.rescale))
        return x, x0


@dataclass(frozen=True)
class CFGPlusPlus:
    """CFG++ (Chung et al. 2024): guide x0 with a small scale in [0, 1] and renoise with the
    *unconditional* noise estimate, so the state stays on the data manifold.

    The returned state is alpha * x0_guided + sigma * eps_uncond = x + alpha * (x0_g - x0_u).
    Exact for first-order samplers (DDIM/Euler); other samplers step from the moved state.
    """

    scale: float = 0.6
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_scale("CFG++ scale", self.scale)
        if self.interval is not None and not self.interval[0] <= self.interval[1]:
            raise ValueError(f"guidance interval must be (low, high), got {self.interval}")

    def __call__(
        self, predict: Predict, x: Tensor, level: Level, cond: Cond, uncond: Cond | None
    ) -> tuple[Tensor, Tensor]:
        if not _in_interval(level, self.interval):
            return x, predict(x, level, cond)
        if uncond is None:
            raise ValueError("CFG++ needs an uncond (null or negative) input")
        cond_x0, uncond_x0 = _paired(predict, x, level, cond, uncond)
        x0 = torch.lerp(uncond_x0, cond_x0, self.scale)
        return x + level.alpha * (x0 - uncond_x0), x0


def as_guider(guidance: float | Guider | None) -> Guider:
    """``None`` -> no guidance, a number -> :class:`CFG` with that scale, a guider -> itself."""
    if guidance is None:
        return NoGuidance()
    if isinstance(guidance, (int, float)):
        return CFG(scale=float(guidance))
    if callable(guidance):
        return guidance
    raise ValueError(f"guidance must be a number or a guider, got {type(guidance).__name__}")


def drop_conditioning(
    cond: Cond, null: Cond, p: float, generator: torch.Generator | None = None
) -> tuple[dict[str, Any], Tensor]:
    """Replace each sample's conditioning by the null one with probability ``p`` (CFG training).

    Args:
        cond: batch-first tensors (B, ...) (e.g. text tokens (B, L, D) and mask (B, L)).
        null: the same keys with batch size 1 (e.g. the encoded empty prompt) or B.
        p: drop probability in [0, 1].

    Returns:
        The new conditioning and the bool (B,) mask of dropped samples.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    tensors = [v for v in cond.values() if isinstance(v, Tensor)]
    if not tensors:
        raise ValueError("cond holds no tensors to drop")
    batch, device = tensors[0].shape[0], tensors[0].device
    drop = (
        torch.rand(batch, generator=generator, device=generator.device if generator else device) < p
    )
    drop = drop.to(device)
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if not isinstance(value, Tensor):
            out[key] = value
            continue
        if key not in null:
            raise ValueError(f"null conditioning lacks key {key!r}")
        empty = null[key].to(device=value.device, dtype=value.dtype)
        if empty.shape[1:] != value.shape[1:] or empty.shape[0] not in (1, batch):
            raise ValueError(
                f"null[{key!r}] has shape {tuple(empty.shape)}, cond has {tuple(value.shape)}"
            )
        where = drop.view(batch, *([1] * (value.ndim - 1)))
        out[key] = torch.where(where, empty.expand_as(value), value)
    return out, drop
