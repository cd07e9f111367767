"""Classifier-free guidance and conditioning dropout.

A guider sits between the sampler and the model. It sees the state ``x``, the noise level and
both conditionings, and returns the state to step from and the clean-sample estimate to step
towards. Samplers only ever call a guider, so a new guider plugs in without touching any
sampler. For ordinary guidance the returned state is ``x`` itself; CFG++ moves it (it renoises
with the unconditional noise estimate).

Padded batches: a guider also receives ``valid`` (keyword-only; None when the caller gave no
mask), a bool tensor with the state's number of dims and batch, True at real positions (see
:func:`valid_mask`). Statistics a guider takes over a sample (CFG's guidance rescale) are taken
over its valid positions only, so a sample's result does not depend on how much padding it
shares a batch with. The x0 estimates ``predict`` returns are already exactly 0 at padding.
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
    "broadcast_cond",
    "concat_cond",
    "drop_conditioning",
    "valid_mask",
]

Cond = Mapping[str, Any]
#: ``predict(x, level, cond) -> x0``: the model's clean-sample estimate for a batch.
Predict = Callable[[Tensor, Level, Cond], Tensor]


class Guider(Protocol):
    """``guider(predict, x, level, cond, uncond, *, valid=None) -> (state, x0)``, shapes as
    ``x``. ``valid`` is None or a bool tensor broadcastable to ``x`` (True = real position);
    every guider must accept the keyword (the sampler passes it only for padded batches)."""

    def __call__(
        self,
        predict: Predict,
        x: Tensor,
        level: Level,
        cond: Cond,
        uncond: Cond | None,
        *,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...


def valid_mask(valid: Tensor, like: Tensor) -> Tensor:
    """The valid-token mask in the form guiders and models receive it.

    Args:
        valid: broadcastable to ``like``, bool or 0/1 numbers; 1 = real, 0 = padding (e.g.
            (B, 1, T) for (B, C, T) motion, (B, L, 1) for (B, L, D) tokens, (T,) for all).
        like: the state (B, ...).

    Returns:
        A contiguous bool tensor on ``like``'s device with ``like.ndim`` dims and ``like``'s
        batch; the other sizes are the given ones (1 where ``valid`` broadcasts), so
        ``(B, 1, T)`` stays ``(B, 1, T)`` and ``valid[:, 0]`` is a DiT token mask (B, T).

    Raises:
        ValueError: ``valid`` does not broadcast to ``like`` or holds values other than 0 and 1.
    """
    try:
        fits = torch.broadcast_shapes(valid.shape, like.shape) == like.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"valid has shape {tuple(valid.shape)}, which does not broadcast to the state's "
            f"{tuple(like.shape)}; give e.g. (B, 1, T) for (B, C, T)"
        )
    if valid.dtype != torch.bool:
        if not bool(((valid == 0) | (valid == 1)).all()):
            raise ValueError("valid must be bool or hold only 0 and 1 (1 = real, 0 = padding)")
        valid = valid != 0
    valid = valid.reshape((1,) * (like.ndim - valid.ndim) + tuple(valid.shape))
    return valid.expand(like.shape[0], *valid.shape[1:]).to(like.device).contiguous()


def _batch_error(name: str, key: str, value: Tensor, batch: int) -> ValueError:
    return ValueError(
        f"{name}[{key!r}] has shape {tuple(value.shape)}: its batch must be 1 or {batch} (the "
        "batch of x); conditioning tensors are batch-first"
    )


def broadcast_cond(cond: Cond, batch: int, *, name: str = "cond") -> dict[str, Any]:
    """``cond`` with every batch-1 tensor expanded (and copied) to ``batch``.

    Tensors are batch-first: a tensor whose first dim is ``batch`` is kept, one of batch 1 is
    repeated, any other raises ValueError naming ``name``, the key and the shapes. Zero-dim
    tensors and other values pass unchanged.
    """
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] != batch:
            if value.shape[0] != 1:
                raise _batch_error(name, key, value, batch)
            value = value.expand(batch, *value.shape[1:]).contiguous()
        out[key] = value
    return out


def concat_cond(first: Cond, second: Cond, *, batch: int | None = None) -> dict[str, Any]:
    """Stack two conditionings along the batch so cond and uncond share one forward pass.

    Tensors are concatenated on dim 0 after expanding a batch-1 tensor (of either side) to
    ``batch``, the batch of x; the result has batch ``2 * batch``. ``batch=None`` takes, per
    key, the larger of the two batches. Any other value must be equal in both and is kept.
    """
    if set(first) != set(second):
        raise ValueError(
            f"cond and uncond must have the same keys, got {sorted(first)} and {sorted(second)}"
        )
    out: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim > 0 and b.ndim > 0:
            n = max(a.shape[0], b.shape[0]) if batch is None else batch
            hint = ""
            if a.shape[1:] != b.shape[1:]:
                hint = "pad them to the same length"
            elif not {a.shape[0], b.shape[0]} <= {1, n}:
                hint = f"each batch must be 1 or {n}" + (" (the batch of x)" if batch else "")
            if hint:
                raise ValueError(
                    f"cond[{key!r}] has shape {tuple(a.shape)} but uncond[{key!r}] has "
                    f"{tuple(b.shape)}; {hint}"
                )
            out[key] = torch.cat([a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])])
        elif a is b or (
            torch.equal(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else a == b
        ):
            out[key] = a
        else:
            raise ValueError(f"cond[{key!r}] differs from uncond[{key!r}] and is not a tensor")
    return out


def _paired(
    predict: Predict, x: Tensor, level: Level, cond: Cond, uncond: Cond
) -> tuple[Tensor, Tensor]:
    x0 = predict(torch.cat([x, x]), level, concat_cond(cond, uncond, batch=x.shape[0]))
    cond_x0, uncond_x0 = x0.chunk(2)
    return cond_x0, uncond_x0


def _std(value: Tensor, valid: Tensor | None) -> Tensor:
    """Per-sample standard deviation (B, 1, ...), over the valid positions when given (with
    the same n - 1 correction as ``Tensor.std``)."""
    dims = tuple(range(1, value.ndim))
    if valid is None:
        return value.std(dim=dims, keepdim=True)
    m = torch.broadcast_to(valid, value.shape).to(value.dtype)
    n = m.sum(dim=dims, keepdim=True)
    mean = (value * m).sum(dim=dims, keepdim=True) / n.clamp(min=1)
    dev = (value - mean) * m
    return ((dev * dev).sum(dim=dims, keepdim=True) / (n - 1).clamp(min=1)).sqrt()


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
        self,
        predict: Predict,
        x: Tensor,
        level: Level,
        cond: Cond,
        uncond: Cond | None,
        *,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return x, predict(x, level, cond)


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022): x0 = u + scale * (c - u).

    Args:
        scale: guidance weight (1 = conditional only, 0 = unconditional only).
        rescale: guidance rescale phi in [0, 1] (Lin et al. 2023): the guided x0 is scaled
            per sample towards the standard deviation of the conditional x0, which counters the
            over-exposure of large scales. With ``valid`` both deviations are taken over the
            sample's valid positions only.
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
        self,
        predict: Predict,
        x: Tensor,
        level: Level,
        cond: Cond,
        uncond: Cond | None,
        *,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if self.scale == 1.0 or not _in_interval(level, self.interval):
            return x, predict(x, level, cond)
        if uncond is None:
            raise ValueError("classifier-free guidance needs an uncond (null or negative) input")
        cond_x0, uncond_x0 = _paired(predict, x, level, cond, uncond)
        x0 = torch.lerp(uncond_x0, cond_x0, self.scale)
        if self.rescale > 0:
            guided_std = _std(x0, valid)
            ratio = _std(cond_x0, valid) / guided_std
            if valid is not None:  # an all-padding (or constant) sample is left as it is
                ratio = torch.where(guided_std > 0, ratio, 1.0)
            x0 = x0 * (self.rescale * ratio + (1.0 - self.rescale))
        return x, x0


@dataclass(frozen=True)
class CFGPlusPlus:
    """CFG++ (Chung et al. 2024): guide x0 with a small scale in [0, 1] and renoise with the
    *unconditional* noise estimate, so the state stays on the data manifold.

    The returned state is alpha * x0_guided + sigma * eps_uncond = x + alpha * (x0_g - x0_u).
    Exact for first-order samplers (DDIM/Euler); other samplers step from the moved state.
    CFG++ takes no statistics over a sample, so ``valid`` changes nothing here: both x0
    estimates are 0 at padding, and so is the move.
    """

    scale: float = 0.6
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_scale("CFG++ scale", self.scale)
        if self.interval is not None and not self.interval[0] <= self.interval[1]:
            raise ValueError(f"guidance interval must be (low, high), got {self.interval}")

    def __call__(
        self,
        predict: Predict,
        x: Tensor,
        level: Level,
        cond: Cond,
        uncond: Cond | None,
        *,
        valid: Tensor | None = None,
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
