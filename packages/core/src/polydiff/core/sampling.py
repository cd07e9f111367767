"""Samplers: one stateless, functional core for VP diffusion and flow matching alike.

Every sampler is a short function ``run(denoise, x, grid, eta, noise) -> x`` over a
:class:`Grid` of noise levels that always ends at the clean level (sigma = 0). ``denoise(x, i)``
returns the state to step from and the clean-sample estimate x0 at level ``i``; it hides the
model call, the prediction-type conversion, guidance, clipping, inpainting and callbacks, so
samplers are pure update rules. Updates are written in the exponential-integrator form on the
half log-SNR ``lam = log(alpha / sigma)``, which is exact for any (alpha, sigma) path: the
first-order step is DDIM, which is also Euler for both VP (in sigma/alpha) and flow schedules.

``eta`` is shared by all samplers: 0 follows the probability-flow ODE; eta > 0 makes each step
ancestral (step deterministically to a lower noise level, then add fresh noise back up to the
next level, with DDIM's eta scale). ``dpmpp_2m_sde`` uses eta in its SDE update and ``lcm`` as
the fraction of fresh noise it renoises with.

Padded batches (``valid``) need nothing from the update rules either: the start, the fresh noise
and every x0 estimate are exactly 0 at padding, so every linear combination a sampler forms is.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from . import schedules as _schedules
from .guidance import Guider, NoGuidance, as_guider, broadcast_cond, valid_mask
from .predictions import check_prediction, model_output, to_x0
from .schedules import CLEAN, Level, Schedule

__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "Grid",
    "invert",
    "make_grid",
    "sample",
    "timesteps",
]

SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "karras", "logsnr", "flow_shift")
#: The time shift of VP schedules' default grid (``flow_shift`` spacing; see :func:`timesteps`).
VP_DEFAULT_SHIFT = 0.3

#: ``denoise(x, i, level=None) -> (state, x0)``; ``level`` defaults to ``grid.levels[i]``.
Denoise = Callable[..., tuple[Tensor, Tensor]]
#: ``noise(like) -> Tensor``: fresh standard normal noise shaped like ``like``.
Noise = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Grid:
    """The noise levels a sampler visits: ``levels[:-1]`` are evaluated, ``levels[-1]`` is clean.

    Attributes:
        levels: N + 1 levels in decreasing noise; the last is ``CLEAN`` (sigma = 0).
        schedule: the schedule the levels lie on (used to place ancestral intermediate levels).
    """

    levels: tuple[Level, ...]
    schedule: Schedule

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    @property
    def straight(self) -> bool:
        """Whether Heun integrates in the flow path's coordinates (flow) or in sigma/alpha (VP)."""
        return self.schedule.kind == "flow"

    def split(self, i: int, eta: float) -> tuple[Level, float]:
        """Where the deterministic part of step ``i`` lands and the std of the fresh noise added
        after it to reach ``levels[i + 1]`` (DDIM's eta: 1 gives DDPM's ancestral step).

        The intermediate level is off the schedule and its model time is left unset (NaN):
        only a sampler that evaluates the model there needs :meth:`placed`.
        """
        cur, nxt = self.levels[i], self.levels[i + 1]
        if eta == 0 or nxt.sigma == 0:
            return nxt, 0.0
        decay = 0.0 if cur.alpha == 0 else (cur.alpha * nxt.sigma) / (cur.sigma * nxt.alpha)
        up = min(eta * nxt.sigma * math.sqrt(max(0.0, 1.0 - decay * decay)), nxt.sigma)
        down = math.sqrt(max(0.0, nxt.sigma**2 - up**2))
        if down == 0.0:
            return replace(CLEAN, alpha=nxt.alpha), up
        return Level(t=math.nan, alpha=nxt.alpha, sigma=down), up

    def placed(self, level: Level) -> Level:
        """``level`` with the model time of the schedule level of equal log-SNR, and the scale
        that maps its state onto that schedule level."""
        if not math.isnan(level.t):
            return level
        lam2 = torch.tensor(2.0 * level.lam, dtype=torch.float64)
        t = self.schedule.t_from_log_snr(lam2)
        scale = float(self.schedule.alpha(t)) / level.alpha
        return replace(level, t=float(t), model_scale=scale)


