"""Behaviour of polydiff.core.objectives: training-time sampling, min-SNR weighting and the
(masked) denoising loss. Perfect models are built from the x0 and noise passed explicitly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polydiff.core import schedules
from polydiff.core.objectives import diffusion_loss, loss_weight, sample_time
from polydiff.core.predictions import PREDICTIONS, target

N = 100_000
VP, FLOW = schedules.linear(), schedules.flow()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(shape=(4, 3, 5), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def perfect_model(x0, noise, schedule, prediction, offset=0.0):
    """Returns the exact target for the known x0 and noise (plus ``offset``); also checks that
    it is handed x_t = alpha x0 + sigma eps and float32 model times."""
    calls = []

    def model(x_t, t, **cond):
        calls.append(cond)
        assert t.dtype == torch.float32 and t.shape == (x0.shape[0],)
        alpha = expand(schedule.alpha(t.double()), x0)
        sigma = expand(schedule.sigma(t.double()), x0)
        torch.testing.assert_close(x_t, alpha * x0 + sigma * noise)
        return target(x0, noise, alpha, sigma, prediction) + offset

    model.calls = calls
    return model


# --------------------------------------------------------------------------- sample_time


def test_vp_uniform_times_are_ddpm_integer_steps_0_to_999_uniformly():
    t = sample_time(VP, N, generator=gen())
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert torch.equal(t, t.round())
    assert t.min().item() == 0.0 and t.max().item() == 999.0
    counts = torch.histc(t, bins=10, min=0, max=1000)
    assert torch.all((counts - N / 10).abs() < 0.05 * N / 10), counts


def test_flow_uniform_times_lie_strictly_inside_0_to_1000_uniformly():
    t = sample_time(FLOW, N, generator=gen())
    assert t.dtype == torch.float32
    assert t.min().item() > 0.0 and t.max().item() < 1000.0
    assert not torch.equal(t, t.round())  # continuous
    counts = torch.histc(t, bins=10, min=0, max=1000)
    assert torch.all((counts - N / 10).abs() < 0.05 * N / 10), counts


@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp", "flow"])
def test_logit_normal_times_have_median_half_t_max_and_concentrate_in_the_middle(schedule):
    t = sample_time(schedule, N, distribution="logit_normal", generator=gen())
    t_max = schedule.t_max
    assert t.median().item() == pytest.approx(t_max / 2, rel=0.02)
    assert t.min().item() > 0.0 and t.max().item() < t_max
    middle = ((t > t_max / 3) & (t < 2 * t_max / 3)).float().mean().item()
    # sigmoid(N(0, 1)) puts 51% of its mass in the middle third; uniform puts 33%.
    assert middle == pytest.approx(0.51, abs=0.02)


def test_logit_normal_mean_moves_the_median_to_sigmoid_of_the_mean():
    t = sample_time(FLOW, N, distribution="logit_normal", mean=1.0, std=0.5, generator=gen())
    assert t.median().item() == pytest.approx(
        1000 * torch.sigmoid(torch.tensor(1.0)).item(), rel=0.01
    )


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_schedule_shift_pushes_training_times_towards_noise(distribution):
    plain = sample_time(FLOW, N, distribution=distribution, generator=gen())
    shifted = sample_time(schedules.flow(shift=3.0), N, distribution=distribution, generator=gen())
    assert torch.all(shifted >= plain) and shifted.mean() > plain.mean() + 100
    # the median follows the shift map: u = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert shifted.median().item() == pytest.approx(750.0, rel=0.02)
    vp_shifted = schedules.DiscreteVP(VP.alphas_cumprod, shift=3.0)
    vp_t = sample_time(vp_shifted, N, distribution=distribution, generator=gen())
    assert vp_t.median().item() == pytest.approx(0.75 * 999, rel=0.02)
    assert vp_t.min().item() >= 0.0 and vp_t.max().item() <= 999.0


def test_sample_time_is_reproducible_with_a_generator():
    a = sample_time(FLOW, 8, generator=gen(3))
    assert torch.equal(a, sample_time(FLOW, 8, generator=gen(3)))
    assert not torch.equal(a, sample_time(FLOW, 8, generator=gen(4)))


def test_unknown_time_distribution_raises_listing_the_valid_ones():
    with pytest.raises(ValueError, match="'beta'.*valid: uniform, logit_normal"):
        sample_time(VP, 4, distribution="beta")
    x0, noise = batch()
    model = perfect_model(x0, noise, VP, "eps")
    for t in [None, torch.zeros(4)]:  # checked even when the times are given explicitly
        with pytest.raises(ValueError, match="'beta'.*valid: uniform, logit_normal"):
            diffusion_loss(model, x0, VP, time_distribution="beta", t=t, noise=noise)
    assert model.calls == []


# --------------------------------------------------------------------------- loss_weight


def vp_snr(t: torch.Tensor) -> torch.Tensor:
    ab = VP.alphas_cumprod[t.long()]
    return ab / (1 - ab)


T_GRID = torch.tensor([0.0, 50.0, 150.0, 300.0, 600.0, 999.0])


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_hang_et_al_for_eps_x0_and_v(gamma):
    snr = vp_snr(T_GRID)
    clipped = snr.clamp(max=gamma)
    assert (snr > gamma).any() and (snr < gamma).any()  # both regimes are exercised
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for prediction, weights in expected.items():
        got = loss_weight(VP, T_GRID, prediction, "min_snr", snr_gamma=gamma)
        assert got.dtype == torch.float32 and got.shape == T_GRID.shape
        torch.testing.assert_close(got, weights.float(), rtol=1e-5, atol=0)


def test_min_snr_weight_for_flow_is_the_x0_weight_times_sigma_squared():
    t = torch.tensor([10.0, 300.0, 700.0, 990.0])
    s = t.double() / 1000
    snr = ((1 - s) / s) ** 2
    expected = snr.clamp(max=5.0) * s**2  # d x0 / d flow = -sigma on the straight path
    torch.testing.assert_close(loss_weight(FLOW, t, "flow", "min_snr"), expected.float())


def test_no_weighting_gives_ones():
    for prediction in PREDICTIONS:
        assert torch.equal(loss_weight(VP, T_GRID, prediction), torch.ones(len(T_GRID)))


def test_unknown_weighting_raises_listing_the_valid_ones():
    with pytest.raises(ValueError, match="'p2'.*valid: none, min_snr"):
        loss_weight(VP, T_GRID, "eps", "p2")
    x0, noise = batch()
    model = perfect_model(x0, noise, VP, "eps")
    with pytest.raises(ValueError, match="'p2'.*valid: none, min_snr"):
        diffusion_loss(model, x0, VP, weighting="p2", noise=noise)
    assert model.calls == []  # rejected before a forward pass is spent


# --------------------------------------------------------------------------- diffusion_loss


CASES = [(VP, "eps"), (VP, "x0"), (VP, "v"), (FLOW, "flow"), (FLOW, "v"), (FLOW, "eps")]
IDS = [f"{'vp' if s is VP else 'flow'}-{p}" for s, p in CASES]


@pytest.mark.parametrize("schedule,prediction", CASES, ids=IDS)
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_a_perfect_model_has_exactly_zero_loss(schedule, prediction, weighting):
    x0, noise = batch()
    t = torch.tensor([0.0, 250.0, 500.0, 990.0])
    model = perfect_model(x0, noise, schedule, prediction)
    loss = diffusion_loss(
        model, x0, schedule, prediction=prediction, weighting=weighting, t=t, noise=noise
    )
    assert loss.shape == () and loss.item() == 0.0


@pytest.mark.parametrize("schedule,prediction", CASES, ids=IDS)
def test_an_imperfect_model_has_positive_loss_equal_to_its_mean_squared_error(schedule, prediction):
    x0, noise = batch()
    t = torch.tensor([1.0, 250.0, 500.0, 990.0])
    model = perfect_model(x0, noise, schedule, prediction, offset=0.1)
    loss = diffusion_loss(model, x0, schedule, prediction=prediction, t=t, noise=noise)
    assert loss.item() == pytest.approx(0.01, rel=1e-4)


def test_loss_draws_times_and_noise_itself_reproducibly():
    x0 = batch()[0]
    model = nn.Linear(5, 5)

    def net(x, t):
        return model(x)

    a = diffusion_loss(net, x0, VP, generator=gen(1))
    assert a.item() > 0
    assert a.item() == diffusion_loss(net, x0, VP, generator=gen(1)).item()
    assert a.item() != diffusion_loss(net, x0, VP, generator=gen(2)).item()


def test_gradients_flow_to_every_model_parameter():
    x0 = batch()[0]
    model = nn.Sequential(nn.Linear(5, 8), nn.SiLU(), nn.Linear(8, 5))

    def net(x, t):
        return model(x) * (1 + t.view(-1, 1, 1) / 1000)

    loss = diffusion_loss(net, x0, FLOW, prediction="flow", weighting="min_snr", generator=gen())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reduction_none_gives_per_sample_losses_that_average_to_the_mean():
    x0, noise = batch()
    t = torch.tensor([1.0, 200.0, 600.0, 999.0])
    offsets = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(-1, 1, 1)
    model = perfect_model(x0, noise, VP, "v", offset=offsets)
    kwargs = dict(prediction="v", t=t, noise=noise)
    per_sample = diffusion_loss(model, x0, VP, reduction="none", **kwargs)
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample, offsets.flatten() ** 2)
    mean = diffusion_loss(model, x0, VP, **kwargs)
    torch.testing.assert_close(mean, per_sample.mean())
    weighted = diffusion_loss(model, x0, VP, weighting="min_snr", reduction="none", **kwargs)
    torch.testing.assert_close(weighted, per_sample * loss_weight(VP, t, "v", "min_snr"))
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(model, x0, VP, reduction="sum", **kwargs)


def test_cond_is_passed_to_the_model_as_keywords():
    x0, noise = batch()
    model = perfect_model(x0, noise, VP, "eps")
    tokens = torch.randn(4, 2, 3)
    diffusion_loss(model, x0, VP, cond={"tokens": tokens}, t=torch.zeros(4), noise=noise)
    assert model.calls[0]["tokens"] is tokens


# --------------------------------------------------------------------------- masks

LENGTHS = [5, 3, 1]  # real frames per sample out of 5; the rest is padding


def padded_batch():
    x0, noise = batch(shape=(3, 5, 2))
    mask = (torch.arange(5)[None, :] < torch.tensor(LENGTHS)[:, None]).unsqueeze(-1)  # (B, L, 1)
    return x0, noise, mask


def test_model_output_at_padded_positions_does_not_change_the_loss():
    x0, noise, mask = padded_batch()
    t = torch.tensor([10.0, 500.0, 900.0])
    exact = perfect_model(x0, noise, VP, "eps", offset=0.1)

    def garbage_in_padding(x_t, t_, **cond):
        return torch.where(mask, exact(x_t, t_), torch.full_like(x0, 1e4))

    kwargs = dict(t=t, noise=noise, mask=mask, reduction="none")
    clean = diffusion_loss(exact, x0, VP, **kwargs)
    noisy = diffusion_loss(garbage_in_padding, x0, VP, **kwargs)
    assert torch.equal(clean, noisy)
    # without the mask the padding would dominate
    unmasked = diffusion_loss(garbage_in_padding, x0, VP, t=t, noise=noise, reduction="none")
    assert unmasked[1:].min() > 1e6


def test_each_sample_is_averaged_over_its_own_real_elements():
    x0, noise, mask = padded_batch()
    t = torch.tensor([10.0, 500.0, 900.0])
    offsets = torch.tensor([0.1, 0.2, 0.3]).view(-1, 1, 1)
    model = perfect_model(x0, noise, VP, "x0", offset=offsets)
    per_sample = diffusion_loss(
        model, x0, VP, prediction="x0", t=t, noise=noise, mask=mask, reduction="none"
    )
    # a constant error per sample gives its square whatever the sample's length
    torch.testing.assert_close(per_sample, offsets.flatten() ** 2)
    mean = diffusion_loss(model, x0, VP, prediction="x0", t=t, noise=noise, mask=mask)
    torch.testing.assert_close(mean, per_sample.mean())


def test_masked_loss_equals_the_mean_squared_error_over_real_elements():
    x0, noise, mask = padded_batch()
    t = torch.tensor([10.0, 500.0, 900.0])
    model = nn.Linear(2, 2)

    def net(x, t_):
        return model(x)

    per_sample = diffusion_loss(net, x0, VP, t=t, noise=noise, mask=mask, reduction="none")
    alpha, sigma = expand(VP.alpha(t.double()), x0), expand(VP.sigma(t.double()), x0)
    out = net(alpha * x0 + sigma * noise, t)
    for k, length in enumerate(LENGTHS):
        expected = ((out[k, :length] - noise[k, :length]) ** 2).mean()
        torch.testing.assert_close(per_sample[k], expected)
    float_mask = diffusion_loss(net, x0, VP, t=t, noise=noise, mask=mask.float(), reduction="none")
    torch.testing.assert_close(float_mask, per_sample)


def test_an_all_padded_sample_raises():
    x0, noise, mask = padded_batch()
    mask[1] = False
    with pytest.raises(ValueError, match="no unmasked elements"):
        diffusion_loss(perfect_model(x0, noise, VP, "eps"), x0, VP, noise=noise, mask=mask)


# --------------------------------------------------------------------------- bad inputs


def test_wrong_model_output_shape_raises_naming_both_shapes():
    x0 = batch()[0]

    def wrong(x, t):
        return x[..., :4]

    with pytest.raises(ValueError, match=r"\(4, 3, 4\).*expected \(4, 3, 5\)"):
        diffusion_loss(wrong, x0, VP, generator=gen())


def test_unknown_prediction_raises():
    x0, noise = batch()
    with pytest.raises(ValueError, match="valid: eps, x0, v, flow"):
        diffusion_loss(perfect_model(x0, noise, VP, "eps"), x0, VP, prediction="score")


def test_nan_from_the_model_at_padded_positions_reaches_neither_loss_nor_gradient():
    x0 = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[..., None]
    weight = torch.nn.Parameter(torch.ones(1))

    def model(x, t):
        out = (x * weight).clone()
        out[0, 3:] = float("nan")  # garbage where sample 0 is padded
        return out

    loss = diffusion_loss(model, x0, schedules.linear(), mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all()
