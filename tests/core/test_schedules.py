"""Behaviour of polydiff.core.schedules: DDPM tables as diffusers builds them, log-SNR
interpolation and its inverse, zero terminal SNR, flow matching, time shifts and levels."""

from __future__ import annotations

import math

import pytest
import torch

from polydiff.core import schedules
from polydiff.core.schedules import CLEAN, Level

T = 1000
INTEGER_T = torch.arange(T, dtype=torch.float64)
VP_SCHEDULES = {
    "linear": schedules.linear(),
    "scaled_linear": schedules.scaled_linear(),
    "cosine": schedules.cosine(),
    "zero_snr": schedules.linear(zero_terminal_snr=True),
}


def table(schedule: schedules.DiscreteVP) -> torch.Tensor:
    """The per-step log-SNR log(alpha_bar / (1 - alpha_bar))."""
    ab = schedule.alphas_cumprod
    return torch.log(ab) - torch.log1p(-ab)


def diffusers_alphas_cumprod(beta_schedule: str, **config) -> torch.Tensor:
    """alphas_cumprod of diffusers' DDPMScheduler (a test-only dependency)."""
    diffusers = pytest.importorskip("diffusers")
    if beta_schedule == "scaled_linear":
        config = {"beta_start": 0.00085, "beta_end": 0.012, **config}
    scheduler = diffusers.DDPMScheduler(beta_schedule=beta_schedule, **config)
    return scheduler.alphas_cumprod.to(torch.float64)


# --------------------------------------------------------------------------- DDPM tables