def timesteps(
    schedule: Schedule,
    steps: int,
    spacing: str | None = None,
    *,
    shift: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Model times of ``steps`` evaluations, decreasing (float64, shape (steps,)).

    Spacings (the sampler then always takes a last step to sigma = 0):
        linspace: evenly spaced from t_max towards 0 (t_max * (1 - i / N), rounded to integer
            DDPM timesteps for VP: diffusers' DPM-Solver/UniPC/DEIS ``linspace`` grid).
        trailing: diffusers' trailing grid: round(T - i * T / N) - 1 for VP (starts at T - 1).
        leading: diffusers' leading grid with offset 1 (i * (T // N) + 1); it does NOT start at
            pure noise, which is why it is not a default.
        karras: EDM's rho = 7 spacing in sigma/alpha between the schedule's extremes.
        logsnr: uniform in log-SNR between the schedule's extremes (DPM-Solver's "logSNR").
        flow_shift: linspace warped by the time shift (``shift`` or the schedule's).
    Default: ``flow_shift``, with the schedule's shift on flow schedules and
    :data:`VP_DEFAULT_SHIFT` on VP ones (a grid denser at low noise that still starts at
    t_max: chosen by the defaults study of ``benchmarks/samplers`` over 7 exact mixtures, where
    ``trailing`` ranked 8th).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing is None:
        spacing = "flow_shift"
        if schedule.kind == "vp" and shift is None:
            shift = VP_DEFAULT_SHIFT
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    big_t, t_max = schedule.train_steps, schedule.t_max
    # The simple grids in Python floats: a handful of tensor ops per grid costs more than a
    # sampler step on small latents.
    if spacing == "linspace":
        values = [t_max * (1.0 - i / steps) for i in range(steps)]
        if schedule.kind == "vp":  # DDPM timesteps are integers (diffusers' multistep grids)
            values = [float(round(v)) for v in values]
        return torch.tensor(values, dtype=torch.float64)
    if spacing == "trailing":
        if schedule.kind == "vp":  # numpy/torch round half to even, as diffusers does
            values = [float(round(big_t - i * big_t / steps)) - 1.0 for i in range(steps)]
        else:
            values = [t_max * (1.0 - i / steps) for i in range(steps)]
        return torch.tensor(values, dtype=torch.float64)
    if spacing == "leading":
        if steps > big_t:
            raise ValueError(f"leading spacing allows at most {big_t} steps")
        values = [(steps - 1 - i) * (big_t // steps) + 1.0 for i in range(steps)]
        return torch.tensor(values, dtype=torch.float64)
    if spacing == "flow_shift":
        k = schedule.shift if shift is None else shift
        if not k > 0:
            raise ValueError(f"shift must be > 0, got {k}")
        us = [1.0 - i / steps for i in range(steps)]
        # u = 1 is t_max exactly: the warp rounds it to t_max * (1 +- 1e-16) for some shifts.
        return torch.tensor(
            [t_max if u == 1.0 else t_max * k * u / (1.0 + (k - 1.0) * u) for u in us],
            dtype=torch.float64,
        )
    # karras and logsnr live between the schedule's extreme noise levels.
    hi = t_max
    if not math.isfinite(float(schedule.log_snr(hi))):
        hi = t_max - t_max / big_t  # pure noise has no finite sigma/alpha: stop one step short
    lam_hi, lam_lo = float(schedule.log_snr(hi)), float(schedule.log_snr(schedule.t_min))
    ramp = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    if spacing == "karras":
        s_hi, s_lo = math.exp(-lam_hi / 2) ** (1 / rho), math.exp(-lam_lo / 2) ** (1 / rho)
        lam = -2.0 * rho * torch.log(s_hi + ramp * (s_lo - s_hi))
    else:
        lam = lam_hi + ramp * (lam_lo - lam_hi)
    t = schedule.t_from_log_snr(lam)
    t[0] = hi
    return t.clamp(0.0, t_max)


def make_grid(schedule: Schedule, t: Tensor | Sequence[float]) -> Grid:
    """A :class:`Grid` through the given model times (decreasing), ending at the clean level."""
    tt = torch.as_tensor(t, dtype=torch.float64).flatten()
    values = tt.tolist()  # validate in Python: cheaper than tensor ops for a few dozen steps
    if not values:
        raise ValueError("timesteps must not be empty")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"timesteps must be strictly decreasing, got {values}")
    if values[0] > schedule.t_max or values[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.t_max}], got {values}")
    return Grid(tuple(_schedules.levels(schedule, tt)) + (CLEAN,), schedule)


# --------------------------------------------------------------------------- update rules


def _combine(*terms: tuple[float, Tensor]) -> Tensor:
    """sum(c * t) in as few full-size passes as torch allows (one allocation, in-place adds)."""
    (c0, t0), rest = terms[0], terms[1:]
    if rest and c0 == 1.0:
        (c1, t1), rest = rest[0], rest[1:]
        out = torch.add(t0, t1, alpha=c1)
    else:
        out = t0 * c0
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def _exp_step(x: Tensor, x0: Tensor, cur: Level, tgt: Level) -> Tensor:
    """First-order step (DDIM / Euler / DPM-Solver-1): tgt.alpha * x0 + tgt.sigma * eps."""
    c = tgt.sigma / cur.sigma
    d = tgt.alpha - cur.alpha * c
    if c == 0.0:
        return x0 if d == 1.0 else x0 * d
    if abs(d - (1.0 - c)) < 1e-12:  # flow schedules (up to rounding): one interpolation kernel
        return torch.lerp(x0, x, c)
    return _combine((d, x0), (c, x))


def _add_noise(x: Tensor, std: float, noise: Noise) -> Tensor:
    return torch.add(x, noise(x), alpha=std) if std > 0 else x


def first_order(denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise) -> Tensor:
    """DDIM (eta = 0), DDPM / Euler ancestral (eta = 1); Euler is DDIM."""
    for i in range(grid.steps):
        x, x0 = denoise(x, i)
        tgt, up = grid.split(i, eta)
        x = _add_noise(_exp_step(x, x0, grid.levels[i], tgt), up, noise)
    return x


def heun(denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise) -> Tensor:
    """Heun's second-order method (Karras et al. 2022); 2N - 1 evaluations for N steps.

    Integrates dy/dtau in y = x / c, tau = sigma / c with c = alpha for VP schedules (EDM's
    sigma/alpha coordinates) and c = alpha + sigma for flow (the straight path). Steps into
    sigma = 0 or out of alpha = 0 (where tau is infinite for VP) are first order. Like EDM's
    Heun it wants a moderate largest sigma/alpha: on schedules whose first step spans a huge
    range of it (the cosine schedule starts at 2e4) prefer the exponential integrators.
    """
    k = 1.0 if grid.straight else 0.0
    for i in range(grid.steps):
        x, x0 = denoise(x, i)
        cur = grid.levels[i]
        tgt, up = grid.split(i, eta)
        x_next = _exp_step(x, x0, cur, tgt)
        c_cur, c_tgt = cur.alpha + k * cur.sigma, tgt.alpha + k * tgt.sigma
        if tgt.sigma > 0 and c_cur > 0:
            x_next, x0_next = denoise(x_next, i + 1, grid.placed(tgt))
            # y_next = y + dtau / 2 * (slope(x, x0) + slope(x_next, x0_next)) with
            # y = x / c and slope = (x - c * x0) / sigma, expanded into one linear combination.
            half = 0.5 * (tgt.sigma / c_tgt - cur.sigma / c_cur) * c_tgt
            x_next = _combine(
                (c_tgt / c_cur + half / cur.sigma, x),
                (-half * c_cur / cur.sigma, x0),
                (half / tgt.sigma, x_next),
                (-half * c_tgt / tgt.sigma, x0_next),
            )
        x = _add_noise(x_next, up, noise)
    return x


def _push(history: list[tuple[float, Tensor]], level: Level, x0: Tensor, keep: int) -> None:
    # A prediction at pure noise (lam = -inf) says nothing about how x0 changes with lam.
    if math.isfinite(level.lam):
        history.insert(0, (level.lam, x0))
        del history[keep:]
    else:
        history.clear()


def _dpmpp_update(
    x: Tensor, cur: Level, tgt: Level, history: list[tuple[float, Tensor]], order: int
) -> Tensor:
    """DPM-Solver++ multistep update of order <= 3 from ``cur`` to ``tgt`` (Lu et al. 2022)."""
    m0 = history[0][1]
    base = _exp_step(x, m0, cur, tgt)
    order = min(order, len(history)) if tgt.sigma > 0 else 1
    if order < 2:
        return base
    h = tgt.lam - cur.lam
    phi1 = -math.expm1(-h)
    (lam0, _), (lam1, m1) = history[0], history[1]
    g10 = h / (lam0 - lam1)  # D1_0 = g10 * (m0 - m1)
    if order == 2:
        w = 0.5 * tgt.alpha * phi1 * g10
        return base.add_(m0, alpha=w).sub_(m1, alpha=w)
    lam2, m2 = history[2]
    r0, r1 = (lam0 - lam1) / h, (lam1 - lam2) / h
    g11 = h / (lam1 - lam2)  # D1_1 = g11 * (m1 - m2)
    # D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
    w1 = tgt.alpha * (1.0 - phi1 / h)
    w2 = tgt.alpha * (0.5 - (h - phi1) / (h * h))
    a = w1 * (1.0 + r0 / (r0 + r1)) + w2 / (r0 + r1)  # weight of D1_0
    b = -(w1 * r0 / (r0 + r1) + w2 / (r0 + r1))  # weight of D1_1
    return _combine((1.0, base), (a * g10, m0), (b * g11 - a * g10, m1), (-b * g11, m2))


def _multistep(
    update: Callable[..., Tensor],
    denoise: Denoise,
    x: Tensor,
    grid: Grid,
    eta: float,
    noise: Noise,
    order: int,
) -> Tensor:
    """The loop of every data-prediction multistep: evaluate, remember the last ``order``
    x0 estimates, ``update(x, cur, tgt, history, order)``, add the ancestral noise."""
    history: list[tuple[float, Tensor]] = []
    for i in range(grid.steps):
        x, x0 = denoise(x, i)
        cur = grid.levels[i]
        tgt, up = grid.split(i, eta)
        _push(history, cur, x0, order)
        x = update(x, cur, tgt, history or [(cur.lam, x0)], order)
        x = _add_noise(x, up, noise)
    return x


def dpmpp_multistep(
    denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise, order: int = 2
) -> Tensor:
    """DPM-Solver++ (2M / 3M): data-prediction multistep, warming up from first order."""
    return _multistep(_dpmpp_update, denoise, x, grid, eta, noise, order)


def _phi_moments(h: float, count: int) -> list[float]:
    """J_p(h) = integral over u in [0, h] of exp(u - h) * u**p, for p < ``count`` (by parts:
    J_0 = 1 - exp(-h), J_p = h**p - p * J_(p-1))."""
    moments = [-math.expm1(-h)]
    for p in range(1, count):
        moments.append(h**p - p * moments[-1])
    return moments


def _lagrange_weights(nodes: Sequence[float], h: float) -> list[float]:
    """Weights w_k with sum_k w_k * f(nodes[k]) = integral over u in [0, h] of exp(u - h) *
    P(u), where P interpolates f at ``nodes`` (offsets in lam from the current level, the
    first 0): the exponential integrator of the data prediction, exact for polynomials."""
    moments = _phi_moments(h, len(nodes))
    weights = []
    for k, uk in enumerate(nodes):
        coeffs = [1.0]  # the basis polynomial prod_(j != k) (u - u_j) / (u_k - u_j), low first
        for j, uj in enumerate(nodes):
            if j != k:
                scale = 1.0 / (uk - uj)
                shifted = [0.0, *coeffs]  # u * P
                padded = [*coeffs, 0.0]
                coeffs = [(a - uj * b) * scale for a, b in zip(shifted, padded, strict=True)]
        weights.append(sum(c * m for c, m in zip(coeffs, moments, strict=True)))
    return weights


def _adams_update(
    x: Tensor, cur: Level, tgt: Level, history: list[tuple[float, Tensor]], order: int
) -> Tensor:
    """Exponential Adams-Bashforth update of order <= ``order`` from ``cur`` to ``tgt``."""
    used = history[: order if tgt.sigma > 0 else 1]
    if len(used) == 1:
        return _exp_step(x, used[0][1], cur, tgt)
    weights = _lagrange_weights([lam - cur.lam for lam, _ in used], tgt.lam - cur.lam)
    return _combine(
        (tgt.sigma / cur.sigma, x),
        *((tgt.alpha * w, m) for w, (_, m) in zip(weights, used, strict=True)),
    )


def exp_adams(
    denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise, order: int = 3
) -> Tensor:
    """Exponential Adams-Bashforth multistep of order ``order`` in lam on any grid.

    The data prediction is interpolated in lam through the last ``order`` estimates
    (Lagrange) and the linear part is integrated exactly, so the local error is
    O(h^(order + 1)) and the global error O(h^order) on non-uniform grids too: at order 3 a
    true third-order method, where DPM-Solver++(3M)'s formula (kept as diffusers has it) is
    second order. Warms up from first order; the step into sigma = 0 is first order (the
    polynomial cannot be extrapolated to lam = inf).
    """
    return _multistep(_adams_update, denoise, x, grid, eta, noise, order)


def dpmpp_2m_sde(denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, midpoint form); eta = 0 is the 2M ODE solver."""
    history: list[tuple[float, Tensor]] = []
    for i in range(grid.steps):
        x, x0 = denoise(x, i)
        cur, nxt = grid.levels[i], grid.levels[i + 1]
        _push(history, cur, x0, 2)
        if nxt.sigma == 0:
            x = x0
            continue
        h = nxt.lam - cur.lam
        eta_h = eta * h if eta else 0.0
        decay = 0.0 if cur.alpha == 0 and eta else math.exp(-eta_h)
        gain = -math.expm1(-h - eta_h)
        terms = [(nxt.sigma / cur.sigma * decay, x), (nxt.alpha * gain, x0)]
        if len(history) == 2:
            (lam0, _), (lam1, m1) = history
            w = 0.5 * nxt.alpha * gain * h / (lam0 - lam1)
            terms = [terms[0], (nxt.alpha * gain + w, x0), (-w, m1)]
        x_next = _combine(*terms)
        x = _add_noise(x_next, nxt.sigma * math.sqrt(-math.expm1(-2.0 * eta_h)), noise)
    return x


def _unipc_b(hh: float, order: int) -> list[float]:
    # B(h) = expm1(hh) ("bh2"); b_k = phi_k(hh) * k! / B(h) for k = 1..order.
    b_h = math.expm1(hh)
    phi_k = math.expm1(hh) / hh - 1.0
    factorial, out = 1.0, []
    for k in range(1, order + 1):
        out.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1.0 / factorial
    return out


def _unipc_update(
    x: Tensor,
    cur: Level,
    tgt: Level,
    history: list[tuple[float, Tensor]],
    order: int,
    x0_new: Tensor | None = None,
) -> Tensor:
    """UniP (``x0_new`` None) or UniC (``x0_new`` = the prediction at ``tgt``) with B(h) = bh2.

    ``history[0]`` is the prediction at ``cur``; older entries are earlier levels.
    """
    lam0, m0 = history[0]
    base = _exp_step(x, m0, cur, tgt)
    h = tgt.lam - lam0
    if x0_new is None and order < 2:
        return base
    hh = -h
    rks = [(lam_k - lam0) / h for lam_k, _ in history[1:order]]
    diffs = [(m_k - m0) / r for (_, m_k), r in zip(history[1:order], rks, strict=True)]
    b = _unipc_b(hh, order)
    grid_r = torch.tensor([[r**j for r in [*rks, 1.0]] for j in range(order)], dtype=torch.float64)
    b_t = torch.tensor(b, dtype=torch.float64)
    if x0_new is None:
        rhos = [0.5] if order == 2 else torch.linalg.solve(grid_r[:-1, :-1], b_t[:-1]).tolist()
        terms = list(zip(rhos, diffs, strict=True))
    else:
        rhos = [0.5] if order == 1 else torch.linalg.solve(grid_r, b_t).tolist()
        terms = [*zip(rhos[:-1], diffs, strict=True), (rhos[-1], x0_new - m0)]
    scale = -tgt.alpha * math.expm1(hh)
    return _combine((1.0, base), *((scale * rho, diff) for rho, diff in terms))


def unipc(
    denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise, order: int = 2
) -> Tensor:
    """UniPC (Zhao et al. 2023): UniP-``order`` predictor with the UniC corrector (B(h) = bh2).

    The corrector reuses each new evaluation, so it costs no extra model calls; it is skipped
    after an ancestral (noisy) step. Lower orders are used while warming up and at the end.
    """
    history: list[tuple[float, Tensor]] = []
    previous: tuple[Tensor, Level, int, list[tuple[float, Tensor]]] | None = None
    for i in range(grid.steps):
        x, x0 = denoise(x, i)
        cur = grid.levels[i]
        if previous is not None:
            x_prev, level_prev, order_prev, hist_prev = previous
            x = _unipc_update(x_prev, level_prev, cur, hist_prev, order_prev, x0_new=x0)
        _push(history, cur, x0, order)
        tgt, up = grid.split(i, eta)
        this_order = max(1, min(order, grid.steps - i, len(history)))
        hist = history or [(cur.lam, x0)]
        x_next = _unipc_update(x, cur, tgt, hist, this_order)
        # Out of pure noise (lam = -inf) the predictor is first order, but the corrector
        # still applies: its order-1 form has the finite limit sigma1 * x + alpha1 * (m0 +
        # m1) / 2 there (diffusers keeps it by starting flow at sigma = 1 - 1e-6).
        previous = (x, cur, this_order, list(hist)) if up == 0 and tgt.sigma > 0 else None
        x = _add_noise(x_next, up, noise)
    return x


def lcm(denoise: Denoise, x: Tensor, grid: Grid, eta: float, noise: Noise) -> Tensor:
    """Latent-consistency multistep sampling (Luo et al. 2023): jump to x0, renoise to the next
    level. ``eta`` is the fraction of the renoising that is fresh noise (1 = LCM, 0 = DDIM).

    Consistency models' boundary condition (c_skip, c_out) belongs in the model's output.
    """
    fresh = min(max(eta, 0.0), 1.0)
    for i in range(grid.steps):
        x, x0 = denoise(x, i)
        cur, nxt = grid.levels[i], grid.levels[i + 1]
        if nxt.sigma == 0:
            x = x0
            continue
        x_next = _exp_step(x, x0, cur, replace(nxt, sigma=nxt.sigma * math.sqrt(1 - fresh**2)))
        x = _add_noise(x_next, nxt.sigma * fresh, noise)
    return x


@dataclass(frozen=True)
class _Sampler:
    run: Callable[..., Tensor]
    eta: float
    guided_order: int | None = None  # multistep order to use with guidance (DPM-Solver's advice)


SAMPLERS: dict[str, _Sampler] = {
    "ddpm": _Sampler(first_order, eta=1.0),
    "ddim": _Sampler(first_order, eta=0.0),
    "euler": _Sampler(first_order, eta=0.0),
    "euler_ancestral": _Sampler(first_order, eta=1.0),
    "heun": _Sampler(heun, eta=0.0),
    "dpmpp_2m": _Sampler(functools.partial(dpmpp_multistep, order=2), eta=0.0),
    "dpmpp_2m_sde": _Sampler(dpmpp_2m_sde, eta=1.0),
    "dpmpp_3m": _Sampler(functools.partial(dpmpp_multistep, order=3), eta=0.0),
    "exp_ab3": _Sampler(functools.partial(exp_adams, order=3), eta=0.0, guided_order=2),
    "unipc": _Sampler(functools.partial(unipc, order=3), eta=0.0, guided_order=2),
    "lcm": _Sampler(lcm, eta=1.0),
}


# --------------------------------------------------------------------------- entry points


def _check(name: str, table: Mapping[str, Any], what: str) -> None:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(table)}")


def _make_denoiser(
    model: Callable[..., Tensor],
    prediction: str,
    guider: Guider,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    grid: Grid,
    clip_x0: float | None,
    known: tuple[Tensor, Tensor, Tensor] | None,
    callback: Callable[[int, float, Tensor, Tensor], None] | None,
    valid: Tensor | None = None,
) -> Denoise:
    # The model times of the grid, made in one go: a per-step tensor costs as much as a
    # sampler update on small latents.
    evaluated = grid.levels[:-1]
    times: dict[tuple[float, int], Tensor] = {}

    def time_tensor(level: Level, x: Tensor) -> Tensor:
        key = (level.t, x.shape[0])
        if key not in times:
            rows = torch.tensor([lv.t for lv in evaluated], dtype=torch.float32, device=x.device)
            block = rows[:, None].expand(len(evaluated), x.shape[0]).contiguous()
            times.update(
                zip(((lv.t, x.shape[0]) for lv in evaluated), block.unbind(0), strict=True)
            )
            if key not in times:  # an off-grid level (Heun's ancestral intermediate point)
                times[key] = torch.full(
                    (x.shape[0],), level.t, dtype=torch.float32, device=x.device
                )
        return times[key]

    # The valid mask at every batch size the model is called with: guiders stack copies of
    # the state (CFG: [x, x]), so the mask is repeated the same way.
    valid_at: dict[int, Tensor] = {} if valid is None else {valid.shape[0]: valid}

    def valid_for(n: int) -> Tensor:
        assert valid is not None
        if n not in valid_at:
            base = valid.shape[0]
            if n % base:
                raise ValueError(
                    f"a guider called the model with batch {n}, not a multiple of {base}"
                )
            valid_at[n] = valid.repeat(n // base, *([1] * (valid.ndim - 1)))
        return valid_at[n]

    def predict(x: Tensor, level: Level, batch_cond: Mapping[str, Any]) -> Tensor:
        t = times.get((level.t, x.shape[0]))
        if t is None:
            t = time_tensor(level, x)
        scale = level.model_scale
        if scale != 1.0:
            x = x * scale
        alpha, sigma = level.alpha * scale, level.sigma * scale
        if valid is None:
            return to_x0(model_output(model(x, t, **batch_cond)), x, alpha, sigma, prediction)
        v = valid_for(x.shape[0])
        out = model_output(model(x, t, **batch_cond, valid=v))
        return torch.where(v, to_x0(out, x, alpha, sigma, prediction), 0.0)

    levels = grid.levels
    unguided = isinstance(guider, NoGuidance)
    batch_cond = dict(cond)
    guider_kwargs = {} if valid is None else {"valid": valid}

    def denoise(x: Tensor, i: int, level: Level | None = None) -> tuple[Tensor, Tensor]:
        level = levels[i] if level is None else level
        if level.sigma <= 0:
            raise AssertionError("the model is never evaluated at the clean level")
        if known is not None:
            image, keep, noise0 = known
            x = torch.lerp(level.alpha * image + level.sigma * noise0, x, keep)
        if not math.isfinite(x.sum().item()):  # one reduction: cheap next to the model
            raise FloatingPointError(
                f"sampler state is not finite at step {i} (t = {level.t:.3f}); check the model, "
                "the prediction type and the schedule (eps prediction cannot reach pure noise)"
            )
        if unguided:  # the common case, without a guider call in the per-step path
            x0 = predict(x, level, batch_cond)
        else:
            x, x0 = guider(predict, x, level, cond, uncond, **guider_kwargs)
            if valid is not None:  # whatever a guider does, padding stays exactly 0
                x, x0 = torch.where(valid, x, 0.0), torch.where(valid, x0, 0.0)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if known is not None:
            x0 = torch.lerp(known[0], x0, known[1])
        if callback is not None:
            callback(i, level.t, x, x0)
        return x, x0

    return denoise


def _prepare(
    schedule: Schedule,
    sampler: str,
    steps: int,
    prediction: str,
    spacing: str | None,
    timesteps_: Tensor | Sequence[float] | None,
    shift: float | None,
) -> Grid:
    _check(sampler, SAMPLERS, "sampler")
    check_prediction(prediction)
    if timesteps_ is None:
        timesteps_ = timesteps(schedule, steps, spacing, shift=shift)
    return make_grid(schedule, timesteps_)


def sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    *,
    schedule: Schedule,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    prediction: str = "eps",
    spacing: str | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
    shift: float | None = None,
    eta: float | None = None,
    guidance: float | Guider | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    init: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    valid: Tensor | None = None,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Draw samples by integrating from noise to data; the last step lands at sigma = 0.

    Args:
        model: ``model(x, t, **cond) -> Tensor`` shaped like ``x``; ``t`` is a float tensor (B,)
            in model time (DDPM timestep for VP schedules, 1000 * sigma for flow). The model
            may also return an object with a ``.sample`` tensor (diffusers' UNet2DOutput) or a
            tuple whose first item is the tensor (:func:`~polydiff.core.predictions.model_output`).
            With ``valid`` it is called as ``model(x, t, **cond, valid=v)`` (see ``valid``).
        noise: (B, ...) standard normal noise; also fixes the output shape.
        schedule: a :mod:`polydiff.core.schedules` schedule.
        sampler: one of ``SAMPLERS``: ddpm ddim euler euler_ancestral heun dpmpp_2m
            dpmpp_2m_sde dpmpp_3m exp_ab3 unipc lcm.
        steps: number of steps (model evaluations, except heun: 2 * steps - 1).
        prediction: what the model outputs: eps, x0, v or flow.
        spacing: see :func:`timesteps`; ``timesteps`` gives the grid explicitly instead.
        shift: time shift for ``flow_shift`` spacing (default: the schedule's).
        eta: stochasticity (default: the sampler's own; 0 = probability-flow ODE).
        guidance: a CFG scale or a guider (:mod:`polydiff.core.guidance`).
        cond, uncond: keyword inputs of the model for the conditional and the unconditional
            (null or negative) branch; tensors are batch-first, batch-1 tensors of either are
            expanded to the batch of ``noise``, and both are batched together for guidance.
        init, strength: img2img: start from ``init`` noised to the level ``strength`` of the
            way up the grid (1 = pure noise), running the last ``round(steps * strength)`` steps.
        mask: inpainting mask broadcastable to ``noise``; 1 = generate, 0 = keep ``init``.
        valid: padding mask broadcastable to ``noise``, bool or 0/1; 1 = real, 0 = padding
            (e.g. (B, 1, T) for (B, C, T) motion). The state is exactly 0 at padding at every
            step, the start and the ancestral noise included, and so is the output (``init``
            and ``noise`` there are ignored). The model then gets the keyword ``valid``: a bool
            tensor with ``x.ndim`` dims, the batch of the call (repeated for guidance's
            [cond, uncond] batch) and the given sizes elsewhere (1 where it broadcasts), so
            ``valid[:, 0]`` is a (B, T) token mask for :class:`~polydiff.core.blocks.DiT`'s
            ``mask``; a model that honours it makes real positions independent of padding.
            Guiders get it too (CFG's rescale takes its statistics over valid positions).
            Without ``valid`` the model is called exactly as before (no ``valid`` keyword).
        clip_x0: clamp x0 estimates to [-clip_x0, clip_x0] (pixel-space models).
        generator: random generator for the ancestral noise.
        callback: ``callback(step, t, x, x0)`` after every model evaluation.

    Returns:
        The samples, shaped like ``noise``.

    Raises:
        ValueError: unknown sampler / prediction / spacing, or bad arguments.
        FloatingPointError: the state became NaN or inf (the message names the step).
    """
    grid = _prepare(schedule, sampler, steps, prediction, spacing, timesteps, shift)
    spec = SAMPLERS[sampler]
    guider = as_guider(guidance)
    if mask is not None and init is None:
        raise ValueError("inpainting needs init (the image to keep) as well as mask")
    cond, uncond = _conditioning(cond, uncond, noise.shape[0], valid)
    if init is not None and init.shape != noise.shape:
        raise ValueError(f"init has shape {tuple(init.shape)}, noise {tuple(noise.shape)}")
    if valid is not None:
        valid = valid_mask(valid, noise)
        noise = torch.where(valid, noise, 0.0)
        init = None if init is None else torch.where(valid, init, 0.0)
    if init is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        keep_steps = min(round(grid.steps * strength), grid.steps)
        if keep_steps < 1:
            raise ValueError(f"strength {strength} leaves no step of {grid.steps}")
        grid = replace(grid, levels=grid.levels[grid.steps - keep_steps :])
        first = grid.levels[0]
        x = first.alpha * init.to(noise.dtype) + first.sigma * noise
    else:
        first = grid.levels[0]
        x = noise * math.sqrt(first.alpha**2 + first.sigma**2)
    known = None
    if mask is not None:
        assert init is not None
        known = (init.to(noise.dtype), mask.to(noise.dtype), noise)
    ancestral = generator, noise.device

    def fresh_noise(like: Tensor) -> Tensor:
        gen, device = ancestral
        draw = torch.randn(
            like.shape,
            generator=gen,
            dtype=like.dtype,
            device=gen.device if gen is not None else device,
        ).to(like.device)
        return draw if valid is None else torch.where(valid, draw, 0.0)

    order_kwargs = {}
    if spec.guided_order is not None and _is_guided(guider, uncond):
        order_kwargs["order"] = spec.guided_order
    denoise = _make_denoiser(
        model, prediction, guider, cond, uncond, grid, clip_x0, known, callback, valid
    )
    run = functools.partial(spec.run, **order_kwargs) if order_kwargs else spec.run
    out = run(denoise, x, grid, spec.eta if eta is None else float(eta), fresh_noise)
    if not math.isfinite(out.sum().item()):
        raise FloatingPointError(f"sampler output is not finite after step {grid.steps - 1}")
    return out


def _conditioning(
    cond: Mapping[str, Any] | None,
    uncond: Mapping[str, Any] | None,
    batch: int,
    valid: Tensor | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """cond and uncond with batch-1 tensors expanded to ``batch`` (checked once, up front)."""
    cond = broadcast_cond(cond or {}, batch, name="cond")
    uncond = None if uncond is None else broadcast_cond(uncond, batch, name="uncond")
    if valid is not None and ("valid" in cond or (uncond is not None and "valid" in uncond)):
        raise ValueError("pass the padding mask as valid=, not as a cond / uncond key 'valid'")
    return cond, uncond


def _is_guided(guider: Guider, uncond: Mapping[str, Any] | None) -> bool:
    """Whether predictions mix cond and uncond (then multistep solvers use a lower order)."""
    if uncond is None or isinstance(guider, NoGuidance):
        return False
    return getattr(guider, "scale", None) != 1.0


def invert(
    model: Callable[..., Tensor],
    x0: Tensor,
    *,
    schedule: Schedule,
    steps: int = 50,
    prediction: str = "eps",
    spacing: str | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
    shift: float | None = None,
    guidance: float | Guider | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    valid: Tensor | None = None,
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Deterministic DDIM inversion: the noise that ``sample(..., sampler="ddim")`` with the same
    grid maps (approximately) back to ``x0``.

    Walks the sampling grid backwards; each step predicts the noise at the noisier level from the
    current state (the usual approximation), so the round trip is exact only as steps grow.
    ``valid`` and batch-1 ``cond``/``uncond`` work as in :func:`sample` (the returned noise is
    0 at padding).

    Returns:
        (B, ...) noise, scaled so that :func:`sample` starts from the inverted state.
    """
    grid = _prepare(schedule, "ddim", steps, prediction, spacing, timesteps, shift)
    cond, uncond = _conditioning(cond, uncond, x0.shape[0], valid)
    if valid is not None:
        valid = valid_mask(valid, x0)
        x0 = torch.where(valid, x0, 0.0)
    denoise = _make_denoiser(
        model, prediction, as_guider(guidance), cond, uncond, grid, None, None, callback, valid
    )
    x = x0
    for i in range(grid.steps - 1, -1, -1):
        cur, tgt = grid.levels[i + 1], grid.levels[i]
        state, x0_tgt = denoise(x, i)
        eps = (state - tgt.alpha * x0_tgt) / tgt.sigma
        clean = (x - cur.sigma * eps) / cur.alpha
        x = tgt.alpha * clean + tgt.sigma * eps
    first = grid.levels[0]
    return x / math.sqrt(first.alpha**2 + first.sigma**2)
