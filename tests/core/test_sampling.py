"""Behaviour of polydiff.core.sample: grids, orders of convergence, img2img, inpainting,
inversion, errors. Uses the exact Gaussian-mixture denoiser, so no training is involved."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
import torch

from polydiff.core import SAMPLERS, SPACINGS, invert, sample, schedules, timesteps
from polydiff.core.analytic import GaussianMixture
from polydiff.core.predictions import PREDICTIONS
from polydiff.core.sampling import make_grid

MIXTURE = GaussianMixture.random(3, 2, seed=0, spread=1.0, std=(0.3, 0.6))
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "exp_ab3", "unipc"]
STOCHASTIC = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm"]
SCHEDULES = {
    "linear": schedules.linear(),
    "scaled_linear": schedules.scaled_linear(),
    "cosine": schedules.cosine(),
    "zero_snr": schedules.linear(zero_terminal_snr=True),
    "flow": schedules.flow(),
    "flow_shift3": schedules.flow(shift=3.0),
}


def start_noise(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def exact_reference(schedule, spacing, steps, z):
    """The exact ODE solution to the grid's last noisy level, then the same final x0 step."""
    grid = make_grid(schedule, timesteps(schedule, steps, spacing))
    first, last = grid.levels[0], grid.levels[-2]
    x_start = z * math.hypot(first.alpha, first.sigma)
    x_last = MIXTURE.ode_solve(x_start, first.alpha, first.sigma, last.alpha, last.sigma, tol=1e-12)
    return MIXTURE.posterior(x_last, last.alpha, last.sigma)[0]


def observed_order(schedule, prediction, spacing, sampler, steps=(20, 40, 80, 160)):
    z = start_noise()
    model = MIXTURE.model(schedule, prediction)
    errors = []
    for n in steps:
        out = sample(
            model,
            z,
            schedule=schedule,
            sampler=sampler,
            steps=n,
            prediction=prediction,
            spacing=spacing,
        )
        ref = exact_reference(schedule, spacing, n, z)
        errors.append(((out - ref).norm() / ref.norm()).item())
    assert all(e1 > e2 for e1, e2 in itertools.pairwise(errors)), errors
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# DPM-Solver++(3M) is implemented exactly as the reference code and diffusers do (the tests
# against diffusers hold it to 1e-5); that formula weights the second difference by half the
# third-order Taylor coefficient, so its error shrinks at order 2 as steps grow. exp_ab3 is the
# true third-order multistep (Lagrange interpolation of x0 in log-SNR, integrated exactly).
PROMISED_ORDER = {
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "dpmpp_2m": 2,
    "dpmpp_3m": 2,
    "exp_ab3": 3,
    "unipc": 3,
}


@pytest.mark.parametrize("family", ["vp_eps", "flow"])
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_converge_at_their_order(family, sampler):
    schedule, prediction = (
        (schedules.linear(), "eps") if family == "vp_eps" else (schedules.flow(), "flow")
    )
    order = observed_order(schedule, prediction, "logsnr", sampler)
    assert order >= PROMISED_ORDER[sampler] - 0.15


def test_higher_order_samplers_beat_first_order_at_equal_evaluations():
    schedule, z = schedules.linear(), start_noise()
    model = MIXTURE.model(schedule, "eps")
    ref = exact_reference(schedule, "logsnr", 10, z)

    def err(name):
        out = sample(model, z, schedule=schedule, sampler=name, steps=10, spacing="logsnr")
        return ((out - ref).norm() / ref.norm()).item()

    assert err("unipc") < err("dpmpp_2m") < err("ddim")
    assert err("dpmpp_3m") < err("dpmpp_2m")
    assert err("exp_ab3") < err("dpmpp_3m")


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_sampler_runs_on_every_schedule_and_prediction(schedule_name, prediction):
    schedule = SCHEDULES[schedule_name]
    if float(schedule.alpha(schedule.t_max)) == 0.0 and prediction == "eps":
        pytest.skip("eps cannot give x0 at pure noise; covered by the error test")
    model = MIXTURE.model(schedule, prediction)
    z = start_noise(8)
    ode = sample(model, z, schedule=schedule, sampler="unipc", steps=40, prediction=prediction)
    for name in SAMPLERS:
        out = sample(
            model,
            z,
            schedule=schedule,
            sampler=name,
            steps=12,
            prediction=prediction,
            generator=torch.Generator().manual_seed(1),
        )
        assert out.shape == z.shape and torch.isfinite(out).all(), name
        # Heun integrates VP schedules in sigma/alpha (as diffusers and k-diffusion do); the
        # cosine schedule's first trailing step spans sigma/alpha 2e4 -> 8, where a trapezoid
        # rule is meaningless, so only the other solvers are held to the ODE there.
        if name in DETERMINISTIC and not (name == "heun" and schedule_name == "cosine"):
            assert ((out - ode).norm() / ode.norm()).item() < 0.25, name


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_accepts_every_spacing(spacing):
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    for name in SAMPLERS:
        out = sample(
            model,
            start_noise(4),
            schedule=schedule,
            sampler=name,
            steps=8,
            spacing=spacing,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(out).all(), (name, spacing)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_last_step_lands_exactly_at_sigma_zero(sampler):
    schedule = schedules.linear()
    seen = []
    out = sample(
        MIXTURE.model(schedule, "eps"),
        start_noise(4),
        schedule=schedule,
        sampler=sampler,
        steps=6,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, x0: seen.append(x0),
    )
    # At sigma = 0 the state is the clean estimate of the last evaluation, nothing else.
    assert torch.equal(out, seen[-1])
    grid = make_grid(schedule, timesteps(schedule, 6))
    assert grid.levels[-1].sigma == 0.0 and grid.levels[-1].alpha == 1.0


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "karras", "logsnr", "flow_shift"])
def test_vp_sampling_from_noise_starts_at_t_999(spacing):
    seen = []
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")

    def spy(x, t):
        seen.append(t[0].item())
        return model(x, t)

    sample(spy, start_noise(2), schedule=schedule, sampler="ddim", steps=7, spacing=spacing)
    assert seen[0] == 999.0
    assert all(a > b for a, b in itertools.pairwise(seen))


