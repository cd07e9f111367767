"""Noise schedules over continuous model time.

A schedule says how much signal and noise a noisy sample carries at model time ``t``:
``x_t = alpha(t) * x0 + sigma(t) * eps``. Two families:

- discrete VP schedules (DDPM's): ``t`` is the DDPM timestep in [0, T-1] (T = 1000 by default),
  the value diffusers passes to the model; fractional ``t`` interpolates linearly in log-SNR.
- flow matching / rectified flow: ``alpha = 1 - s``, ``sigma = s`` with ``t = 1000 * s``.

Schedules are immutable values; samplers never store step state in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CLEAN",
    "DiscreteVP",
    "Flow",
    "Level",
    "Schedule",
    "cosine",
    "flow",
    "levels",
    "linear",
    "resolution_shift",
    "scaled_linear",
    "shift_time",
    "zero_terminal_snr",
]


def _as_float64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _like(value: Tensor, t: Tensor | float) -> Tensor:
    # Return in the caller's floating dtype/device; keep float64 for Python numbers.
    if isinstance(t, Tensor) and t.is_floating_point():
        return value.to(dtype=t.dtype, device=t.device)
    if isinstance(t, Tensor):
        return value.to(device=t.device)
    return value


class Schedule:
    """Interface shared by all schedules.

    Attributes:
        kind: ``"vp"`` (variance preserving, alpha**2 + sigma**2 = 1) or ``"flow"``.
        t_max: the model time of pure noise (999 for DDPM schedules, 1000 for flow).
        t_min: the smallest model time the model is trained on.
        shift: the time shift that ``flow_shift`` spacing and training sampling apply (1 = none).
        train_steps: the number of discrete training steps T the model-time unit comes from.
    """

    kind: Literal["vp", "flow"]
    t_max: float
    t_min: float
    shift: float
    train_steps: int

    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale alpha(t), same shape as ``t``."""
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale sigma(t), same shape as ``t``."""
        raise NotImplementedError

    def log_snr(self, t: Tensor | float) -> Tensor:
        """log(alpha**2 / sigma**2) at ``t`` (+inf for clean data, -inf for pure noise)."""
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr`, clamped to [t_min, t_max]."""
        raise NotImplementedError

    def scales(self, t: float) -> tuple[float, float]:
        """(alpha(t), sigma(t)) as Python floats: the samplers' per-grid fast path."""
        tt = torch.tensor(t, dtype=torch.float64)
        return float(self.alpha(tt)), float(self.sigma(tt))

    def noise_level(self, t: Tensor | float) -> Tensor:
        """The schedule-free noise level sigma/alpha = exp(-log_snr / 2) (EDM's sigma)."""
        return torch.exp(-0.5 * self.log_snr(t))


