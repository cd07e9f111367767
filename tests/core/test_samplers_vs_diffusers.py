"""polydiff's samplers agree with diffusers' schedulers on the same schedule, grid and model.

diffusers is a test-only dependency. Each case runs diffusers' own scheduler loop and
``polydiff.core.sample`` with the same alphas, the same timesteps, the same deterministic model
and the same starting state, and asks for relative error <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from polydiff.core import CFG, sample, schedules  # noqa: E402

STEPS = 10
SHAPE = (2, 4, 8, 8)


def smooth_model(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None):
    """A fixed, nonlinear, time-dependent stand-in for a trained denoiser."""
    assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
    scale = (1.0 + t / 1000.0).view(-1, 1, 1, 1)
    out = torch.tanh(0.7 * x + 0.1 * x.roll(1, dims=-1)) * scale
    if label is not None:
        out = out + 0.3 * label.view(-1, 1, 1, 1)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run_diffusers(scheduler, latents, timesteps=None, generator=None, cond=None, scale=1.0):
    """diffusers' standard denoising loop (what its pipelines do), CFG in the model's space."""
    x = latents
    for t in timesteps if timesteps is not None else scheduler.timesteps:
        scale_input = getattr(scheduler, "scale_model_input", None)  # flow matching has none
        inp = scale_input(x, t) if scale_input else x
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
        if cond is None:
            out = smooth_model(inp, tt)
        else:
            c, u = cond
            out_u = smooth_model(inp, tt, u)
            out = out_u + scale * (smooth_model(inp, tt, c) - out_u)
        extra = {} if generator is None else {"generator": generator}
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def vp_pair(scheduler_cls, **config):
    scheduler = scheduler_cls(
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        **config,
    )
    scheduler.set_timesteps(STEPS)
    ours = schedules.DiscreteVP(scheduler.alphas_cumprod)
    return scheduler, ours


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers_without_clipping(prediction):
    sched, ours = vp_pair(
        diffusers.DDIMScheduler,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type=prediction,
    )
    z = noise()
    ref = run_diffusers(sched, z)
    got = sample(
        smooth_model,
        z,
        schedule=ours,
        sampler="ddim",
        timesteps=sched.timesteps,
        prediction="eps" if prediction == "epsilon" else "v",
    )
    assert rel_err(got, ref) <= 1e-5


def _ve_start(sched, z):
    # diffusers' Euler/Heun keep the state divided by alpha (EDM's x / alpha).
    alpha0 = sched.alphas_cumprod[int(sched.timesteps[0])].double().sqrt().item()
    return z / alpha0


def test_euler_matches_diffusers():
    sched, ours = vp_pair(diffusers.EulerDiscreteScheduler)
    z = noise()
    ref = run_diffusers(sched, _ve_start(sched, z))
    got = sample(smooth_model, z, schedule=ours, sampler="euler", timesteps=sched.timesteps)
    assert rel_err(got, ref) <= 1e-5


def test_euler_ancestral_matches_diffusers_with_the_same_generator():
    sched, ours = vp_pair(diffusers.EulerAncestralDiscreteScheduler)
    z = noise()
    ref = run_diffusers(sched, _ve_start(sched, z), generator=torch.Generator().manual_seed(7))
    got = sample(
        smooth_model,
        z,
        schedule=ours,
        sampler="euler_ancestral",
        timesteps=sched.timesteps,
        generator=torch.Generator().manual_seed(7),
    )
    assert rel_err(got, ref) <= 1e-5


def test_heun_matches_diffusers():
    sched, ours = vp_pair(diffusers.HeunDiscreteScheduler)
    z = noise()
    ref = run_diffusers(sched, _ve_start(sched, z))
    grid = torch.unique_consecutive(sched.timesteps)
    assert len(grid) == STEPS
    calls = []
    got = sample(
        smooth_model,
        z,
        schedule=ours,
        sampler="heun",
        timesteps=grid,
        callback=lambda *a: calls.append(a[0]),
    )
    assert rel_err(got, ref) <= 1e-5
    assert len(calls) == 2 * STEPS - 1


@pytest.mark.parametrize("sampler,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_dpm_solver_pp_multistep_matches_diffusers(sampler, order):
    sched, ours = vp_pair(
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver++",
        solver_order=order,
        final_sigmas_type="zero",
        lower_order_final=False,
    )
    z = noise()
    ref = run_diffusers(sched, z)
    got = sample(smooth_model, z, schedule=ours, sampler=sampler, timesteps=sched.timesteps)
    assert rel_err(got, ref) <= 1e-5


def test_dpm_solver_pp_matches_diffusers_on_karras_sigmas():
    sched, ours = vp_pair(
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        use_karras_sigmas=True,
    )
    z = noise()
    ref = run_diffusers(sched, z)
    # diffusers rounds the model's timesteps but steps on the exact Karras sigmas; pass the
    # sigmas' own times so both integrate the same ODE on the same grid.
    sigmas = sched.sigmas[:-1].double()
    t = ours.t_from_log_snr(-2 * torch.log(sigmas))
    got = sample(
        lambda x, tt: smooth_model(x, _rounded_like(tt, sched)),
        z,
        schedule=ours,
        sampler="dpmpp_2m",
        timesteps=t,
    )
    assert rel_err(got, ref) <= 1e-5


def _rounded_like(t: torch.Tensor, sched) -> torch.Tensor:
    # The model sees the rounded timestep diffusers passes; the update uses the exact sigma.
    return t.round()


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers(order):
    sched, ours = vp_pair(
        diffusers.UniPCMultistepScheduler,
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        final_sigmas_type="zero",
    )
    z = noise()
    if order == 3:  # unguided: polydiff's unipc runs order 3
        ref = run_diffusers(sched, z)
        got = sample(smooth_model, z, schedule=ours, sampler="unipc", timesteps=sched.timesteps)
    else:  # guided: polydiff's unipc runs order 2, as DPM-Solver advises with guidance
        c, u = torch.tensor([1.0, -1.0]), torch.zeros(2)
        ref = run_diffusers(sched, z, cond=(c, u), scale=4.0)
        got = sample(
            smooth_model,
            z,
            schedule=ours,
            sampler="unipc",
            timesteps=sched.timesteps,
            guidance=CFG(4.0),
            cond={"label": c},
            uncond={"label": u},
        )
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_matches_diffusers(shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(STEPS)
    z = noise()
    ref = run_diffusers(sched, z)
    got = sample(
        smooth_model,
        z,
        schedule=schedules.flow(shift=shift),
        sampler="euler",
        prediction="flow",
        timesteps=sched.timesteps,
    )
    assert rel_err(got, ref) <= 1e-5


def test_flow_match_euler_grid_is_polydiffs_flow_shift_spacing():
    from polydiff.core import timesteps

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(STEPS)
    ours = timesteps(schedules.flow(shift=3.0), STEPS)
    # diffusers stops its linspace at 1/1000 rather than 0; both start at pure noise.
    assert ours[0].item() == pytest.approx(1000.0)
    assert sched.timesteps[0].item() == pytest.approx(1000.0)


def test_lcm_matches_diffusers_with_the_same_generator():
    sched = diffusers.LCMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    sched.set_timesteps(4)
    ours = schedules.DiscreteVP(sched.alphas_cumprod)
    z = noise()
    ref = run_diffusers(sched, z, generator=torch.Generator().manual_seed(3))
    got = sample(
        smooth_model,
        z,
        schedule=ours,
        sampler="lcm",
        timesteps=sched.timesteps,
        generator=torch.Generator().manual_seed(3),
    )
    # diffusers also applies LCM's boundary condition, which is < 1e-7 at these timesteps.
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_polydiff_spacings_reproduce_diffusers_multistep_grids(spacing):
    from polydiff.core import timesteps

    for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler):
        sched = cls(beta_schedule="linear", timestep_spacing=spacing)
        for steps in (5, 10, 25):
            sched.set_timesteps(steps)
            ours = timesteps(schedules.linear(), steps, spacing)
            assert ours.tolist() == sched.timesteps.tolist(), (cls.__name__, steps)