def test_model_receives_float_time_of_batch_shape_in_model_units():
    calls = []

    def spy(x, t):
        calls.append((t.dtype, tuple(t.shape), t[0].item()))
        return torch.zeros_like(x)

    sample(
        spy,
        torch.randn(3, 2),
        schedule=schedules.flow(),
        sampler="euler",
        steps=4,
        prediction="flow",
    )
    assert calls[0] == (torch.float32, (3,), 1000.0)  # flow: 1000 * sigma
    assert [c[2] for c in calls] == [1000.0, 750.0, 500.0, 250.0]


def test_spacings_give_the_documented_grids():
    vp = schedules.linear()
    assert timesteps(vp, 10, "trailing").tolist() == [
        999,
        899,
        799,
        699,
        599,
        499,
        399,
        299,
        199,
        99,
    ]
    assert timesteps(vp, 10, "leading").tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert timesteps(vp, 4, "linspace").tolist() == [999, 749, 500, 250]
    assert timesteps(schedules.flow(), 4, "linspace").tolist() == [1000, 750, 500, 250]
    lam = vp.log_snr(timesteps(vp, 6, "logsnr"))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(5), atol=1e-9)
    flow_grid = timesteps(schedules.flow(shift=3.0), 4)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(flow_grid, 1000 * 3 * u / (1 + 2 * u))
    karras = vp.noise_level(timesteps(vp, 5, "karras"))
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    hi, lo = karras[0] ** (1 / 7), karras[-1] ** (1 / 7)
    assert torch.allclose(karras, (hi + ramp * (lo - hi)) ** 7, rtol=1e-6)


def test_unknown_names_raise_value_error_listing_valid_ones():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    with pytest.raises(ValueError, match="valid: ddpm, ddim, euler"):
        sample(model, start_noise(2), schedule=schedule, sampler="plms")
    with pytest.raises(ValueError, match="valid: eps, x0, v, flow"):
        sample(model, start_noise(2), schedule=schedule, prediction="score")
    with pytest.raises(ValueError, match="valid: linspace, leading, trailing"):
        sample(model, start_noise(2), schedule=schedule, spacing="quadratic")


def test_a_nan_in_the_state_raises_an_error_naming_the_step():
    calls = []

    def breaks_at_third_call(x, t):
        calls.append(1)
        return torch.full_like(x, math.nan) if len(calls) == 3 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match="step 3"):
        sample(
            breaks_at_third_call,
            torch.randn(2, 2),
            schedule=schedules.linear(),
            sampler="ddim",
            steps=6,
        )


def test_eps_prediction_at_zero_terminal_snr_fails_loudly():
    schedule = schedules.linear(zero_terminal_snr=True)
    with pytest.raises(FloatingPointError, match="step"):
        sample(
            MIXTURE.model(schedule, "eps"),
            start_noise(2),
            schedule=schedule,
            sampler="ddim",
            steps=5,
        )


def test_explicit_timesteps_are_validated():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(model, start_noise(2), schedule=schedule, timesteps=[500, 700])
    with pytest.raises(ValueError, match="lie in"):
        sample(model, start_noise(2), schedule=schedule, timesteps=[1500, 700])


def test_ancestral_samplers_are_reproducible_with_a_generator_and_vary_without():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    z = start_noise(4)
    for name in STOCHASTIC:
        a = sample(
            model,
            z,
            schedule=schedule,
            sampler=name,
            steps=8,
            generator=torch.Generator().manual_seed(5),
        )
        b = sample(
            model,
            z,
            schedule=schedule,
            sampler=name,
            steps=8,
            generator=torch.Generator().manual_seed(5),
        )
        c = sample(
            model,
            z,
            schedule=schedule,
            sampler=name,
            steps=8,
            generator=torch.Generator().manual_seed(6),
        )
        assert torch.equal(a, b) and not torch.equal(a, c), name