@pytest.mark.parametrize(
    "ours,beta_schedule",
    [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")],
)
def test_alphas_cumprod_equal_diffusers_ddpm_tables(ours, beta_schedule):
    mine = VP_SCHEDULES[ours].alphas_cumprod
    theirs = diffusers_alphas_cumprod(beta_schedule)
    assert mine.dtype == torch.float64 and mine.shape == (T,)
    # diffusers builds its betas in float32, we build them in float64.
    torch.testing.assert_close(mine[:-1], theirs[:-1], rtol=1e-6, atol=0)
    # The cosine schedule's last beta is the 0.999 cap, which float32 stores as 0.99900001:
    # 1 - beta then differs by 1.3e-5 relative. The other tables match to 1e-6 there too.
    torch.testing.assert_close(mine[-1:], theirs[-1:], rtol=2e-5, atol=0)


def test_default_linear_schedule_is_ddpm_betas_1e4_to_0_02():
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(schedules.linear().alphas_cumprod, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(VP_SCHEDULES))
def test_vp_schedules_preserve_variance_at_any_time(name):
    schedule = VP_SCHEDULES[name]
    t = torch.cat([INTEGER_T, torch.linspace(0, 999, 777, dtype=torch.float64)])
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    assert schedule.kind == "vp" and schedule.t_max == 999.0 and schedule.t_min == 0.0


@pytest.mark.parametrize("name", list(VP_SCHEDULES))
def test_alpha_at_integer_time_is_sqrt_alphas_cumprod(name):
    schedule = VP_SCHEDULES[name]
    ab = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.alpha(INTEGER_T), ab.sqrt(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(schedule.sigma(INTEGER_T), (1 - ab).sqrt(), rtol=1e-12, atol=1e-15)
    assert float(schedule.alpha(0)) == pytest.approx(math.sqrt(float(ab[0])), rel=1e-14)


def test_fractional_time_interpolates_log_snr_linearly_between_steps():
    schedule = schedules.scaled_linear()
    lam = table(schedule)
    for t in [0.25, 10.5, 499.9, 998.75]:
        lo, frac = math.floor(t), t - math.floor(t)
        expected = (1 - frac) * lam[lo] + frac * lam[lo + 1]
        assert float(schedule.log_snr(t)) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(schedule.log_snr(INTEGER_T), lam)


@pytest.mark.parametrize("name", list(VP_SCHEDULES))
def test_log_snr_decreases_and_noise_increases_with_time(name):
    schedule = VP_SCHEDULES[name]
    t = torch.linspace(0, 999, 5001, dtype=torch.float64)
    lam = schedule.log_snr(t)
    finite = torch.isfinite(lam)
    assert torch.all(lam[finite].diff() < 0)
    assert torch.all(schedule.alpha(t).diff() <= 0) and torch.all(schedule.sigma(t).diff() >= 0)
    level = schedule.noise_level(t)  # inf at pure noise, where diff() would give nan
    assert torch.all(level[1:] >= level[:-1])


def test_time_outside_the_table_is_clamped():
    schedule = schedules.linear()
    assert float(schedule.log_snr(-5.0)) == float(schedule.log_snr(0.0))
    assert float(schedule.log_snr(2000.0)) == float(schedule.log_snr(999.0))


def test_noise_level_is_sigma_over_alpha():
    t = torch.linspace(1, 999, 50, dtype=torch.float64)
    for schedule in [schedules.cosine(), schedules.flow()]:
        expected = schedule.sigma(t) / schedule.alpha(t)
        torch.testing.assert_close(schedule.noise_level(t), expected, rtol=1e-10, atol=0)


def test_results_come_back_in_the_callers_floating_dtype():
    schedule = schedules.linear()
    assert schedule.alpha(torch.tensor([3.0])).dtype == torch.float32
    assert schedule.alpha(3.0).dtype == torch.float64
    assert schedule.alpha(torch.tensor([3])).dtype == torch.float64
    assert schedules.flow().sigma(torch.tensor([3.0], dtype=torch.float16)).dtype == torch.float16


# --------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("name", list(VP_SCHEDULES))
def test_t_from_log_snr_inverts_log_snr_on_vp_schedules(name):
    schedule = VP_SCHEDULES[name]
    t = torch.tensor([0.0, 0.3, 1.0, 17.25, 250.0, 500.5, 777.7, 997.0], dtype=torch.float64)
    back = schedule.t_from_log_snr(schedule.log_snr(t))
    torch.testing.assert_close(back, t, rtol=0, atol=1e-9)


def test_t_from_log_snr_inverts_log_snr_on_flow():
    for schedule in [schedules.flow(), schedules.flow(shift=3.0)]:
        t = torch.tensor([1.0, 2.5, 100.0, 500.0, 900.0, 999.0, 1000.0], dtype=torch.float64)
        back = schedule.t_from_log_snr(schedule.log_snr(t))
        torch.testing.assert_close(back, t, rtol=1e-12, atol=1e-9)


def test_t_from_log_snr_clamps_outside_the_schedule_range():
    vp = schedules.linear()
    lam = torch.tensor([100.0, math.inf, -100.0, -math.inf], dtype=torch.float64)
    assert vp.t_from_log_snr(lam).tolist() == [0.0, 0.0, 999.0, 999.0]
    fl = schedules.flow()
    assert fl.t_from_log_snr(lam).tolist() == [fl.t_min, fl.t_min, 1000.0, 1000.0]
    assert fl.t_min == 1.0 and fl.t_max == 1000.0


# --------------------------------------------------------------------------- zero terminal SNR


@pytest.mark.parametrize("base", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_alpha(base):
    original = VP_SCHEDULES[base]
    rescaled = schedules.zero_terminal_snr(original)
    lam = rescaled.log_snr(INTEGER_T)
    assert lam[-1].item() == -math.inf and torch.isfinite(lam[:-1]).all()
    assert float(rescaled.alpha(999)) == 0.0 and float(rescaled.sigma(999)) == 1.0
    assert float(rescaled.alpha(0)) == pytest.approx(float(original.alpha(0)), rel=1e-14)
    # sqrt(alpha_bar) is an affine map of the original one (Lin et al., Algorithm 1).
    a, b = original.alphas_cumprod.sqrt(), rescaled.alphas_cumprod.sqrt()
    expected = (a - a[-1]) * a[0] / (a[0] - a[-1])
    torch.testing.assert_close(b, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "ours,beta_schedule",
    [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")],
)
def test_zero_terminal_snr_matches_diffusers_rescale_zero_terminal_betas(ours, beta_schedule):
    mine = schedules.zero_terminal_snr(VP_SCHEDULES[ours]).alphas_cumprod
    theirs = diffusers_alphas_cumprod(beta_schedule, rescale_betas_zero_snr=True)
    assert theirs[-1].item() == 0.0 and mine[-1].item() == 0.0
    # diffusers subtracts in float32, so the tiny tail values carry absolute float32 error.
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_zero_terminal_snr_flag_of_the_constructors_equals_the_function():
    for make in [schedules.linear, schedules.scaled_linear, schedules.cosine]:
        flagged = make(zero_terminal_snr=True).alphas_cumprod
        torch.testing.assert_close(flagged, schedules.zero_terminal_snr(make()).alphas_cumprod)


def test_zero_terminal_snr_log_snr_is_finite_before_the_last_step_and_inverts_there():
    schedule = schedules.linear(zero_terminal_snr=True)
    lam = schedule.log_snr(torch.tensor([998.0, 998.5, 999.0], dtype=torch.float64))
    assert math.isfinite(lam[0]) and lam[1] == -math.inf and lam[2] == -math.inf
    assert schedule.t_from_log_snr(-math.inf).item() == 999.0
    assert schedule.t_from_log_snr(lam[0]).item() == pytest.approx(998.0, abs=1e-9)


# --------------------------------------------------------------------------- flow


def test_flow_is_the_straight_path_alpha_1_minus_s_sigma_s():
    schedule = schedules.flow()
    t = torch.linspace(0, 1000, 41, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(t), 1 - t / 1000)
    torch.testing.assert_close(schedule.sigma(t), t / 1000)
    assert schedule.kind == "flow" and schedule.train_steps == 1000 and schedule.shift == 1.0
    assert schedule.log_snr(1000.0).item() == -math.inf
    assert schedule.log_snr(0.0).item() == math.inf
    assert schedule.log_snr(500.0).item() == pytest.approx(0.0, abs=1e-12)
    s = 0.2
    assert schedule.noise_level(1000 * s).item() == pytest.approx(s / (1 - s), rel=1e-12)


def test_flow_model_time_unit_follows_train_steps():
    schedule = schedules.flow(train_steps=100)
    assert schedule.t_max == 100.0
    assert schedule.sigma(25.0).item() == pytest.approx(0.25)


def test_flow_shift_is_stored_and_does_not_change_the_path():
    shifted, plain = schedules.flow(shift=3.0), schedules.flow()
    t = torch.linspace(0, 1000, 11, dtype=torch.float64)
    assert shifted.shift == 3.0
    torch.testing.assert_close(shifted.alpha(t), plain.alpha(t))


# --------------------------------------------------------------------------- time shifts


def test_shift_time_fixes_both_ends():
    for shift in [0.3, 1.0, 3.0, 10.0]:
        assert schedules.shift_time(0.0, shift).item() == 0.0
        assert schedules.shift_time(1.0, shift).item() == pytest.approx(1.0, abs=1e-15)


def test_shift_time_is_monotone_and_shift_above_one_raises_noise():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    inner = u[1:-1]
    for shift in [0.25, 2.0, 3.0, 8.0]:
        assert torch.all(schedules.shift_time(u, shift).diff() > 0)
    assert torch.all(schedules.shift_time(inner, 3.0) > inner)
    assert torch.all(schedules.shift_time(inner, 0.5) < inner)
    torch.testing.assert_close(schedules.shift_time(u, 1.0), u)
    # Larger shifts give more noise at every interior point.
    assert torch.all(schedules.shift_time(inner, 4.0) > schedules.shift_time(inner, 2.0))


def test_shift_time_multiplies_the_noise_odds_by_the_shift_and_one_over_shift_undoes_it():
    u = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    shifted = schedules.shift_time(u, 3.0)
    torch.testing.assert_close(shifted / (1 - shifted), 3.0 * u / (1 - u))
    torch.testing.assert_close(schedules.shift_time(shifted, 1 / 3.0), u)
    assert schedules.shift_time(0.5, 3.0).item() == pytest.approx(0.75)


def test_resolution_shift_grows_with_sqrt_of_the_token_ratio():
    assert schedules.resolution_shift(256) == pytest.approx(1.0)
    assert schedules.resolution_shift(1024) == pytest.approx(2.0)
    assert schedules.resolution_shift(64) == pytest.approx(0.5)
    assert schedules.resolution_shift(4096, base_tokens=1024, base_shift=3.0) == pytest.approx(6.0)
    ratio = schedules.resolution_shift(9 * 300, 300, 1.7) / schedules.resolution_shift(
        300, 300, 1.7
    )
    assert ratio == pytest.approx(3.0)


# --------------------------------------------------------------------------- levels


def test_levels_carry_time_alpha_and_sigma_of_the_schedule():
    schedule = schedules.cosine()
    t = torch.tensor([999.0, 500.5, 10.0], dtype=torch.float64)
    out = schedules.levels(schedule, t)
    assert [lv.t for lv in out] == t.tolist()
    assert all(isinstance(lv.alpha, float) and lv.model_scale == 1.0 for lv in out)
    assert [lv.alpha for lv in out] == pytest.approx(schedule.alpha(t).tolist(), rel=1e-15)
    assert [lv.sigma for lv in out] == pytest.approx(schedule.sigma(t).tolist(), rel=1e-15)
    assert [lv.lam for lv in out] == pytest.approx((0.5 * schedule.log_snr(t)).tolist(), rel=1e-9)
    assert [lv.noise_level for lv in out] == pytest.approx(
        schedule.noise_level(t).tolist(), rel=1e-9
    )


def test_level_lam_and_noise_level_at_the_ends():
    assert Level(t=0.0, alpha=1.0, sigma=0.0) == CLEAN
    assert CLEAN.lam == math.inf and CLEAN.noise_level == 0.0
    pure = Level(t=1000.0, alpha=0.0, sigma=1.0)
    assert pure.lam == -math.inf and pure.noise_level == math.inf
    level = Level(t=1.0, alpha=0.6, sigma=0.8)
    assert level.lam == pytest.approx(math.log(0.75)) and level.noise_level == pytest.approx(4 / 3)
    flow_end = schedules.levels(schedules.flow(), torch.tensor([1000.0]))[0]
    assert flow_end.alpha == 0.0 and flow_end.lam == -math.inf


# --------------------------------------------------------------------------- bad inputs


def test_non_monotone_or_out_of_range_alphas_cumprod_raise():
    with pytest.raises(ValueError, match="non-increasing"):
        schedules.DiscreteVP(torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedules.DiscreteVP(torch.tensor([1.2, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedules.DiscreteVP(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="at least 2"):
        schedules.DiscreteVP(torch.tensor([0.5]))


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan])
def test_non_positive_shift_raises(shift):
    with pytest.raises(ValueError, match="shift"):
        schedules.flow(shift=shift)
    with pytest.raises(ValueError, match="shift"):
        schedules.DiscreteVP(schedules.linear().alphas_cumprod, shift=shift)
    with pytest.raises(ValueError, match="shift"):
        schedules.shift_time(torch.tensor([0.5]), shift)
    with pytest.raises(ValueError, match="shift"):
        schedules.resolution_shift(1024, base_shift=shift)


def test_non_positive_token_counts_raise():
    with pytest.raises(ValueError, match="positive"):
        schedules.resolution_shift(0)
    with pytest.raises(ValueError, match="positive"):
        schedules.resolution_shift(256, base_tokens=-4)


def test_schedules_are_immutable_values():
    schedule = schedules.linear()
    with pytest.raises(AttributeError):
        schedule.shift = 2.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        schedules.flow().shift = 2.0  # type: ignore[misc]
