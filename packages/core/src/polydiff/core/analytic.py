"""An exactly solvable diffusion problem: data from a Gaussian mixture.

For x = alpha * x0 + sigma * eps with x0 from a mixture of diagonal Gaussians, E[x0 | x] and
E[eps | x] have closed forms, so this gives a perfect denoiser for any schedule and prediction
type, and the probability-flow ODE can be integrated to tight tolerance. Used to test samplers'
orders of convergence and to benchmark samplers without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .predictions import check_prediction, target
from .schedules import Schedule

__all__ = ["GaussianMixture"]


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of K diagonal Gaussians in D dimensions.

    Args:
        means: (K, D) component means.
        stds: (K, D) per-dimension standard deviations (> 0).
        weights: (K,) mixture weights (normalised here).
    """

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64)
        stds = torch.as_tensor(self.stds, dtype=torch.float64).expand_as(means)
        weights = torch.as_tensor(self.weights, dtype=torch.float64)
        if means.ndim != 2 or weights.shape != (means.shape[0],) or torch.any(stds <= 0):
            raise ValueError("need means (K, D), stds > 0 broadcastable to (K, D), weights (K,)")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds.clone())
        object.__setattr__(self, "weights", weights / weights.sum())

    @classmethod
    def random(
        cls,
        components: int,
        dim: int,
        seed: int = 0,
        spread: float = 1.0,
        std: tuple[float, float] = (0.05, 0.3),
    ) -> GaussianMixture:
        """A reproducible random mixture (means ~ N(0, spread), stds ~ U(std))."""
        gen = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=gen, dtype=torch.float64)
        lo, hi = std
        stds = lo + (hi - lo) * torch.rand(components, dim, generator=gen, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=gen, dtype=torch.float64)
        return cls(means, stds, weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, D) float64 samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def posterior(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """Exact (E[x0 | x], E[eps | x]) for x (N, D) at noise level (alpha, sigma), float64."""
        x = x.to(torch.float64)
        mu = alpha * self.means  # (K, D)
        var = (alpha * self.stds) ** 2 + sigma**2  # (K, D)
        diff = x[:, None, :] - mu[None]  # (N, K, D)
        log_p = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        resp = torch.softmax(log_p + torch.log(self.weights), dim=1)  # (N, K)
        x0_k = self.means + alpha * self.stds**2 / var * diff
        eps_k = sigma / var * diff
        return (resp[..., None] * x0_k).sum(1), (resp[..., None] * eps_k).sum(1)

    def model(self, schedule: Schedule, prediction: str = "eps") -> Callable[..., Tensor]:
        """A perfect denoiser ``model(x, t) -> prediction`` for ``schedule`` (x: (B, D))."""
        check_prediction(prediction)

        def predict(x: Tensor, t: Tensor, **_: object) -> Tensor:
            flat = x.reshape(x.shape[0], -1)
            out = torch.empty_like(flat)
            # Samplers call with one time for the whole batch; group so it is one posterior.
            for value in torch.unique(t):
                rows = t == value
                tt = value.to(torch.float64)
                a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
                x0, eps = self.posterior(flat[rows], a, s)
                out[rows] = target(x0, eps, a, s, prediction).to(x.dtype)
            return out.view_as(x)

        return predict

    def ode_solve(
        self,
        x: Tensor,
        alpha: float,
        sigma: float,
        alpha_end: float = 1.0,
        sigma_end: float = 0.0,
        tol: float = 1e-10,
    ) -> Tensor:
        """Integrate the probability-flow ODE from state ``x`` (N, D) at (alpha, sigma) to
        (alpha_end, sigma_end) with an adaptive 8th-order Runge-Kutta method (scipy's DOP853).

        Integrates y = x / (alpha + sigma) over tau = sigma / (alpha + sigma), where the path is
        the straight one, dy/dtau = E[eps | y] - E[x0 | y]; tau spans [0, 1] for every schedule,
        pure noise included.
        """
        from scipy.integrate import solve_ivp

        shape = x.shape
        c0, c1 = alpha + sigma, alpha_end + sigma_end
        y0 = (x.to(torch.float64) / c0).reshape(-1).numpy()

        def velocity(tau: float, y_flat):
            y = torch.from_numpy(y_flat).view(shape)
            x0, eps = self.posterior(y, 1.0 - tau, tau)
            return (eps - x0).reshape(-1).numpy()

        sol = solve_ivp(
            velocity, (sigma / c0, sigma_end / c1), y0, method="DOP853", rtol=tol, atol=tol
        )
        if not sol.success:
            raise RuntimeError(f"ODE integration failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).view(shape) * c1