def test_eta_is_shared_ddim_with_eta_one_is_ddpm_and_euler_ancestral():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    z = start_noise(4)
    runs = [
        sample(
            model,
            z,
            schedule=schedule,
            sampler=name,
            steps=8,
            eta=eta,
            generator=torch.Generator().manual_seed(2),
        )
        for name, eta in [("ddim", 1.0), ("ddpm", None), ("euler_ancestral", None)]
    ]
    assert torch.allclose(runs[0], runs[1]) and torch.allclose(runs[0], runs[2])
    # eta = 0 turns every stochastic sampler into its deterministic counterpart
    ddim = sample(model, z, schedule=schedule, sampler="ddim", steps=8)
    assert torch.allclose(sample(model, z, schedule=schedule, sampler="ddpm", steps=8, eta=0), ddim)
    assert torch.allclose(sample(model, z, schedule=schedule, sampler="lcm", steps=8, eta=0), ddim)
    dpm = sample(model, z, schedule=schedule, sampler="dpmpp_2m", steps=8)
    sde = sample(model, z, schedule=schedule, sampler="dpmpp_2m_sde", steps=8, eta=0)
    assert torch.allclose(dpm, sde)


def test_stochastic_sampling_reaches_the_data_distribution():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    z = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = MIXTURE.sample(20000, generator=torch.Generator().manual_seed(1))
    for name in ["ddpm", "dpmpp_2m_sde", "heun"]:
        out = sample(
            model,
            z,
            schedule=schedule,
            sampler=name,
            steps=100,
            eta=0.5 if name == "heun" else None,
            generator=torch.Generator().manual_seed(3),
        )
        assert torch.allclose(out.mean(0), data.mean(0), atol=0.1), name
        assert torch.allclose(out.std(0), data.std(0), rtol=0.08), name


def test_img2img_strength_runs_the_last_part_of_the_grid():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    z, init = start_noise(4), MIXTURE.sample(4, generator=torch.Generator().manual_seed(0))
    times = []
    out = sample(
        model,
        z,
        schedule=schedule,
        sampler="ddim",
        steps=10,
        init=init,
        strength=0.3,
        callback=lambda i, t, x, x0: times.append(t),
    )
    assert times == timesteps(schedule, 10)[-3:].tolist()
    assert (out - init).norm() < (sample(model, z, schedule=schedule, steps=10) - init).norm()
    full = sample(model, z, schedule=schedule, sampler="ddim", steps=10, init=init, strength=1.0)
    # strength 1 starts from alpha * init + sigma * noise at t = 999 (alpha = 0.006): nearly
    # the same as sampling from pure noise.
    assert torch.allclose(
        full, sample(model, z, schedule=schedule, sampler="ddim", steps=10), atol=0.1
    )
    with pytest.raises(ValueError, match="strength"):
        sample(model, z, schedule=schedule, init=init, strength=0.01, steps=10)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "heun", "ddpm"])
def test_inpainting_keeps_the_known_region_exactly(sampler):
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    z = start_noise(6)
    init = MIXTURE.sample(6, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0.0]]).expand(6, 2)  # generate dim 0, keep dim 1
    out = sample(
        model,
        z,
        schedule=schedule,
        sampler=sampler,
        steps=10,
        init=init,
        mask=mask,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out[:, 1], init[:, 1])
    assert not torch.allclose(out[:, 0], init[:, 0])
    with pytest.raises(ValueError, match="init"):
        sample(model, z, schedule=schedule, mask=mask)


@pytest.mark.parametrize("schedule_name,prediction", [("linear", "eps"), ("flow", "flow")])
def test_ddim_inversion_round_trips_better_with_more_steps(schedule_name, prediction):
    schedule = SCHEDULES[schedule_name]
    model = MIXTURE.model(schedule, prediction)
    data = MIXTURE.sample(8, generator=torch.Generator().manual_seed(4))
    errors = []
    for steps in (10, 40, 160):
        spacing = "linspace" if schedule_name == "flow" else "logsnr"
        noise = invert(
            model, data, schedule=schedule, steps=steps, prediction=prediction, spacing=spacing
        )
        back = sample(
            model,
            noise,
            schedule=schedule,
            sampler="ddim",
            steps=steps,
            prediction=prediction,
            spacing=spacing,
        )
        errors.append(((back - data).norm() / data.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_sampling_holds_no_state_between_calls_and_threads():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    inputs = [start_noise(4, seed) for seed in range(4)]
    expected = [sample(model, z, schedule=schedule, sampler="unipc", steps=8) for z in inputs]
    results: dict[int, torch.Tensor] = {}

    def worker(k):
        results[k] = sample(model, inputs[k], schedule=schedule, sampler="unipc", steps=8)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(results[k], expected[k]) for k in range(4))


def test_clip_x0_bounds_every_clean_estimate():
    schedule = schedules.linear()
    model = MIXTURE.model(schedule, "eps")
    seen = []
    out = sample(
        model,
        3 * start_noise(8),
        schedule=schedule,
        sampler="dpmpp_2m",
        steps=8,
        clip_x0=0.5,
        callback=lambda i, t, x, x0: seen.append(x0.abs().max().item()),
    )
    assert max(seen) <= 0.5 and out.abs().max() <= 0.5 + 1e-9
