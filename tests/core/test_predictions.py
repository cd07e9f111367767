"""Behaviour of polydiff.core.predictions: the four parameterisations (eps, x0, v, flow) and
their exact conversions, for any (alpha, sigma), not only variance-preserving ones."""

from __future__ import annotations

import math

import pytest
import torch

from polydiff.core import predictions
from polydiff.core.predictions import PREDICTIONS, target, to_eps, to_x0, x0_error_scale

SHAPE = (3, 5)


def draws(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    return x0, eps


def random_levels(seed: int = 0) -> list[tuple[float, float]]:
    """(alpha, sigma) pairs: variance preserving, flow's straight path and arbitrary ones."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(12, generator=gen, dtype=torch.float64).mul(0.98).add(0.01).tolist()
    vp = [(math.cos(v * math.pi / 2), math.sin(v * math.pi / 2)) for v in u[:4]]
    flow = [(1 - v, v) for v in u[4:8]]
    edm = [(1.0, 80 * v) for v in u[8:10]]  # EDM's (1, sigma): far from variance preserving
    odd = [(3 * u[10], 0.2 + u[11])]
    return vp + flow + edm + odd


LEVELS = random_levels()


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_to_x0_recovers_x0_from_the_exact_target(prediction, alpha, sigma):
    x0, eps = draws()
    x = alpha * x0 + sigma * eps
    out = target(x0, eps, alpha, sigma, prediction)
    torch.testing.assert_close(to_x0(out, x, alpha, sigma, prediction), x0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_to_eps_recovers_the_noise_from_the_x0_estimate(prediction, alpha, sigma):
    x0, eps = draws(1)
    x = alpha * x0 + sigma * eps
    x0_hat = to_x0(target(x0, eps, alpha, sigma, prediction), x, alpha, sigma, prediction)
    torch.testing.assert_close(to_eps(x0_hat, x, alpha, sigma), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_broadcast_per_sample_noise_levels(prediction):
    x0, eps = draws(2)
    alpha = torch.tensor([[0.9], [0.5], [0.05]], dtype=torch.float64)
    sigma = torch.tensor([[0.1], [0.5], [0.95]], dtype=torch.float64)  # flow's path, per row
    x = alpha * x0 + sigma * eps
    out = target(x0, eps, alpha, sigma, prediction)
    assert out.shape == SHAPE
    torch.testing.assert_close(to_x0(out, x, alpha, sigma, prediction), x0)
    for row in range(SHAPE[0]):
        a, s = alpha[row].item(), sigma[row].item()
        torch.testing.assert_close(out[row], target(x0[row], eps[row], a, s, prediction))


def test_targets_are_the_documented_quantities():
    x0, eps = draws(3)
    a, s = 0.6, 0.8
    assert torch.equal(target(x0, eps, a, s, "eps"), eps)
    assert torch.equal(target(x0, eps, a, s, "x0"), x0)
    torch.testing.assert_close(target(x0, eps, a, s, "v"), a * eps - s * x0)
    torch.testing.assert_close(target(x0, eps, a, s, "flow"), eps - x0)


def test_flow_target_is_the_velocity_of_the_straight_path():
    x0, eps = draws(4)
    s, h = 0.3, 1e-6

    def path(v):
        return (1 - v) * x0 + v * eps

    velocity = (path(s + h) - path(s - h)) / (2 * h)
    torch.testing.assert_close(target(x0, eps, 1 - s, s, "flow"), velocity, rtol=1e-7, atol=1e-7)


def test_v_target_is_the_velocity_of_the_vp_path_in_its_angle():
    x0, eps = draws(5)
    phi, h = 0.7, 1e-6

    def path(p):
        return math.cos(p) * x0 + math.sin(p) * eps

    velocity = (path(phi + h) - path(phi - h)) / (2 * h)
    v = target(x0, eps, math.cos(phi), math.sin(phi), "v")
    torch.testing.assert_close(v, velocity, rtol=1e-7, atol=1e-7)


def test_x0_prediction_is_returned_unchanged():
    x0, eps = draws(6)
    x = 0.4 * x0 + 0.9 * eps
    assert to_x0(x0, x, 0.4, 0.9, "x0") is x0


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_x0_error_scale_is_the_size_of_d_x0_d_output(prediction, alpha, sigma):
    x0, eps = draws(7)
    x = alpha * x0 + sigma * eps
    out = target(x0, eps, alpha, sigma, prediction)
    h = 1e-4
    derivative = (
        to_x0(out + h, x, alpha, sigma, prediction) - to_x0(out - h, x, alpha, sigma, prediction)
    ) / (2 * h)
    scale = x0_error_scale(
        torch.tensor(alpha, dtype=torch.float64),
        torch.tensor(sigma, dtype=torch.float64),
        prediction,
    )
    # to_x0 is affine in the output, so the derivative is the same everywhere; the error scale
    # is its magnitude (it is negative for eps, v and flow).
    torch.testing.assert_close(derivative.abs(), scale.expand(SHAPE), rtol=1e-6, atol=1e-9)


def test_x0_error_scale_keeps_the_shape_of_per_sample_levels():
    alpha = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    for prediction in PREDICTIONS:
        assert x0_error_scale(alpha, sigma, prediction).shape == (3,)
    torch.testing.assert_close(x0_error_scale(alpha, sigma, "x0"), torch.ones(3, dtype=alpha.dtype))


def test_unknown_prediction_raises_value_error_listing_the_valid_names():
    x = torch.zeros(SHAPE)
    for call in [
        lambda: predictions.check_prediction("score"),
        lambda: to_x0(x, x, 0.5, 0.5, "score"),
        lambda: target(x, x, 0.5, 0.5, "score"),
        lambda: x0_error_scale(torch.tensor(0.5), torch.tensor(0.5), "score"),
    ]:
        with pytest.raises(ValueError, match="'score'.*valid: eps, x0, v, flow"):
            call()
    assert predictions.check_prediction("v") == "v"
    assert PREDICTIONS == ("eps", "x0", "v", "flow")