@dataclass(frozen=True, eq=False)
class DiscreteVP(Schedule):
    """A DDPM-style variance-preserving schedule given by its cumulative alphas.

    Args:
        alphas_cumprod: (T,) the products of (1 - beta) for training steps 0..T-1.
        shift: optional time shift used by ``flow_shift`` spacing (1 = none).
    """

    alphas_cumprod: Tensor
    shift: float = 1.0
    kind: Literal["vp", "flow"] = field(default="vp", init=False)
    _table: Tensor = field(init=False, repr=False)
    _table_list: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ab = _as_float64(self.alphas_cumprod).flatten()
        if ab.numel() < 2 or not torch.all((ab >= 0) & (ab <= 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values in [0, 1]")
        if torch.any(ab[1:] > ab[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing")
        if not self.shift > 0:
            raise ValueError(f"time shift must be > 0, got {self.shift}")
        object.__setattr__(self, "alphas_cumprod", ab)
        # log-SNR per integer step; -inf where alpha_bar = 0 (zero terminal SNR).
        object.__setattr__(self, "_table", torch.log(ab) - torch.log1p(-ab))
        object.__setattr__(self, "_table_list", self._table.tolist())

    @property
    def train_steps(self) -> int:  # type: ignore[override]
        return self.alphas_cumprod.numel()

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.train_steps - 1)

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 0.0

    def log_snr(self, t: Tensor | float) -> Tensor:
        tt = _as_float64(t).clamp(0.0, self.t_max)
        lo = tt.floor().clamp(max=self.t_max - 1).long()
        frac = tt - lo
        a, b = self._table[lo], self._table[lo + 1]
        # Avoid inf * 0 = nan at exact integer points of a zero-terminal-SNR table.
        mid = a + frac * (b - a)
        out = torch.where(frac == 0, a, torch.where(frac == 1, b, mid))
        return _like(out, t)

    def alpha(self, t: Tensor | float) -> Tensor:
        return _like(torch.sigmoid(_as_float64(self.log_snr(_as_float64(t)))).sqrt(), t)

    def scales(self, t: float) -> tuple[float, float]:
        # The same linear log-SNR interpolation as log_snr(), in Python floats.
        t = min(max(float(t), 0.0), self.t_max)
        k = min(int(t), self.train_steps - 2)
        frac = t - k
        a, b = self._table_list[k], self._table_list[k + 1]
        lam = a if frac == 0 else b if frac == 1 else a + frac * (b - a)
        if lam == -math.inf:
            return 0.0, 1.0
        return math.sqrt(1.0 / (1.0 + math.exp(-lam))), math.sqrt(1.0 / (1.0 + math.exp(lam)))

    def sigma(self, t: Tensor | float) -> Tensor:
        return _like(torch.sigmoid(-_as_float64(self.log_snr(_as_float64(t)))).sqrt(), t)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        lam = _as_float64(log_snr)
        table = self._table  # decreasing in t
        neg = -table  # increasing
        idx = torch.searchsorted(neg, -lam).clamp(1, self.train_steps - 1)
        hi_val, lo_val = table[idx], table[idx - 1]
        span = lo_val - hi_val
        frac = torch.where(span > 0, (lo_val - lam) / span, torch.zeros_like(lam))
        frac = torch.nan_to_num(frac, nan=1.0).clamp(0.0, 1.0)
        out = (idx - 1).to(torch.float64) + frac
        return _like(out.clamp(0.0, self.t_max), log_snr)


@dataclass(frozen=True, eq=False)
class Flow(Schedule):
    """Flow matching / rectified flow: alpha = 1 - s, sigma = s, model time t = 1000 * s.

    Args:
        shift: the resolution shift applied to sampling grids (``flow_shift`` spacing) and to
            training-time sampling; s' = shift * s / (1 + (shift - 1) * s). 1 means no shift.
        train_steps: the unit of model time (t = train_steps * s).
    """

    shift: float = 1.0
    train_steps: int = 1000  # type: ignore[assignment]
    kind: Literal["vp", "flow"] = field(default="flow", init=False)

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.train_steps)

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0

    def _s(self, t: Tensor | float) -> Tensor:
        return (_as_float64(t) / self.train_steps).clamp(0.0, 1.0)

    def alpha(self, t: Tensor | float) -> Tensor:
        return _like(1.0 - self._s(t), t)

    def scales(self, t: float) -> tuple[float, float]:
        s = min(max(float(t) / self.train_steps, 0.0), 1.0)
        return 1.0 - s, s

    def sigma(self, t: Tensor | float) -> Tensor:
        return _like(self._s(t), t)

    def log_snr(self, t: Tensor | float) -> Tensor:
        s = self._s(t)
        return _like(2.0 * (torch.log1p(-s) - torch.log(s)), t)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        s = torch.sigmoid(-0.5 * _as_float64(log_snr))
        return _like((s * self.train_steps).clamp(self.t_min, self.t_max), log_snr)


def _from_betas(betas: Tensor, zero_snr: bool) -> DiscreteVP:
    schedule = DiscreteVP(torch.cumprod(1.0 - betas, dim=0))
    return zero_terminal_snr(schedule) if zero_snr else schedule


def linear(
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    train_steps: int = 1000,
    zero_terminal_snr: bool = False,
) -> DiscreteVP:
    """DDPM's linear betas (Ho et al. 2020): 1e-4 .. 0.02 over 1000 steps, in float64."""
    betas = torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)
    return _from_betas(betas, zero_terminal_snr)


def scaled_linear(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    train_steps: int = 1000,
    zero_terminal_snr: bool = False,
) -> DiscreteVP:
    """Stable Diffusion's betas: linear in sqrt(beta) from sqrt(0.00085) to sqrt(0.012)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64) ** 2
    return _from_betas(betas, zero_terminal_snr)


def cosine(
    train_steps: int = 1000,
    offset: float = 0.008,
    max_beta: float = 0.999,
    zero_terminal_snr: bool = False,
) -> DiscreteVP:
    """Nichol & Dhariwal's cosine schedule, alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2)**2,
    discretised into betas capped at ``max_beta``."""
    u = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    f = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return _from_betas(betas, zero_terminal_snr)


def flow(shift: float = 1.0, train_steps: int = 1000) -> Flow:
    """Flow matching schedule (alpha = 1 - s, sigma = s) with an optional resolution shift."""
    return Flow(shift=shift, train_steps=train_steps)


def zero_terminal_snr(schedule: DiscreteVP) -> DiscreteVP:
    """Rescale a VP schedule so its last step is pure noise (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted and scaled so that its last value is exactly 0 while the first
    is kept. Such a schedule needs a v, x0 or flow prediction: eps alone cannot give x0 at
    pure noise.
    """
    root = schedule.alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return DiscreteVP(root**2, shift=schedule.shift)


def shift_time(u: Tensor | float, shift: float) -> Tensor:
    """The resolution time shift u' = shift * u / (1 + (shift - 1) * u) for u in [0, 1]
    (Esser et al. 2024). Shift > 1 spends more steps at high noise."""
    if not shift > 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    uu = _as_float64(u)
    return _like(shift * uu / (1.0 + (shift - 1.0) * uu), u)


def resolution_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """Time shift for a resolution with ``num_tokens`` tokens when ``base_shift`` suits
    ``base_tokens``: shift grows with sqrt(num_tokens / base_tokens) (SD3's rule, which keeps
    the per-token signal-to-noise ratio of the base resolution)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError("token counts must be positive")
    if not base_shift > 0:
        raise ValueError(f"base_shift must be > 0, got {base_shift}")
    return base_shift * math.sqrt(num_tokens / base_tokens)


@dataclass(frozen=True)
class Level:
    """One noise level on a schedule: model time and (alpha, sigma) as Python floats.

    The clean end of a sampling grid is ``Level(t=0.0, alpha=1.0, sigma=0.0)``; the model is
    never evaluated there. ``model_scale`` is 1 for points on the schedule; an ancestral
    sampler's intermediate level shares its log-SNR with the schedule at ``t`` but not its scale,
    so the state is multiplied by ``model_scale`` before the model sees it.
    """

    t: float
    alpha: float
    sigma: float
    model_scale: float = 1.0

    @property
    def lam(self) -> float:
        """Half log-SNR log(alpha / sigma): -inf at pure noise, +inf at clean data."""
        if self.sigma == 0.0:
            return math.inf
        if self.alpha == 0.0:
            return -math.inf
        return math.log(self.alpha) - math.log(self.sigma)

    @property
    def noise_level(self) -> float:
        """sigma / alpha (EDM's sigma): 0 at clean data, inf at pure noise."""
        return math.inf if self.alpha == 0.0 else self.sigma / self.alpha


CLEAN = Level(t=0.0, alpha=1.0, sigma=0.0)


def levels(schedule: Schedule, t: Tensor) -> list[Level]:
    """The :class:`Level` of each model time in ``t`` (shape (N,))."""
    return [Level(ti, *schedule.scales(ti)) for ti in _as_float64(t).flatten().tolist()]
